"""The worker API's artifact calls: a worker reads only its job's inputs and writes only its attempt's outputs,
chunk by checked chunk, and a commit lands whole or not at all."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.webapp.factories import demo_objects, make_run, make_worker
from webapp.fleet import artifacts
from webapp.jobs import ledger
from webapp.training.models import Adapter, TrainingRun
from workers.contract.store import sha256_of

pytestmark = pytest.mark.django_db


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Api:
    """The calls of one worker on one job, as `workers/runtime/remote.py` makes them."""

    def __init__(self, token: str, job_id: int, attempt: int, kind: str = "jobs") -> None:
        self.client, self.attempt = Client(), attempt
        self.base = f"/api/worker/v1/{kind}/{job_id}/artifacts"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def post(self, name: str, **payload: Any):  # type: ignore[no-untyped-def]
        return self.client.post(
            f"{self.base}/{name}",
            {"attempt": self.attempt, **payload},
            content_type="application/json",
            headers=self.headers,
        )

    def manifest(self, uri: str, latest_checkpoint: bool = False):  # type: ignore[no-untyped-def]
        return self.post("manifest", uri=uri, latest_checkpoint=latest_checkpoint)

    def get(self, uri: str, path: str = "", start: int | None = None):  # type: ignore[no-untyped-def]
        headers = {**self.headers, **({"Range": f"bytes={start}-"} if start is not None else {})}
        return self.client.get(
            f"{self.base}/file", {"attempt": self.attempt, "uri": uri, "path": path}, headers=headers
        )

    def put(self, uri: str, path: str, offset: int, chunk: bytes, digest: str | None = None):  # type: ignore[no-untyped-def]
        query = f"attempt={self.attempt}&uri={uri}&path={path}&offset={offset}"
        return self.client.put(
            f"{self.base}/upload?{query}",
            chunk,
            content_type="application/octet-stream",
            headers={**self.headers, "X-Chunk-Sha256": digest or sha(chunk)},
        )

    def offset(self, uri: str, path: str = "") -> int:
        response = self.post("offset", uri=uri, path=path)
        assert response.status_code == 200, response.content
        return int(response.json()["offset"])

    def commit(self, uri: str, files: dict[str, bytes], keep: list[str] | None = None):  # type: ignore[no-untyped-def]
        listed = [{"path": p, "size": len(data), "sha256": sha(data)} for p, data in sorted(files.items())]
        return self.post("commit", uri=uri, files=listed, keep=keep)

    def send(self, uri: str, files: dict[str, bytes], keep: list[str] | None = None, chunk: int = 1 << 20) -> Any:
        """Upload every file in chunks and commit; the commit's reply."""
        for path, data in files.items():
            for start in range(0, len(data), chunk):
                response = self.put(uri, path, start, data[start : start + chunk])
                assert response.status_code == 200, response.content
        response = self.commit(uri, files, keep)
        assert response.status_code == 200, response.content
        return response.json()


def body(response) -> bytes:  # type: ignore[no-untyped-def]
    return b"".join(response.streaming_content)


def write(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


@pytest.fixture
def world(tiny_model_dir, store_dir):  # type: ignore[no-untyped-def]
    """A run warm-started from an adapter, dispatched to w1 (attempt 1); w2 holds no job."""
    user, base, dataset, config = demo_objects(tiny_model_dir)
    adapter = Adapter.objects.create(
        name="start",
        owner=user,
        base_model=base,
        rank=8,
        uri="store://adapters/start",
        size_bytes=1,
        sha256="0" * 64,
        trainable_params=1,
        total_params=2,
    )
    write(store_dir / "adapters" / "start", {"adapter_model.safetensors": b"w" * 3000, "adapter_config.json": b"{}"})
    run = make_run(user, base, dataset, config)
    run.init_adapter = adapter
    run.save(update_fields=["init_adapter"])
    other = make_run(user, base, dataset, config)
    worker, token = make_worker("w1")
    _w2, other_token = make_worker("w2")
    attempt = ledger.dispatch(run, worker)
    assert attempt == 1
    return {
        "run": run,
        "other": other,
        "worker": worker,
        "token": token,
        "other_token": other_token,
        "dataset": dataset,
        "store": store_dir,
        "model": tiny_model_dir,
        "api": Api(token, run.pk, attempt),
    }


def checkpoints(run: TrainingRun) -> str:
    return f"store://runs/{run.pk}/checkpoints"


def output(run: TrainingRun, attempt: int = 1) -> str:
    return f"store://runs/{run.pk}/attempt-{attempt}/adapter"


# --- reading ------------------------------------------------------------------------------------------------


def test_the_manifest_lists_a_dataset_file_and_an_adapter_folder_with_their_sha256s(world) -> None:  # type: ignore[no-untyped-def]
    api, store, dataset = world["api"], world["store"], world["dataset"]
    data = store.joinpath(dataset.uri.removeprefix("store://")).read_bytes()
    reply = api.manifest(dataset.uri)
    assert reply.status_code == 200, reply.content
    assert reply.json() == {
        "uri": dataset.uri,
        "kind": "file",
        "files": [{"path": "", "size": len(data), "sha256": sha(data)}],
    }

    # Uploads in progress and the store's own folders are not part of an artifact.
    write(store / "adapters" / "start", {"half.safetensors.part": b"x", ".uploads/y": b"y"})
    folder = api.manifest("store://adapters/start").json()
    assert folder["kind"] == "dir"
    assert folder["files"] == [
        {"path": "adapter_config.json", "size": 2, "sha256": sha(b"{}")},
        {"path": "adapter_model.safetensors", "size": 3000, "sha256": sha(b"w" * 3000)},
    ]
    tracking = f"store://runs/{world['run'].pk}/tracking"  # carried: read where it exists
    assert api.manifest(tracking).json() == {"uri": tracking, "kind": "missing", "files": []}


def test_the_base_model_folder_is_listed_with_cached_digests_and_downloaded(world) -> None:  # type: ignore[no-untyped-def]
    api, store, model = world["api"], world["store"], world["model"]
    uri = "model:" + str(model)
    listing = api.manifest(uri).json()
    assert listing["kind"] == "dir" and listing["files"]
    entry = listing["files"][0]
    assert entry["sha256"] == sha256_of(model / entry["path"])
    assert [f["path"] for f in listing["files"]] == sorted(f["path"] for f in listing["files"])
    assert list((store / ".hashes").rglob("*.json"))  # hashed once, remembered
    assert api.manifest(uri).json() == listing
    assert body(api.get(uri, entry["path"])) == (model / entry["path"]).read_bytes()
    # Never written, and no other local folder is readable.
    assert api.commit(uri, {"x": b"x"}).status_code == 403
    assert api.manifest("model:" + str(model.parent)).status_code == 403


def test_a_cached_digest_is_not_reused_once_the_file_changes(world) -> None:  # type: ignore[no-untyped-def]
    api, store = world["api"], world["store"]
    uri = "store://adapters/start"
    assert api.manifest(uri).json()["files"][1]["sha256"] == sha(b"w" * 3000)
    write(store / "adapters" / "start", {"adapter_model.safetensors": b"v" * 3001})
    assert api.manifest(uri).json()["files"][1] == {
        "path": "adapter_model.safetensors",
        "size": 3001,
        "sha256": sha(b"v" * 3001),
    }


def test_a_file_downloads_whole_or_from_a_byte_on(world) -> None:  # type: ignore[no-untyped-def]
    api = world["api"]
    uri, data = "store://adapters/start", b"w" * 3000
    whole = api.get(uri, "adapter_model.safetensors")
    assert whole.status_code == 200 and whole["Content-Length"] == "3000" and body(whole) == data
    part = api.get(uri, "adapter_model.safetensors", start=1000)
    assert part.status_code == 206 and part["Content-Range"] == "bytes 1000-2999/3000"
    assert part["Content-Length"] == "2000" and body(part) == data[1000:]
    beyond = api.get(uri, "adapter_model.safetensors", start=3001)
    assert beyond.status_code == 416 and beyond["Content-Range"] == "bytes */3000"
    missing = api.get(uri, "nothing.bin")
    assert missing.status_code == 404 and missing["Content-Type"] == "application/problem+json"
    assert api.get(uri, "../start/adapter_config.json").status_code == 400


def test_a_job_reads_only_its_own_inputs(world) -> None:  # type: ignore[no-untyped-def]
    api, store, other = world["api"], world["store"], world["other"]
    write(store / "runs" / str(other.pk) / "attempt-1" / "adapter", {"adapter_model.safetensors": b"secret"})
    for uri in (output(other), f"store://runs/{other.pk}/checkpoints"):
        refused = api.manifest(uri)
        assert refused.status_code == 403 and uri in refused.json()["detail"]
        assert api.get(uri, "adapter_model.safetensors").status_code == 403
    assert api.manifest("store://../outside").status_code == 400
    assert api.manifest("/etc").status_code == 400
    # Someone else's job is not found; without a token nothing is answered.
    assert Api(world["other_token"], world["run"].pk, 1).manifest("store://adapters/start").status_code == 404
    assert Api("", world["run"].pk, 1).manifest("store://adapters/start").status_code == 401
    assert Api("", world["run"].pk, 1).get("store://adapters/start", "adapter_config.json").status_code == 401
    assert Api("tdw_forged", world["run"].pk, 1).put(output(world["run"]), "a", 0, b"a").status_code == 401


def test_latest_checkpoint_lists_only_the_newest_complete_one(world) -> None:  # type: ignore[no-untyped-def]
    api, store, run = world["api"], world["store"], world["run"]
    folder = store / "runs" / str(run.pk) / "checkpoints"
    assert api.manifest(checkpoints(run), latest_checkpoint=True).json()["kind"] == "missing"
    for step in (9, 40, 100):
        write(folder / f"checkpoint-{step}", {"adapter_model.safetensors": b"c%d" % step, "trainer_state.json": b"{}"})
    (folder / "checkpoint-100" / "trainer_state.json").unlink()  # still being written
    listing = api.manifest(checkpoints(run), latest_checkpoint=True).json()
    assert listing["kind"] == "dir"
    assert [f["path"] for f in listing["files"]] == [
        "checkpoint-40/adapter_model.safetensors",
        "checkpoint-40/trainer_state.json",
    ]
    fetched = api.get(checkpoints(run), "checkpoint-40/adapter_model.safetensors")
    assert body(fetched) == b"c40"
    # Only the run's checkpoint folder is listed that way.
    assert api.manifest("store://adapters/start", latest_checkpoint=True).status_code == 403


# --- writing ------------------------------------------------------------------------------------------------


def test_an_upload_in_chunks_lands_whole_at_commit(world) -> None:  # type: ignore[no-untyped-def]
    api, store, run = world["api"], world["store"], world["run"]
    uri, weights, config = output(run), bytes(range(256)) * 10, b'{"r": 8}'
    assert api.offset(uri, "adapter_model.safetensors") == 0
    for i, start in enumerate(range(0, len(weights), 1000)):  # 3 chunks
        reply = api.put(uri, "adapter_model.safetensors", start, weights[start : start + 1000])
        assert reply.status_code == 200 and reply.json() == {"offset": min(start + 1000, len(weights))}
        assert i < 3
    assert api.offset(uri, "adapter_model.safetensors") == len(weights)
    target = store / "runs" / str(run.pk) / "attempt-1" / "adapter"
    assert not target.exists()  # nothing shows before the commit
    assert api.put(uri, "sub/adapter_config.json", 0, config).status_code == 200
    committed = api.commit(uri, {"adapter_model.safetensors": weights, "sub/adapter_config.json": config})
    assert committed.status_code == 200, committed.content
    assert (target / "adapter_model.safetensors").read_bytes() == weights
    assert (target / "sub" / "adapter_config.json").read_bytes() == config
    assert committed.json() == {"uri": uri, "size": len(weights) + len(config), "sha256": sha256_of(target)}
    assert not (store / ".uploads").exists() or not any((store / ".uploads").iterdir())
    # A commit sent again (its reply lost) finds it done.
    again = api.commit(uri, {"adapter_model.safetensors": weights, "sub/adapter_config.json": config})
    assert again.status_code == 200 and again.json() == committed.json()


def test_a_corrupted_chunk_is_refused_and_sent_again(world) -> None:  # type: ignore[no-untyped-def]
    api, uri = world["api"], output(world["run"])
    assert api.put(uri, "a.bin", 0, b"first").json() == {"offset": 5}
    refused = api.put(uri, "a.bin", 5, b"secXnd", digest=sha(b"second"))
    assert refused.status_code == 422 and refused.json()["code"] == "checksum"
    assert api.offset(uri, "a.bin") == 5  # nothing of it kept
    assert api.put(uri, "a.bin", 5, b"second").json() == {"offset": 11}
    assert api.commit(uri, {"a.bin": b"firstsecond"}).status_code == 200


def test_a_chunk_at_the_wrong_offset_gets_416_with_the_offset_to_go_on_from(world) -> None:  # type: ignore[no-untyped-def]
    api, uri = world["api"], output(world["run"])
    assert api.put(uri, "a.bin", 0, b"12345").status_code == 200
    for wrong in (0, 3, 9):
        refused = api.put(uri, "a.bin", wrong, b"678")
        assert refused.status_code == 416 and refused.json()["offset"] == 5
    assert api.offset(uri, "a.bin") == 5


def test_a_commit_that_does_not_check_out_leaves_the_previous_content(world) -> None:  # type: ignore[no-untyped-def]
    api, store, run = world["api"], world["store"], world["run"]
    uri = f"store://runs/{run.pk}/tracking"  # carried: read and written back by every attempt
    target = store / "runs" / str(run.pk) / "tracking"
    write(target, {"events.log": b"old"})
    assert api.put(uri, "events.log", 0, b"new content").status_code == 200
    listed = [{"path": "events.log", "size": 11, "sha256": sha(b"other content")}]
    refused = api.post("commit", uri=uri, files=listed, keep=None)
    assert refused.status_code == 422 and "events.log" in refused.json()["detail"]
    assert "sha256" in refused.json()["detail"]
    short = api.post("commit", uri=uri, files=[{"path": "events.log", "size": 4, "sha256": sha(b"new ")}])
    assert short.status_code == 422 and "11 bytes" in short.json()["detail"]
    missing = api.commit(uri, {"events.log": b"new content", "more.log": b"more"})
    assert missing.status_code == 422 and "more.log" in missing.json()["detail"]
    assert (target / "events.log").read_bytes() == b"old"
    # The staged file is still there: the right commit goes through, replacing the folder whole.
    assert api.commit(uri, {"events.log": b"new content"}).status_code == 200
    assert (target / "events.log").read_bytes() == b"new content"


def test_a_single_file_output_and_an_empty_file_commit(world) -> None:  # type: ignore[no-untyped-def]
    api, store, run = world["api"], world["store"], world["run"]
    uri = output(run)
    (store / "runs" / str(run.pk) / "attempt-1").mkdir(parents=True)
    (store / "runs" / str(run.pk) / "attempt-1" / "adapter").write_bytes(b"previous")
    assert api.send(uri, {"": b"one file"}, chunk=3)["size"] == 8
    assert (store / "runs" / str(run.pk) / "attempt-1" / "adapter").read_bytes() == b"one file"
    # A folder with an empty file (a worker sends no chunk for it).
    assert api.send(uri, {"empty.txt": b"", "a": b"a"})["size"] == 1
    assert (store / "runs" / str(run.pk) / "attempt-1" / "adapter" / "empty.txt").read_bytes() == b""


def test_a_checkpoint_commit_prunes_the_checkpoints_the_trainer_did_not_keep(world) -> None:  # type: ignore[no-untyped-def]
    api, store, run = world["api"], world["store"], world["run"]
    folder = store / "runs" / str(run.pk) / "checkpoints"
    for step in (10, 20, 30):
        write(folder / f"checkpoint-{step}", {"trainer_state.json": b"{}"})
    write(folder, {"notes.txt": b"kept"})
    files = {"adapter_model.safetensors": b"c40", "trainer_state.json": b"{}"}
    bad = api.post(
        "commit",
        uri=f"{checkpoints(run)}/checkpoint-40",
        files=[{"path": p, "size": len(d), "sha256": sha(d)} for p, d in files.items()],
        keep=["checkpoint-30", "../x"],
    )
    assert bad.status_code == 400
    reply = api.send(f"{checkpoints(run)}/checkpoint-40", files, keep=["checkpoint-30", "checkpoint-40"])
    assert reply["size"] == 5
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-30", "checkpoint-40", "notes.txt"]
    listing = api.manifest(checkpoints(run), latest_checkpoint=True).json()
    assert [f["path"] for f in listing["files"]] == [f"checkpoint-40/{name}" for name in sorted(files)]
    # The checkpoint folder itself is written a checkpoint at a time, never whole.
    assert api.commit(checkpoints(run), {"x": b"x"}).status_code == 403


def test_a_job_writes_only_its_outputs(world) -> None:  # type: ignore[no-untyped-def]
    api, run, other = world["api"], world["run"], world["other"]
    for uri in (world["dataset"].uri, "store://adapters/start", output(other), output(run, attempt=2)):
        refused = api.put(uri, "a", 0, b"a")
        assert refused.status_code == 403 and uri in refused.json()["detail"]
        assert api.post("offset", uri=uri, path="a").status_code == 403
        assert api.commit(uri, {"a": b"a"}).status_code == 403
    assert api.put(output(run), "../x", 0, b"a").status_code == 400
    assert api.put(output(run), "/etc/x", 0, b"a").status_code == 400
    assert api.post("offset", uri=output(run), path="a/../../x").status_code == 400
    assert api.put("store://../../x", "a", 0, b"a").status_code == 400


def test_a_stale_attempt_can_neither_upload_nor_commit(world) -> None:  # type: ignore[no-untyped-def]
    api, run, worker, token = world["api"], world["run"], world["worker"], world["token"]
    uri = output(run)
    assert api.put(uri, "a.bin", 0, b"half").status_code == 200
    ledger.requeue_or_fail(TrainingRun.objects.get(pk=run.pk), "worker lost", max_attempts=3)
    assert ledger.dispatch(TrainingRun.objects.get(pk=run.pk), worker) == 2
    for response in (
        api.put(uri, "a.bin", 4, b"more"),
        api.commit(uri, {"a.bin": b"half"}),
        api.post("offset", uri=uri, path="a.bin"),
        api.manifest(world["dataset"].uri),
        api.get(world["dataset"].uri),
    ):
        assert response.status_code == 409, response.content
    assert not (world["store"] / "runs" / str(run.pk) / "attempt-1" / "adapter").exists()
    # The new attempt stages apart, and writes its own output.
    second = Api(token, run.pk, 2)
    assert second.offset(output(run, 2), "a.bin") == 0
    assert second.put(uri, "a.bin", 0, b"x").status_code == 403
    assert second.send(output(run, 2), {"a.bin": b"x"})["size"] == 1
    assert not list((world["store"] / ".uploads").iterdir())  # the first attempt's half upload is gone too


def test_an_adapter_job_uses_its_own_path(world) -> None:  # type: ignore[no-untyped-def]
    """The routes exist for every kind of job: another kind's id under the wrong path is not found."""
    assert Api(world["token"], world["run"].pk, 1, kind="adapter-jobs").manifest("store://x").status_code == 404


def test_problem_bodies_are_json(world) -> None:  # type: ignore[no-untyped-def]
    refused = world["api"].put(output(world["run"]), "a", 0, b"a", digest="0" * 64)
    assert refused["Content-Type"] == "application/problem+json"
    assert json.loads(refused.content)["status"] == 422


def test_a_chunk_larger_than_django_buffers_is_streamed_and_one_over_the_limit_refused(world, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    api, uri = world["api"], output(world["run"])
    big = bytes(range(256)) * (3 << 12)  # 3 MiB: over Django's 2.5 MB cap on request.body
    assert api.put(uri, "big.bin", 0, big).json() == {"offset": len(big)}
    monkeypatch.setattr(artifacts, "MAX_CHUNK_BYTES", 1000)
    refused = api.put(uri, "big.bin", len(big), b"x" * 1001)
    assert refused.status_code == 413
    assert api.offset(uri, "big.bin") == len(big)
    committed = api.commit(uri, {"big.bin": big})
    assert committed.status_code == 200
    assert (world["store"] / uri.removeprefix("store://") / "big.bin").read_bytes() == big


# --- housekeeping -------------------------------------------------------------------------------------------


def test_the_store_sweep_removes_staging_of_ended_attempts_and_stale_digests(world) -> None:  # type: ignore[no-untyped-def]
    api, store, run = world["api"], world["store"], world["run"]
    # The running attempt stages a file and is cut off before its commit; the manifest caches the dataset's digest.
    assert api.put(output(run), "adapter_model.safetensors", 0, b"x" * 100).status_code == 200
    assert api.manifest(world["dataset"].uri).status_code == 200
    staged = store / artifacts.UPLOADS / f"jobs-{run.pk}-a1"
    digests = list((store / artifacts.HASHES).glob("*/*.json"))
    assert staged.is_dir() and digests
    stray = store / artifacts.UPLOADS / "not-a-staging-folder"
    stray.mkdir()

    # While the attempt runs, nothing of it goes; a changed file's digest does.
    assert artifacts.sweep_store(force=True) == {"staging": 0, "digests": 0}
    assert artifacts.sweep_store() == {}  # the scheduler's passes sweep every SWEEP_EVERY_S at most
    dataset_file = store / world["dataset"].uri.removeprefix("store://")
    dataset_file.write_bytes(dataset_file.read_bytes() + b"\n")
    assert artifacts.sweep_store(force=True) == {"staging": 0, "digests": 1}
    assert staged.is_dir()

    # Once the attempt has ended (here: failed for good), its staging is garbage.
    TrainingRun.objects.filter(pk=run.pk).update(state="failed")
    assert artifacts.sweep_store(force=True) == {"staging": 1, "digests": 0}
    assert not staged.exists() and stray.is_dir()  # what the API did not make is left alone
