"""The runtime folder the worker's main process and its job processes share.

`running/<job>` says what the heartbeat reports (a marker holding the job process's pid), `stop/<job>` that the
control plane moved that job on (stop it, report nothing more), and `shutdown` that the worker is stopping (every job
checkpoints at its next step and hands its job back).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.contract.reporter import SUPERSEDED, Reporter

log = logging.getLogger("tunedeck.worker")

RUNTIME_ENV = "TUNEDECK_WORKER_RUNTIME"  # the per-worker runtime folder, set by start_worker for its pool processes


def runtime_dir() -> Path | None:
    raw = os.environ.get(RUNTIME_ENV)
    return Path(raw) if raw else None


def job_key(path: str, job_id: int, attempt: int) -> str:
    return f"{path}.{int(job_id)}.{int(attempt)}"


def parse_job_key(key: str) -> dict[str, Any] | None:
    path, _, rest = key.partition(".")
    job_id, _, attempt = rest.partition(".")
    if path not in ("jobs", "adapter-jobs") or not job_id.isdigit() or not attempt.isdigit():
        return None
    return {"path": path, "id": int(job_id), "attempt": int(attempt)}


@contextlib.contextmanager
def running_job(path: str, job_id: int, attempt: int, reporter: Reporter) -> Iterator[None]:
    """Mark this job as running for the heartbeat, and let the main process stop it through the reporter."""
    folder = runtime_dir()
    if folder is None:  # a task called outside `tunedeck worker` (tests, a shell)
        yield
        return
    key = job_key(path, job_id, attempt)
    marker, stop, shutdown = folder / "running" / key, folder / "stop" / key, folder / "shutdown"

    def stop_check() -> str:
        if stop.exists():
            return SUPERSEDED
        if shutdown.exists():
            return shutdown.read_text(encoding="utf-8").strip() or "the worker is shutting down"
        return ""

    reporter.stop_check = stop_check
    marker.write_text(str(os.getpid()), encoding="utf-8")
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)
        stop.unlink(missing_ok=True)


def running_jobs(folder: Path) -> list[dict[str, Any]]:
    """The jobs the pool processes run now; a marker left by a process that died is removed."""
    jobs = []
    for marker in sorted((folder / "running").glob("*")):
        job = parse_job_key(marker.name)
        try:
            pid = int(marker.read_text(encoding="utf-8"))
            os.kill(pid, 0)
        except (OSError, ValueError):
            marker.unlink(missing_ok=True)
            continue
        if job is not None:
            jobs.append(job)
    return jobs


def stop_jobs(folder: Path, jobs: Any) -> None:
    """The control plane says these jobs have moved on: their processes stop at their next step."""
    for job in jobs if isinstance(jobs, list) else []:
        try:
            key = job_key(str(job["path"]), int(job["id"]), int(job["attempt"]))
        except (KeyError, TypeError, ValueError):
            continue
        if (folder / "running" / key).exists():
            log.warning("job %s has moved to a newer attempt: stopping it", key)
            (folder / "stop" / key).touch()
