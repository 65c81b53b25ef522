"""Hostile dataset uploads against a live web server: peak memory, stored preview, time, next to legitimate uploads.

    python bench/hostile_uploads.py                      # this tree
    python bench/hostile_uploads.py --tree /path/to/old  # another checkout of Tunedeck, for a before/after
    python bench/hostile_uploads.py --tiny               # small files, to check that the script runs

Builds the files on disk (a legitimate JSONL and Parquet of toy rows, and a JSONL of 1,000,000 rows, the
default row bound; a Parquet file whose one zstd cell
decodes to 300 MB; a Parquet file of 20 million rows in a few dozen KB; a 50 MB JSON line; JSON nested
200,000 deep), starts the ASGI server (uvicorn, one process, SQLite under a temporary TUNEDECK_VAR) and
uploads each through POST /api/v1/datasets/ with an API key, one after the other. For each it reads the
server's peak resident memory during the request (Linux: VmHWM after resetting it through
/proc/PID/clear_refs), the preview stored in the database and the time. Then it lists the datasets through
GET /api/v1/datasets/, which loads every stored dataset row. The legitimate uploads are the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from page_speed import free_port  # this script's folder is on sys.path when it runs

ROOT = Path(__file__).resolve().parent.parent
MB = 2**20


@dataclass
class Case:
    label: str
    filename: str
    path: Path


def build_files(folder: Path, scale: float) -> list[Case]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from workers.training.demo import toy_rows

    rows = toy_rows(max(10, int(200_000 * scale)), 0)
    legit_jsonl = folder / "legit.jsonl"
    legit_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    legit_parquet = folder / "legit.parquet"
    pq.write_table(pa.Table.from_pylist(rows), legit_parquet, compression="zstd")
    at_bound = folder / "at-the-row-bound.jsonl"  # as many rows as the default bound lets in
    with at_bound.open("w", encoding="utf-8") as out:
        for row in toy_rows(max(10, int(1_000_000 * scale)), 1):
            out.write(json.dumps(row) + "\n")

    bomb = folder / "bomb.parquet"  # one cell of 300 MB, zstd: a few KB on disk
    cell = pc.binary_repeat(pa.array(["x"]), int(300 * MB * scale)).cast(pa.string())
    pq.write_table(pa.table({"text": cell}), bomb, compression="zstd")
    del cell

    many = folder / "many-rows.parquet"  # 20 million valid rows, one dictionary value: a few dozen KB
    count = int(20_000_000 * scale)
    import numpy as np

    column = pa.DictionaryArray.from_arrays(pa.array(np.zeros(count, dtype=np.int32)), pa.array(["What is 1 + 1? 2"]))
    pq.write_table(pa.table({"text": column}), many, compression="zstd")
    del column

    line = folder / "one-line.jsonl"  # a single JSON line of 50 MB
    with line.open("w", encoding="utf-8") as out:
        out.write('{"text": "' + "y" * int(50 * MB * scale) + '"}\n')

    nested = folder / "nested.jsonl"
    depth = max(2_000, int(200_000 * scale))
    nested.write_text("[" * depth + "]" * depth + "\n", encoding="utf-8")
    return [
        Case("baseline: legitimate JSONL", "legit.jsonl", legit_jsonl),
        Case("baseline: legitimate Parquet", "legit.parquet", legit_parquet),
        Case("legitimate JSONL of 1,000,000 rows", "at-the-row-bound.jsonl", at_bound),
        Case("Parquet bomb (one zstd cell)", "bomb.parquet", bomb),
        Case("Parquet, 20 M rows", "many-rows.parquet", many),
        Case("one 50 MB JSON line", "one-line.jsonl", line),
        Case("JSON nested 200,000 deep", "nested.jsonl", nested),
    ]


def server_env(tree: Path, var: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNEDECK_DATASET_", "DATABASE_URL"))}
    env.update(TUNEDECK_VAR=str(var), SECRET_KEY="bench-only-not-secret", ALLOWED_HOSTS="127.0.0.1",
               DJANGO_SETTINGS_MODULE="webapp.settings", PYTHONPATH=str(tree), LOG_LEVEL="ERROR",
               CELERY_BROKER_URL="memory://", REDIS_URL="")
    return env


def prepare_database(tree: Path, env: dict[str, str]) -> str:
    """Migrate, then make a user and a write key; returns the key's secret."""
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=tree, env=env, check=True)
    script = ("import django; django.setup()\n"
              "from django.contrib.auth import get_user_model\n"
              "from webapp.api.models import ApiKey\n"
              "user = get_user_model().objects.create_user('bench', password='bench-pass-123')\n"
              "print(ApiKey.issue(user, 'bench', ['write'])[1])\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tree, env=env, check=True, capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


def start_server(tree: Path, env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "webapp.asgi:application", "--host", "127.0.0.1",
                               "--port", str(port), "--log-level", "warning"], cwd=tree, env=env)
    import httpx

    for _ in range(300):
        try:
            httpx.get(f"http://127.0.0.1:{port}/login/", timeout=1)
            return server
        except httpx.HTTPError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("the server did not start")


def memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measured(pid: int, request: Callable[[], Any]) -> tuple[Any, float, float]:
    """(response, seconds, peak resident growth in MB) of one request to the server process `pid`."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = memory_kb(pid, "VmRSS")
    started = time.perf_counter()
    response = request()
    seconds = time.perf_counter() - started
    return response, seconds, (memory_kb(pid, "VmHWM") - before) / 1024


def stored_preview_bytes(var: Path, name: str) -> int | None:
    with sqlite3.connect(var / "tunedeck.sqlite3") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        query = ("SELECT length(p.rows) FROM catalog_datasetpreview p JOIN catalog_dataset d ON d.id = p.dataset_id "
                 "WHERE d.name = ?" if "catalog_datasetpreview" in tables else
                 "SELECT length(preview) FROM catalog_dataset WHERE name = ?")
        row = db.execute(query, (name,)).fetchone()
    return None if row is None else int(row[0] or 0)


def outcome(response: Any) -> str:
    status = response.status_code
    if status == 201:
        return f"{status} stored"
    try:
        body = response.json()
        message = body.get("problems", [{}])[0].get("message") or body.get("detail", "")
        where = body.get("problems", [{}])[0]
        place = f"{where.get('unit', '')} {where.get('line', '')}".strip() if where.get("line") else ""
        place += f", field '{where['field']}'" if where.get("field") else ""
        return f"{status} {place + ': ' if place else ''}{message}"[:110]
    except ValueError:
        return f"{status} {response.text[:80]!r}"


def run(tree: Path, cases: list[Case]) -> list[dict[str, object]]:
    import httpx

    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="tunedeck-bench-") as tmp:
        var = Path(tmp)
        env = server_env(tree, var)
        key = prepare_database(tree, env)
        port = free_port()
        server = start_server(tree, env, port)
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}
        try:
            for index, warm in enumerate(cases[:2]):  # the first upload of a kind imports its readers (pyarrow: ~60 MB)
                with warm.path.open("rb") as handle:
                    httpx.post(f"{base}/api/v1/datasets/", headers=headers, data={"name": f"warm-{index}"},
                               files={"file": (warm.filename, handle)}, timeout=3600).raise_for_status()
            rss = memory_kb(server.pid, "VmRSS") / 1024
            print(f"server {tree}: resident {rss:.0f} MB after start and one upload of each kind", flush=True)
            for number, case in enumerate(cases):
                name = f"d{number}"

                def upload(case: Case = case, name: str = name) -> httpx.Response:
                    with case.path.open("rb") as handle:
                        return httpx.post(f"{base}/api/v1/datasets/", headers=headers, data={"name": name},
                                          files={"file": (case.filename, handle)}, timeout=3600)

                response, seconds, growth = measured(server.pid, upload)
                answer = outcome(response)
                results.append({"case": case.label, "size": case.path.stat().st_size, "seconds": seconds,
                                "growth_mb": growth, "preview": stored_preview_bytes(var, name), "outcome": answer})
                print(f"  {case.label}: {answer[:60]}", flush=True)
            with httpx.Client(base_url=base, headers=headers) as session:
                response, seconds, growth = measured(server.pid, lambda: session.get("/api/v1/datasets/", timeout=600))
            results.append({"case": "datasets list (API), after the uploads", "size": None, "seconds": seconds,
                            "growth_mb": growth, "preview": None, "outcome": str(response.status_code)})
        finally:
            server.terminate()
            server.wait(timeout=30)
    return results


def size_text(size: object) -> str:
    if size is None:
        return ""
    value = float(size)  # type: ignore[arg-type]
    return f"{value / MB:.1f} MB" if value >= MB else f"{value / 1024:.0f} KB" if value >= 1024 else f"{value:.0f} B"


def print_table(results: list[dict[str, object]]) -> None:
    """One row per upload; time also as a ratio to the legitimate JSONL upload (the first row)."""
    baseline = max(float(results[0]["seconds"]), 1e-3)  # type: ignore[arg-type]
    print("\n| upload | file | answer | time s | time vs baseline | peak RSS growth | stored preview |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        seconds = float(r["seconds"])  # type: ignore[arg-type]
        print(f"| {r['case']} | {size_text(r['size'])} | {r['outcome']} | {seconds:.2f} | {seconds / baseline:.1f}× "
              f"| {max(0.0, float(r['growth_mb'])):.0f} MB | {size_text(r['preview'])} |")  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="the Tunedeck checkout whose server is measured")
    parser.add_argument("--tiny", action="store_true", help="files at 1/100 of their size")
    parser.add_argument("--json-out", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="tunedeck-files-") as folder:
        cases = build_files(Path(folder), 0.01 if args.tiny else 1.0)
        results = run(args.tree.resolve(), cases)
    print_table(results)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
