"""Real `tunedeck worker` processes for end-to-end fleet tests, and waiting on them with the scheduler ticking."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.webapp.factories import make_worker
from webapp.fleet.models import Worker, hash_token
from webapp.fleet.scheduler import schedule_once
from webapp.training.models import TrainingRun


class Fleet:
    """Worker processes started with `tunedeck worker` against the live server, sharing one artifact store, or
    (`remote`) each with a folder and cache of its own, artifacts moved through the worker API."""

    def __init__(self, server: str, store: Path, env: dict[str, str] | None = None, remote: bool | None = None):
        self.server, self.store, self.env = server, store, env or {}
        self.remote = remote_by_default() if remote is None else remote
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, labels: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        """Register the worker (or give it a fresh token) and start its process."""
        token = f"tdw_{uuid.uuid4().hex}"
        if not Worker.objects.filter(name=name).exists():
            make_worker(name, token=token)
        Worker.objects.filter(name=name).update(token_hash=hash_token(token), labels=list(labels))
        env = with_worker_store(
            {**os.environ, **self.env, "TUNEDECK_SERVER": self.server, "TUNEDECK_WORKER_TOKEN": token,
             "TUNEDECK_HEARTBEAT_INTERVAL": "1", "OMP_NUM_THREADS": "1"},
            self.store, self.worker_dir(name), self.remote)
        self.logs[name] = self.store / f"worker-{name}-{len(self.procs)}.log"
        with open(self.logs[name], "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "webapp.cli", "worker"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def worker_dir(self, name: str) -> Path:
        """A remote worker's own folder, beside the control plane's store (never inside it)."""
        return self.store.parent / f"{self.store.name}-{name}"

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def wait_ready(self, *names: str, timeout: float = 120) -> None:
        """Until each worker has consumed its queue (its log says so) and sent a heartbeat."""
        until(lambda: all("ready." in self.log(n) for n in names)
              and Worker.objects.filter(name__in=names, last_heartbeat__isnull=False).count() == len(names),
              timeout, lambda: {n: self.log(n)[-2000:] for n in names})

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def remote_by_default() -> bool:
    """Whether the test run's workers have no shared store (TUNEDECK_TEST_WORKERS=remote: CI runs so)."""
    return os.environ.get("TUNEDECK_TEST_WORKERS", "") == "remote"


def with_worker_store(env: dict[str, str], store: Path, folder: Path, remote: bool | None = None) -> dict[str, str]:
    """`env` for a test worker: the control plane's `store` shared, or (`remote`, by default as the test run asks)
    `folder` of its own, with no ARTIFACT_STORE at all."""
    env = {k: v for k, v in env.items() if k != "ARTIFACT_STORE"}
    if remote_by_default() if remote is None else remote:
        return {**env, **remote_worker_env(folder)}
    return {**env, "ARTIFACT_STORE": str(store)}


def remote_worker_env(folder: Path) -> dict[str, str]:
    """A worker with no shared store: its artifacts in `folder`/artifacts, its input cache in `folder`/cache."""
    return {"TUNEDECK_WORKER_STORE": "remote", "TUNEDECK_WORKER_DIR": str(folder / "artifacts"),
            "TUNEDECK_WORKER_CACHE": str(folder / "cache")}


def until(check: Callable[[], Any], timeout: float, describe: Callable[[], Any] = lambda: "", tick: bool = False) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tick:
            schedule_once()
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s: {describe()}")


def run_until(run: TrainingRun, states: tuple[str, ...], timeout: float = 300) -> TrainingRun:
    def check() -> bool:
        run.refresh_from_db()
        return run.state in states

    until(check, timeout, lambda: (run.state, [e.message for e in run.events.order_by("id")][-12:]), tick=True)
    return run
