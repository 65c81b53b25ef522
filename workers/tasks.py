"""The worker's Celery app and its one task: a thin wrapper that claims a job and runs it.

Django-free: a GPU machine needs only the broker URL, the control plane URL and its token.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from functools import cache
from typing import Any

from celery import Celery, signals

# Read once when CUDA starts (the heartbeat's inventory may start it before the first job):
# packed batches change shape every step, and expandable segments keep the allocator unfragmented.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from workers.client import NotAssigned, StaleAttempt, WorkerClient
from workers.config import (
    ConfigError,
    artifact_store_root,
    celery_settings,
    env_int,
    env_secret,
    env_str,
    queue_for,
)

log = logging.getLogger("tunedeck.worker")

app = Celery("tunedeck-worker")
app.conf.update(celery_settings())


@cache
def client() -> WorkerClient:
    server, token = env_str("TUNEDECK_SERVER"), env_secret("TUNEDECK_WORKER_TOKEN")
    if not server or not token:
        raise ConfigError("a worker needs TUNEDECK_SERVER and TUNEDECK_WORKER_TOKEN (or TUNEDECK_WORKER_TOKEN_FILE)")
    return WorkerClient(server, token)


@app.task(name="tunedeck.run_job", ignore_result=True)
def run_job(job_id: int, attempt: int) -> None:
    from workers.reporter import HttpReporter
    from workers.spec import TrainSpec
    from workers.store import ArtifactStore
    from workers.train import run_training

    try:
        spec = TrainSpec.from_dict(client().claim(job_id, attempt))
    except (NotAssigned, StaleAttempt) as exc:
        log.warning("job %s attempt %s not ours to run: %s", job_id, attempt, exc)
        return
    log.info("job %s attempt %s claimed", job_id, attempt)
    try:
        run_training(spec, HttpReporter(client(), job_id, attempt), ArtifactStore(artifact_store_root()))
    except StaleAttempt as exc:
        log.warning("job %s attempt %s superseded: %s", job_id, attempt, exc)
    log.info("job %s attempt %s done", job_id, attempt)


# The runner of each adapter job kind, imported when a job of that kind arrives.
ADAPTER_RUNNERS = {
    "compare": ("workers.generate", "run_compare"),
    "merge": ("workers.merge", "run_merge"),
    "combine": ("workers.merge", "run_combine"),
    "evaluate": ("workers.evaluate", "run_evaluate"),
    "push": ("workers.push", "run_push"),
}


@app.task(name="tunedeck.run_adapter_job", ignore_result=True)
def run_adapter_job(job_id: int, attempt: int) -> None:
    import importlib

    from workers.jobspecs import spec_from_dict
    from workers.reporter import HttpReporter
    from workers.store import ArtifactStore

    try:
        claimed = client().claim_job(job_id, attempt, path="adapter-jobs")
    except (NotAssigned, StaleAttempt) as exc:
        log.warning("adapter job %s attempt %s not ours to run: %s", job_id, attempt, exc)
        return
    kind = str(claimed.get("kind"))
    reporter = HttpReporter(client(), job_id, attempt, path="adapter-jobs")
    if kind == "compare":
        reporter.flush_interval = 0.25  # the grid fills token by token
    try:
        module, name = ADAPTER_RUNNERS[kind]
        spec = spec_from_dict(kind, claimed["spec"])
    except (KeyError, TypeError, ValueError) as exc:  # a control plane newer than this worker
        reporter.started()
        reporter.log(f"This worker cannot run this {kind} job: {exc}", level="error")
        reporter.finish("failed", error=f"the worker cannot read this {kind} job: {exc}")
        return
    log.info("%s job %s attempt %s claimed", kind, job_id, attempt)
    try:
        getattr(importlib.import_module(module), name)(spec, reporter, ArtifactStore(artifact_store_root()))
    except StaleAttempt as exc:
        log.warning("adapter job %s attempt %s superseded: %s", job_id, attempt, exc)
    log.info("%s job %s attempt %s done", kind, job_id, attempt)


def inventory() -> dict[str, Any]:
    info: dict[str, Any] = {"hostname": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpus"] = [
            {"name": torch.cuda.get_device_name(i), "memory_total": torch.cuda.get_device_properties(i).total_memory}
            for i in range(torch.cuda.device_count())
        ]
    except ImportError:
        info["gpus"] = []
    return info


def _heartbeat_loop(stop: threading.Event, interval: int) -> None:
    details = inventory()
    while True:
        try:
            client().heartbeat(details)
        except Exception as exc:  # the control plane may be restarting: keep trying
            log.warning("heartbeat failed: %s", exc)
        if stop.wait(interval):
            return


_stop_heartbeat = threading.Event()


@signals.worker_ready.connect
def _start_heartbeat(**kwargs: Any) -> None:
    interval = env_int("TUNEDECK_HEARTBEAT_INTERVAL", 10, minimum=1)
    threading.Thread(target=_heartbeat_loop, args=(_stop_heartbeat, interval), daemon=True, name="heartbeat").start()


@signals.worker_shutdown.connect
def _stop(**kwargs: Any) -> None:
    _stop_heartbeat.set()


def start_worker(extra_queues: list[str], loglevel: str = "INFO") -> None:
    """Consume this worker's own queue, one job at a time, in the main process (solo pool).

    The token names the worker: the first heartbeat (which also checks server and token
    before any job arrives) returns the name, and so the queue.
    """
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per report is noise
    name = str(client().heartbeat(inventory())["name"])
    queues = [queue_for(name), *extra_queues]
    log.info("worker %s consuming %s", name, ", ".join(queues))
    app.worker_main(
        [
            "worker",
            f"--hostname={name}@{platform.node()}",
            f"--queues={','.join(queues)}",
            "--pool=solo",
            "--concurrency=1",
            "--without-gossip",
            "--without-mingle",
            f"--loglevel={loglevel}",
        ]
    )
