"""`tunedeck worker`: start a worker process: its runtime folder, its first heartbeat, then Celery's consumer.

Django-free: a GPU machine needs only the broker URL, the control plane URL and its token.

Process layout: the main process consumes the queues and sends heartbeats (inventory and telemetry through NVML,
never CUDA, workers.runtime.heartbeat); every job runs in a fresh pool process (workers.runtime.tasks). They talk
through files in a per-worker runtime folder (workers.runtime.jobfolder).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from workers.config import env_int, label_queue, queue_for
from workers.runtime import tasks  # noqa: F401  (registers the tasks with the app before it consumes)
from workers.runtime.celeryapp import app
from workers.runtime.heartbeat import Heartbeat, start_heartbeat
from workers.runtime.jobfolder import RUNTIME_ENV

log = logging.getLogger(__name__)


def start_worker(extra_queues: list[str], loglevel: str = "INFO") -> None:
    """Consume this worker's own queue and its labels' queues, one job per GPU (one at a time without a GPU),
    each job in a fresh process.

    The token names the worker: the first heartbeat (which also checks server and token before any job
    arrives) returns the name, so the queue, and the labels.
    """
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per report is noise
    folder = Path(tempfile.mkdtemp(prefix="tunedeck-worker-"))
    for sub in ("running", "stop"):
        (folder / sub).mkdir()
    os.environ[RUNTIME_ENV] = str(folder)  # inherited by the pool processes
    heartbeat = start_heartbeat(folder, env_int("TUNEDECK_HEARTBEAT_INTERVAL", 10, minimum=1))
    try:
        reply = first_heartbeat(heartbeat, env_int("TUNEDECK_SERVER_WAIT", 300, minimum=0))
        name = str(reply["name"])
        labels = [str(label) for label in reply.get("labels") or []]
        queues = [queue_for(name), *(label_queue(label) for label in labels), *extra_queues]
        from workers.runtime import telemetry

        gpus = telemetry.gpu_count()
        concurrency = max(gpus, 1)
        heartbeat.banner = "worker {} consuming {} with concurrency {} ({})".format(
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
        heartbeat.stop()
        shutil.rmtree(folder, ignore_errors=True)


def first_heartbeat(heartbeat: Heartbeat, wait_s: float) -> dict[str, Any]:
    """The first heartbeat, tried again while the control plane cannot be reached or answers 5xx, for up to
    `wait_s` seconds: it may be starting at the same moment (`tunedeck up`, a compose file, a machine's reboot).
    A refusal (a wrong token, say) is final at once."""
    deadline = time.monotonic() + wait_s
    told = False
    while True:
        try:
            return heartbeat.beat(starting=True)
        except (httpx.TransportError, httpx.HTTPStatusError) as exc:
            status = exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None
            if (status is not None and status < 500) or time.monotonic() >= deadline:
                raise
            if not told:
                log.warning("the control plane does not answer yet (%s); trying again for up to %d s", exc, wait_s)
                told = True
            time.sleep(2)
