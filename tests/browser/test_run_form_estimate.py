"""The New run form in a real Chromium, under the real Content-Security-Policy: settings folded in groups that
open from the keyboard, and an estimate panel that follows the fields (here: a larger batch, more memory)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from webapp.catalog.models import BaseModel
from webapp.fleet.models import Worker

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

GiB = 2**30
# A Llama of about a billion parameters (only its config is read; the tiny model's tokenizer beside it).
BIG_CONFIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
              "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}


def big_model(tiny_model_dir, models_root) -> BaseModel:  # type: ignore[no-untyped-def]
    folder = models_root / "big-llama"
    if not folder.exists():
        shutil.copytree(tiny_model_dir, folder)
        config = folder / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), **BIG_CONFIG}))
    return BaseModel.objects.create(name="big", source=str(folder), num_parameters=1_100_000_000, max_positions=2048,
                                    architecture="LlamaForCausalLM", model_type="llama")


def test_the_estimate_follows_the_batch_size(page, demo, tiny_model_dir, models_root, screenshot) -> None:  # type: ignore[no-untyped-def]
    big = big_model(tiny_model_dir, models_root)
    Worker.objects.create(name="h100-box", state="online", last_heartbeat=timezone.now(), inventory={
        "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total": 80 * GiB}]})
    Worker.objects.create(name="t4-box", state="online", last_heartbeat=timezone.now(), inventory={
        "gpus": [{"index": 0, "name": "NVIDIA T4", "memory_total": 16 * GiB}]})
    refused: list[str] = []
    page.on("console", lambda message: refused.append(message.text) if "Content Security Policy" in message.text else None)
    page.goto(f"/runs/new/?base_model={big.pk}")

    memory = page.locator("#estimate-memory")
    expect(memory).to_have_text(re.compile(r"GiB$"), timeout=30_000)  # the first asks tokenize the rows
    expect(page.locator("#estimate-workers")).to_contain_text("h100-box")
    expect(page.locator("#plan-micro-batch")).to_have_text("8")
    before = memory.inner_text()

    # The batch sits in a folded group: opened from the keyboard, its help one line under each setting.
    batch = page.get_by_label("Batch size")
    expect(batch).to_be_hidden()
    page.locator("#group-memory > summary").focus()
    page.keyboard.press("Enter")
    expect(batch).to_be_visible()
    batch.fill("48")
    # 48 rows a pass would need recomputation on the H100: the plan the worker will pick runs the step as 3 passes.
    expect(page.locator("#plan-micro-batch")).to_have_text("16")
    expect(page.locator("#run-estimate")).to_contain_text("micro-batch 16 x 3 for the 48 rows per optimizer step")
    expect(memory).not_to_have_text(before)
    after = memory.inner_text()
    assert float(after.split()[0]) > float(before.split()[0]), (before, after)

    # Another base model swaps its settings in: the open group stays open, the estimate follows.
    page.locator("#id_base_model").select_option(str(demo[1].pk))
    expect(page.locator("#group-memory")).to_have_attribute("open", "")
    expect(page.locator("#estimate-memory")).not_to_have_text(after)
    assert not refused and not page.dialogs, refused  # type: ignore[attr-defined]

    # Screenshots last (taking one leaves empty style attributes that a later swap would copy).
    page.goto(f"/runs/new/?base_model={big.pk}")
    expect(memory).to_have_text(re.compile(r"GiB$"))
    screenshot(page, "new-run")
    page.locator("#group-memory > summary").click()
    page.locator("#group-memory .info").first.focus()  # the batch size's whole help
    screenshot(page, "new-run-batching-open")
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"/runs/new/?base_model={big.pk}")
    expect(memory).to_have_text(re.compile(r"GiB$"))
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "new-run-phone")
