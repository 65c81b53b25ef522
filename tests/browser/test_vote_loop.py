"""The loop from votes back into training in a real Chromium: blind votes on a finished comparison, a preference
dataset made of them, "Train DPO on these votes" filling the New run page, and the run training to success on a
real worker."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import fill_setting
from tests.webapp.factories import make_run
from webapp.playground import services
from webapp.playground.models import AdapterJob, Comparison, PromptSet, VoteDataset
from webapp.training.models import Adapter, TrainingRun
from workers.contract import jobspecs
from workers.contract.store import ArtifactStore

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
PROMPTS = ("What is 2 + 3?", "Double 4", "Half of 8")
GOOD, BAD = ("5", "8", "4"), ("<b>seven</b>", "nine", "zero")


def saved_adapter(model_dir: Path, store: Path, config) -> str:  # type: ignore[no-untyped-def]
    """A fresh LoRA of the tiny model with the LoRA config's settings, saved in the store: a run may start from it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    params = config.lora_params()
    lora = LoraConfig(r=params.r, lora_alpha=params.alpha, lora_dropout=params.dropout, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    uri = "store://adapters/arith"
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora).save_pretrained(ArtifactStore(store).path(uri))
    return uri


def finished_comparison(demo, uri: str) -> tuple[Comparison, Adapter]:  # type: ignore[no-untyped-def]
    """The base and an adapter trained by an earlier run, on three prompts, every output stored and the job
    succeeded (no worker needed)."""
    user, base, dataset, config = demo
    earlier = make_run(user, base, dataset, config)
    TrainingRun.objects.filter(pk=earlier.pk).update(state="succeeded")
    adapter = Adapter.objects.create(name="arith-adapter", owner=user, base_model=base, run=earlier, rank=16, uri=uri,
                                     size_bytes=4096, sha256="0" * 64, trainable_params=10, total_params=100)
    prompts = PromptSet.objects.create(name="three", owner=user, rows=[{"prompt": p, "reference": ""} for p in PROMPTS])
    comparison = services.start_compare(user, prompts, [adapter], jobspecs.GenerationParams(max_new_tokens=8),
                                        name="arith")
    comparison.store_outputs(
        [{"row": r, "column": adapter.key, "text": GOOD[r]} for r in range(3)]
        + [{"row": r, "column": jobspecs.BASE_KEY, "text": BAD[r]} for r in range(3)])
    AdapterJob.objects.filter(pk=comparison.job_id).update(state="succeeded")
    return comparison, adapter


def test_votes_become_a_preference_dataset_and_a_dpo_run_that_trains(  # type: ignore[no-untyped-def]
    page, demo, worker_process, scheduler, screenshot, tiny_model_dir, shared_store
) -> None:
    started = time.monotonic()
    user, base, _, config = demo
    comparison, adapter = finished_comparison(demo, saved_adapter(tiny_model_dir, shared_store, config))

    page.goto(f"/compare/{comparison.pk}/vote/")
    for row in (0, 1):  # the adapter's answer wins rows 0 and 1; row 2 stays unvoted
        best = comparison.blind_order(user.pk, row).index(adapter.key) + 1
        section = page.locator(f"#vote-row-{row}")
        section.get_by_role("button", name=f"Output {best} is best").click()
        expect(section).to_contain_text("Your vote: arith-adapter")

    page.goto(f"/compare/{comparison.pk}/")
    expect(page.locator("#pair-figures")).to_have_text("2 pairs from 2 rows; 1 row unvoted left out")
    page.locator(f"#thumbs-2-{adapter.key}").get_by_role("button", name=re.compile("👍")).click()  # htmx, in place
    expect(page.locator(f"#thumbs-2-{adapter.key} .thumb.up")).to_have_attribute("aria-pressed", "true")
    page.get_by_role("button", name="Make a preference dataset").click()
    page.wait_for_url(re.compile(r"/datasets/\d+/$"))
    expect(page.locator("#dataset-source")).to_contain_text("Made from comparison arith's 2 blind votes")
    expect(page.locator("#source-figures")).to_have_text("2 pairs from 2 rows; 1 row unvoted left out.")
    screenshot(page, "vote-dataset")
    source = VoteDataset.objects.select_related("dataset").get()
    assert (source.dataset.name, source.dataset.format, source.dataset.row_count) == ("votes of arith", "preference", 2)

    page.get_by_role("link", name="Train DPO on these votes").click()
    expect(page.get_by_role("heading", name="New training run")).to_be_visible()
    expect(page.get_by_label("What training optimizes")).to_have_value("dpo")
    expect(page.get_by_label("Dataset", exact=True)).to_have_value(str(source.dataset_id))
    expect(page.get_by_label("Base model", exact=True)).to_have_value(str(base.pk))
    expect(page.get_by_label("Start from adapter", exact=True)).to_have_value(str(adapter.pk))
    page.get_by_label("LoRA config").select_option(label=config.name)
    for name, value in (("max_steps", 4), ("eval_fraction", 0), ("batch_size", 2)):
        fill_setting(page.locator(f"#id_{name}"), str(value))
    page.get_by_role("button", name="Train").click()
    page.wait_for_url(re.compile(r"/runs/\d+/$"))

    run = TrainingRun.objects.exclude(adapter=adapter).get()
    assert (run.dataset_id, run.base_model_id, run.hyperparameters["objective"]) == (source.dataset_id, base.pk, "dpo")
    assert run.init_adapter_id == adapter.pk  # warm-started from the adapter that won the votes
    expect(page.locator("#run-state")).to_have_text("succeeded", timeout=90_000)
    screenshot(page, "vote-dpo-run")
    trained = Adapter.objects.get(run=run)
    page.goto(f"/adapters/{trained.pk}/")
    expect(page.locator("#vote-lineage")).to_contain_text("made from comparison arith's 2 votes")
    assert not page.dialogs  # type: ignore[attr-defined]
    assert time.monotonic() - started < 90
