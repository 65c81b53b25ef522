"""Inventory and telemetry of a worker machine (this one has no GPU), and the heartbeat that stores them."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata

import pytest
from django.test import Client

from tests.webapp.factories import demo_objects, make_run, make_worker
from webapp.fleet.models import Worker
from webapp.jobs import ledger
from webapp.training.models import TrainingRun
from workers.runtime import telemetry


def test_inventory_on_a_machine_without_gpus_reports_the_host_and_the_package_versions() -> None:
    info = telemetry.inventory()
    assert json.loads(json.dumps(info)) == info  # it travels as JSON
    assert info["gpus"] == [] and info["driver_version"] is None and info["cuda_driver_version"] is None
    assert info["hostname"] == platform.node() and info["python"] == platform.python_version()
    assert info["cpus"] == os.cpu_count() and isinstance(info["os"], str) and info["os"]
    assert isinstance(info["memory_total"], int) and info["memory_total"] > 2**27
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
        assert info[name] == metadata.version(name), name
    assert "NVML" in info["nvml_error"] or "nvidia-ml-py" in info["nvml_error"]


def test_sample_reports_host_memory_and_no_gpus() -> None:
    sample = telemetry.sample()
    assert sample["gpus"] == []
    assert isinstance(sample["memory_available"], int) and 0 < sample["memory_available"] <= sample["memory_total"]
    assert telemetry.gpu_count() == 0


def test_host_memory_from_meminfo_matches_the_kernel_page_count() -> None:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert abs(telemetry.host_memory()["total"] - total) <= total * 0.01


def test_versions_of_missing_packages_and_cuda_numbers_read_plainly() -> None:
    assert telemetry.package_version("no-such-package-tunedeck") is None
    assert telemetry.cuda_version_text(12040) == "12.4"
    assert telemetry.cuda_version_text(11080) == "11.8"
    assert telemetry.cuda_version_text(0) is None and telemetry.cuda_version_text(None) is None


# --- The control plane's heartbeat handler ---------------------------------------------------------------

GPU_SAMPLE = {"memory_available": 2**33, "memory_total": 2**34, "gpus": [
    {"index": 0, "memory_used": 3 * 2**30, "memory_free": 77 * 2**30, "memory_total": 80 * 2**30,
     "utilization": 97, "temperature": 61},
]}


def beat(token: str, payload: dict):  # type: ignore[no-untyped-def]
    return Client().post("/api/worker/v1/heartbeat", payload, content_type="application/json",
                         headers={"Authorization": f"Bearer {token}"})


@pytest.mark.django_db
def test_the_heartbeat_stores_the_inventory_and_keeps_the_last_60_samples() -> None:
    worker, token = make_worker("w1")
    worker.labels = ["a100", "team-nlp"]
    worker.save()
    inventory = telemetry.inventory()
    sample = telemetry.sample()
    reply = beat(token, {"inventory": inventory, "telemetry": sample, "running": []})
    assert reply.status_code == 200, reply.content
    assert reply.json()["labels"] == ["a100", "team-nlp"] and reply.json()["stop"] == []
    worker.refresh_from_db()
    # The inventory as sent, with how the worker has its artifacts from the latest sample (the workers pages').
    assert worker.inventory == {**inventory, "artifacts": sample["artifacts"]} and worker.telemetry[0]["gpus"] == []
    assert isinstance(worker.telemetry[0]["t"], int)

    gpu_inventory = {**inventory, "gpus": [{"index": 0, "name": "H100", "uuid": "GPU-1", "memory_total": 80 * 2**30,
                                            "memory_free": 80 * 2**30, "memory_used": 0, "utilization": 0}]}
    assert beat(token, {"inventory": gpu_inventory}).status_code == 200
    for _ in range(64):
        assert beat(token, {"telemetry": GPU_SAMPLE}).status_code == 200
    worker.refresh_from_db()
    assert len(worker.telemetry) == 60
    assert worker.telemetry[-1]["gpus"] == [{"memory_used": 3 * 2**30, "memory_total": 80 * 2**30, "utilization": 97}]
    # Between full inventories the stored GPUs carry the latest live values (what the scheduler reads).
    assert worker.inventory["gpus"][0]["memory_free"] == 77 * 2**30 and worker.inventory["gpus"][0]["name"] == "H100"


@pytest.mark.django_db
@pytest.mark.parametrize(("payload", "field"), [
    ({"inventory": ["not", "an", "object"]}, "inventory must be a JSON object"),
    ({"inventory": {"gpus": "two"}}, "inventory.gpus must be a list"),
    ({"telemetry": {"gpus": [{"memory_used": "lots"}]}}, "telemetry.gpus[0].memory_used"),
    ({"telemetry": {"gpus": [{"utilization": 140}]}}, "telemetry.gpus[0].utilization"),
    ({"telemetry": {"gpus": [{"memory_used": -1}]}}, "telemetry.gpus[0].memory_used"),
    ({"telemetry": {"memory_available": 1.5}}, "telemetry.memory_available"),
    ({"telemetry": [1, 2]}, "telemetry must be a JSON object"),
    ({"running": [{"path": "../etc", "id": 1, "attempt": 1}]}, "running[0].path"),
    ({"running": [{"path": "jobs", "id": "one", "attempt": 1}]}, "running[0].id"),
    ({"running": [{"path": "jobs", "id": 1}]}, "running[0].attempt"),
    ({"shutting_down": "yes"}, "shutting_down must be true or false"),
])
def test_a_malformed_heartbeat_gets_400_naming_the_field_and_changes_nothing(payload, field) -> None:  # type: ignore[no-untyped-def]
    worker, token = make_worker("w1")
    before = worker.last_heartbeat
    reply = beat(token, payload)
    assert reply.status_code == 400 and field in reply.json()["detail"], reply.content
    worker.refresh_from_db()
    assert worker.last_heartbeat == before and worker.telemetry == [] and worker.inventory == {}


@pytest.mark.django_db
def test_a_heartbeat_keeps_a_draining_worker_draining_and_brings_an_offline_one_back() -> None:
    worker, token = make_worker("w1")
    for before, payload, after in [
        ("draining", {}, "draining"),
        ("offline", {}, "online"),
        ("online", {"shutting_down": True}, "offline"),
        ("offline", {"shutting_down": True}, "offline"),
        ("draining", {"shutting_down": True}, "draining"),
    ]:
        Worker.objects.filter(pk=worker.pk).update(state=before)
        reply = beat(token, {"telemetry": telemetry.sample(), **payload})
        assert reply.status_code == 200 and reply.json()["state"] == after, (before, payload)
        assert Worker.objects.get(pk=worker.pk).state == after


@pytest.mark.django_db
def test_the_heartbeat_tells_the_worker_to_stop_jobs_that_moved_on(tiny_model_dir, store_dir, local_models) -> None:  # type: ignore[no-untyped-def]
    user, base, dataset, config = demo_objects(tiny_model_dir)
    worker, token = make_worker("w1")
    other, _ = make_worker("w2")
    mine, moved = make_run(user, base, dataset, config), make_run(user, base, dataset, config)
    mine_attempt = ledger.dispatch(mine, worker)
    old_attempt = ledger.dispatch(moved, worker)
    ledger.requeue_or_fail(TrainingRun.objects.get(pk=moved.pk), "worker lost", max_attempts=3)
    ledger.dispatch(moved, other)
    running = [{"path": "jobs", "id": mine.pk, "attempt": mine_attempt},
               {"path": "jobs", "id": moved.pk, "attempt": old_attempt},
               {"path": "adapter-jobs", "id": 999999, "attempt": 1}]
    reply = beat(token, {"running": running})
    assert reply.status_code == 200
    assert reply.json()["stop"] == running[1:]


@pytest.mark.django_db
def test_a_starting_worker_gives_back_the_jobs_its_previous_process_had_claimed(tiny_model_dir, store_dir, local_models) -> None:  # type: ignore[no-untyped-def]
    user, base, dataset, config = demo_objects(tiny_model_dir)
    worker, token = make_worker("w1")
    claimed, waiting = make_run(user, base, dataset, config), make_run(user, base, dataset, config)
    ledger.claim(worker, TrainingRun, claimed.pk, ledger.dispatch(claimed, worker))
    ledger.dispatch(waiting, worker)  # its wake-up is still in the queue: the new process will claim it
    assert beat(token, {"starting": True, "running": []}).status_code == 200
    claimed.refresh_from_db()
    waiting.refresh_from_db()
    assert (claimed.state, claimed.failures) == ("queued", 1)
    assert claimed.attempt_log[-1]["outcome"] == "lost" and "restarted" in claimed.attempt_log[-1]["reason"]
    assert waiting.state == "dispatched"
