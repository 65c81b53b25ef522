"""A worker without the shared store, against the real worker API: its inputs fetched (the second time from its
cache), an upload cut off mid-way never showing, a damaged chunk sent again, a newer attempt fencing the older
one out, and a full disk handing the job back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.webapp.factories import demo_objects, make_run, make_worker
from webapp.jobs import ledger
from webapp.training.models import TrainingRun
from workers.contract.refusals import StaleAttempt
from workers.contract.store import ArtifactStore, sha256_of
from workers.runtime.client import WorkerClient
from workers.runtime.remote import InputCache, RemoteReporter, TransferError

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]


class Damaging(httpx.HTTPTransport):
    """The network between worker and control plane, damaging the body of the first `damage` uploads."""

    def __init__(self, damage: int) -> None:
        super().__init__()
        self.damage, self.puts = damage, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            self.puts += 1
            if self.damage:
                self.damage -= 1
                body = bytearray(request.read())
                body[len(body) // 2] ^= 0xFF
                request = httpx.Request(request.method, request.url, headers=request.headers, content=bytes(body))
        return super().handle_request(request)


@pytest.fixture
def plane(live_server, tmp_path, settings, tiny_model_dir):  # type: ignore[no-untyped-def]
    settings.ARTIFACT_STORE = tmp_path / "store"
    settings.ARTIFACT_STORE.mkdir()
    user, base, dataset, config = demo_objects(tiny_model_dir)
    worker, token = make_worker("remote-1")
    return {"url": live_server.url, "token": token, "worker": worker, "objects": (user, base, dataset, config),
            "store": ArtifactStore(settings.ARTIFACT_STORE), "tmp": tmp_path}


def dispatched_run(plane: dict[str, Any], **params: Any) -> tuple[TrainingRun, int]:
    run = make_run(*plane["objects"], **params)
    return run, ledger.dispatch(run, plane["worker"])


def reporter_for(plane: dict[str, Any], run: TrainingRun, attempt: int, folder: str,
                 transport: httpx.BaseTransport | None = None) -> RemoteReporter:
    client = WorkerClient(plane["url"], plane["token"], retries=1, transport=transport)
    run.refresh_from_db()
    return RemoteReporter(client, run.pk, attempt, "jobs", run.job_spec(),
                          local=ArtifactStore(plane["tmp"] / folder), cache=InputCache(plane["tmp"] / "cache", 2**30))


def logs(reporter: RemoteReporter, run: TrainingRun) -> list[str]:
    reporter.flush()
    return list(run.events.filter(kind="log").values_list("message", flat=True))


def test_inputs_come_through_the_api_and_the_second_run_on_the_base_finds_them_cached(plane) -> None:  # type: ignore[no-untyped-def]
    _, base, dataset, _ = plane["objects"]
    run, attempt = dispatched_run(plane)
    reporter = reporter_for(plane, run, attempt, "worker")
    store = reporter.prepare()
    assert store is not None and store.root == (plane["tmp"] / "worker").resolve()
    # The dataset and the base model (a local folder on the control plane) are here, byte for byte.
    assert store.path(dataset.uri).read_bytes() == plane["store"].path(dataset.uri).read_bytes()
    local_model = Path(reporter.spec.base_model.source)
    assert local_model.is_relative_to(store.root) and sha256_of(local_model) == sha256_of(Path(base.source))
    said = logs(reporter, run)
    assert any(m.startswith(f"Downloading {dataset.uri}") for m in said), said
    assert any(m.startswith("Inputs fetched:") for m in said), said
    run.refresh_from_db()
    assert run.state == "running"

    # The next run on the same base and data downloads nothing: every file is linked from the cache.
    again, attempt = dispatched_run(plane)
    reporter = reporter_for(plane, again, attempt, "worker")
    assert reporter.prepare() is not None
    said = logs(reporter, again)
    assert not any(m.startswith("Downloading") for m in said), said
    assert any("from the worker's cache" in m for m in said), said


def test_an_upload_cut_off_mid_way_never_shows_and_the_next_attempt_resumes_from_the_last_complete_one(plane) -> None:  # type: ignore[no-untyped-def]
    run, attempt = dispatched_run(plane, save_steps=10)
    first = reporter_for(plane, run, attempt, "worker-a")
    store = first.prepare()
    assert store is not None
    checkpoints = first.artifacts.checkpoints
    for step, weights in ((10, b"ten" * 5000), (20, b"twenty" * 5000)):
        folder = store.path(f"{checkpoints}/checkpoint-{step}")
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    first.transfers.upload(f"{checkpoints}/checkpoint-10", store.path(f"{checkpoints}/checkpoint-10"))
    # checkpoint-20: its first file arrives, then the worker dies before the rest and the commit.
    cut = store.path(f"{checkpoints}/checkpoint-20/adapter_model.safetensors")
    first.transfers.send_chunk(f"{checkpoints}/checkpoint-20", "adapter_model.safetensors", 0, cut.read_bytes())
    server = plane["store"].path(checkpoints)
    assert sorted(p.name for p in server.iterdir()) == ["checkpoint-10"]  # the cut upload is not in the store

    # The control plane hands the run to another worker (attempt 2), which has a folder of its own.
    ledger.requeue_or_fail(TrainingRun.objects.get(pk=run.pk), "Worker remote-1 stopped answering", 3)
    run.refresh_from_db()
    second_attempt = ledger.dispatch(run, plane["worker"])
    assert second_attempt == 2
    second = reporter_for(plane, run, second_attempt, "worker-b")
    resumed = second.prepare()
    assert resumed is not None
    assert sorted(p.name for p in resumed.path(checkpoints).iterdir()) == ["checkpoint-10"]
    assert resumed.path(f"{checkpoints}/checkpoint-10/adapter_model.safetensors").read_bytes() == b"ten" * 5000

    # The first attempt is fenced out: it can neither finish its upload nor write its adapter.
    with pytest.raises(StaleAttempt):
        first.transfers.upload(f"{checkpoints}/checkpoint-20", store.path(f"{checkpoints}/checkpoint-20"))
    # And the second may not overwrite the first attempt's adapter, nor read another run's inputs.
    old_output = TrainingRun.objects.get(pk=run.pk).output_uri(1)
    store.path(old_output).mkdir(parents=True)
    (store.path(old_output) / "adapter_config.json").write_text("{}")
    with pytest.raises(TransferError, match="403: this job may not write"):
        second.transfers.upload(old_output, store.path(old_output))
    other, _ = dispatched_run(plane)
    with pytest.raises(TransferError, match="403: this job may not read"):
        second.transfers.manifest(other.output_uri(1))


def test_a_damaged_chunk_is_refused_and_sent_again(plane) -> None:  # type: ignore[no-untyped-def]
    run, attempt = dispatched_run(plane)
    network = Damaging(damage=1)
    reporter = reporter_for(plane, run, attempt, "worker", transport=network)
    store = reporter.prepare()
    assert store is not None
    output = reporter.artifacts.outputs[0]
    folder = store.path(output)
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4096)  # 1 MiB: one chunk
    reply = reporter.transfers.upload(output, folder)
    assert network.puts == 2  # the damaged one and the one sent again
    assert reply["sha256"] == sha256_of(folder) == sha256_of(plane["store"].path(output))


def test_a_full_disk_hands_the_job_back_to_be_run_again(plane) -> None:  # type: ignore[no-untyped-def]
    small = plane["tmp"] / "small-disk"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("a 64 KiB file system needs mount (root): not available here")
    try:
        run, attempt = dispatched_run(plane)
        client = WorkerClient(plane["url"], plane["token"], retries=1)
        run.refresh_from_db()
        reporter = RemoteReporter(client, run.pk, attempt, "jobs", run.job_spec(), local=ArtifactStore(small / "store"),
                                  cache=InputCache(small / "cache", 2**30))
        assert reporter.prepare() is None
    finally:
        subprocess.run(["umount", str(small)], check=False)
    run.refresh_from_db()
    # Not the job's fault: requeued for another attempt, counted as a failed one.
    assert run.state == "queued" and run.failures == 1, (run.state, run.error)
    assert "disk is full" in run.attempt_log[-1]["reason"], run.attempt_log
    assert any("disk is full" in m for m in run.events.values_list("message", flat=True))


@pytest.mark.parametrize("state", ["failed", "cancelled"])
def test_a_failed_or_cancelled_attempt_keeps_its_trackers_files_and_no_output(plane, state: str) -> None:  # type: ignore[no-untyped-def]
    run, attempt = dispatched_run(plane)
    reporter = reporter_for(plane, run, attempt, "worker")
    store = reporter.prepare()
    assert store is not None
    tracking = run.tracking_uri()
    assert reporter.artifacts.carried == [tracking]
    events = store.path(tracking) / "tensorboard" / "events.out.tfevents.1"
    events.parent.mkdir(parents=True)
    events.write_bytes(b"loss at step 1..3" * 100)
    output = reporter.artifacts.outputs[0]
    store.path(output).mkdir(parents=True)
    (store.path(output) / "adapter_config.json").write_text("{}")  # half-written: must not reach the store

    reporter.finish(state, error="stopped at step 3" if state == "failed" else "")

    server = plane["store"]
    assert (server.path(tracking) / "tensorboard" / "events.out.tfevents.1").read_bytes() == events.read_bytes()
    assert not server.path(output).exists()
    run.refresh_from_db()
    assert run.state == state, (run.state, run.error)
