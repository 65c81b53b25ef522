"""Organising in a real Chromium: moving an alias on the adapter page, a required evaluation refusing a worse adapter
(the refusal and its scores shown, the alias unchanged); tags and a note edited inline with htmx, and a chip that
filters the runs list. No CSP violation on the way."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.webapp.evaluations import record_evaluation
from tests.webapp.factories import make_run
from webapp.catalog.models import Dataset
from webapp.playground.models import AdapterAlias
from webapp.training.models import Adapter

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def console_errors(page) -> list[str]:  # type: ignore[no-untyped-def]
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    return errors


def adapter(user, base, name: str) -> Adapter:  # type: ignore[no-untyped-def]
    return Adapter.objects.create(name=name, owner=user, base_model=base, rank=8, uri=f"store://adapters/{name}",
                                  size_bytes=4096, sha256="0" * 64, trainable_params=10, total_params=100)


def test_a_required_evaluation_refuses_a_worse_adapter_on_the_page(page, demo, screenshot) -> None:  # type: ignore[no-untyped-def]
    user, base, _, _ = demo
    holder, worse = adapter(user, base, "holder-adapter"), adapter(user, base, "worse-adapter")
    evalset = Dataset.objects.create(name="qa-eval", uri="store://datasets/qa.jsonl", original_filename="qa.jsonl",
                                     format="alpaca", row_count=50, size_bytes=100, sha256="0" * 64)
    record_evaluation(user, evalset, {holder: {"rouge_l": 0.62}, worse: {"rouge_l": 0.41}})
    errors = console_errors(page)

    page.goto(f"/adapters/{holder.pk}/")
    page.get_by_label("Point alias").fill("production")
    page.locator("#alias-move").click()
    expect(page.locator(".flash")).to_contain_text("production moved to holder-adapter")
    expect(page.locator("#aliases-held")).to_contain_text("This adapter is production")

    page.goto(f"/adapters/{worse.pk}/")
    page.get_by_label("Point alias").fill("production")
    page.get_by_label("Only if it beats the current holder").check()
    page.get_by_label("On evaluation set").select_option(label="qa-eval")
    page.get_by_label("Score").select_option("rouge_l")
    page.get_by_label("By at least").fill("0.02")
    page.locator("#alias-move").click()

    flash = page.locator(".flash")
    expect(flash).to_contain_text("Not moved: worse-adapter does not beat the current holder by 0.02")
    expect(flash).to_contain_text("worse-adapter 0.41 vs the current holder holder-adapter 0.62")
    expect(page.locator("#aliases-held")).to_contain_text("No alias points at this adapter.")
    expect(page.locator('#alias-history tr[data-outcome="refused"]')).to_have_count(1)
    assert AdapterAlias.objects.get(base_model=base, name="production").adapter_id == holder.pk
    screenshot(page, "adapter-alias-refused")
    assert errors == []


def test_tags_and_a_note_edited_inline_filter_the_runs_list(page, demo, screenshot) -> None:  # type: ignore[no-untyped-def]
    user, base, dataset, config = demo
    tagged = make_run(user, base, dataset, config)
    other = make_run(user, base, dataset, config)
    tagged.name, other.name = "lr 2e-4", "lr 1e-3"
    tagged.save(update_fields=["name"])
    other.save(update_fields=["name"])
    errors = console_errors(page)

    page.goto(f"/runs/{tagged.pk}/")
    page.get_by_text("Edit tags and note").click()
    page.get_by_label("Tags").fill("baseline, Bad Tag!")
    page.get_by_label("Note").fill("<b>keep</b> this one")
    page.locator("#labels-save").click()
    expect(page.locator("#labels .error")).to_contain_text("'tag!' is not a tag")
    expect(page.get_by_label("Note")).to_have_value("<b>keep</b> this one")  # nothing typed is lost
    page.get_by_label("Tags").fill("baseline lr-sweep")
    page.locator("#labels-save").click()
    expect(page.locator("#labels .tag-chip")).to_have_count(2)
    expect(page.locator("#note")).to_have_text("<b>keep</b> this one")  # escaped, shown as typed
    screenshot(page, "run-tags-note")

    page.goto("/runs/")
    page.locator("#runs-rows .tag-chip", has_text="lr-sweep").click()
    expect(page).to_have_url(f"{page.url.split('/runs/')[0]}/runs/?tag=lr-sweep")
    expect(page.locator("#runs-rows tr")).to_have_count(1)
    expect(page.locator("#runs-rows")).to_contain_text("lr 2e-4")
    expect(page.locator("#active-tags")).to_contain_text("lr-sweep")
    screenshot(page, "runs-filtered-by-tag")
    assert errors == []
