"""What a job reads from and writes to the artifact store, and how a worker without the store moves them.

Both planes read a job's artifacts off its spec with `job_artifacts`: the worker to fetch its inputs and publish
its outputs, the control plane to allow exactly those (a worker reads only the inputs of the jobs assigned to
it and writes only into the outputs of the attempt it holds).

A worker has its artifacts one of two ways (`TUNEDECK_WORKER_STORE`):

  local    the store is a directory it shares with the web server (one machine, or a shared volume)
  remote   it has a directory of its own and moves artifacts through the worker API:

Under `/api/worker/v1/<path>/<job_id>/artifacts/` (`path` is `jobs` or `adapter-jobs`), with the worker's
bearer token; every call names the attempt and is fenced like the events (401 bad token, 404 not the worker's
job, 409 a newer attempt owns the job, 403 a URI the job may not read or write, 400 a malformed call):

  POST manifest   {"attempt", "uri", "latest_checkpoint": false}
                  -> {"uri", "kind": "file"|"dir"|"missing", "files": [{"path", "size", "sha256"}]}
                  An input: a store URI, or the job's base model when it is a local folder (`uri` is then
                  `model:` + its path). A file's entry has path "". With latest_checkpoint (the run's checkpoint
                  folder only), only the newest complete checkpoint-N folder is listed, under its own name.
  GET  file       ?attempt=&uri=&path=   -> the file's bytes, streamed; `Range: bytes=N-` answers 206 from byte N.
  POST offset     {"attempt", "uri", "path"} -> {"offset": bytes of this file already received}
  PUT  upload     ?attempt=&uri=&path=&offset=   body: a chunk, header X-Chunk-Sha256: its sha256 (hex)
                  -> {"offset": new end}. 422 (code "checksum") when the chunk's sha256 differs (nothing kept:
                  send it again), 416 (with "offset") when `offset` is not where the file ends on the server.
  POST commit     {"attempt", "uri", "files": [{"path", "size", "sha256"}], "keep": [names] | null}
                  -> {"uri", "size", "sha256"}: each staged file checked against its size and sha256 (422 naming
                  the file otherwise), then the whole file or folder moved into place at once. A checkpoint
                  (`<checkpoint folder>/checkpoint-N`) is committed on its own; `keep` then names the checkpoint
                  folders the trainer kept, and the others are removed.

Uploads are staged per job and attempt on the server, so an upload cut off (a killed worker) never shows: the
store holds what was there before, and the next attempt resumes from the last complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from workers.contract.store import SCHEME

MODEL_SCHEME = "model:"  # a base model given by a local path on the control plane's machine
CHECKPOINT = re.compile(r"checkpoint-\d+")
COMPLETE_MARK = "trainer_state.json"  # the trainer writes it last: a checkpoint folder holding it is whole


def checkpoint_number(name: str) -> int | None:
    """N of a checkpoint-N folder's name; None for any other name."""
    return int(name.split("-", 1)[1]) if CHECKPOINT.fullmatch(name) else None


def saved_checkpoints(folder: Path) -> dict[int, Path]:
    """Each complete checkpoint-N folder inside `folder` by its N, in order. The one rule of both planes: the
    trainer resumes from the newest, and the control plane lists only the newest to a remote worker."""
    if not folder.is_dir():
        return {}
    done = {checkpoint_number(p.name): p for p in folder.iterdir() if p.is_dir() and (p / COMPLETE_MARK).is_file()}
    return {n: done[n] for n in sorted(n for n in done if n is not None)}


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint-N folder (largest N), or None."""
    saved = saved_checkpoints(folder)
    return saved[max(saved)] if saved else None


@dataclass
class JobArtifacts:
    """A job's store URIs: `inputs` it reads whole (read-only: cacheable), `outputs` it writes (a folder is
    replaced whole), `carried` ones it reads where they exist and writes back (a run's trackers' folder, the same
    for every attempt), and its run's checkpoint folder (read: the latest complete checkpoint; written: a
    checkpoint at a time). `model` is the base model's local path when it is one (fetched like an input)."""

    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)
    checkpoints: str = ""
    model: str = ""

    def may_read(self, uri: str) -> bool:
        if uri.startswith(MODEL_SCHEME):
            return bool(self.model) and uri[len(MODEL_SCHEME):] == self.model
        return uri in self.inputs or uri in self.carried or (bool(self.checkpoints) and uri == self.checkpoints)

    def may_write(self, uri: str) -> bool:
        return uri in self.outputs or uri in self.carried or self.is_checkpoint(uri)

    def is_checkpoint(self, uri: str) -> bool:
        """A checkpoint-N folder directly inside the run's checkpoint folder."""
        if not self.checkpoints or not uri.startswith(self.checkpoints.rstrip("/") + "/"):
            return False
        return bool(CHECKPOINT.fullmatch(uri[len(self.checkpoints.rstrip("/")) + 1:]))


def is_local_model(source: str) -> bool:
    return source.startswith(("/", "~", "./", "../"))


def job_artifacts(spec: Any) -> JobArtifacts:
    """Every store URI in a job spec (a TrainSpec or an adapter job's spec, as a dataclass or in its JSON form),
    by what the job does with it."""
    found = JobArtifacts()
    for name, value in _fields(spec):
        if not isinstance(value, str) or not value:
            continue
        if name == "checkpoint_uri":
            found.checkpoints = value
        elif name == "output_uri":
            found.outputs.append(value)
        elif name == "tracking_uri":
            found.carried.append(value)
        elif name == "source" and is_local_model(value):
            found.model = value
        elif value.startswith(SCHEME) and (name == "uri" or name.endswith("_uri")):
            found.inputs.append(value)
    return found


def _fields(value: Any, name: str = "") -> list[tuple[str, Any]]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [pair for f in dataclasses.fields(value) for pair in _fields(getattr(value, f.name), f.name)]
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in _fields(item, str(key))]
    if isinstance(value, list):
        return [pair for item in value for pair in _fields(item, name)]
    return [(name, value)]


def relative_file(path: str) -> PurePosixPath:
    """A file's path inside an artifact folder, refused where it could leave it ("" for the artifact itself)."""
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts or "\\" in path or "\x00" in path:
        raise ValueError(f"bad file path {path!r}")
    return relative
