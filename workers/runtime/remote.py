"""A worker without the shared store: its job's inputs fetched through the worker API into a folder of its own,
its outputs and checkpoints uploaded back (protocol: workers.contract.artifacts).

- Inputs read whole (datasets, adapters, a base model given as a local folder) go through a cache keyed by
  sha256 and bounded in size (least recently used out first), so that the next job on the same base downloads
  nothing. Downloads are streamed to disk, resumed from where a dropped connection left them (Range), and
  verified against the server's sha256.
- Outputs are uploaded in chunks, each with its sha256 (a corrupted chunk is refused and sent again), resumed
  from the server's offset after a dropped connection, and committed at once once every file checks out.
- A checkpoint is uploaded in the background while training goes on; its `checkpoint` event is reported once
  the upload is committed, so that the run lists only checkpoints another worker can resume from.
- The outputs are uploaded before the success is reported: an upload that fails fails the attempt, saying why.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from workers.config import (
    artifact_store_root,
    worker_artifacts_dir,
    worker_cache_bytes,
    worker_cache_dir,
    worker_store_mode,
)
from workers.contract.artifacts import MODEL_SCHEME, JobArtifacts, job_artifacts
from workers.contract.jobrunner import REQUEUE
from workers.contract.store import COPY_BYTES, ArtifactStore, sha256_of, sha256_stream
from workers.formatting import duration, plural, size
from workers.runtime.client import HttpReporter, WorkerClient

CHUNK_BYTES = 8 << 20  # an upload's chunk: what is sent again when one is refused
CHUNK_RETRIES = 4  # sends of one chunk before the upload gives up
DOWNLOAD_RETRIES = 6  # resumed downloads of one file before the fetch gives up
PROGRESS_S = 5.0  # a large transfer logs its progress this often
MANIFEST_TIMEOUT_S = 900.0
BLOB = re.compile(r"[0-9a-f]{64}")


class TransferError(RuntimeError):
    """An artifact could not be moved: the message says which, and why. `retryable`: another attempt (on another
    worker, or later) may succeed where this one did not: a full disk, the control plane out of reach."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class InputCache:
    """Read-only inputs by sha256 (`blobs/<sha256>`), bounded to `max_bytes`: the least recently used go first.
    A job's folder links to the blobs (hard links: no copy), so that evicting one never breaks a running job."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root, self.max_bytes = root, max_bytes
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)

    def get(self, sha256: str, size_bytes: int) -> Path | None:
        blob = self.blobs / sha256
        if blob.is_file() and blob.stat().st_size == size_bytes:
            os.utime(blob)  # recently used
            return blob
        return None

    def partial(self, sha256: str) -> Path:
        """Where a download of this blob is written (kept across attempts: a later fetch resumes it)."""
        return self.blobs / f"{sha256}.part"

    def put(self, part: Path, sha256: str) -> Path:
        blob = self.blobs / sha256
        os.replace(part, blob)
        self.evict(keep=blob)
        return blob

    @contextlib.contextmanager
    def lock(self, sha256: str) -> Iterator[None]:
        """Held while one blob is looked up and downloaded: two jobs of this worker needing the same input download
        it once, the second waiting for the first."""
        with (self.blobs / f"{sha256}.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def stored(self) -> list[Path]:
        """The complete blobs (not downloads in progress, nor locks)."""
        return [p for p in self.blobs.iterdir() if BLOB.fullmatch(p.name) and p.is_file()]

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.stored())

    def evict(self, keep: Path | None = None) -> list[Path]:
        blobs = sorted((p for p in self.stored() if p != keep), key=lambda p: p.stat().st_mtime)
        used, gone = self.used_bytes(), []
        for blob in blobs:
            if used <= self.max_bytes:
                break
            used -= blob.stat().st_size
            blob.unlink(missing_ok=True)
            gone.append(blob)
        return gone


def place(source: Path, target: Path) -> None:
    """`target` holding `source`'s bytes: a hard link where the file system allows, a copy otherwise."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".linking")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


class Transfers:
    """The worker API's artifact calls for one attempt of one job, with progress said in the job's log."""

    def __init__(self, client: WorkerClient, path: str, job_id: int, attempt: int, reporter: HttpReporter) -> None:
        self.client, self.reporter, self.attempt = client, reporter, attempt
        self.base = f"/{path}/{job_id}/artifacts"

    def manifest(self, uri: str, latest_checkpoint: bool = False) -> dict[str, Any]:
        # The first listing of a large local base model hashes it on the server (about 2 s a GB): minutes.
        response = self.client.request("POST", f"{self.base}/manifest", accept=(403,), timeout=MANIFEST_TIMEOUT_S,
                                       json={"attempt": self.attempt, "uri": uri, "latest_checkpoint": latest_checkpoint})
        _check(response, f"listing {uri}")
        return dict(response.json())

    def download(self, uri: str, entry: dict[str, Any], part: Path) -> None:
        """The file into `part`, resumed from its current length, verified against the manifest's sha256."""
        expected, total = str(entry["sha256"]), int(entry["size"])
        part.parent.mkdir(parents=True, exist_ok=True)
        if part.exists() and part.stat().st_size > total:
            part.unlink()
        part.touch()  # an empty file has nothing to download, but is a file all the same
        params = {"attempt": self.attempt, "uri": uri, "path": entry["path"]}
        for _ in range(DOWNLOAD_RETRIES):
            have = part.stat().st_size if part.exists() else 0
            if have < total:
                try:
                    with self.client.stream(f"{self.base}/file", params=params,
                                            headers={"Range": f"bytes={have}-"} if have else {}) as response:
                        if response.status_code not in (200, 206):
                            response.read()
                            _check(response, f"downloading {uri} {entry['path']}".strip())
                        mode = "ab" if response.status_code == 206 else "wb"
                        with part.open(mode) as out:
                            for piece in response.iter_bytes(COPY_BYTES):
                                out.write(piece)
                except (OSError, httpx.TransportError) as exc:
                    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                        raise TransferError(f"the worker's disk is full ({part.parent}) while downloading {uri} "
                                            f"({size(total)})", retryable=True) from exc
                    time.sleep(1.0)
                    continue
            with part.open("rb") as fh:
                digest = sha256_stream(fh).hexdigest()
            if digest == expected:
                return
            part.unlink()  # corrupted on the way: download it again from its start
        raise TransferError(f"{uri} {entry['path']}: the download did not arrive whole after {DOWNLOAD_RETRIES} tries")

    def upload(self, uri: str, root: Path, keep: list[str] | None = None, quiet: bool = False) -> dict[str, Any]:
        """A file or folder of this worker's store uploaded under `uri` and committed; returns the commit reply.
        `quiet`: nothing said in the log (a background upload must not touch the reporter)."""
        files = _listing(root)
        total = sum(f["size"] for f in files)
        started, sent = time.monotonic(), 0
        if not quiet:
            self.reporter.log(f"Uploading {uri}: {plural(len(files), 'file')}, {size(total)}")
        for entry in files:
            local = root / entry["path"] if entry["path"] else root
            sent = self._upload_file(uri, entry, local, sent, total, started, quiet)
        reply = self.commit(uri, files, keep)
        seconds = time.monotonic() - started
        if not quiet:
            self.reporter.log(f"Uploaded {uri}: {size(total)} in {duration(seconds)} "
                              f"({size(total / max(seconds, 1e-3))}/s)")
        return {**reply, "seconds": seconds}

    def commit(self, uri: str, files: list[dict[str, Any]], keep: list[str] | None = None) -> dict[str, Any]:
        response = self.client.request("POST", f"{self.base}/commit", accept=(403,),
                                       json={"attempt": self.attempt, "uri": uri, "files": files, "keep": keep})
        _check(response, f"committing {uri}")
        return dict(response.json())

    def _upload_file(self, uri: str, entry: dict[str, Any], local: Path, sent: int, total: int, started: float,
                     quiet: bool) -> int:
        # From the start: where the server holds part of the file already (an upload resumed), it answers the
        # first chunk with its offset and the upload goes on from there; a fresh file costs no extra call.
        offset = 0
        last_said = time.monotonic()
        with local.open("rb") as fh:
            while offset < entry["size"]:
                fh.seek(offset)
                chunk = fh.read(CHUNK_BYTES)
                offset = self.send_chunk(uri, entry["path"], offset, chunk)
                if offset > entry["size"]:
                    raise TransferError(f"{uri} {entry['path']}: the server holds more than the file ({offset} bytes)")
                sent += len(chunk)
                if not quiet and time.monotonic() - last_said >= PROGRESS_S:
                    last_said = time.monotonic()
                    speed = sent / max(last_said - started, 1e-3)
                    self.reporter.log(f"Uploading {uri}: {size(sent)} of {size(total)} ({size(speed)}/s)")
                    self.reporter.maybe_flush()
        return sent

    def _offset(self, uri: str, path: str) -> int:
        response = self.client.request("POST", f"{self.base}/offset", accept=(403,),
                                       json={"attempt": self.attempt, "uri": uri, "path": path})
        _check(response, f"resuming the upload of {uri}")
        return int(response.json()["offset"])

    def send_chunk(self, uri: str, path: str, offset: int, chunk: bytes) -> int:
        """One chunk of a file at `offset`, sent again where it arrived damaged; the server's offset after it."""
        digest = hashlib.sha256(chunk).hexdigest()
        for _ in range(CHUNK_RETRIES):
            try:
                response = self.client.request(
                    "PUT", f"{self.base}/upload", accept=(403, 416, 422), content=chunk,
                    params={"attempt": self.attempt, "uri": uri, "path": path, "offset": offset},
                    headers={"X-Chunk-Sha256": digest, "Content-Type": "application/octet-stream"},
                )
            except httpx.TransportError:
                return self._offset(uri, path)  # the connection dropped: go on from what the server has
            if response.status_code == 422:
                continue  # damaged on the way: the same chunk again
            if response.status_code == 416:
                return int(response.json()["offset"])  # the server has more (an earlier try arrived) or less
            _check(response, f"uploading {uri} {path}".strip())
            return int(response.json()["offset"])
        raise TransferError(f"{uri} {path}: a chunk at byte {offset} was refused {CHUNK_RETRIES} times (checksum)")


class RemoteReporter(HttpReporter):
    """The job's reporter on a worker without the shared store: it fetches the job's inputs when the job starts,
    uploads each checkpoint in the background (the `checkpoint` event follows the upload) and the outputs before
    the success is reported."""

    def __init__(self, client: WorkerClient, job_id: int, attempt: int, path: str, spec: Any,
                 local: ArtifactStore | None = None, cache: InputCache | None = None) -> None:
        super().__init__(client, job_id, attempt, path=path)
        self.spec, self.artifacts = spec, job_artifacts(spec)
        self.local = local or ArtifactStore(worker_artifacts_dir())
        self.cache = cache or InputCache(worker_cache_dir(), worker_cache_bytes())
        self.transfers = Transfers(client, path, job_id, attempt, self)
        self._uploads = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending: list[tuple[concurrent.futures.Future[Any], int, dict[str, Any], Path]] = []
        self._has_started = False

    # --- the job's start: its inputs --------------------------------------------------------------------------

    def started(self) -> None:
        if not self._has_started:  # the runner says so again once the inputs are here
            super().started()
            self._has_started = True

    def prepare(self) -> ArtifactStore | None:
        """Fetch the job's inputs into this worker's folder; the store the runner gets, or None when the fetch
        failed (the attempt is then reported failed)."""
        self.started()
        if self.user_cancelled:
            return self.local  # the runner reports the cancel before loading anything
        try:
            self.fetch(self.artifacts)
        except (TransferError, OSError, httpx.TransportError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                exc = TransferError(f"the worker's disk is full ({self.local.root}): {exc}", retryable=True)
            elif isinstance(exc, httpx.TransportError):
                exc = TransferError(f"the control plane could not be reached: {exc}", retryable=True)
            retry = isinstance(exc, TransferError) and exc.retryable
            self.log(f"{'Handed back' if retry else 'Failed'}: {exc}", level="error")
            self.finish(REQUEUE if retry else "failed", error=str(exc))
            return None
        return self.local

    def fetch(self, artifacts: JobArtifacts) -> None:
        started, fetched = time.monotonic(), 0
        for uri in artifacts.inputs:
            fetched += self._fetch(uri, self.local.path(uri), cached=True)
        for uri in artifacts.carried:
            fetched += self._fetch(uri, self.local.path(uri), cached=False)
        if artifacts.checkpoints:
            fetched += self._fetch(artifacts.checkpoints, self.local.path(artifacts.checkpoints), cached=False,
                                   latest_checkpoint=True)
        if artifacts.model:
            folder = self._model_folder(artifacts.model)
            fetched += self._fetch(MODEL_SCHEME + artifacts.model, folder, cached=True)
            self.spec.base_model.source = str(folder)  # the runner loads this worker's copy
        if fetched:
            seconds = time.monotonic() - started
            self.log(f"Inputs fetched: {size(fetched)} in {duration(seconds)} ({size(fetched / max(seconds, 1e-3))}/s); "
                     f"cache {size(self.cache.used_bytes())} of {size(self.cache.max_bytes)}")
        self.flush()

    def _model_folder(self, source: str) -> Path:
        name = Path(source).expanduser().name or "model"
        return self.local.root / "models" / f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"

    def _fetch(self, uri: str, target: Path, cached: bool, latest_checkpoint: bool = False) -> int:
        """Bring a file or folder here; returns the bytes downloaded (0 when all came from the cache)."""
        listing = self.transfers.manifest(uri, latest_checkpoint=latest_checkpoint)
        if listing["kind"] == "missing":
            if latest_checkpoint or uri in self.artifacts.carried:
                return 0
            if uri.startswith(MODEL_SCHEME):
                raise TransferError(f"the base model folder {uri[len(MODEL_SCHEME):]} does not exist on the control plane")
            raise TransferError(f"{uri} does not exist in the control plane's store")
        files = listing["files"]
        missing = [f for f in files if not (cached and self.cache.get(f["sha256"], int(f["size"])))]
        total = sum(int(f["size"]) for f in missing)
        if missing:
            self.log(f"Downloading {uri}: {plural(len(missing), 'file')}, {size(total)}")
            self.flush()
        started, last_said, done = time.monotonic(), time.monotonic(), 0
        for entry in files:
            local = target / entry["path"] if entry["path"] else target
            if cached:
                with self.cache.lock(entry["sha256"]):
                    blob = self.cache.get(entry["sha256"], int(entry["size"]))
                    if blob is None:
                        part = self.cache.partial(entry["sha256"])
                        self.transfers.download(uri, entry, part)
                        blob = self.cache.put(part, entry["sha256"])
                        done += int(entry["size"])
                    place(blob, local)
            else:
                part = local.with_name(local.name + ".part")
                self.transfers.download(uri, entry, part)
                os.replace(part, local)
                done += int(entry["size"])
            if missing and time.monotonic() - last_said >= PROGRESS_S:
                last_said = time.monotonic()
                self.log(f"Downloading {uri}: {size(done)} of {size(total)} "
                         f"({size(done / max(last_said - started, 1e-3))}/s)")
                self.maybe_flush()
        if cached and not missing and files:
            self.log(f"{uri}: {plural(len(files), 'file')} from the worker's cache")
        return done

    # --- checkpoints, in the background -----------------------------------------------------------------------

    def _event(self, kind: str, message: str = "", level: str = "info", data: dict[str, Any] | None = None) -> None:
        if kind == "checkpoint" and self.artifacts.checkpoints and data and "step" in data:
            self._queue_checkpoint(int(data["step"]), dict(data))
            return
        super()._event(kind, message, level, data)

    def _queue_checkpoint(self, step: int, data: dict[str, Any]) -> None:
        """Upload checkpoint-`step` in the background, from hard links made now: the trainer may delete the folder
        (keep_checkpoints) before its upload ends. Where checkpoints come faster than they upload, a newer one
        replaces those still waiting: a resumed attempt needs only the latest."""
        uri = f"{self.artifacts.checkpoints.rstrip('/')}/checkpoint-{step}"
        snapshot = self.local.root / ".uploading" / f"checkpoint-{step}"
        shutil.rmtree(snapshot, ignore_errors=True)
        folder = self.local.path(uri)
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                place(file, snapshot / file.relative_to(folder))
        for future, _, _, older in self._pending:
            if future.cancel():
                shutil.rmtree(older, ignore_errors=True)
        keep = [f"checkpoint-{k}" for k in data.get("kept") or [step]]
        future = self._uploads.submit(self._upload_checkpoint, uri, snapshot, keep)
        self._pending.append((future, step, data, snapshot))

    def _upload_checkpoint(self, uri: str, snapshot: Path, keep: list[str]) -> float:
        try:
            return float(self.transfers.upload(uri, snapshot, keep=keep, quiet=True)["seconds"])
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def _report_uploaded(self, wait: bool) -> None:
        """The checkpoint events of finished uploads, in order (all of them, waiting, with `wait`)."""
        while self._pending and (wait or self._pending[0][0].done()):
            future, step, data, _ = self._pending.pop(0)
            if future.cancelled():  # replaced by a newer one before its upload began
                continue
            try:
                seconds = future.result()
            except Exception as exc:  # the next checkpoint is tried all the same; this one is not resumable
                super()._event("log", f"Checkpoint at step {step} could not be uploaded: {exc}", "warning")
                continue
            super()._event("checkpoint", f"Checkpoint saved at step {step}", "info", {**data, "upload_s": round(seconds, 2)})

    def flush(self) -> None:
        self._report_uploaded(wait=False)
        super().flush()

    # --- the end: the outputs ---------------------------------------------------------------------------------

    def finish(self, state: str, result: dict[str, Any] | None = None, error: str = "") -> None:
        self._report_uploaded(wait=True)
        self._uploads.shutdown(wait=True)
        if state == "succeeded":
            try:
                for uri in self.artifacts.outputs + self.artifacts.carried:
                    if self.local.path(uri).exists():
                        self.transfers.upload(uri, self.local.path(uri))
            except (TransferError, OSError) as exc:
                state, error = "failed", f"the job's outputs could not be uploaded to the control plane: {exc}"
                self.log(f"Failed: {error}", level="error")
        elif state != REQUEUE:  # (a requeue is a full disk or an unreachable control plane: nothing to try)
            # A failed or cancelled attempt's trackers' files (TensorBoard, MLflow, W&B offline) are what shows
            # how it went: kept as on a worker with the shared store. Its outputs are not (never half-written).
            for uri in self.artifacts.carried:
                try:
                    if self.local.path(uri).exists():
                        self.transfers.upload(uri, self.local.path(uri))
                except (TransferError, OSError) as exc:
                    self.log(f"The trackers' files ({uri}) could not be uploaded: {exc}", level="warning")
        super().finish(state, result, error)


def _listing(root: Path) -> list[dict[str, Any]]:
    """Each file of a file or folder with its size and sha256, in path order ("" for a single file)."""
    if root.is_file():
        return [{"path": "", "size": root.stat().st_size, "sha256": sha256_of(root)}]
    if not root.is_dir():
        raise TransferError(f"{root} does not exist on this worker")
    return [{"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": sha256_of(p)}
            for p in sorted(root.rglob("*")) if p.is_file()]


def _check(response: Any, doing: str) -> None:
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail") or response.text
        except ValueError:  # not JSON (a proxy's page)
            detail = response.text
        raise TransferError(f"{doing}: the control plane answered {response.status_code}: {detail}")




def job_reporter(client: WorkerClient, job_id: int, attempt: int, path: str, spec: Any) -> HttpReporter:
    """The reporter a job runs with: a plain one with the shared store (local mode), one that moves the job's
    artifacts through the worker API otherwise (remote mode)."""
    if worker_store_mode() == "local":
        return HttpReporter(client, job_id, attempt, path=path)
    return RemoteReporter(client, job_id, attempt, path, spec)


def job_store(reporter: HttpReporter) -> ArtifactStore | None:
    """The store the job's runner gets: the shared one, or this worker's folder with the job's inputs fetched
    (None when the fetch failed: the attempt has been reported failed)."""
    if isinstance(reporter, RemoteReporter):
        return reporter.prepare()
    return ArtifactStore(artifact_store_root())
