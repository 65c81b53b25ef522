"""A worker's telemetry as JSON for its GPU charts (workers/<pk>/telemetry.json), and the pages that draw them."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tests.webapp.team import login
from webapp.fleet.models import Worker

pytestmark = pytest.mark.django_db
GIB = 2**30
INVENTORY = {"gpus": [{"name": "A100", "memory_total": 40 * GIB}, {"name": "T4", "memory_total": 16 * GIB}]}


def gpu(used: float | None = None, total: float | None = None, util: Any = None) -> dict[str, Any]:
    figures = {"memory_used": used, "memory_total": total, "utilization": util}
    return {key: value for key, value in figures.items() if value is not None}


def sampled_worker(**fields: Any) -> Worker:
    telemetry = [
        {"t": 1020, "gpus": [gpu(30 * GIB, 40 * GIB, 90), gpu(4 * GIB, 16 * GIB, 10)]},
        "junk",
        {"t": "soon", "gpus": [gpu(1, 2, 3)]},  # no time
        {"t": 1030, "gpus": "none"},  # no list of GPUs
        {"gpus": [gpu(1, 2, 3)]},
        {"t": 1000, "gpus": [gpu(10 * GIB, 40 * GIB, 0), "broken"]},  # older: sorted first
        {"t": 1010, "gpus": [gpu(20 * GIB, None, True), gpu(util=150.0)]},  # total from the inventory; bool is no number
        {"t": 1040, "gpus": [{"name": "no figures"}, gpu(8 * GIB, 16 * GIB, -3)]},
    ]
    return Worker.objects.create(name="gpu-1", state="online", inventory=INVENTORY, telemetry=telemetry, **fields)


def test_it_lists_each_gpus_well_formed_samples_oldest_first(team, client: Client) -> None:  # type: ignore[no-untyped-def]
    worker = sampled_worker()
    body = login(client, "staff").get(f"/workers/{worker.pk}/telemetry.json").json()
    assert body == {"worker": "gpu-1", "poll_seconds": 5, "gpus": [
        {"index": 0, "title": "GPU 0 · A100", "memory_total_gib": 40.0, "points": [
            {"time": 1000.0, "memory_used_gib": 10.0, "memory_percent": 25.0, "utilization": 0.0},
            {"time": 1010.0, "memory_used_gib": 20.0, "memory_percent": 50.0},
            {"time": 1020.0, "memory_used_gib": 30.0, "memory_percent": 75.0, "utilization": 90.0},
        ]},
        {"index": 1, "title": "GPU 1 · T4", "memory_total_gib": 16.0, "points": [
            {"time": 1010.0, "utilization": 100.0},  # past 100% is drawn at the top of the scale
            {"time": 1020.0, "memory_used_gib": 4.0, "memory_percent": 25.0, "utilization": 10.0},
            {"time": 1040.0, "memory_used_gib": 8.0, "memory_percent": 50.0, "utilization": 0.0},
        ]},
    ]}


def test_it_gives_a_gpu_without_samples_no_points_and_a_worker_without_gpus_none(team, client: Client) -> None:  # type: ignore[no-untyped-def]
    login(client, "staff")
    quiet = Worker.objects.create(name="quiet", inventory=INVENTORY, telemetry="not a list")
    cpu = Worker.objects.create(name="cpu", telemetry=[{"t": 1000, "gpus": []}])
    assert [g["points"] for g in client.get(f"/workers/{quiet.pk}/telemetry.json").json()["gpus"]] == [[], []]
    assert client.get(f"/workers/{cpu.pk}/telemetry.json").json()["gpus"] == []
    assert client.get("/workers/999999/telemetry.json").status_code == 404


def test_it_is_for_staff_only(team, client: Client) -> None:  # type: ignore[no-untyped-def]
    url = f"/workers/{sampled_worker().pk}/telemetry.json"
    response = client.get(url)
    assert response.status_code == 302 and response["Location"].startswith("/login/")
    assert login(client, "mate").get(url).status_code == 403


def test_it_reads_one_row(team, client: Client, django_assert_max_num_queries: Any) -> None:  # type: ignore[no-untyped-def]
    url = f"/workers/{sampled_worker().pk}/telemetry.json"
    login(client, "staff")
    with django_assert_max_num_queries(3):  # the session, the user, the worker
        assert client.get(url).status_code == 200


def test_the_worker_page_has_a_gpu_use_section_fed_by_the_json(team, client: Client) -> None:  # type: ignore[no-untyped-def]
    login(client, "staff")
    worker = sampled_worker()
    body = client.get(f"/workers/{worker.pk}/").content.decode()
    assert '<h2 id="gpu-use-heading">GPU use</h2>' in body
    assert f'data-gpu-charts data-telemetry-url="/workers/{worker.pk}/telemetry.json" data-poll-seconds="5"' in body
    assert '<p class="gpu-empty" hidden>' in body  # charts follow; the no-telemetry note is hidden
    assert "tunedeck/charts.js" in body

    quiet = Worker.objects.create(name="quiet", inventory=INVENTORY)
    body = client.get(f"/workers/{quiet.pk}/").content.decode()
    assert '<p class="gpu-empty">No GPU telemetry yet: quiet\'s heartbeats have carried no GPU samples.</p>' in body
    cpu = Worker.objects.create(name="cpu")
    assert "(a worker without GPUs sends none)" in client.get(f"/workers/{cpu.pk}/").content.decode()


def test_the_workers_pages_show_how_each_worker_has_its_artifacts_and_its_cache_use(team, client: Client) -> None:  # type: ignore[no-untyped-def]
    from tests.webapp.factories import make_worker
    from workers.runtime.telemetry import sample

    remote, remote_token = make_worker("far-away")
    _shared, shared_token = make_worker("next-door")

    def beat(token: str, artifacts: Any) -> Any:
        return Client().post("/api/worker/v1/heartbeat", {"telemetry": {"gpus": [], "artifacts": artifacts}},
                             content_type="application/json", headers={"Authorization": f"Bearer {token}"})

    assert beat(remote_token, {"mode": "remote", "cache_used": 3 * GIB // 2, "cache_max": 50 * GIB}).status_code == 200
    assert beat(shared_token, {"mode": "local"}).status_code == 200
    bad = beat(remote_token, {"mode": "remote", "cache_used": "lots"})
    assert bad.status_code == 400 and "telemetry.artifacts.cache_used" in bad.json()["detail"]
    staff = login(client, "staff")
    page = staff.get("/workers/").content.decode()
    assert "own folder, through the worker API · cache 1.5 GiB of 50.0 GiB" in page and "shared store" in page
    detail = staff.get(f"/workers/{remote.pk}/").content.decode()
    assert "cache 1.5 GiB of 50.0 GiB" in detail
    # What a worker's own sample says (this test process is configured like a worker with the shared store).
    assert sample()["artifacts"]["mode"] in ("local", "remote")
