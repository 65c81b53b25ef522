"""A live uvicorn on webapp.asgi in a subprocess, as `tunedeck web` runs it, for tests that need the real ASGI
server (streams, a database that is gone). The browser tests' fixtures (tests/browser/conftest.py) serve the
test database; this one serves whatever settings `env` holds."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.browser.conftest import ROOT, free_port, stop


@contextmanager
def serve(env: dict[str, str], log: Path) -> Iterator[str]:
    """Yields the base URL once /healthz answers (it needs no database)."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "webapp.asgi:application", "--host", "127.0.0.1",
                                 "--port", str(port), "--log-level", "warning"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        stop(proc)
