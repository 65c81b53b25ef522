"""A database that cannot be reached, for real: a live uvicorn pointed at a PostgreSQL port nothing listens
on answers 503 with Retry-After (pages a short page, APIs their problem shapes), /healthz stays up and
/readyz says why; the server commands refuse to start, naming the database but never its password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.browser.conftest import ROOT, free_port
from tests.webapp.liveserver import serve

PASSWORD = "s3cret-pw"


@pytest.fixture
def gone_env(tmp_path: Path) -> dict[str, str]:
    """Settings whose database refuses every connection (a port nothing listens on)."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": f"postgresql://tunedeck:{PASSWORD}@127.0.0.1:{port}/tunedeck_gone",
           "SECRET_KEY": "x" * 50, "TUNEDECK_VAR": str(tmp_path / "var"), "TUNEDECK_DB_POOL_TIMEOUT": "1",
           "PYTHONUNBUFFERED": "1"}
    for name in ("SECRET_KEY_FILE", "REDIS_URL", "CELERY_BROKER_URL"):  # the filesystem broker: it is reachable
        env.pop(name, None)
    env["GONE_AT"] = f"127.0.0.1:{port}"
    return env


def test_a_server_without_its_database_answers_503_in_each_shape_and_readyz_says_why(gone_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with serve(gone_env, tmp_path / "uvicorn.log") as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.headers["Retry-After"]
        checks = ready.json()["checks"]
        assert "tunedeck_gone" in checks["database"] and gone_env["GONE_AT"] in checks["database"]
        assert PASSWORD not in ready.text and checks["broker"] == "ok"

        session = {"Cookie": f"sessionid={'a' * 32}"}  # a well-formed session key: it is looked up
        key, token = {"Authorization": "Bearer tdk_x"}, {"Authorization": "Bearer tdw_x"}
        csrf = http.get("/login/").cookies["csrftoken"]  # the login form itself needs no database
        pages = [http.get("/runs/", headers=session), http.get("/runs/1/stream/", headers=session),
                 http.post("/login/", data={"username": "a", "password": "b", "csrfmiddlewaretoken": csrf})]
        for response in pages:
            assert response.status_code == 503 and response.headers["Retry-After"], response.text
            assert response.headers["Content-Type"].startswith("text/plain") and len(response.text) < 200
        problems = [http.get("/api/v1/runs/", headers=key), http.get("/api/v1/runs/1/events/stream/", headers=key),
                    http.post("/api/worker/v1/heartbeat", json={}, headers=token)]
        for response in problems:
            assert response.status_code == 503 and response.headers["Retry-After"], response.text
            assert response.headers["Content-Type"] == "application/problem+json"
            assert response.json()["status"] == 503 and "database" in response.json()["detail"]
        for response in (http.get("/v1/fine_tuning/jobs", headers=key), http.get("/v1/files", headers=key)):
            assert response.status_code == 503 and response.headers["Retry-After"], response.text
            assert response.json()["error"]["type"] == "server_error" and "database" in response.json()["error"]["message"]


@pytest.mark.parametrize("command", [["web", "--port", "0"], ["scheduler"], ["up", "--no-worker", "--port", "0"]])
def test_server_commands_refuse_to_start_naming_the_database_without_its_password(gone_env, command) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run([sys.executable, "-m", "webapp.cli", *command], cwd=ROOT, env=gone_env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    assert "tunedeck_gone" in done.stderr and gone_env["GONE_AT"] in done.stderr, done.stderr
    assert PASSWORD not in done.stderr + done.stdout and "Traceback" not in done.stderr, done.stderr


def test_a_connect_timeout_in_database_url_gives_way_to_the_probes_own(gone_env) -> None:  # type: ignore[no-untyped-def]
    """dj_database_url puts `?connect_timeout=` into OPTIONS, so the connection parameters already hold one: the
    probe still connects (here: is refused by the server), rather than failing on its own arguments."""
    env = {**gone_env, "DATABASE_URL": f"{gone_env['DATABASE_URL']}?connect_timeout=10",
           "DJANGO_SETTINGS_MODULE": "webapp.settings"}
    script = "import django; django.setup(); from webapp.health import database_problem; print(database_problem())"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Connection refused" in done.stdout and "connect_timeout" not in done.stdout, done.stdout


@pytest.mark.django_db
def test_the_probe_answers_for_a_live_database_whose_url_sets_connect_timeout(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from django.db import connection

    from webapp.health import database_problem

    if connection.vendor != "postgresql":
        pytest.skip("the probe connects on its own only to PostgreSQL (set DATABASE_URL to run this)")
    options = {**connection.settings_dict["OPTIONS"], "connect_timeout": 10}  # what ?connect_timeout=10 gives
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", options)
    assert database_problem() is None
