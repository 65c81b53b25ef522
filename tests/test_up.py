"""`tunedeck up` from nothing: a temporary var/, a free port, log in, stop cleanly with Ctrl-C; one instance per
var/; a Ctrl-C mid-run hands the run over; var/ is private to the user."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from webapp.cli import build_parser

pytestmark = pytest.mark.timeout(480)
RUNNING = "Tunedeck is running at"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def until(check: Callable[[], Any], timeout: float, what: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, what()
        time.sleep(0.3)


class Up:
    """One `tunedeck up` process on a var/ folder and a port, its output in a log file."""

    def __init__(self, var: Path, port: int, name: str = "up", **env: str) -> None:
        self.var, self.port, self.url = var, port, f"http://127.0.0.1:{port}"
        self.log_path = var.parent / f"{name}.log"
        base = {k: v for k, v in os.environ.items()
                if k not in {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "ARTIFACT_STORE", "SECRET_KEY",
                             "TUNEDECK_ADMIN_PASSWORD"}}
        self.env = {**base, "TUNEDECK_VAR": str(var), "PYTHONUNBUFFERED": "1", "TUNEDECK_HEARTBEAT_INTERVAL": "1", **env}
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "webapp.cli", "up", "--port", str(port)], env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_running(self, timeout: float = 180) -> None:
        until(lambda: RUNNING in self.log or self.proc.poll() is not None, timeout, lambda: self.log)
        assert RUNNING in self.log, self.log

    def interrupt(self, timeout: float = 240) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def db(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(f"file:{self.var / 'tunedeck.sqlite3'}?mode=ro", uri=True, timeout=30) as conn:
            return conn.execute(sql, params).fetchall()


def log_in(url: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=url, follow_redirects=True, timeout=30)
    page = client.get("/login/")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    overview = client.post("/login/", data={"username": "admin", "password": password, "csrfmiddlewaretoken": token})
    assert overview.status_code == 200 and "Overview" in overview.text, overview.text[-2000:]
    return client


def no_process_left(tmp_path: Path) -> None:
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    assert not leftover


def test_tunedeck_up_starts_serves_a_login_and_stops_cleanly(tmp_path: Path) -> None:
    up = Up(tmp_path / "var", free_port(), TUNEDECK_ADMIN_PASSWORD="first-admin-pass")
    try:
        up.wait_running()
        client = log_in(up.url, "first-admin-pass")
        runs = client.get("/runs/")
        assert runs.status_code == 200 and "No runs match" in runs.text
        form = client.get("/runs/new/").text
        assert "demo-tiny-llama" in form and "demo-addition" in form and "demo-lora-all-linear" in form
    finally:
        code = up.interrupt()
    text = up.log
    assert code == 0, text[-3000:]
    assert "Tunedeck: stopped" in text
    # The password came from the environment: it is not printed.
    assert "first-admin-pass" not in text and "admin account: admin" in text
    assert (tmp_path / "var" / "tunedeck.sqlite3").exists() and (tmp_path / "var" / "secret_key").exists()
    no_process_left(tmp_path)


def test_var_is_private_to_the_user(tmp_path: Path) -> None:
    var = tmp_path / "var"
    up = Up(var, free_port())
    try:
        up.wait_running()
        until(lambda: (var / "tunedeck.sqlite3-wal").exists(), 30, lambda: str(sorted(var.iterdir())))
        found = {str(p.relative_to(var)): stat.S_IMODE(p.stat().st_mode) for p in [var, *var.rglob("*")]}
    finally:
        up.interrupt()
    for name in ("tunedeck.sqlite3", "tunedeck.sqlite3-wal", "tunedeck.sqlite3-shm", "secret_key", "broker/queue",
                 "artifacts/models/demo-tiny-llama/model.safetensors"):
        assert name in found, sorted(found)
    shared = {name: oct(mode) for name, mode in found.items() if mode & 0o077}
    assert not shared, shared  # nothing in var/ readable, writable or searchable by others
    assert found["."] == 0o700 and found["secret_key"] == 0o600 and found["tunedeck.sqlite3"] == 0o600


def test_a_second_up_on_the_same_var_is_refused_and_the_first_keeps_working(tmp_path: Path) -> None:
    var = tmp_path / "var"
    first = Up(var, free_port(), TUNEDECK_ADMIN_PASSWORD="first-admin-pass")
    try:
        first.wait_running()
        token = first.db("SELECT token_hash FROM fleet_worker WHERE name = 'local'")
        # The same port or another: either way the running instance is found before anything is touched.
        for port in (first.port, free_port()):
            second = Up(var, port, name=f"second-{port}")
            assert second.proc.wait(timeout=60) != 0, second.log
            assert RUNNING not in second.log
            assert f"already running (pid {first.proc.pid}) at {first.url}/" in second.log, second.log
            assert first.db("SELECT token_hash FROM fleet_worker WHERE name = 'local'") == token
        # The first instance's worker still gets its heartbeats through.
        refused_at = first.db("SELECT strftime('%s', 'now')")[0][0]
        until(lambda: first.db("SELECT strftime('%s', last_heartbeat) > ? FROM fleet_worker WHERE name = 'local'",
                               refused_at)[0][0], 30, lambda: first.log[-3000:])
        assert "401" not in first.log and first.proc.poll() is None
    finally:
        assert first.interrupt() == 0, first.log[-3000:]
    no_process_left(tmp_path)


def test_up_on_a_port_another_program_listens_on_says_so_and_claims_nothing(tmp_path: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        up = Up(tmp_path / "var", other.getsockname()[1])
        code = up.proc.wait(timeout=120)
    assert code != 0 and RUNNING not in up.log, up.log
    assert f"cannot listen on 127.0.0.1:{up.port}" in up.log and "--port" in up.log, up.log
    assert not (tmp_path / "var" / "tunedeck.sqlite3").exists()  # refused before touching anything
    no_process_left(tmp_path)


def test_the_port_check_tries_every_address_the_host_resolves_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """The web server listens on each address its host resolves to (localhost: 127.0.0.1 and ::1 on a dual-stack
    machine): another program on any one of them is said before anything starts."""
    from webapp import embedded

    try:
        other = socket.socket(socket.AF_INET6)
        other.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback to listen on here: {exc}")
    with other:
        other.listen()
        port = other.getsockname()[1]
        localhost = [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port)),
                     (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1", port, 0, 0))]
        monkeypatch.setattr(embedded.socket, "getaddrinfo", lambda *args, **kwargs: localhost)
        problem = embedded.check_port_free("localhost", port)
    assert problem.startswith(f"cannot listen on localhost:{port}: ") and "another program listens there" in problem


def test_ctrl_c_mid_run_hands_the_run_over_and_the_next_start_resumes_where_it_stopped(tmp_path: Path) -> None:
    var = tmp_path / "var"
    up = Up(var, free_port())
    try:
        up.wait_running()
        password = re.search(r"admin account: admin / (\S+)", up.log).group(1)  # type: ignore[union-attr]
        client = log_in(up.url, password)
        ids = {kind: {row["name"]: row["id"] for row in client.get(f"/api/v1/{kind}/").json()["results"]}
               for kind in ("base-models", "datasets", "lora-configs")}
        created = client.post("/api/v1/runs/", headers={"X-CSRFToken": client.cookies["csrftoken"]}, json={
            "name": "interrupted", "base_model": ids["base-models"]["demo-tiny-llama"],
            "dataset": ids["datasets"]["demo-addition"], "lora_config": ids["lora-configs"]["demo-lora-all-linear"],
            # Periodic checkpoints every 10 steps: resuming from one of them would lose the steps after it. More
            # steps than any machine trains before the interrupt lands: the run is cancelled once it has resumed.
            "hyperparameters": {"max_steps": 100_000, "save_steps": 10, "logging_steps": 1},
        })
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        until(lambda: up.db("SELECT step >= 13 FROM training_trainingrun WHERE id = ?", run_id)[0][0], 240,
              lambda: up.log[-3000:])
        reached = up.db("SELECT step FROM training_trainingrun WHERE id = ?", run_id)[0][0]
    finally:
        code = up.interrupt()
    assert code == 0, up.log[-3000:]

    # The worker stopped first and reported: the run is back in the queue, not lost with its worker.
    state, failures, attempt_log = up.db("SELECT state, failures, attempt_log FROM training_trainingrun WHERE id = ?",
                                         run_id)[0]
    assert (state, failures) == ("queued", 0), up.log[-3000:]
    assert json.loads(attempt_log)[-1]["outcome"] == "handed over"
    saved = [json.loads(data)["step"] for (data,) in up.db(
        "SELECT data FROM training_runevent WHERE run_id = ? AND kind = 'checkpoint' ORDER BY id", run_id)]
    handed_over_at = saved[-1]
    assert handed_over_at >= reached, (saved, reached)

    def restart_points() -> list[int]:
        rows = again.db("SELECT data FROM training_runevent WHERE run_id = ? AND attempt = 2 AND kind = 'metric'",
                        run_id)
        return [json.loads(data)["step"] for (data,) in rows if json.loads(data).get("restart")]

    again = Up(var, free_port(), name="again")
    try:
        again.wait_running()
        until(lambda: again.db("SELECT step > ? FROM training_trainingrun WHERE id = ? AND attempt = 2",
                               handed_over_at, run_id) == [(1,)], 300, lambda: again.log[-3000:])
        client = log_in(again.url, password)
        cancelled = client.post(f"/api/v1/runs/{run_id}/cancel/", headers={"X-CSRFToken": client.cookies["csrftoken"]})
        assert cancelled.status_code == 200, cancelled.text
        until(lambda: again.db("SELECT state FROM training_trainingrun WHERE id = ?", run_id) == [("cancelled",)],
              120, lambda: again.log[-3000:])
    finally:
        assert again.interrupt() == 0, again.log[-3000:]
    assert "admin account" not in again.log  # the password is printed on the first start only
    attempt, failures = again.db("SELECT attempt, failures FROM training_trainingrun WHERE id = ?", run_id)[0]
    assert (attempt, failures) == (2, 0)
    # The second attempt started from the step the first had reached, not from an older periodic checkpoint.
    assert restart_points() == [handed_over_at]
    assert f"Resuming from checkpoint checkpoint-{handed_over_at} " in again.log or any(
        f"checkpoint-{handed_over_at}" in message for (message,) in again.db(
            "SELECT message FROM training_runevent WHERE run_id = ? AND attempt = 2 AND kind = 'log'", run_id))
    no_process_left(tmp_path)


def test_web_and_up_listen_on_the_loopback_interface_unless_told_otherwise() -> None:
    parser = build_parser()
    assert parser.parse_args(["web"]).host == "127.0.0.1"
    assert parser.parse_args(["up"]).host == "127.0.0.1"
    assert parser.parse_args(["web", "--host", "0.0.0.0"]).host == "0.0.0.0"
    # Inside its container the web server must take connections from the other services and the published port.
    compose = yaml.safe_load((Path(__file__).resolve().parent.parent / "docker-compose.yml").read_text())
    assert "tunedeck web --host 0.0.0.0" in " ".join(compose["services"]["web"]["command"])


def test_an_existing_var_is_narrowed_only_where_it_holds_tunedecks_state(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from workers.config import private_var_dir

    old, foreign = tmp_path / "old-var", tmp_path / "shared"
    for folder in (old, foreign):
        folder.mkdir(mode=0o755)
        folder.chmod(0o755)
    (old / "tunedeck.sqlite3").touch()  # an installation from before var/ was private
    (foreign / "notes.txt").touch()
    for folder, mode in ((old, 0o700), (foreign, 0o755), (tmp_path / "new" / "var", 0o700)):
        monkeypatch.setenv("TUNEDECK_VAR", str(folder))
        assert private_var_dir() == folder and stat.S_IMODE(folder.stat().st_mode) == mode, folder
