"""The overview and the workers page: what they show, who may see them, and a fixed query count."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.fleet.models import Worker
from webapp.training.models import Adapter, RunEvent, TrainingRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def objects():  # type: ignore[no-untyped-def]
    user = get_user_model().objects.create_user("owner", password="owner-pass-123")
    base = BaseModel.objects.create(name="tiny-<b>", source="/models/tiny", num_parameters=1000)
    dataset = Dataset.objects.create(name="toy", uri="file:///toy.jsonl", original_filename="toy.jsonl", format="text",
                                     row_count=10, size_bytes=100, sha256="0" * 64)
    config = LoraConfig.objects.create(name="cfg", params={"r": 8})
    return user, base, dataset, config


def make_runs(objects, count: int, state: str, worker: Worker | None = None, **fields):  # type: ignore[no-untyped-def]
    user, base, dataset, config = objects
    return [TrainingRun.objects.create(owner=user, base_model=base, dataset=dataset, lora_config=config, state=state,
                                       worker=worker, name=f"{state}-{i}", **fields) for i in range(count)]


def make_worker(name: str, **fields) -> Worker:  # type: ignore[no-untyped-def]
    worker = Worker(name=name, **fields)
    worker.set_new_token()
    worker.save()
    return worker


def login(user) -> Client:  # type: ignore[no-untyped-def]
    client = Client()
    client.force_login(user)
    return client


def metric_points(run: TrainingRun, steps: list[int], start, every_s: float) -> None:  # type: ignore[no-untyped-def]
    first_seq = RunEvent.objects.filter(run=run).count()
    for i, step in enumerate(steps):
        event = RunEvent.objects.create(run=run, attempt=run.attempt, seq=first_seq + i, kind="metric", data={"step": step, "loss": 1.0})
        RunEvent.objects.filter(pk=event.pk).update(created_at=start + timedelta(seconds=every_s * i))


def test_it_shows_active_runs_with_progress_and_an_eta_from_the_recent_step_rate(objects) -> None:  # type: ignore[no-untyped-def]
    worker = make_worker("gpu-1", state="online", inventory={"gpus": [{"name": "H100", "memory_total": 80 * 2**30}]})
    (run,) = make_runs(objects, 1, "running", worker=worker, attempt=1, step=250, total_steps=550)
    start = timezone.now() - timedelta(seconds=200)
    # Slow at first (outside the 20-point window), then 10 steps every 2 s = 5 steps/s.
    metric_points(run, [1, 2, 3], start - timedelta(hours=1), 600)
    metric_points(run, list(range(10, 251, 10)), start, 2)
    page = login(objects[0]).get("/")
    body = page.content.decode()
    assert page.status_code == 200
    assert 'value="250"' in body and "250/550" in body
    assert "5 steps/s" in body
    assert "1 min" in body  # 300 steps left at 5 steps/s
    assert "gpu-1" in body and "H100" in body and "80.0 GiB" in body
    assert "tiny-&lt;b&gt;" in body and "tiny-<b>" not in body


def test_it_falls_back_to_the_rate_since_the_start(objects) -> None:  # type: ignore[no-untyped-def]
    make_runs(objects, 1, "running", step=50, total_steps=150, started_at=timezone.now() - timedelta(seconds=100))
    body = login(objects[0]).get("/").content.decode()
    assert "0.5 steps/s" in body and "3 min" in body


def test_it_lists_the_queue_oldest_first_with_positions(objects) -> None:  # type: ignore[no-untyped-def]
    runs = make_runs(objects, 3, "queued")
    body = login(objects[0]).get("/").content.decode()
    positions = [body.index(f"#{run.pk} {run.name}") for run in runs]
    assert positions == sorted(positions)
    assert "<td>3</td>" in body


def test_the_htmx_poll_gets_only_the_sections(objects) -> None:  # type: ignore[no-untyped-def]
    make_runs(objects, 1, "running")
    client = login(objects[0])
    full = client.get("/")
    partial = client.get("/", headers={"HX-Request": "true"})
    assert b"<html" in full.content and 'hx-trigger="every 5s"' in full.content.decode()
    assert b"<html" not in partial.content and b"Active runs" in partial.content
    assert "HX-Request" in partial["Vary"]


def test_the_overview_needs_a_login() -> None:
    response = Client().get("/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_the_overview_makes_a_fixed_number_of_queries(objects, django_assert_max_num_queries) -> None:  # type: ignore[no-untyped-def]
    user = objects[0]
    client = login(user)
    client.get("/")  # warm the session
    workers = [make_worker(f"w{i}", state="online") for i in range(3)]

    def grow() -> None:
        for worker in workers:
            (run,) = make_runs(objects, 1, "running", worker=worker, step=5, total_steps=10)
            metric_points(run, [1, 2, 3], timezone.now(), 1)
        make_runs(objects, 5, "queued")
        for run in make_runs(objects, 3, "succeeded"):
            Adapter.objects.create(run=run, uri="file:///a", size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=2)

    grow()
    with django_assert_max_num_queries(8) as small:
        client.get("/")
    grow()
    grow()
    with django_assert_max_num_queries(8) as large:
        client.get("/")
    assert len(large.captured_queries) == len(small.captured_queries)


def test_the_workers_page_is_for_staff_only(objects) -> None:  # type: ignore[no-untyped-def]
    assert Client().get("/workers/").status_code == 302
    assert login(objects[0]).get("/workers/").status_code == 403


def test_the_workers_page_shows_state_labels_heartbeat_run_and_gpus(objects, django_assert_max_num_queries) -> None:  # type: ignore[no-untyped-def]
    staff = get_user_model().objects.create_user("admin", password="admin-pass-123", is_staff=True)
    busy = make_worker("busy", state="online", labels=["a100", "<script>"], last_heartbeat=timezone.now() - timedelta(minutes=3),
                       inventory={"hostname": "node7", "gpus": [{"name": "A100", "memory_total": 40 * 2**30,
                                                                  "memory_used": 10 * 2**30, "utilization": 87}]})
    make_worker("idle", state="offline", inventory={"gpus": "garbage"})
    (run,) = make_runs(objects, 1, "running", worker=busy)
    client = login(staff)
    client.get("/workers/")
    with django_assert_max_num_queries(4):
        body = client.get("/workers/").content.decode()
    assert "a100" in body and "&lt;script&gt;" in body and "<script>" not in body.split("<body")[1]
    assert "3 min ago</time>" in body and "never" in body
    assert f"#{run.pk} {run.name}" in body and "idle" in body
    assert "A100" in body and 'value="25"' in body and "87.0% busy" in body and "node7" in body
    partial = client.get("/workers/", headers={"HX-Request": "true"})
    assert b"<html" not in partial.content and b"busy" in partial.content
