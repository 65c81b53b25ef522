"""The worker's Celery app and its tasks: thin wrappers that claim a job and run it.

Django-free: a GPU machine needs only the broker URL, the control plane URL and its token.

Process layout: the main process consumes the queues and sends heartbeats (inventory and telemetry
through NVML, never CUDA); every job runs in a fresh pool process (prefork, one per GPU, one task per
process), which picks its GPUs with CUDA_VISIBLE_DEVICES before anything starts CUDA. The main process
talks to the job processes through files in a per-worker runtime folder: `running/<job>` (what the
heartbeat reports), `stop/<job>` (the control plane moved that job on: stop it, report nothing more) and
`shutdown` (the worker is stopping: every job checkpoints at its next step and hands its job back).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery, signals

# Read once when CUDA starts in a job's process: packed batches change shape every step, and
# expandable segments keep the allocator unfragmented.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from workers.config import (
    ConfigError,
    artifact_store_root,
    celery_settings,
    env_int,
    env_secret,
    env_str,
    label_queue,
    queue_for,
)
from workers.contract.refusals import CancelledBeforeStart, NotAssigned, StaleAttempt
from workers.contract.reporter import SUPERSEDED, Reporter
from workers.runtime.client import HttpReporter, WorkerClient

log = logging.getLogger("tunedeck.worker")

app = Celery("tunedeck-worker")
app.conf.update(celery_settings())


RUNTIME_ENV = "TUNEDECK_WORKER_RUNTIME"  # the per-worker runtime folder, set by start_worker for its pool processes
INVENTORY_EVERY = 30  # heartbeats between two full inventories (each heartbeat carries a telemetry sample)
_clients: dict[int, WorkerClient] = {}


def client() -> WorkerClient:
    """This process's client: a pool process must not share the main process's open connections."""
    pid = os.getpid()
    if pid not in _clients:
        server, token = env_str("TUNEDECK_SERVER"), env_secret("TUNEDECK_WORKER_TOKEN")
        if not server or not token:
            raise ConfigError("a worker needs TUNEDECK_SERVER and TUNEDECK_WORKER_TOKEN (or TUNEDECK_WORKER_TOKEN_FILE)")
        _clients[pid] = WorkerClient(server, token)
    return _clients[pid]


# --- The runtime folder shared by the main process and the job processes ---------------------------------


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


# --- Tasks -----------------------------------------------------------------------------------------------


def claim(job_id: int, attempt: int, path: str) -> dict[str, Any] | None:
    """The claim reply, or None where the wake-up was not ours to act on (forged, stale, duplicated)."""
    try:
        return client().claim_job(job_id, attempt, path=path)
    except CancelledBeforeStart as exc:
        log.info("%s %s attempt %s cancelled before it started: skipped, nothing loaded (%s)", path, job_id, attempt, exc)
        return None
    except (NotAssigned, StaleAttempt) as exc:
        log.warning("%s %s attempt %s not ours to run: %s", path, job_id, attempt, exc)
        return None


def use_gpus(indices: Any) -> None:
    """Show this job's process only the GPUs the scheduler gave the attempt (NVML's indices, in PCI order).

    No indices (a CPU job, or a control plane that does not assign GPUs) leaves the worker's own setting."""
    if not isinstance(indices, list) or not indices:
        return
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        log.warning("ignoring malformed gpu_indices %r", indices)
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.warning("CUDA already started in this process: GPUs %s cannot be selected", indices)
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # the order NVML numbers them in
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in indices)
    log.info("using GPU(s) %s", os.environ["CUDA_VISIBLE_DEVICES"])


@app.task(name="tunedeck.run_job", ignore_result=True)
def run_job(job_id: int, attempt: int) -> None:
    claimed = claim(job_id, attempt, "jobs")
    if claimed is None:
        return
    use_gpus(claimed.get("gpu_indices"))  # before the ML stack is imported

    from workers.contract.spec import TrainSpec
    from workers.contract.store import ArtifactStore
    from workers.runtime.launch import run_training_job

    spec = TrainSpec.from_dict(claimed["spec"])
    log.info("job %s attempt %s claimed", job_id, attempt)
    reporter = HttpReporter(client(), job_id, attempt)
    with running_job("jobs", job_id, attempt, reporter):
        try:
            run_training_job(spec, lambda: reporter, ArtifactStore(artifact_store_root()))
        except StaleAttempt as exc:
            log.warning("job %s attempt %s superseded: %s", job_id, attempt, exc)
    log.info("job %s attempt %s done", job_id, attempt)


@app.task(name="tunedeck.run_adapter_job", ignore_result=True)
def run_adapter_job(job_id: int, attempt: int) -> None:
    claimed = claim(job_id, attempt, "adapter-jobs")
    if claimed is None:
        return
    use_gpus(claimed.get("gpu_indices"))

    import importlib

    from workers.contract.kinds import KINDS, spec_from_dict
    from workers.contract.store import ArtifactStore

    kind = str(claimed.get("kind"))
    reporter = HttpReporter(client(), job_id, attempt, path="adapter-jobs")
    try:
        decl = KINDS[kind]
        spec = spec_from_dict(kind, claimed["spec"])
    except (KeyError, TypeError, ValueError) as exc:  # a control plane newer than this worker
        reporter.started()
        reporter.log(f"This worker cannot run this {kind} job: {exc}", level="error")
        reporter.finish("failed", error=f"the worker cannot read this {kind} job: {exc}")
        return
    reporter.flush_interval = decl.flush_interval
    log.info("%s job %s attempt %s claimed", kind, job_id, attempt)
    runner = getattr(importlib.import_module(decl.runner_module), decl.runner_function)
    with running_job("adapter-jobs", job_id, attempt, reporter):
        try:
            runner(spec, reporter, ArtifactStore(artifact_store_root()))
        except StaleAttempt as exc:
            log.warning("adapter job %s attempt %s superseded: %s", job_id, attempt, exc)
    log.info("%s job %s attempt %s done", kind, job_id, attempt)


# --- Heartbeats and shutdown (main process) --------------------------------------------------------------


class Heartbeat:
    """Heartbeats of the main process: a telemetry sample and the running jobs each time, the inventory
    on the first and then every INVENTORY_EVERY beats; once the worker shuts down, every beat says so."""

    def __init__(self, folder: Path, interval: int) -> None:
        self.folder, self.interval = folder, interval
        self.shutting_down = threading.Event()
        self.stopped = threading.Event()
        self._wake = threading.Event()
        self._beats_since_inventory: int | None = None  # None: the control plane has not got it yet
        self.banner = ""

    def beat(self, starting: bool = False) -> dict[str, Any]:
        from workers.runtime import telemetry

        payload: dict[str, Any] = {"telemetry": telemetry.sample(), "running": running_jobs(self.folder)}
        send_inventory = self._beats_since_inventory is None or self._beats_since_inventory + 1 >= INVENTORY_EVERY
        if send_inventory:
            payload["inventory"] = telemetry.inventory()
        if starting:
            payload["starting"] = True
        if self.shutting_down.is_set():
            payload["shutting_down"] = True
        reply = client().heartbeat(**payload)
        self._beats_since_inventory = 0 if send_inventory else (self._beats_since_inventory or 0) + 1
        stop_jobs(self.folder, reply.get("stop"))
        return reply

    def loop(self) -> None:
        announced = False
        while not self.stopped.is_set():
            leaving = self.shutting_down.is_set()
            try:
                self.beat()
            except Exception as exc:  # the control plane may be restarting: keep trying
                log.warning("heartbeat failed: %s", exc)
            if leaving and not announced:
                # Only once the control plane knows this worker is leaving (so it places nothing more here)
                # are the jobs told to hand back.
                announced = True
                try:
                    (self.folder / "shutdown").write_text("the worker is shutting down", encoding="utf-8")
                except OSError:  # the worker's folder is already gone: it has exited its jobs
                    pass
            self._wake.wait(self.interval)
            self._wake.clear()

    def shut_down(self) -> None:
        self.shutting_down.set()
        self._wake.set()

    def stop(self) -> None:
        self.stopped.set()
        self._wake.set()


_heartbeat: Heartbeat | None = None


@signals.worker_ready.connect
def _start_heartbeat(**kwargs: Any) -> None:
    if _heartbeat is not None:
        log.info("%s", _heartbeat.banner)  # once Celery's logging is set up
        threading.Thread(target=_heartbeat.loop, daemon=True, name="heartbeat").start()


@signals.worker_shutting_down.connect
def _shutting_down(**kwargs: Any) -> None:
    """SIGTERM (or Ctrl-C): Celery's warm shutdown would let a training of hours run to its end. Instead
    every job checkpoints at its next step and hands its job back, then the worker exits."""
    if _heartbeat is not None:
        log.warning("shutting down: running jobs save a checkpoint at their next step and go back to the queue")
        _heartbeat.shut_down()


@signals.worker_shutdown.connect
def _stop(**kwargs: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


def start_worker(extra_queues: list[str], loglevel: str = "INFO") -> None:
    """Consume this worker's own queue and its labels' queues, one job per GPU (one at a time without a GPU),
    each job in a fresh process.

    The token names the worker: the first heartbeat (which also checks server and token before any job
    arrives) returns the name, so the queue, and the labels.
    """
    global _heartbeat
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per report is noise
    folder = Path(tempfile.mkdtemp(prefix="tunedeck-worker-"))
    for sub in ("running", "stop"):
        (folder / sub).mkdir()
    os.environ[RUNTIME_ENV] = str(folder)  # inherited by the pool processes
    _heartbeat = Heartbeat(folder, env_int("TUNEDECK_HEARTBEAT_INTERVAL", 10, minimum=1))
    try:
        reply = _heartbeat.beat(starting=True)
        name = str(reply["name"])
        labels = [str(label) for label in reply.get("labels") or []]
        queues = [queue_for(name), *(label_queue(label) for label in labels), *extra_queues]
        from workers.runtime import telemetry

        gpus = telemetry.gpu_count()
        concurrency = max(gpus, 1)
        _heartbeat.banner = "worker {} consuming {} with concurrency {} ({})".format(
            name, ", ".join(queues), concurrency, f"one job per GPU, {gpus} GPU(s)" if gpus else "no GPU: one job at a time"
        )
        app.worker_main([
            "worker",
            f"--hostname={name}@{platform.node()}",
            f"--queues={','.join(queues)}",
            "--pool=prefork",
            f"--concurrency={concurrency}",
            "--max-tasks-per-child=1",  # a fresh process per job: no CUDA state leaks from one job to the next
            "--without-gossip",
            "--without-mingle",
            f"--loglevel={loglevel}",
        ])
    finally:
        _heartbeat.stop()
        shutil.rmtree(folder, ignore_errors=True)
