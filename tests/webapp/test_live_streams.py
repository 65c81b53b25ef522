"""Open live streams hold no database connection: on PostgreSQL, a live uvicorn whose pool has 4 connections
serves 12 open SSE streams (run pages and the API's), answers API requests meanwhile, and every stream gets a
line the worker posts; the server never holds more connections than its pool."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.db import connection
from django.test import Client

from tests.browser.conftest import _test_database_url
from tests.webapp.factories import make_worker
from tests.webapp.fleetprocs import until
from tests.webapp.liveserver import serve
from tests.webapp.team import make
from webapp.api.models import ApiKey

POOL = 4
STREAMS = 12  # three times the pool: each holding a connection, most could not even open
APP_NAME = "tunedeck-live-streams-test"


class Stream(threading.Thread):
    """One SSE connection read line by line in a thread of its own."""

    def __init__(self, url: str, headers: dict[str, str]):
        super().__init__(daemon=True)
        self.url, self.headers, self.lines, self.status = url, headers, [], 0
        self.client = httpx.Client(timeout=httpx.Timeout(30, read=None))

    def run(self) -> None:
        try:
            with self.client.stream("GET", self.url, headers=self.headers) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    self.lines.append(line)
        except httpx.HTTPError:
            pass  # closed by the test

    def close(self) -> None:
        self.client.close()


def server_connections() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [APP_NAME])
        return int(cursor.fetchone()[0])


@pytest.fixture
def streams() -> Iterator[list[Stream]]:
    opened: list[Stream] = []
    yield opened
    for stream in opened:
        stream.close()


def test_open_streams_hold_no_connection_and_the_api_answers_meanwhile(transactional_db, team, streams, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                       settings: Any) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("connections are counted in PostgreSQL's pg_stat_activity (set DATABASE_URL to run this)")
    worker, token = make_worker("stream-worker")
    run = make(team, state="running", attempt=1, worker=worker)
    key = ApiKey.issue(team[0]["owner"], "streams", ["read"])[1]
    browser = Client()
    browser.force_login(team[0]["owner"])
    env = {**os.environ, "DATABASE_URL": f"{_test_database_url()}?application_name={APP_NAME}",
           "SECRET_KEY": settings.SECRET_KEY, "TUNEDECK_DB_POOL_SIZE": str(POOL), "TUNEDECK_DB_POOL_TIMEOUT": "5",
           "TUNEDECK_VAR": str(tmp_path / "var")}
    env.pop("SECRET_KEY_FILE", None)

    with serve(env, tmp_path / "uvicorn.log") as url:
        page = ({"Cookie": f"sessionid={browser.cookies['sessionid'].value}"}, f"{url}/runs/{run.pk}/stream/")
        api = ({"Authorization": f"Bearer {key}"}, f"{url}/api/v1/runs/{run.pk}/events/stream/")
        for i in range(STREAMS):
            headers, stream_url = (page, api)[i % 2]
            streams.append(Stream(stream_url, headers))
            streams[-1].start()
        until(lambda: all(s.lines for s in streams), 60, lambda: [(s.status, s.lines[:2]) for s in streams])
        assert {s.status for s in streams} == {200}
        assert server_connections() <= POOL

        with httpx.Client(base_url=url, headers=api[0], timeout=30) as http:
            for _ in range(2 * POOL):
                assert http.get("/api/v1/runs/").status_code == 200
            posted = http.post(f"/api/worker/v1/jobs/{run.pk}/events", headers={"Authorization": f"Bearer {token}"},
                               json={"attempt": 1, "events": [{"seq": 1, "kind": "log", "message": "line-for-every-stream"}]})
            assert posted.status_code == 200, posted.text
        until(lambda: all(any("line-for-every-stream" in line for line in s.lines) for s in streams), 60,
              lambda: [s.lines[-3:] for s in streams])
        assert server_connections() <= POOL
