"""Page speed on a large PostgreSQL database: p50/p95 per page next to the login page.

    python bench/page_speed.py                       # seeds tunedeck_bench once, then measures
    python bench/page_speed.py --requests 100 --reseed

Seeds (once; --reseed starts over) a separate database with 10,000 runs and 1,000,000 events
(COPY), one run holding a large share of them, then requests each page with Django's test
Client in-process, round-robin so every page sees the same machine load, and prints p50/p95 in
milliseconds and the ratio to the login page's p95. With --explain, each page's slowest query is
printed with its time, so a slow page names its query.

The compare page and the charts' JSON are measured over 10 runs of 200,000 metric events each,
folded into their curves as the ledger folds a worker's reports (`merge_points`, 200 at a time).
`--compare-only --database-url sqlite:///path` measures just those, on any database.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SERVER_URL = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432")


def ensure_database(name: str, reseed: bool) -> None:
    import psycopg

    with psycopg.connect(f"{SERVER_URL}/postgres", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists and reseed:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            exists = None
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
            print(f"created database {name}", flush=True)


def setup_django(db: str, url: str = "") -> None:
    os.environ["DATABASE_URL"] = url or f"{SERVER_URL}/{db}"
    os.environ.setdefault("SECRET_KEY", "bench-only-not-secret")
    os.environ.setdefault("ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)


def start_web_server(port: int) -> subprocess.Popen[bytes]:
    """The same server `tunedeck web` runs (webapp.cli._web_argv) on a local port, once it accepts connections."""
    from webapp.cli import _web_argv

    root = Path(__file__).resolve().parent.parent
    server = subprocess.Popen(_web_argv("127.0.0.1", port), cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    return listening(server, port)


def listening(server: subprocess.Popen[bytes], port: int) -> subprocess.Popen[bytes]:
    """`server` once it accepts connections on `port` (stopped, and the bench ended, if it does not in 60 s)."""
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server
        if server.poll() is not None or time.monotonic() > deadline:
            server.terminate()
            raise SystemExit("the server did not start")
        time.sleep(0.2)


def free_port() -> int:
    """A local TCP port free now, for a server the bench starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveWorld:
    """What a bench of running runs on a live server starts from."""

    user: Any
    base: Any
    dataset: Any
    config: Any
    worker: Any
    token: str  # the worker's bearer token
    session: str  # the user's session cookie


def live_world(label: str) -> LiveWorld:
    """The user bench-<label>, logged in; the catalog's first base model, dataset and LoRA config (<label>-base,
    -data and -cfg when there are none); and a new online worker with its token."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    from webapp.catalog.models import BaseModel, Dataset, LoraConfig
    from webapp.fleet.models import Worker

    User = get_user_model()
    user = (User.objects.filter(username=f"bench-{label}").first()
            or User.objects.create_user(f"bench-{label}", password="bench-pass-123"))
    base = BaseModel.objects.first() or BaseModel.objects.create(name=f"{label}-base", source="org/model",
                                                                 num_parameters=10**9)
    dataset = Dataset.objects.first() or Dataset.objects.create(
        name=f"{label}-data", uri="file:///d.jsonl", original_filename="d.jsonl", format="text", row_count=1,
        size_bytes=1, sha256="0" * 64)
    config = LoraConfig.objects.first() or LoraConfig.objects.create(name=f"{label}-cfg", params={"r": 8})
    worker = Worker(name=f"bench-{label}-{os.getpid()}", state="online", labels=["bench"])
    token = worker.set_new_token()  # what `manage.py register_worker` does
    worker.save()
    client = Client()
    client.force_login(user)
    return LiveWorld(user, base, dataset, config, worker, token, client.cookies["sessionid"].value)


def seed(runs_n: int, events_n: int, big_share: float = 0.2) -> dict[str, int]:
    """Users, catalog rows, workers, runs in every state, adapters, and events by COPY."""
    from django.contrib.auth import get_user_model
    from django.db import connection, transaction

    from webapp.catalog.models import BaseModel, Dataset, LoraConfig
    from webapp.fleet.models import Worker
    from webapp.training.models import Adapter, TrainingRun

    User = get_user_model()
    if TrainingRun.objects.count() >= runs_n:
        big = TrainingRun.objects.filter(name="bench-big").values_list("pk", flat=True).first()
        print(f"database already seeded ({TrainingRun.objects.count()} runs); --reseed to start over", flush=True)
        return {"big_run": big or TrainingRun.objects.order_by("pk").values_list("pk", flat=True)[0]}
    rng = random.Random(7)
    t0 = time.perf_counter()
    with transaction.atomic():
        admin = User.objects.create_user("bench-admin", password="bench-pass-123", is_staff=True, is_superuser=True)
        users = [admin] + [User.objects.create_user(f"user{i}", password="bench-pass-123") for i in range(20)]
        bases = [BaseModel.objects.create(name=f"base-{i}", source=f"org/model-{i}", num_parameters=10**9 * (i + 1))
                 for i in range(8)]
        datasets = [Dataset.objects.create(name=f"data-{i}", uri=f"file:///data/{i}.jsonl", original_filename=f"{i}.jsonl",
                                           format="text", row_count=1000, size_bytes=10**6, sha256="0" * 64)
                    for i in range(12)]
        configs = [LoraConfig.objects.create(name=f"cfg-{i}", params={"r": 8 * (i + 1), "alpha": 16})
                   for i in range(6)]
        workers = []
        for i in range(16):
            w = Worker(name=f"gpu-{i:02d}", state="online" if i < 14 else "offline", labels=["h100", f"rack-{i // 4}"],
                       last_heartbeat=datetime.now(UTC) - timedelta(seconds=rng.randint(1, 60)),
                       inventory={"hostname": f"node{i}", "cpus": 32, "gpus": [
                           {"name": "NVIDIA H100 80GB HBM3", "memory_total": 85 * 10**9,
                            "memory_used": rng.randint(1, 80) * 10**9, "utilization": rng.randint(0, 100)}]})
            w.set_new_token()
            workers.append(w)
        Worker.objects.bulk_create(workers)
        workers = list(Worker.objects.order_by("pk"))
        now = datetime.now(UTC)
        rows = []
        for i in range(runs_n):
            # Oldest first; the newest few are queued, 12 active, the rest finished.
            from_end = runs_n - i
            state = ("queued" if from_end <= 40 else "running" if from_end <= 50 else "dispatched" if from_end <= 52
                     else rng.choices(["succeeded", "failed", "cancelled"], [8, 1, 1])[0])
            created = now - timedelta(minutes=from_end * 5)
            active = state in ("running", "dispatched")
            total = rng.choice([500, 1000, 2000])
            step = rng.randint(1, total - 1) if state == "running" else total if state == "succeeded" else 0
            rows.append(TrainingRun(
                name="bench-big" if i == runs_n - 45 else f"run-{i}", owner=rng.choice(users), base_model=rng.choice(bases),
                dataset=rng.choice(datasets), lora_config=rng.choice(configs), hyperparameters={"learning_rate": 2e-4},
                state=state, attempt=1 if state != "queued" else 0, worker=workers[from_end % 14] if active else None,
                step=step, total_steps=total if state != "queued" else 0,
                last_loss=rng.uniform(0.5, 3.0) if step else None, created_at=created,
                started_at=created + timedelta(minutes=1) if state not in ("queued", "dispatched") else None,
                finished_at=created + timedelta(minutes=4) if state in ("succeeded", "failed", "cancelled") else None,
            ))
        TrainingRun.objects.bulk_create(rows, batch_size=2000)
        # auto_now_add overrides created_at in bulk_create: set it back from the run number.
        with connection.cursor() as cur:
            cur.execute("UPDATE training_trainingrun SET created_at = now() - (%s - id) * interval '5 minutes'",
                        [TrainingRun.objects.order_by("-pk").values_list("pk", flat=True)[0]])
        runs = list(TrainingRun.objects.order_by("pk").values_list("pk", "state", "attempt", "total_steps"))
        Adapter.objects.bulk_create([
            Adapter(run_id=pk, uri=f"file:///artifacts/runs/{pk}/adapter", size_bytes=rng.randint(10**6, 10**9),
                    sha256="0" * 64, trainable_params=10**7, total_params=10**9, final_loss=rng.uniform(0.5, 2),
                    metrics={"eval_loss": rng.uniform(0.5, 2)})
            for pk, state, _, _ in runs if state == "succeeded"
        ], batch_size=2000)
    print(f"seeded {len(runs)} runs, workers, adapters in {time.perf_counter() - t0:.1f}s", flush=True)

    big = TrainingRun.objects.get(name="bench-big").pk
    big_n = int(events_n * big_share)
    plan: list[tuple[int, int, int]] = [(big, 1, big_n)]  # (run, attempt, events)
    others = [(pk, max(1, attempt)) for pk, state, attempt, _ in runs if pk != big and state != "queued"]
    per = (events_n - big_n) // len(others)
    extra = (events_n - big_n) - per * len(others)
    plan += [(pk, attempt, per + (1 if k < extra else 0)) for k, (pk, attempt) in enumerate(others)]
    t0 = time.perf_counter()
    written = 0
    base_time = now - timedelta(days=30)
    with connection.cursor() as cur, cur.cursor.copy(
        "COPY training_runevent (run_id, attempt, seq, kind, level, message, data, created_at) FROM STDIN"
    ) as copy:
        for run_id, attempt, n in plan:
            start = base_time + timedelta(seconds=run_id * 60)
            for seq in range(n):
                # Two of three events are metric points (one per step), the rest log lines.
                if seq % 3:
                    step = seq * 2 // 3 + 1
                    kind, message = "metric", ""
                    data = json.dumps({"step": step, "loss": round(3.0 / (1 + step / 200), 4), "learning_rate": 2e-4})
                else:
                    kind, message, data = "log", f"step {seq}: loss is going down, tokens/s {rng.randint(900, 1100)}", "{}"
                copy.write_row((run_id, attempt, seq, kind, "info", message, data, start + timedelta(seconds=seq)))
                written += 1
                if written % 100_000 == 0:
                    print(f"  events: {written:,} / {events_n:,} ({time.perf_counter() - t0:.0f}s)", flush=True)
    big_steps = (big_n - 1) * 2 // 3 + 1
    TrainingRun.objects.filter(pk=big).update(state="running", step=big_steps, total_steps=big_steps * 2, attempt=1)
    with connection.cursor() as cur:
        cur.execute("ANALYZE")
    print(f"copied {written:,} events in {time.perf_counter() - t0:.1f}s (run {big} holds {big_n:,})", flush=True)
    return {"big_run": big}


COMPARE_RUNS, COMPARE_EVENTS, EVAL_EVERY = 10, 200_000, 500


def seed_compare(runs_n: int = COMPARE_RUNS, events_n: int = COMPARE_EVENTS) -> list[int]:
    """`runs_n` finished runs named bench-compare-<i>, each with a curve folded from `events_n` metric events
    (an eval point every EVAL_EVERY steps), settings that differ by run; their ids, seeded once."""
    from django.contrib.auth import get_user_model

    from webapp.catalog.models import BaseModel, Dataset, LoraConfig
    from webapp.training.metrics import merge_points
    from webapp.training.models import Adapter, TrainingRun

    seeded = list(TrainingRun.objects.filter(name__startswith="bench-compare-").order_by("pk").values_list("pk", flat=True))
    if len(seeded) >= runs_n:
        return seeded[:runs_n]
    User = get_user_model()
    owner = User.objects.filter(username="bench-admin").first() or User.objects.create_user(
        "bench-admin", password="bench-pass-123", is_staff=True, is_superuser=True)
    base = BaseModel.objects.first() or BaseModel.objects.create(name="base-0", source="org/model-0", num_parameters=10**9)
    data = Dataset.objects.first() or Dataset.objects.create(
        name="data-0", uri="file:///data/0.jsonl", original_filename="0.jsonl", format="text", row_count=1000,
        size_bytes=10**6, sha256="0" * 64)
    config = LoraConfig.objects.first() or LoraConfig.objects.create(name="cfg-0", params={"r": 8, "alpha": 16})
    t0 = time.perf_counter()
    ids = []
    for i in range(runs_n):
        lr, start = 1e-4 * (i + 1), 1.8e9 + i * 10**6
        points: list[dict[str, Any]] = []
        for at in range(1, events_n + 1, 200):  # a worker's batches, folded as record_events folds them
            points = merge_points(points, [
                {"step": s, "total_steps": events_n, "epoch": s / events_n, "loss": 3.0 / (1 + s * lr / 20),
                 "learning_rate": lr * (1 - s / events_n), "grad_norm": 0.4 + (s % 7) / 10, "tokens_per_s": 900.0 + i,
                 "num_tokens": 512.0 * s, "time": start + 0.5 * s,
                 **({"eval_loss": 3.1 / (1 + s * lr / 20)} if s % EVAL_EVERY == 0 else {})}
                for s in range(at, min(at + 200, events_n + 1))])
        run = TrainingRun.objects.create(
            name=f"bench-compare-{i}", owner=owner, base_model=base, dataset=data, lora_config=config,
            hyperparameters={"learning_rate": lr, "epochs": 1, "max_length": 512 * (1 + i % 2)}, state="succeeded",
            attempt=1, step=events_n, total_steps=events_n, last_loss=points[-1]["loss"], metric_points=points)
        Adapter.objects.create(run=run, name=run.name, owner=owner, base_model=base, uri=f"file:///a/{run.pk}",
                               size_bytes=10**7, sha256="0" * 64, trainable_params=10**7, total_params=10**9,
                               metrics={"eval_loss": points[-1].get("eval_loss"), "trained_tokens": 512 * events_n,
                                        "peak_memory_reserved": 20 * 2**30})
        ids.append(run.pk)
    print(f"seeded {runs_n} runs of {events_n:,} metric events each ({len(points):,} points in a curve) in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    return ids


def compare_pages(client: object, ids: list[int], events_n: int = COMPARE_EVENTS
                  ) -> dict[str, tuple[object, str, dict[str, str]]]:
    listed = ",".join(str(pk) for pk in ids)
    events = f"{events_n // 1000}k"
    return {
        f"compare page ({len(ids)} runs x {events} events)": (client, f"/runs/compare/?ids={listed}", {}),
        f"compare curves JSON ({len(ids)} runs)": (client, f"/runs/compare/metrics.json?ids={listed}", {}),
        f"run metrics JSON ({events} events)": (client, f"/runs/{ids[0]}/metrics.json", {}),
        "run metrics JSON, after a step": (client, f"/runs/{ids[0]}/metrics.json?after={events_n - 1000}", {}),
        f"run page ({events} events)": (client, f"/runs/{ids[0]}/", {}),
    }


def measure(pages: dict[str, tuple[object, str, dict[str, str]]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Round-robin over the pages so that each sees the same load; milliseconds per request."""
    times: dict[str, list[float]] = {name: [] for name in pages}
    for r in range(warmup + rounds):
        for name, (client, url, headers) in pages.items():
            t0 = time.perf_counter()
            response = client.get(url, headers=headers)  # type: ignore[attr-defined]
            elapsed = (time.perf_counter() - t0) * 1000
            if response.status_code != 200:
                raise SystemExit(f"{name}: {url} answered {response.status_code}")
            if r >= warmup:
                times[name].append(elapsed)
    return times


def slowest_queries(client: object, url: str, headers: dict[str, str]) -> list[tuple[float, str]]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as ctx:
        client.get(url, headers=headers)  # type: ignore[attr-defined]
    return sorted(((float(q["time"]) * 1000, q["sql"]) for q in ctx.captured_queries), reverse=True)


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="tunedeck_bench")
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=60, help="Measured requests per page.")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reseed", action="store_true")
    parser.add_argument("--explain", action="store_true", help="Print each page's slowest queries.")
    parser.add_argument("--target-ms", type=float, default=100.0)
    parser.add_argument("--compare-only", action="store_true",
                        help="Only the experiments' pages: compare, the charts' JSON and a sweep (and the login page, "
                             "the baseline).")
    parser.add_argument("--compare-events", type=int, default=COMPARE_EVENTS,
                        help="Metric events folded into each compared run's curve (seeded once per database).")
    parser.add_argument("--database-url", help="Measure on this database instead (with --compare-only), "
                                               "e.g. sqlite:////tmp/bench.sqlite3")
    args = parser.parse_args()

    if args.database_url:
        os.environ["DATABASE_URL"] = args.database_url
        setup_django("", url=args.database_url)
    else:
        ensure_database(args.db, args.reseed)
        setup_django(args.db)
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
    if args.compare_only:
        ids = seed_compare(events_n=args.compare_events)
        client = Client()
        client.force_login(get_user_model().objects.get(username="bench-admin"))
        pages = {"login (baseline)": (Client(), "/login/", {}), **compare_pages(client, ids, args.compare_events),
                 **sweep_pages(client)}
        return report(pages, args)
    info = seed(args.runs, args.events)
    big = info["big_run"]
    from webapp.training.models import RunEvent, TrainingRun

    print(f"database: {TrainingRun.objects.count():,} runs, ~{RunEvent.objects.count():,} events; "
          f"run {big} has {RunEvent.objects.filter(run_id=big).count():,}", flush=True)
    user = get_user_model().objects.get(username="bench-admin")
    client = Client()
    client.force_login(user)
    anonymous = Client()
    owner = get_user_model().objects.filter(username="user3").values_list("pk", flat=True).first()
    htmx = {"HX-Request": "true"}
    pages: dict[str, tuple[object, str, dict[str, str]]] = {
        "login (baseline)": (anonymous, "/login/", {}),
        "overview": (client, "/", {}),
        "overview (htmx poll)": (client, "/", htmx),
        "workers": (client, "/workers/", {}),
        "runs list": (client, "/runs/", {}),
        "runs list, filtered": (client, f"/runs/?state=succeeded&owner={owner}&sort=-loss", {}),
        "runs list, sorted by name, p.20": (client, "/runs/?sort=name&page=20", {}),
        "runs list (htmx poll)": (client, "/runs/", htmx),
        f"run detail ({RunEvent.objects.filter(run_id=big).count() // 1000}k events)": (client, f"/runs/{big}/", {}),
        "run status partial (big run)": (client, f"/runs/{big}/status/", {}),
        "adapters list": (client, "/adapters/", {}),
        **compare_pages(client, seed_compare()),
        **sweep_pages(client),
    }
    return report(pages, args)


def report(pages: dict[str, tuple[object, str, dict[str, str]]], args: argparse.Namespace) -> int:
    print(f"measuring {args.requests} requests per page (+{args.warmup} warm-up), round-robin…", flush=True)
    times = measure(pages, args.requests, args.warmup)
    base95 = p(times["login (baseline)"], 0.95)
    print()
    print(f"{'page':<40} {'p50 ms':>8} {'p95 ms':>8} {'p95/login':>10}")
    slow = []
    for name, values in times.items():
        p50, p95 = p(values, 0.5), p(values, 0.95)
        flag = "  SLOW" if p95 > args.target_ms else ""
        print(f"{name:<40} {p50:>8.1f} {p95:>8.1f} {p95 / base95:>9.1f}x{flag}")
        if flag:
            slow.append(name)
    print(f"\n{len(times)} pages; target p95 < {args.target_ms:.0f} ms: "
          + ("all met" if not slow else "missed by " + ", ".join(slow)))
    if args.explain or slow:
        for name in (pages if args.explain else slow):
            c, url, headers = pages[name]
            queries = slowest_queries(c, url, headers)
            total = sum(t for t, _ in queries)
            print(f"\n{name}: {len(queries)} queries, {total:.1f} ms in the database; slowest:")
            for t, sql in queries[:3]:
                print(f"  {t:7.1f} ms  {sql[:300]}")
    return 0



def sweep_pages(client: object, trials_n: int = 100) -> dict[str, tuple[object, str, dict[str, str]]]:
    """The sweep page of a finished sweep with `trials_n` trials (each an ordinary run with an eval curve), seeded
    once: its full page and its htmx poll."""
    from webapp.sweeps.models import Sweep, Trial
    from webapp.training.models import TrainingRun

    name = f"bench sweep ({trials_n} trials)"
    sweep = Sweep.objects.filter(name=name).first()
    if sweep is None:
        template = TrainingRun.objects.order_by("id").first()
        assert template is not None, "seed runs first"
        rng = random.Random(7)
        sweep = Sweep.objects.create(
            owner=template.owner, name=name, base_run=template, state="finished", num_runs=trials_n, runs_at_once=4,
            sampler="tpe", pruner="median", metric="eval_loss",
            space={"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                   "batch_size": {"type": "categorical", "choices": [4, 8, 16]},
                   "grad_accum": {"type": "int", "low": 1, "high": 4}})
        for number in range(trials_n):
            curve = [{"step": s, "loss": 2.0 - s / 400, "eval_loss": 2.1 - s / 500 + rng.random() / 10}
                     for s in range(0, 400, 10)]
            run = TrainingRun.objects.create(
                name=f"{name} #{number}", owner=template.owner, base_model=template.base_model, dataset=template.dataset,
                lora_config=template.lora_config, hyperparameters=template.hyperparameters, state="succeeded",
                step=400, total_steps=400, metric_points=curve)
            pruned = number % 3 == 2
            Trial.objects.create(
                sweep=sweep, number=number, run=run, state="pruned" if pruned else "complete",
                params={"learning_rate": 10 ** rng.uniform(-5, -3), "batch_size": rng.choice([4, 8, 16]),
                        "grad_accum": rng.randint(1, 4)},
                value=curve[-1]["eval_loss"], pruned_at_step=200 if pruned else None)
    return {f"sweep page ({trials_n} trials)": (client, f"/sweeps/{sweep.pk}/", {}),
            "sweep page (htmx poll)": (client, f"/sweeps/{sweep.pk}/?sort=-value", {"HX-Request": "true"})}


if __name__ == "__main__":
    sys.exit(main())
