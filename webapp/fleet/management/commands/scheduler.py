from __future__ import annotations

import logging
import signal
import time
from typing import Any

from django.core.management.base import BaseCommand
from django.db import close_old_connections

from webapp.fleet.scheduler import run_extra_passes, schedule_once

log = logging.getLogger("tunedeck.scheduler")


class Command(BaseCommand):
    help = "Place queued runs on idle workers, in a loop (or once with --once)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--interval", type=float, default=1.0, help="Seconds between passes.")
        parser.add_argument("--once", action="store_true", help="Run a single pass and exit.")

    def handle(self, *args: Any, interval: float, once: bool, **options: Any) -> None:
        stopping = False

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("scheduler started (every %.1fs)", interval)
        while not stopping:
            try:
                outcome = schedule_once()
                if any(outcome.values()):
                    log.info("scheduler pass: %s", outcome)
                run_extra_passes()
            except Exception:
                log.exception("scheduler pass failed; retrying")
            finally:
                close_old_connections()
            if once:
                return
            deadline = time.monotonic() + interval
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.1)
