"""Adapter pages in a real Chromium over ASGI: the comparison grid filling live from a worker's reports,
escaped, and blind voting with htmx; the pages render without CSP violations."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import expect

from tests.webapp.factories import make_worker
from webapp.jobs import ledger
from webapp.playground import services
from webapp.playground.models import PromptSet
from webapp.training.models import Adapter
from workers.contract import jobspecs

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
HOSTILE = "<img src=x onerror=alert(1)>"


def adapters(user, base) -> list[Adapter]:  # type: ignore[no-untyped-def]
    return [
        Adapter.objects.create(name=name, owner=user, base_model=base, rank=8, uri=f"store://adapters/{name}",
                               size_bytes=4096, sha256="0" * 64, trainable_params=10, total_params=100)
        for name in ("add-adapter", "double-adapter")
    ]


def console_errors(page) -> list[str]:  # type: ignore[no-untyped-def]
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    return errors


def test_a_comparison_streams_into_its_grid_and_teammates_vote_blind(page, demo, asgi_server, screenshot) -> None:  # type: ignore[no-untyped-def]
    user, base, _, _ = demo
    add, double = adapters(user, base)
    prompts = PromptSet.objects.create(name="two", owner=user, rows=[
        {"prompt": "What is 2 + 3?", "reference": "5"}, {"prompt": "Double 4", "reference": "8"}])
    comparison = services.start_compare(user, prompts, [add, double], jobspecs.GenerationParams(max_new_tokens=8))
    worker, token = make_worker("compare-worker")
    job = comparison.job
    attempt = ledger.dispatch(job, worker)
    api = httpx.Client(base_url=asgi_server, headers={"Authorization": f"Bearer {token}"}, timeout=15)
    url = f"/api/worker/v1/adapter-jobs/{job.pk}"
    assert api.post(f"{url}/claim", json={"attempt": attempt}).status_code == 200
    assert api.post(f"{url}/status", json={"attempt": attempt, "state": "running"}).status_code == 200

    errors = console_errors(page)
    page.goto(f"/compare/{comparison.pk}/")
    expect(page.get_by_role("heading", name=str(comparison))).to_be_visible()
    page.wait_for_timeout(1000)  # let the event stream connect
    cell = page.locator(f"#cell-0-{add.key}")
    events = [{"seq": 1, "kind": "output", "data": {"row": 0, "column": add.key, "text": "5"}},
              {"seq": 2, "kind": "output", "data": {"row": 0, "column": double.key, "text": HOSTILE}}]
    assert api.post(f"{url}/events", json={"attempt": attempt, "events": events}).status_code == 200
    expect(cell).to_have_text("5")  # live, through the stream
    more = [{"seq": 3, "kind": "output", "data": {"row": 0, "column": add.key, "text": " apples\n"}}]
    api.post(f"{url}/events", json={"attempt": attempt, "events": more})
    expect(cell).to_have_text("5 apples\n")
    hostile = page.locator(f"#cell-0-{double.key}")
    expect(hostile).to_have_text(HOSTILE)
    assert page.locator("#compare-grid img, #compare-grid script").count() == 0

    outputs = [{"row": r, "column": c, "text": t} for r, c, t in (
        (0, "__base__", "hmm"), (0, add.key, "5 apples\n"), (0, double.key, HOSTILE),
        (1, "__base__", "four"), (1, add.key, "6"), (1, double.key, "8"))]
    reply = api.post(f"{url}/status", json={"attempt": attempt, "state": "succeeded", "result": {"outputs": outputs}})
    assert reply.status_code == 200
    expect(page.locator("#compare-state")).to_have_text("succeeded", timeout=15_000)  # the page refreshes itself
    expect(page.locator(f"#cell-1-{double.key}")).to_have_text("8")
    screenshot(page, "comparison-grid")

    page.get_by_role("link", name="Vote blind").click()
    row = page.locator("#vote-row-1")
    expect(row).not_to_contain_text("double-adapter")  # names hidden before the vote
    order = comparison.blind_order(user.pk, 1)
    best = order.index(double.key) + 1
    row.get_by_role("button", name=f"Output {best} is best").click()
    expect(row).to_contain_text("Your vote: double-adapter")  # swapped in place by htmx, names revealed
    screenshot(page, "comparison-vote")
    page.goto(f"/compare/{comparison.pk}/")
    expect(page.locator("#win-rates")).to_contain_text("100.0%")
    assert page.dialogs == [] and errors == [], errors  # type: ignore[attr-defined]


def test_adapter_pages_render_without_errors(page, demo, screenshot) -> None:  # type: ignore[no-untyped-def]
    user, base, _, _ = demo
    add, double = adapters(user, base)
    errors = console_errors(page)
    for path, heading, name in [
        ("/adapters/", "Adapters", "adapters-list"),
        (f"/adapters/{add.pk}/", f"Adapter · {add}", "adapter-detail"),
        (f"/compare/new/?adapters={add.pk}&adapters={double.pk}", "New comparison", "compare-new"),
        ("/compare/", "Comparisons", "comparisons"),
        (f"/adapters/combine/?adapters={add.pk}&adapters={double.pk}", "Combine adapters", "combine-new"),
        (f"/evaluations/new/?adapters={add.pk}", "Evaluate adapters", "evaluate-new"),
        ("/jobs/", "Adapter jobs", "jobs"),
    ]:
        response = page.goto(path, wait_until="domcontentloaded")
        assert response is not None and response.status == 200, path
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
        screenshot(page, name)
    # A merge started from the adapter page lands on its job page, queued.
    page.goto(f"/adapters/{add.pk}/")
    page.get_by_role("button", name="Merge into the base").click()
    expect(page.locator("#job-state")).to_have_text("queued")
    screenshot(page, "merge-job-queued")
    assert errors == [], errors


def test_a_vllm_export_from_the_adapter_page_waits_for_a_worker_with_vllm(page, demo, scheduler, screenshot) -> None:  # type: ignore[no-untyped-def]
    user, base, _, _ = demo
    add, _ = adapters(user, base)
    make_worker("no-vllm")  # online, but its inventory reports no vLLM
    errors = console_errors(page)
    page.goto(f"/adapters/{add.pk}/")
    card = page.locator("#vllm-form")
    expect(card).to_contain_text("No online worker reports vLLM")
    card.get_by_label("Form").select_option("adapter")
    card.get_by_label("Name").fill("adder")
    card.get_by_label("Check prompts").fill("What is 2 + 3?\n\nDouble 4\n")
    screenshot(page, "adapter-vllm-export")
    card.get_by_role("button", name="Export and check in vLLM").click()
    expect(page.locator("#job-state")).to_have_text("queued")
    expect(page.locator("main")).to_contain_text("needs a worker with vLLM installed", timeout=15_000)  # live
    screenshot(page, "vllm-export-waiting")
    job = services.AdapterJob.objects.get(kind="export")
    assert (job.params["target"], job.params["check_prompts"]) == ("vllm", ["What is 2 + 3?", "Double 4"])
    assert errors == [], errors
