"""The New run form in a real Chromium, under the real Content-Security-Policy: choosing an objective shows its
settings only, and the datasets it trains on."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import expect

from webapp.training.models import TrainingRun

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_choosing_dpo_hides_the_supervised_settings_shows_beta_and_fits_the_datasets(page, demo, screenshot) -> None:  # type: ignore[no-untyped-def]
    from webapp.catalog.services import register_dataset

    toy = demo[2]

    pairs = register_dataset("pairs", "pairs.jsonl", "".join(
        json.dumps({"prompt": f"What is {i} + 2?\n", "chosen": str(i + 2), "rejected": str(i + 3)}) + "\n"
        for i in range(12)).encode())
    refused: list[str] = []
    page.on("console", lambda message: refused.append(message.text) if "Content Security Policy" in message.text else None)
    response = page.goto("/runs/new/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    completion_only, beta = page.get_by_label("Completion only loss"), page.get_by_label("Beta")
    dataset = page.locator("#id_dataset")
    expect(completion_only).to_be_visible()
    expect(beta).to_be_hidden()  # sft, the default: the DPO settings are hidden
    expect(page.locator(f'#id_dataset option[value="{pairs.pk}"]')).to_be_disabled()

    page.get_by_label("What training optimizes").select_option("dpo")
    expect(beta).to_be_visible()
    expect(page.get_by_label("Dpo loss")).to_be_visible()
    expect(completion_only).to_be_hidden()
    expect(page.get_by_label("Learning rate")).to_be_visible()  # shared settings stay
    expect(page.locator("#objective-formats")).to_have_text("preference")
    expect(page.locator(f'#id_dataset option[value="{toy.pk}"]')).to_be_disabled()  # alpaca rows: not for dpo
    expect(page.locator(f'#id_dataset option[value="{pairs.pk}"]')).to_be_enabled()
    dataset.select_option(str(pairs.pk))
    screenshot(page, "new-run-dpo")

    beta.fill("0.25")
    page.get_by_role("button", name="Train").click()
    page.wait_for_url(re.compile(r"/runs/\d+/$"))
    run = TrainingRun.objects.get()
    assert (run.hyperparameters["objective"], run.hyperparameters["beta"], run.dataset_id) == ("dpo", 0.25, pairs.pk)
    assert not refused and not page.dialogs  # type: ignore[attr-defined]

    # The pairs' page: each prompt above its chosen and rejected answers, then tokenized as DPO trains them.
    page.goto(f"/datasets/{pairs.pk}/?base_model={demo[1].pk}&batching=pad&max_length=64&row=1")
    first = page.locator("article.preview-row").first
    expect(first.locator(".chosen pre")).to_have_text("2")
    expect(first.locator(".rejected pre")).to_have_text("3")
    expect(page.locator("article.rendered-pair")).to_have_count(3)
    screenshot(page, "dataset-pairs")
