"""Open live streams against API requests: errors, API latency and PostgreSQL connections, with and without
N open SSE streams.

    python bench/load_streams.py                              # 500 streams, 200 concurrent API requests
    python bench/load_streams.py --streams 100 --requests 100
    python bench/load_streams.py --tree var/before            # the same load on another checkout's code

Starts the real ASGI server (uvicorn, as `tunedeck web` runs it) on a PostgreSQL bench database
(tunedeck_streams, created, migrated and seeded if missing: a user with an API key, a worker and 50 running
runs). Two phases, printed side by side:

- baseline: `--requests` API GETs fired at once (runs list, a run, its events; round-robin), no stream open
- streams: `--streams` SSE streams opened and held (half run pages `/runs/<id>/stream/` with a session, half
  `/api/v1/runs/<id>/events/stream/` with the key, spread over the 50 runs), then the same burst of API GETs;
  then one log line posted through the worker API to every run, and counted on every stream

Each phase reports the requests that failed (status other than 200, or no answer within 60 s), p50/p95/max of
the API requests in ms, and the peak of `select count(*) from pg_stat_activity` (the whole server, sampled
every 50 ms) and of this server's own connections (its application_name). The server runs with a generous
API rate (`TUNEDECK_API_RATE`) so that the rate limiter does not answer for the database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from page_speed import SERVER_URL, ensure_database, free_port, listening, live_world, p, setup_django

APP_NAME = "tunedeck-load-bench"
RUNS = 50


def prepare() -> tuple[list[int], str, str, str]:
    """Running runs held by one worker; returns (run ids, API key, session cookie, worker token)."""
    from webapp.api.models import ApiKey
    from webapp.training.models import RunEvent, TrainingRun

    world = live_world("load")
    TrainingRun.objects.filter(state="running").update(state="succeeded")  # a previous bench's runs end here
    runs = [TrainingRun.objects.create(name=f"load {i}", owner=world.user, base_model=world.base,
                                       dataset=world.dataset, lora_config=world.config, state="running", attempt=1,
                                       worker=world.worker, total_steps=100) for i in range(RUNS)]
    RunEvent.objects.bulk_create([RunEvent(run=run, attempt=1, seq=k, kind="log", message=f"line {k}")
                                  for run in runs for k in range(1, 21)])
    key = ApiKey.issue(world.user, "bench-load", ["read"])[1]
    return [run.pk for run in runs], key, world.session, world.token


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    peak_total: int = 0
    peak_server: int = 0
    streams_open: int = 0
    streams_failed: int = 0
    delivered: str = "-"

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def sample_connections(phase: Phase, stop: asyncio.Event) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(f"{SERVER_URL}/postgres", autocommit=True) as conn:
        while not stop.is_set():
            row = await (await conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE application_name = %s) FROM pg_stat_activity", (APP_NAME,)
            )).fetchone()
            phase.peak_total, phase.peak_server = max(phase.peak_total, row[0]), max(phase.peak_server, row[1])
            await asyncio.sleep(0.05)


async def burst(client, phase: Phase, run_ids: list[int], n: int) -> None:  # type: ignore[no-untyped-def]
    paths = ["/api/v1/runs/", "/api/v1/runs/{id}/", "/api/v1/runs/{id}/events/?limit=50"]

    async def one(i: int) -> None:
        path = paths[i % len(paths)].format(id=run_ids[i % len(run_ids)])
        t0 = time.perf_counter()
        try:
            response = await client.get(path, timeout=60)
        except Exception as exc:  # a refused or dropped connection is an error to count, not to stop on
            phase.error(type(exc).__name__)
            return
        phase.latencies.append((time.perf_counter() - t0) * 1000)
        if response.status_code != 200:
            phase.error(str(response.status_code))

    await asyncio.gather(*(one(i) for i in range(n)))


async def hold_stream(client, url: str, headers: dict[str, str], phase: Phase, opened: asyncio.Event,  # type: ignore[no-untyped-def]
                      seen: set[int], marker: str, index: int, total: int) -> None:
    try:
        async with client.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                phase.streams_failed += 1
                phase.error(f"stream {response.status_code}")
                return
            phase.streams_open += 1
            if phase.streams_open + phase.streams_failed >= total:
                opened.set()
            async for line in response.aiter_lines():
                if marker in line:
                    seen.add(index)
    except Exception as exc:  # counted as a failed stream (a cancel is a BaseException: not caught here)
        phase.streams_failed += 1
        phase.error(f"stream {type(exc).__name__}")
    finally:
        if phase.streams_open + phase.streams_failed >= total:
            opened.set()


async def run_phases(base_url: str, run_ids: list[int], key: str, session: str, token: str, n_streams: int,
                     n_requests: int) -> list[Phase]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base_url, limits=limits, headers=auth) as client:
        await burst(client, Phase("warm-up"), run_ids, n_requests)  # imports, the pool's first connections
    phases = []
    for name, streams in (("baseline (no streams)", 0), (f"{n_streams} open streams", n_streams)):
        phase, stop = Phase(name), asyncio.Event()
        sampler = asyncio.create_task(sample_connections(phase, stop))
        async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(60, read=None)) as client:
            opened, seen, marker = asyncio.Event(), set(), f"bench-mark-{time.time_ns()}"
            holders = []
            for i in range(streams):
                run_id = run_ids[i % len(run_ids)]
                url, headers = ((f"/runs/{run_id}/stream/", {"Cookie": f"sessionid={session}"}) if i % 2 == 0 else
                                (f"/api/v1/runs/{run_id}/events/stream/", auth))
                holders.append(asyncio.create_task(hold_stream(client, url, headers, phase, opened, seen, marker, i, streams)))
            if streams:
                t0 = time.perf_counter()
                try:
                    await asyncio.wait_for(opened.wait(), 300)
                except TimeoutError:
                    print(f"only {phase.streams_open} of {streams} streams opened in 300 s", flush=True)
                print(f"{phase.streams_open} streams open ({phase.streams_failed} failed) after "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
                await asyncio.sleep(2.0)  # let every stream reach its idle wait
            client.headers.update(auth)
            await burst(client, phase, run_ids, n_requests)
            if streams:
                await post_to_every_run(client, run_ids, token, marker)
                deadline = time.monotonic() + 30
                while len(seen) < phase.streams_open and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                phase.delivered = f"{len(seen)}/{phase.streams_open}"
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
        stop.set()
        await sampler
        phases.append(phase)
        await asyncio.sleep(2.0)
    return phases


async def post_to_every_run(client, run_ids: list[int], token: str, marker: str) -> None:  # type: ignore[no-untyped-def]
    seq = 1000  # above the seeded lines' (the runs are new each time)
    for run_id in run_ids:
        response = await client.post(f"/api/worker/v1/jobs/{run_id}/events", headers={"Authorization": f"Bearer {token}"},
                                     json={"attempt": 1, "events": [{"seq": seq, "kind": "log", "message": marker}]})
        if response.status_code != 200:
            print(f"posting to run {run_id}: {response.status_code} {response.text[:200]}", flush=True)


def start_server(tree: Path, db: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(tree), "DATABASE_URL": f"{SERVER_URL}/{db}?application_name={APP_NAME}",
           "TUNEDECK_API_RATE": "1000000/minute", "LOG_LEVEL": "WARNING"}
    # The same server `tunedeck web` runs (webapp.cli._web_argv), on a free local port.
    argv = [sys.executable, "-m", "uvicorn", "webapp.asgi:application", "--host", "127.0.0.1", "--port", str(port),
            "--no-access-log", "--timeout-graceful-shutdown", "3"]
    return listening(subprocess.Popen(argv, cwd=tree, env=env), port)


def report(phases: list[Phase], requests: int) -> None:
    print("\n| phase | API requests | errors | p50 ms | p95 ms | max ms | peak pg_stat_activity (all / this server) "
          "| streams open | line delivered |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for ph in phases:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(ph.errors.items())) or "0"
        lat = ph.latencies or [float("nan")]
        print(f"| {ph.name} | {requests} | {errors} | {p(lat, 0.5):.0f} | {p(lat, 0.95):.0f} | {max(lat):.0f} "
              f"| {ph.peak_total} / {ph.peak_server} | {ph.streams_open} | {ph.delivered} |")
    if len(phases) == 2 and phases[0].latencies and phases[1].latencies:
        print(f"\np95 with streams / baseline p95: {p(phases[1].latencies, 0.95) / p(phases[0].latencies, 0.95):.2f}×")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="tunedeck_streams")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tree", type=Path, default=ROOT, help="Serve this checkout's code (default: this one).")
    args = parser.parse_args()

    ensure_database(args.db, reseed=False)
    setup_django(args.db)
    run_ids, key, session, token = prepare()
    port = free_port()
    server = start_server(args.tree.resolve(), args.db, port)
    try:
        print(f"uvicorn on port {port} serving {args.tree}; {len(run_ids)} running runs", flush=True)
        phases = asyncio.run(run_phases(f"http://127.0.0.1:{port}", run_ids, key, session, token, args.streams,
                                        args.requests))
    finally:
        server.terminate()
        server.wait(timeout=30)
    report(phases, args.requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
