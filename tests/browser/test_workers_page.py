"""The workers page in a real Chromium over ASGI: an admin registers a worker, sees its token and start command
once, and drains and resumes it; the pages render without CSP violations."""

from __future__ import annotations

import time

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from playwright.sync_api import expect

from tests.browser.conftest import log_in
from webapp.fleet.models import Worker, hash_token

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
GIB = 2**30
NAME = "gpu-browser-1"


def console_errors(page) -> list[str]:  # type: ignore[no-untyped-def]
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    return errors


def test_an_admin_registers_a_worker_sees_its_token_once_then_drains_and_resumes_it(  # type: ignore[no-untyped-def]
        transactional_db, context, asgi_server, screenshot) -> None:
    get_user_model().objects.create_user("boss", password="boss-pass-123", is_staff=True)
    page = context.new_page()
    errors = console_errors(page)
    log_in(page, "boss", "boss-pass-123")
    page.goto("/workers/")
    expect(page.get_by_role("heading", name="Workers")).to_be_visible()

    page.get_by_text("Register a worker").click()
    page.get_by_label("Name").fill(NAME)
    page.get_by_label("Labels").fill("A100")
    page.get_by_role("button", name="Register").click()
    expect(page.get_by_role("alert")).to_contain_text("“A100”: a label is a lowercase slug")
    page.get_by_label("Labels").fill("a100, team-nlp")
    page.get_by_label("Max GPU memory per job (GiB)").fill("24")
    page.get_by_label("Max jobs at once").fill("1")
    page.get_by_role("button", name="Register").click()

    expect(page.get_by_role("heading", name=f"Registered worker {NAME}")).to_be_visible()
    token = page.locator("#worker-token").inner_text().strip()
    assert token.startswith("tdw_") and len(token) > 40
    expect(page.locator("#env-command")).to_have_text(f"TUNEDECK_WORKER_TOKEN={token} tunedeck worker --server {asgi_server}")
    expect(page.locator("#file-command")).to_contain_text(f"tunedeck worker --server {asgi_server} --token-file ~/.tunedeck-token")
    assert token not in page.url
    worker = Worker.objects.get(name=NAME)
    assert worker.token_hash == hash_token(token)
    assert (worker.labels, worker.max_gpu_bytes, worker.max_jobs) == (["a100", "team-nlp"], 24 * GIB, 1)
    screenshot(page, "worker-token")

    beat = httpx.post(f"{asgi_server}/api/worker/v1/heartbeat", json={"inventory": {"hostname": "gpu-box"}},
                      headers={"Authorization": f"Bearer {token}"}, timeout=15)
    assert beat.status_code == 200 and beat.json()["name"] == NAME
    now = time.time()
    samples = [{"t": now - 10 * (5 - i), "gpus": [{"memory_used": (8 + 3 * i) * GIB, "memory_total": 40 * GIB,
                                                    "utilization": [20, 85, 90, 40, 95, 70][i]}]} for i in range(6)]
    Worker.objects.filter(pk=worker.pk).update(telemetry=samples)

    page.goto("/workers/")
    assert token not in page.content()  # shown once: not on the workers page
    row = page.locator(f"#worker-{worker.pk}")
    expect(row.locator(".badge")).to_have_text("online")
    expect(row).to_contain_text("team-nlp")
    expect(row).to_contain_text("issued")
    expect(row.locator('.gpu-preview[data-gpu="0"] canvas').first).to_be_visible()
    expect(row.locator(".gpu-preview-value")).to_have_text("now: memory 57.5%, busy 70%")  # the meter rounds it: 58%

    row.get_by_role("button", name=f"Drain {NAME}").click()
    expect(page.locator(".flash")).to_contain_text(f"Draining {NAME}")
    expect(row.locator(".badge")).to_have_text("draining")
    assert Worker.objects.get(pk=worker.pk).state == "draining"
    screenshot(page, "workers-draining")

    row.get_by_role("button", name=f"Resume {NAME}").click()
    expect(page.locator(".flash")).to_contain_text(f"Resumed {NAME}")
    expect(row.locator(".badge")).to_have_text("online")
    assert Worker.objects.get(pk=worker.pk).state == "online"
    assert token not in page.content()
    row.get_by_role("link", name=f"Manage {NAME}").click()
    expect(page.get_by_role("heading", name=f"Worker {NAME}")).to_be_visible()
    expect(page.get_by_role("textbox", name="Labels")).to_have_value("a100, team-nlp")
    assert token not in page.content()
    unexpected = [e for e in errors if "status of 400" not in e]  # the refused registration answered 400
    assert errors and not unexpected, errors


def legend(figure) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Legend label → the value it shows now."""
    rows = figure.locator(".u-legend .u-series").evaluate_all(
        "rows => rows.map(r => [r.querySelector('.u-label').textContent, r.querySelector('.u-value').textContent])")
    return dict(rows)


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t))  # the browser context's time zone is UTC


def shown(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def gpu_samples(start: float, count: int) -> list[dict]:
    return [{"t": int(start + 10 * i), "gpus": [
        {"memory_used": (8 + 3 * i) * GIB, "memory_total": 40 * GIB, "utilization": [20, 85, 90, 40, 95, 70, 55][i % 7]},
        {"memory_used": (2 + i) * GIB, "memory_total": 16 * GIB, "utilization": 10 * i},
    ]} for i in range(count)]


def test_the_worker_page_charts_each_gpus_use_live_and_the_list_previews_it(  # type: ignore[no-untyped-def]
        transactional_db, chromium, asgi_server, screenshot) -> None:
    get_user_model().objects.create_user("boss", password="boss-pass-123", is_staff=True)
    inventory = {"hostname": "gpu-box", "gpus": [{"name": "A100", "memory_total": 40 * GIB},
                                                 {"name": "L4", "memory_total": 16 * GIB}]}
    start = time.time() - 60
    worker = Worker.objects.create(name="gpu-charts-1", state="online", inventory=inventory, last_heartbeat=timezone.now(),
                                   telemetry=[*gpu_samples(start, 6), "junk", {"t": "x", "gpus": []}])
    quiet = Worker.objects.create(name="gpu-quiet", state="offline", inventory=inventory)
    context = chromium.new_context(base_url=asgi_server, viewport={"width": 1280, "height": 900}, timezone_id="UTC")
    page = context.new_page()
    errors = console_errors(page)
    page.on("pageerror", lambda error: errors.append(str(error)))
    log_in(page, "boss", "boss-pass-123")

    page.goto(f"/workers/{worker.pk}/")
    section = page.locator("#gpu-use")
    expect(section.get_by_role("heading", name="GPU use")).to_be_visible()
    charts = section.locator("figure.chart")
    expect(charts.nth(1).locator("canvas")).to_be_visible()
    assert [charts.nth(i).get_attribute("data-title") for i in range(charts.count())] == ["GPU 0 · A100", "GPU 1 · L4"]
    expect(charts.first.locator("figcaption")).to_have_text("GPU 0 · A100 % · 40 GiB of memory")
    expect(section.locator(".gpu-empty")).to_be_hidden()
    gpu0 = charts.first
    assert gpu0.locator(".chart-plot").get_attribute("data-points") == "6"
    assert list(legend(gpu0)) == ["time of day", "memory %", "busy %"]
    body = page.request.get(f"/workers/{worker.pk}/telemetry.json").json()
    points = {clock(p["time"]): p for p in body["gpus"][0]["points"]}

    # Hover: the legend shows the time of day under the cursor and both lines' values at that sample.
    over = gpu0.locator(".u-over")
    box = over.bounding_box()
    assert box and box["width"] > 400 and box["height"] > 150
    for share in (0.05, 0.5, 0.95):
        over.hover(position={"x": box["width"] * share, "y": box["height"] / 2})
        values = legend(gpu0)
        point = points[values["time of day"]]
        assert (values["memory %"], values["busy %"]) == (shown(point["memory_percent"]), shown(point["utilization"]))
    assert values == {"time of day": clock(start + 50), "memory %": "57.5", "busy %": "70"}

    # Drag to zoom in on the time axis, double-click to show it all again; a legend entry hides its line.
    plot = gpu0.locator(".chart-plot")
    whole = plot.get_attribute("data-x-range")
    assert whole == f"{clock(start)} – {clock(start + 50)}"
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + 20)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + 40, steps=5)
    page.mouse.up()
    assert plot.get_attribute("data-x-range") != whole
    over.dblclick(position={"x": box["width"] / 2, "y": box["height"] / 2})
    expect(plot).to_have_attribute("data-x-range", whole)
    gpu0.locator(".u-legend .u-series").filter(has_text="busy %").click()
    expect(gpu0.locator(".u-legend .u-series.u-off")).to_have_count(1)
    gpu0.locator(".u-legend .u-series").filter(has_text="busy %").click()
    expect(gpu0.locator(".u-legend .u-series.u-off")).to_have_count(0)

    # A heartbeat's new sample shows within a poll (5 s), without reloading the page.
    Worker.objects.filter(pk=worker.pk).update(telemetry=gpu_samples(start, 7))
    expect(plot).to_have_attribute("data-points", "7", timeout=15_000)
    expect(plot).to_have_attribute("data-x-range", f"{clock(start)} – {clock(start + 60)}")
    page.mouse.move(0, 0)
    screenshot(page, "worker-detail")

    # No polling while the tab is hidden; one request as soon as it shows again.
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url) if "telemetry.json" in request.url else None)
    page.evaluate("() => Object.defineProperty(document, 'hidden', {value: true, configurable: true})")
    time.sleep(0.5)
    asked.clear()
    time.sleep(6)
    assert not asked
    page.evaluate("() => { Object.defineProperty(document, 'hidden', {value: false, configurable: true});"
                  " document.dispatchEvent(new Event('visibilitychange')); }")
    page.wait_for_timeout(500)
    assert len(asked) == 1, asked

    # On a phone the charts take the screen's width.
    page.set_viewport_size({"width": 390, "height": 844})
    for _ in range(50):
        canvas = charts.first.locator("canvas").bounding_box()
        if canvas and canvas["width"] <= 370:
            break
        time.sleep(0.1)
    assert canvas and canvas["width"] <= 370, canvas
    screenshot(page, "worker-detail-phone")
    page.set_viewport_size({"width": 1280, "height": 900})

    # The workers list: a small chart per GPU; hovering it reads the time and values there.
    page.goto("/workers/")
    row = page.locator(f"#worker-{worker.pk}")
    preview = row.locator('.gpu-preview[data-gpu="1"]')
    expect(preview.locator("canvas")).to_be_visible()
    expect(preview.locator(".gpu-preview-value")).to_have_text("now: memory 50%, busy 60%")
    small = preview.locator(".u-over").bounding_box()
    assert small and small["width"] < 200 and small["height"] < 50
    preview.locator(".u-over").hover(position={"x": 1, "y": small["height"] / 2})
    expect(preview.locator(".gpu-preview-value")).to_have_text(f"{clock(start)}: memory 12.5%, busy 0%")
    page.mouse.move(0, 0)
    expect(page.locator(f"#worker-{quiet.pk} .gpu-preview")).to_have_count(0)
    # The rows are refreshed every 10 s: the previews stay drawn through it, and take the new samples.
    Worker.objects.filter(pk=worker.pk).update(telemetry=gpu_samples(start, 8))
    expect(preview).to_have_attribute("data-points", "8", timeout=20_000)
    expect(preview.locator("canvas")).to_have_count(1)
    screenshot(page, "workers")

    page.goto(f"/workers/{quiet.pk}/")
    expect(page.locator("#gpu-use .gpu-empty")).to_have_text(
        "No GPU telemetry yet: gpu-quiet's heartbeats have carried no GPU samples.")
    expect(page.locator("#gpu-use figure.chart")).to_have_count(0)
    assert not errors, errors
    context.close()
