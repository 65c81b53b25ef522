"""The worker API's artifact calls: a worker without the shared store reads its job's inputs and publishes its
outputs through these (protocol: workers.contract.artifacts).

What a job may read and write is read off its spec (`job_artifacts`); every call is fenced to the attempt the
worker holds. Uploads are staged per job and attempt under `<store>/.uploads/` and moved into place at once on
commit, so the store never shows half an artifact. Digests of the files listed are cached under
`<store>/.hashes/`, so that a large base model is hashed once, not at every manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from django.conf import settings
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse

from webapp.fleet.api import worker_call, worker_endpoint
from webapp.fleet.models import Worker
from webapp.jobs import ledger
from webapp.jobs.registry import worker_paths
from webapp.problem_details import PROBLEM_CONTENT_TYPE, problem_body
from workers.contract.artifacts import (
    CHECKPOINT,
    MODEL_SCHEME,
    JobArtifacts,
    job_artifacts,
    latest_checkpoint,
    relative_file,
)
from workers.contract.store import COPY_BYTES, ArtifactStore, sha256_of, sha256_stream, size_of

MAX_CHUNK_BYTES = 64 << 20  # the largest upload chunk taken
UPLOADS, HASHES = ".uploads", ".hashes"  # the store's staging and digest-cache folders: never listed
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


Problem = ledger.Rejected  # a refused artifact call: status, detail, code, and fields for the problem body


# --- the job, its store and what it may touch ---------------------------------------------------------------


@dataclass
class Access:
    """A fenced call's job, what it may read and write, and the control plane's store."""

    job: Any
    artifacts: JobArtifacts
    store: ArtifactStore
    path: str
    attempt: int

    def staging(self) -> Path:
        """This attempt's staging folder: `<store>/.uploads/<path>-<job id>-a<attempt>`."""
        return self.store.root / UPLOADS / f"{self.path}-{self.job.pk}-a{self.attempt}"

    def staged_folder(self, uri: str) -> Path:
        """Where the files of `uri` are staged (a name safe on any filesystem, unique per URI)."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.removeprefix("store://")).strip("._")[:80] or "artifact"
        return self.staging() / f"{slug}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def fenced(worker: Worker, path: str, job_id: int, attempt: Any) -> Access:
    if isinstance(attempt, bool):
        raise ValueError("attempt must be an integer")
    attempt = int(attempt)
    job = ledger.fenced_job(worker, worker_paths()[path], job_id, attempt)
    return Access(job, job_artifacts(job.job_spec()), ArtifactStore(settings.ARTIFACT_STORE), path, attempt)


def text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string")
    return value


def readable(access: Access, uri: str) -> tuple[Path, bool]:
    """The local path of an input the job may read, and whether it is in the store (not a `model:` folder)."""
    if uri.startswith(MODEL_SCHEME):
        if not access.artifacts.may_read(uri):
            raise Problem(403, f"this job may not read {uri}")
        return Path(uri[len(MODEL_SCHEME) :]).expanduser().resolve(), False
    target = access.store.path(uri)  # ValueError (400) when not in the store
    if not access.artifacts.may_read(uri):
        raise Problem(403, f"this job may not read {uri}")
    return target, True


def writable(access: Access, uri: str) -> Path:
    if uri.startswith(MODEL_SCHEME):
        raise Problem(403, f"this job may not write {uri}: a base model is never written")
    target = access.store.path(uri)
    if not access.artifacts.may_write(uri):
        raise Problem(403, f"this job may not write {uri}")
    return target


def file_path(value: Any) -> PurePosixPath:
    return relative_file(text(value if value is not None else "", "path"))


def hidden(relative: PurePosixPath) -> bool:
    """A file the listings leave out: an upload in progress, the store's staging or digest folders."""
    return bool(relative.parts) and (
        relative.name.endswith(".part") or any(p in (UPLOADS, HASHES) for p in relative.parts)
    )


# --- listing, with digests cached ---------------------------------------------------------------------------


def cached_sha256(store: ArtifactStore, file: Path) -> tuple[int, str]:
    """The size and sha256 of a file, hashed streaming and remembered under `<store>/.hashes/` by its absolute
    path, size, mtime, ctime and inode: a file changed in any way is hashed again."""
    real = file.resolve()
    before = real.stat()
    stamp = [str(real), before.st_size, before.st_mtime_ns, before.st_ctime_ns, before.st_ino]
    key = hashlib.sha256(str(real).encode()).hexdigest()
    entry = store.root / HASHES / key[:2] / f"{key}.json"
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        cached = json.loads(entry.read_text())
        if cached["stamp"] == stamp and SHA256_HEX.fullmatch(cached["sha256"]):
            return before.st_size, str(cached["sha256"])
    with real.open("rb") as fh:
        digest = sha256_stream(fh).hexdigest()
    after = real.stat()
    if [after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino] == stamp[1:]:
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs a hash next time
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f"{entry.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
            os.replace(tmp, entry)
    return before.st_size, digest


def folder_files(folder: Path, inside: Path | None) -> list[tuple[str, Path]]:
    """The files of a folder by path (posix, sorted), hidden ones left out; with `inside`, files whose real path
    leaves it (a link out of the store) too. Linked folders are not followed."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in (UPLOADS, HASHES)]
        for name in files:
            path = Path(parent) / name
            relative = PurePosixPath(path.relative_to(folder).as_posix())
            if hidden(relative) or not path.is_file():
                continue
            if inside is not None and not path.resolve().is_relative_to(inside):
                continue
            found.append((relative.as_posix(), path))
    return sorted(found)


def listing(store: ArtifactStore, target: Path, in_store: bool, prefix: str = "") -> tuple[str, list[dict[str, Any]]]:
    if target.is_file():
        size, digest = cached_sha256(store, target)
        return "file", [{"path": prefix, "size": size, "sha256": digest}]
    if not target.is_dir():
        return "missing", []
    files = []
    for relative, path in folder_files(target, store.root if in_store else None):
        size, digest = cached_sha256(store, path)
        files.append({"path": f"{prefix}{relative}", "size": size, "sha256": digest})
    return "dir", files


@worker_endpoint
def manifest(worker: Worker, payload: dict[str, Any], job_id: int, path: str) -> dict[str, Any]:
    access = fenced(worker, path, job_id, payload["attempt"])
    uri = text(payload.get("uri"), "uri")
    latest = payload.get("latest_checkpoint", False)
    if not isinstance(latest, bool):
        raise ValueError("latest_checkpoint must be true or false")
    target, in_store = readable(access, uri)
    if latest:
        if not access.artifacts.checkpoints or uri != access.artifacts.checkpoints:
            raise Problem(403, f"latest_checkpoint lists the run's checkpoint folder only, not {uri}")
        newest = latest_checkpoint(target)
        if newest is None:
            return {"uri": uri, "kind": "missing", "files": []}
        _kind, files = listing(access.store, newest, in_store, prefix=f"{newest.name}/")
        return {"uri": uri, "kind": "dir", "files": files}
    kind, files = listing(access.store, target, in_store)
    return {"uri": uri, "kind": kind, "files": files}


# --- download ------------------------------------------------------------------------------------------------

RANGE_FROM = re.compile(r"bytes=(\d+)-")


def query(request: HttpRequest, name: str) -> str:
    if name not in request.GET:
        raise KeyError(name)
    return request.GET[name]


@worker_call("GET")
def file(request: HttpRequest, worker: Worker, job_id: int, path: str) -> HttpResponse:
    """A file of an input, streamed; `Range: bytes=N-` answers 206 from byte N (other ranges: the whole file)."""
    access = fenced(worker, path, job_id, query(request, "attempt"))
    uri = query(request, "uri")
    relative = file_path(request.GET.get("path", ""))
    root, in_store = readable(access, uri)
    target = root.joinpath(*relative.parts)
    if hidden(relative) or not target.is_file():
        raise Problem(404, f"{uri} has no file {relative.as_posix()!r}" if relative.parts else f"{uri} is no file")
    real = target.resolve()
    if in_store and not (real == root or real.is_relative_to(root)):
        raise Problem(404, f"{uri} has no file {relative.as_posix()!r} in the store")
    fh = real.open("rb")
    size = os.fstat(fh.fileno()).st_size
    start = RANGE_FROM.fullmatch(request.headers.get("Range", "").strip())
    if start is None:
        return FileResponse(fh, content_type="application/octet-stream")
    first = int(start.group(1))
    if first > size:
        fh.close()
        body = problem_body(416, f"the file has {size} bytes, the range starts at {first}", instance=request.path)
        return JsonResponse(
            body, status=416, content_type=PROBLEM_CONTENT_TYPE, headers={"Content-Range": f"bytes */{size}"}
        )
    fh.seek(first)
    response = FileResponse(fh, status=206, content_type="application/octet-stream")
    # From the end of the file nothing is left to send: an empty 206 (bytes N-(N-1) cannot be written).
    response["Content-Range"] = f"bytes {first}-{size - 1}/{size}" if first < size else f"bytes */{size}"
    response["Content-Length"] = str(size - first)
    return response


# --- upload --------------------------------------------------------------------------------------------------


def staged_file(folder: Path, relative: PurePosixPath) -> Path:
    """`<staging folder>/<file path>.part` (a single-file artifact's is `.part`)."""
    if not relative.parts:
        return folder / ".part"
    return folder.joinpath(*relative.parts[:-1], relative.parts[-1] + ".part")


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """`folder` created and held exclusively (an upload's chunks and its commit never interleave). A folder
    removed while waiting for it (a commit) is made and locked again."""
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(folder).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield
                return
        finally:
            os.close(fd)


@worker_endpoint
def offset(worker: Worker, payload: dict[str, Any], job_id: int, path: str) -> dict[str, Any]:
    access = fenced(worker, path, job_id, payload["attempt"])
    uri = text(payload.get("uri"), "uri")
    relative = file_path(payload.get("path", ""))
    writable(access, uri)
    part = staged_file(access.staged_folder(uri), relative)
    return {"offset": part.stat().st_size if part.is_file() else 0}


@worker_call("PUT")
def upload(request: HttpRequest, worker: Worker, job_id: int, path: str) -> HttpResponse:
    """A chunk of a file, appended to its staged copy if it starts where that ends and its sha256 checks out."""
    access = fenced(worker, path, job_id, query(request, "attempt"))
    uri = query(request, "uri")
    relative = file_path(request.GET.get("path", ""))
    writable(access, uri)
    start = int(query(request, "offset"))
    if start < 0:
        raise ValueError("offset must not be negative")
    expected = request.headers.get("X-Chunk-Sha256", "").strip().lower()
    if not SHA256_HEX.fullmatch(expected):
        raise ValueError("the X-Chunk-Sha256 header must be the chunk's sha256 in hex")
    length = request.headers.get("Content-Length") or "0"
    if int(length) > MAX_CHUNK_BYTES:
        raise Problem(413, f"a chunk is at most {MAX_CHUNK_BYTES} bytes, this one has {length}")
    folder = access.staged_folder(uri)
    with locked(folder):
        part = staged_file(folder, relative)
        current = part.stat().st_size if part.is_file() else 0
        if start != current:
            raise Problem(416, f"the upload of this file is at byte {current}, not {start}", extra={"offset": current})
        part.parent.mkdir(parents=True, exist_ok=True)
        with part.open("ab") as out:
            digest, received = hashlib.sha256(), 0
            for piece in iter(lambda: request.read(COPY_BYTES), b""):
                received += len(piece)
                if received > MAX_CHUNK_BYTES:
                    out.truncate(start)
                    raise Problem(413, f"a chunk is at most {MAX_CHUNK_BYTES} bytes")
                digest.update(piece)
                out.write(piece)
            if digest.hexdigest() != expected:
                out.truncate(start)
                raise Problem(
                    422,
                    f"the chunk at byte {start} has sha256 {digest.hexdigest()}, not {expected}: "
                    "nothing of it was kept, send it again",
                    code="checksum",
                )
        return JsonResponse({"offset": start + received})


# --- commit --------------------------------------------------------------------------------------------------


def commit_files(value: Any) -> dict[str, dict[str, Any]]:
    """The files of a commit by path, checked: a single file (one entry, path "") or a folder's files."""
    if not isinstance(value, list):
        raise ValueError("files must be a list")
    files: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise ValueError(f"files[{i}] must be a JSON object")
        relative = file_path(entry.get("path", ""))
        size, digest = entry.get("size"), entry.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"files[{i}].size must be a non-negative integer")
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest.lower()):
            raise ValueError(f"files[{i}].sha256 must be a sha256 in hex")
        name = relative.as_posix() if relative.parts else ""
        if name in files:
            raise ValueError(f"files[{i}]: {name!r} is listed twice")
        if hidden(relative):
            raise ValueError(f"files[{i}]: {name!r} is not a name an artifact's file may have")
        files[name] = {"path": relative, "size": size, "sha256": digest.lower()}
    if "" in files and len(files) > 1:
        raise ValueError('a single file (path "") is committed alone')
    return files


def keep_names(value: Any) -> set[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ValueError("keep must be a list of checkpoint folder names or null")
    wrong = [name for name in value if not CHECKPOINT.fullmatch(name)]
    if wrong:
        raise ValueError(f"keep names checkpoint-N folders, not {', '.join(map(repr, wrong))}")
    return set(value)


def differences(folder: Path, files: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with the staged files, file by file (an empty file may be committed without its upload)."""
    wrong = []
    for name, entry in files.items():
        part = staged_file(folder, entry["path"])
        label = name or "the file"
        if not part.is_file():
            if entry["size"] == 0 and entry["sha256"] == EMPTY_SHA256:
                continue
            wrong.append(f"{label}: not uploaded")
            continue
        size = part.stat().st_size
        if size != entry["size"]:
            wrong.append(f"{label}: {size} bytes uploaded, not {entry['size']}")
            continue
        with part.open("rb") as fh:
            digest = sha256_stream(fh).hexdigest()
        if digest != entry["sha256"]:
            wrong.append(f"{label}: sha256 {digest}, not {entry['sha256']}")
    return wrong


def already_there(store: ArtifactStore, target: Path, files: dict[str, dict[str, Any]]) -> bool:
    """The target holds exactly these files (a commit sent again after its reply was lost)."""
    kind, listed = listing(store, target, True)
    if kind == "missing" or (kind == "file") != ("" in files):
        return False
    return {f["path"]: (f["size"], f["sha256"]) for f in listed} == {
        name: (entry["size"], entry["sha256"]) for name, entry in files.items()
    }


def swap(new: Path, target: Path, aside: Path) -> None:
    """`new` in place of `target`: a file over a file at once (os.replace); otherwise the old one renamed aside,
    the new one renamed in, the old one deleted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove(aside)  # left by a commit cut off halfway
    if new.is_file() and target.is_file() and not target.is_symlink():
        os.replace(new, target)
        return
    if target.exists() or target.is_symlink():
        os.rename(target, aside)
    os.rename(new, target)
    remove(aside)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def build(folder: Path, files: dict[str, dict[str, Any]], new: Path) -> None:
    """The artifact put together from its staged files at `new` (beside the staging folder, same filesystem)."""
    remove(new)
    if "" in files:
        part = staged_file(folder, files[""]["path"])
        if part.is_file():
            os.rename(part, new)
        else:
            new.touch()
        return
    new.mkdir(parents=True)
    for entry in files.values():
        part, placed = staged_file(folder, entry["path"]), new.joinpath(*entry["path"].parts)
        placed.parent.mkdir(parents=True, exist_ok=True)
        if part.is_file():
            os.rename(part, placed)
        else:
            placed.touch()


def prune_checkpoints(checkpoints: Path, keep: set[str], committed: str) -> None:
    for folder in checkpoints.iterdir() if checkpoints.is_dir() else []:
        if CHECKPOINT.fullmatch(folder.name) and folder.name not in keep and folder.name != committed:
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder)


def drop_older_attempts(access: Access) -> None:
    """What older attempts of the job left staged (a worker killed mid-upload): they are fenced out for good."""
    uploads = access.store.root / UPLOADS
    older = re.compile(rf"{re.escape(access.path)}-{access.job.pk}-a(\d+)")
    for folder in uploads.iterdir() if uploads.is_dir() else []:
        match = older.fullmatch(folder.name)
        if match and int(match.group(1)) < access.attempt:
            shutil.rmtree(folder, ignore_errors=True)


# --- housekeeping: what no attempt will commit, digests of files that are gone ------------------------------

SWEEP_EVERY_S = 600.0  # the scheduler's passes run this often at most
_last_sweep = 0.0


def sweep_store(force: bool = False) -> dict[str, int]:
    """Remove what the worker API left in the store that nothing will use: an attempt's staging folder once that
    attempt has ended (the job finished, was requeued to a newer attempt, or is gone; a worker killed mid-upload
    leaves one), and digest-cache entries of files that no longer exist or have changed. A scheduler pass runs it
    at most every SWEEP_EVERY_S; returns how many of each were removed."""
    global _last_sweep
    if not force and time.monotonic() - _last_sweep < SWEEP_EVERY_S:
        return {}
    _last_sweep = time.monotonic()
    store = ArtifactStore(settings.ARTIFACT_STORE)
    return {"staging": _sweep_staging(store.root / UPLOADS), "digests": _sweep_digests(store.root / HASHES)}


STAGED = re.compile(r"(?P<path>[a-z-]+)-(?P<job>\d+)-a(?P<attempt>\d+)")


def _sweep_staging(uploads: Path) -> int:
    kinds = worker_paths()
    removed = 0
    for folder in sorted(uploads.iterdir()) if uploads.is_dir() else []:
        match = STAGED.fullmatch(folder.name)
        if not match or match["path"] not in kinds:
            continue
        job = kinds[match["path"]].objects.filter(pk=int(match["job"])).only("state", "attempt").first()
        live = job is not None and not job.is_final and job.attempt == int(match["attempt"])
        if live:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


def _sweep_digests(hashes: Path) -> int:
    removed = 0
    for entry in hashes.glob("*/*.json") if hashes.is_dir() else []:
        try:
            stamp = json.loads(entry.read_text())["stamp"]
            now = Path(stamp[0]).stat()
            current = [now.st_size, now.st_mtime_ns, now.st_ctime_ns, now.st_ino] == stamp[1:]
        except (OSError, ValueError, TypeError, KeyError, IndexError):
            current = False
        if not current:
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


@worker_endpoint
def commit(worker: Worker, payload: dict[str, Any], job_id: int, path: str) -> dict[str, Any]:
    access = fenced(worker, path, job_id, payload["attempt"])
    uri = text(payload.get("uri"), "uri")
    target = writable(access, uri)
    files = commit_files(payload.get("files"))
    checkpoint = access.artifacts.is_checkpoint(uri)
    keep = keep_names(payload.get("keep")) if checkpoint else None  # a folder that is no checkpoint keeps nothing
    folder = access.staged_folder(uri)
    if not folder.exists() and already_there(access.store, target, files):
        return {"uri": uri, "size": size_of(target), "sha256": sha256_of(target)}
    with locked(folder):
        wrong = differences(folder, files)
        if wrong:
            raise ledger.Rejected(422, f"{uri} was not committed: {'; '.join(wrong)}", code="mismatch")
        new, aside = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
        build(folder, files, new)
        swap(new, target, aside)
        if checkpoint and keep is not None:
            prune_checkpoints(target.parent, keep, target.name)
        shutil.rmtree(folder)
    with contextlib.suppress(OSError):
        access.staging().rmdir()  # the attempt's staging folder, once nothing else is staged in it
    drop_older_attempts(access)
    return {"uri": uri, "size": size_of(target), "sha256": sha256_of(target)}
