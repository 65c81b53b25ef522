"""Live log latency: from a worker's POST to the line's arrival on every SSE connection.

    python bench/live_latency.py                     # 50 connections, 40 lines
    python bench/live_latency.py --connections 100 --lines 60 --interval 0.2

Starts the real ASGI server (uvicorn, as `tunedeck web` does) on the bench database
(tunedeck_bench, created and migrated if missing; bench/page_speed.py seeds it), makes a running
run held by a freshly registered worker, opens N SSE connections to /runs/<id>/stream/ with a
logged-in session cookie, posts log lines through the worker API with the worker's bearer token,
and prints p50/p95/max of (arrival - post) over every (connection, line) pair.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from page_speed import ensure_database, free_port, live_world, p, setup_django, start_web_server


def prepare() -> tuple[int, str, str]:
    """A running run on a new worker; returns (run id, worker token, session cookie)."""
    from webapp.training.models import TrainingRun

    world = live_world("live")
    run = TrainingRun.objects.create(name="live latency", owner=world.user, base_model=world.base,
                                     dataset=world.dataset, lora_config=world.config, state="running", attempt=1,
                                     worker=world.worker, total_steps=100)
    return run.pk, world.token, world.session


async def listen(client, url: str, conn: int, arrivals: dict[tuple[int, int], float], ready: asyncio.Event,  # type: ignore[no-untyped-def]
                 opened: list[int], total: int, stop: asyncio.Event) -> None:
    async with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as response:
        if response.status_code != 200:
            raise SystemExit(f"stream answered {response.status_code}")
        opened.append(conn)
        if len(opened) == total:
            ready.set()
        async for line in response.aiter_lines():
            if line.startswith("data:") and "lat-" in line:
                now = time.perf_counter()
                marker = line.split("lat-", 1)[1].split("-", 1)[0]
                if marker.isdigit():
                    arrivals.setdefault((conn, int(marker)), now)
            if stop.is_set():
                return


async def run_bench(base_url: str, run_id: int, token: str, session: str, connections: int, lines: int,
                    interval: float) -> list[float]:
    import httpx

    arrivals: dict[tuple[int, int], float] = {}
    posted: dict[int, float] = {}
    ready, stop = asyncio.Event(), asyncio.Event()
    opened: list[int] = []
    limits = httpx.Limits(max_connections=connections + 10, max_keepalive_connections=connections + 10)
    timeout = httpx.Timeout(30.0, read=None)
    async with httpx.AsyncClient(base_url=base_url, cookies={"sessionid": session}, limits=limits, timeout=timeout) as viewers, \
            httpx.AsyncClient(base_url=base_url, timeout=timeout) as worker:
        url = f"/runs/{run_id}/stream/"
        tasks = [asyncio.create_task(listen(viewers, url, c, arrivals, ready, opened, connections, stop))
                 for c in range(connections)]
        await asyncio.wait_for(ready.wait(), 60)
        print(f"{connections} SSE connections open; posting {lines} lines every {interval}s", flush=True)
        await asyncio.sleep(1.0)
        for k in range(lines):
            body = {"attempt": 1, "events": [{"seq": k + 1, "kind": "log", "message": f"lat-{k}-bench line {k}"}]}
            posted[k] = time.perf_counter()
            response = await worker.post(f"/api/worker/v1/jobs/{run_id}/events", json=body,
                                         headers={"Authorization": f"Bearer {token}"})
            if response.status_code != 200:
                raise SystemExit(f"worker API answered {response.status_code}: {response.text}")
            await asyncio.sleep(interval)
        deadline = time.perf_counter() + 10
        while len(arrivals) < connections * lines and time.perf_counter() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    missing = connections * lines - len(arrivals)
    if missing:
        print(f"WARNING: {missing} (connection, line) pairs never arrived", flush=True)
    return [(arrivals[(c, k)] - posted[k]) * 1000 for (c, k) in arrivals]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="tunedeck_bench")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--lines", type=int, default=40)
    parser.add_argument("--interval", type=float, default=0.25, help="Seconds between posted lines.")
    parser.add_argument("--target-ms", type=float, default=500.0)
    args = parser.parse_args()

    ensure_database(args.db, reseed=False)
    setup_django(args.db)
    run_id, token, session = prepare()
    port = free_port()
    server = start_web_server(port)
    try:
        print(f"uvicorn on port {port}; run {run_id}", flush=True)
        latencies = asyncio.run(run_bench(f"http://127.0.0.1:{port}", run_id, token, session,
                                          args.connections, args.lines, args.interval))
    finally:
        server.terminate()
        server.wait(timeout=15)
    if not latencies:
        print("no line arrived")
        return 1
    p50, p95 = p(latencies, 0.5), p(latencies, 0.95)
    print(f"\n{len(latencies)} (connection, line) pairs: p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {max(latencies):.0f} ms"
          f" (target p95 < {args.target_ms:.0f} ms: {'met' if p95 < args.target_ms else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
