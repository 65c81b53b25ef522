"""The workers page in a real Chromium over ASGI: an admin registers a worker, sees its token and start command
once, and drains and resumes it; the pages render without CSP violations."""

from __future__ import annotations

import time

import httpx
import pytest
from django.contrib.auth import get_user_model
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
    expect(row.get_by_role("img", name="GPU 0 memory used over the last 6 samples; latest 58%")).to_be_visible()  # as the meter rounds it

    row.get_by_role("button", name=f"Drain {NAME}").click()
    expect(page.locator(".flash")).to_contain_text(f"Draining {NAME}")
    expect(row.locator(".badge")).to_have_text("draining")
    assert Worker.objects.get(pk=worker.pk).state == "draining"
    screenshot(page, "workers-draining")

    row.get_by_role("button", name=f"Resume {NAME}").click()
    expect(page.locator(".flash")).to_contain_text(f"Resumed {NAME}")
    expect(row.locator(".badge")).to_have_text("online")
    assert Worker.objects.get(pk=worker.pk).state == "online"
    screenshot(page, "workers")
    assert token not in page.content()
    row.get_by_role("link", name=f"Manage {NAME}").click()
    expect(page.get_by_role("heading", name=f"Worker {NAME}")).to_be_visible()
    expect(page.get_by_role("textbox", name="Labels")).to_have_value("a100, team-nlp")
    assert token not in page.content()
    screenshot(page, "worker-detail")
    unexpected = [e for e in errors if "status of 400" not in e]  # the refused registration answered 400
    assert errors and not unexpected, errors
