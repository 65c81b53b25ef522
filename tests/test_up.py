"""`tunedeck up` from nothing: a temporary var/, a free port, log in, stop cleanly with Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_tunedeck_up_starts_serves_a_login_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "ARTIFACT_STORE", "SECRET_KEY"}}
    env.update(TUNEDECK_VAR=str(tmp_path / "var"), TUNEDECK_ADMIN_PASSWORD="first-admin-pass", PYTHONUNBUFFERED="1")
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "webapp.cli", "up", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while "Tunedeck is running at" not in log.read_text(errors="replace"):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")
                time.sleep(0.5)
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", follow_redirects=True)
            page = client.get("/login/")
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
            runs = client.post("/login/", data={"username": "admin", "password": "first-admin-pass", "csrfmiddlewaretoken": token})
            overview = runs  # logging in lands on the overview
            assert overview.status_code == 200 and "Overview" in overview.text and "admin" in overview.text
            runs = client.get("/runs/")
            assert runs.status_code == 200 and "No runs match" in runs.text
            form = client.get("/runs/new/").text
            assert "demo-tiny-llama" in form and "demo-addition" in form and "demo-lora-all-linear" in form
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=60)
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "Tunedeck: stopped" in text
    assert (tmp_path / "var" / "tunedeck.sqlite3").exists() and (tmp_path / "var" / "secret_key").exists()
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    assert not leftover
