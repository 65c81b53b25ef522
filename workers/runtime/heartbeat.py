"""The worker's heartbeats, sent by a thread of its main process, and its shutdown through them.

Each beat carries a telemetry sample and the running jobs (read from the runtime folder); its reply lists the jobs
the control plane moved on, which are told to stop. On SIGTERM the next beat says the worker is leaving, and only
then are the jobs told to hand their work back.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from celery import signals

from workers.runtime.client import process_client
from workers.runtime.jobfolder import running_jobs, stop_jobs

log = logging.getLogger("tunedeck.worker")

INVENTORY_EVERY = 30  # heartbeats between two full inventories (each heartbeat carries a telemetry sample)


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
        reply = process_client().heartbeat(**payload)
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


def start_heartbeat(folder: Path, interval: int) -> Heartbeat:
    """The main process's heartbeat; its thread starts once the worker is ready, and stops with the worker."""
    global _heartbeat
    _heartbeat = Heartbeat(folder, interval)
    return _heartbeat


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
