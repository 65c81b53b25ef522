"""The dashboard in a real Chromium, served over ASGI by uvicorn, with a real worker training the tiny model."""

from __future__ import annotations

import json
import re
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import PASSWORD, USERNAME, fill_setting, log_in
from tests.webapp.factories import make_run, make_worker
from webapp.jobs import ledger
from webapp.training.models import RunEvent, TrainingRun

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
FINAL = ("succeeded", "failed", "cancelled")
HOSTILE = "<img src=x onerror=alert(1)>"


def run_id_of(page) -> int:  # type: ignore[no-untyped-def]
    match = re.search(r"/runs/(\d+)/$", page.url)
    assert match, page.url
    return int(match.group(1))


def create_run_in_form(page, dataset, config, name: str, **fields: int) -> int:  # type: ignore[no-untyped-def]
    """Fill /runs/new/ keeping the suggested hyperparameters (overriding `fields`), press Train."""
    page.goto("/runs/new/")
    expect(page.get_by_role("heading", name="New training run")).to_be_visible()
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_label("Dataset").select_option(label=f"{dataset.name} ({dataset.format} rows)")
    page.get_by_label("LoRA config").select_option(label=config.name)
    for field, value in fields.items():
        fill_setting(page.get_by_label(field.replace("_", " ").capitalize(), exact=True), str(value))
    page.get_by_role("button", name="Train").click()
    page.wait_for_url(re.compile(r"/runs/\d+/$"))
    return run_id_of(page)


def log_ids(page) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(i.removeprefix("ev-")) for i in page.locator("#log [id^=ev-]").evaluate_all("els => els.map(e => e.id)")]


def db_log_ids(run_id: int) -> list[int]:
    return list(RunEvent.objects.filter(run_id=run_id).exclude(kind="metric").order_by("id").values_list("id", flat=True))


def chart_points(page) -> int:  # type: ignore[no-untyped-def]
    """Points drawn on the loss chart (charts.js writes how many steps it plots on the plot's element)."""
    plot = page.locator('#run-charts figure[data-title="Loss"] .chart-plot').first
    if not plot.count():
        return 0
    return int(plot.get_attribute("data-points") or 0)


def wait_until(predicate, timeout: float, what: str, poll: float = 0.25):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_state(run_id: int, states: tuple[str, ...], timeout: float = 90, until=None, worker=None) -> TrainingRun:  # type: ignore[no-untyped-def]
    def check() -> TrainingRun | None:
        run = TrainingRun.objects.get(pk=run_id)
        return run if run.state in states and (until is None or until(run)) else None

    try:
        return wait_until(check, timeout, f"run {run_id} to reach {states}")
    except AssertionError:
        run = TrainingRun.objects.get(pk=run_id)
        log = worker.log_path.read_text(errors="replace")[-3000:] if worker else ""
        raise AssertionError(f"run {run_id} still {run.state}: {[e.message for e in run.events.all()][-10:]}\n{log}") from None


def wait_while_training(run_id: int, states: tuple[str, ...], stall: float = 90, worker=None) -> TrainingRun:  # type: ignore[no-untyped-def]
    """Wait for the run to reach one of `states` for as long as it keeps making progress: fails only when neither
    its state nor its step has changed for `stall` seconds (the pace of a loaded CI machine is not the test's)."""
    last, since = None, time.monotonic()
    while True:
        run = TrainingRun.objects.get(pk=run_id)
        if run.state in states:
            return run
        if (run.state, run.step) != last:
            last, since = (run.state, run.step), time.monotonic()
        elif time.monotonic() - since > stall:
            log = worker.log_path.read_text(errors="replace")[-3000:] if worker else ""
            raise AssertionError(f"run {run_id} stalled at {last} for {stall}s: "
                                 f"{[e.message for e in run.events.all()][-10:]}\n{log}")
        time.sleep(0.5)


def test_login_through_the_form(context, demo, screenshot) -> None:  # type: ignore[no-untyped-def]
    page = context.new_page()
    page.goto("/runs/")
    page.wait_for_url(re.compile(r"/login/"))  # anonymous: sent to the login form
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    page.get_by_label("Username").fill(USERNAME)
    page.get_by_label("Password").fill("wrong-password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_text("did not match")).to_be_visible()
    screenshot(page, "login-error")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(re.compile(r"/runs/$"))  # ?next= honoured
    expect(page.get_by_role("button", name="Log out")).to_be_visible()
    expect(page.locator("header")).to_contain_text(USERNAME)
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(re.compile(r"/login/"))
    log_in(page)
    expect(page.get_by_role("navigation").get_by_role("link", name="Runs", exact=True)).to_be_visible()


def test_upload_a_dataset_and_see_its_format_and_preview(page, screenshot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}"}]} for i in range(12)]
    upload = tmp_path / "chat-sums.jsonl"
    upload.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page.goto("/datasets/")
    expect(page.get_by_role("heading", name="Datasets", exact=True)).to_be_visible()
    page.get_by_label("Name").fill("chat-sums")
    page.get_by_label("File").set_input_files(str(upload))
    with page.expect_navigation():  # the POST answers with a redirect: to the list or the new dataset's page
        page.get_by_role("button", name="Upload").click()
    if not re.search(r"/datasets/\d+/$", page.url):  # back on the list: open the dataset from its row
        row = page.get_by_role("row").filter(has_text="chat-sums")
        expect(row).to_contain_text("messages")
        expect(row).to_contain_text("12")
        screenshot(page, "datasets-after-upload")
        row.get_by_role("link", name="chat-sums").click()
        page.wait_for_url(re.compile(r"/datasets/\d+/$"))
    expect(page.get_by_role("heading", name="chat-sums")).to_be_visible()
    expect(page.locator("main")).to_contain_text("messages")  # the detected format
    expect(page.locator("main")).to_contain_text("12")  # rows
    expect(page.get_by_role("heading", name="First rows")).to_be_visible()
    expect(page.get_by_text("What is 3 + 3?").first).to_be_visible()  # the preview
    screenshot(page, "dataset-detail")


def test_a_bad_upload_lists_its_problems(page) -> None:  # type: ignore[no-untyped-def]
    page.goto("/datasets/")
    page.get_by_label("Name").fill("broken")
    page.get_by_label("File").set_input_files({"name": "broken.jsonl", "mimeType": "application/json",
                                               "buffer": b'{"messages": [{"role": "assistant", "content": "hi"}]}\n'})
    page.get_by_role("button", name="Upload").click()
    expect(page.get_by_text("broken.jsonl was not saved")).to_be_visible()
    expect(page.locator(".problems li").first).to_be_visible()


@pytest.mark.timeout(600)
def test_a_run_trains_live_survives_a_reload_and_its_adapter_downloads(  # type: ignore[no-untyped-def]
    page, demo, worker_process, scheduler, tiny_model_dir, screenshot, tmp_path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, _, dataset, config = demo
    # Long enough (a few seconds on a fast machine) to still be training at the reload below.
    run_id = create_run_in_form(page, dataset, config, "browser-live", max_steps=240, logging_steps=1)
    expect(page.get_by_role("heading", name=re.compile(rf"Run {run_id}"))).to_be_visible()

    # Live, without a reload: the state, the log and the loss chart update while the tiny model trains.
    wait_state(run_id, ("running",), worker=worker_process)
    expect(page.locator("#run-state")).to_have_text("running")
    first_lines = len(log_ids(page))
    wait_until(lambda: chart_points(page) >= 2, 90, "the loss chart to show two points")
    wait_until(lambda: len(log_ids(page)) > first_lines, 30, "new log lines to stream in")
    points_before = chart_points(page)
    screenshot(page, "run-detail-live")
    before = log_ids(page)
    assert before == sorted(set(before)), "log lines out of order or doubled while streaming"
    assert before == [i for i in db_log_ids(run_id) if i <= before[-1]], "a line was lost while streaming"

    # Reload mid-run: the page renders the tail, then the stream resumes after it.
    assert TrainingRun.objects.get(pk=run_id).state == "running", "the run finished before the reload"
    page.reload()
    wait_while_training(run_id, ("succeeded",), worker=worker_process)
    expect(page.locator("#run-state")).to_have_text("succeeded", timeout=30_000)  # live, through the stream
    wait_until(lambda: chart_points(page) > points_before, 15, "the loss chart to show the points after the reload")
    wait_until(lambda: log_ids(page) == db_log_ids(run_id), 10, "the page's log to match the stored events")
    ids = log_ids(page)
    assert len(ids) == len(set(ids)) and ids == db_log_ids(run_id)
    expect(page.get_by_role("img", name=re.compile(r"loss by step", re.I)).first).to_be_visible()
    screenshot(page, "run-detail-succeeded")

    # The adapter, downloaded as the browser does, loads on the tiny model.
    with page.expect_download() as info:
        page.get_by_role("link", name=re.compile(r"^Download")).click()
    archive = tmp_path / info.value.suggested_filename
    info.value.save_as(archive)
    assert archive.name == f"tunedeck-run-{run_id}-adapter.zip"
    target = tmp_path / "adapter"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(target)
    config_file = next(target.rglob("adapter_config.json"))
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config_file.parent)
    assert tuned.peft_config["default"].r == 16

    page.goto("/adapters/")
    expect(page.get_by_role("heading", name="Adapters", exact=True)).to_be_visible()
    screenshot(page, "adapters")
    page.goto("/runs/")
    expect(page.get_by_text("browser-live").first).to_be_visible()
    screenshot(page, "runs")
    page.goto("/")
    screenshot(page, "overview")
    assert not page.dialogs  # type: ignore[attr-defined]


def test_cancel_a_running_run_from_its_page(page, demo, worker_process, scheduler, screenshot) -> None:  # type: ignore[no-untyped-def]
    _, _, dataset, config = demo
    run_id = create_run_in_form(page, dataset, config, "browser-cancel", max_steps=3000, logging_steps=1)
    wait_state(run_id, ("running",), until=lambda r: r.step >= 2, worker=worker_process)
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#cancel-notice")).to_contain_text("Cancel requested")
    expect(page.locator("#run-state")).to_have_text("cancelled", timeout=60_000)  # live, through the stream
    expect(page.locator("#cancel-notice")).to_have_count(0)  # the notice went with the panel it was in
    expect(page.locator(".flash")).to_have_count(0)
    run = TrainingRun.objects.get(pk=run_id)
    assert run.state == "cancelled" and run.step < 3000
    # The actions follow the state live: Cancel goes, Retry and Delete come, without a reload.
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0, timeout=15_000)
    expect(page.get_by_role("button", name="Retry")).to_be_visible()
    page.reload()
    expect(page.locator("#run-state")).to_have_text("cancelled")
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    screenshot(page, "run-detail-cancelled")


def test_a_hostile_log_line_renders_as_text(page, demo, asgi_server, screenshot) -> None:  # type: ignore[no-untyped-def]
    user, base, dataset, config = demo
    worker, token = make_worker("hostile-worker")
    run = make_run(user, base, dataset, config)
    attempt = ledger.dispatch(run, worker)
    api = httpx.Client(base_url=asgi_server, headers={"Authorization": f"Bearer {token}"}, timeout=15)
    assert api.post(f"/api/worker/v1/jobs/{run.pk}/claim", json={"attempt": attempt}).status_code == 200

    page.goto(f"/runs/{run.pk}/")
    expect(page.locator("#run-state")).to_have_text("dispatched")
    page.wait_for_timeout(1000)  # let the event stream connect
    lines = [{"seq": 1, "kind": "log", "level": "info", "message": HOSTILE},
             {"seq": 2, "kind": "log", "level": "error", "message": "<script>alert(2)</script>"}]
    reply = api.post(f"/api/worker/v1/jobs/{run.pk}/events", json={"attempt": attempt, "events": lines})
    assert reply.status_code == 200, reply.text

    # Arrives through the stream, as text.
    log = page.locator("#log")
    expect(log).to_contain_text(HOSTILE)
    expect(log).to_contain_text("<script>alert(2)</script>")
    assert log.locator("img, script").count() == 0
    page.reload()  # and rendered by the server
    expect(log).to_contain_text(HOSTILE)
    assert log.locator("img, script").count() == 0
    page.wait_for_timeout(500)
    screenshot(page, "run-detail-hostile-log")
    assert page.dialogs == []  # type: ignore[attr-defined]


PAGES = [
    ("/", "Overview", "overview-empty"),
    ("/runs/", "Runs", "runs-queued"),
    ("/datasets/", "Datasets", "datasets"),
    ("/base-models/", "Base models", "base-models"),
    ("/lora-configs/", "LoRA configs", "lora-configs"),
    ("/adapters/", "Adapters", "adapters-empty"),
    ("/merged/", "Merged models", "merged-models-empty"),
    ("/runs/new/", "New training run", "run-new"),
]


def test_main_pages_render(page, demo, screenshot) -> None:  # type: ignore[no-untyped-def]
    user, base, dataset, config = demo
    run = make_run(user, base, dataset, config)
    TrainingRun.objects.filter(pk=run.pk).update(name="queued-run")
    for path, heading, name in PAGES:
        response = page.goto(path, wait_until="domcontentloaded")
        assert response is not None and response.status == 200, path
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
        expect(page.get_by_role("navigation")).to_be_visible()
        screenshot(page, name)
    page.goto(f"/runs/{run.pk}/")
    expect(page.locator("#run-state")).to_have_text("queued")
    screenshot(page, "run-detail-queued")
    assert not page.dialogs  # type: ignore[attr-defined]
