"""Artifact transfer through the worker API on loopback: how fast a remote-mode worker uploads and downloads a
large file, and how much memory the web server and the worker use while they do.

    python bench/artifact_transfer.py              # a 5 GiB file
    python bench/artifact_transfer.py --gib 1

Starts the real ASGI server (uvicorn, as `tunedeck web` does) on the bench database (tunedeck_bench on the local
PostgreSQL, created and migrated if missing) with a scratch artifact store, makes a running run held by a freshly
registered worker, then, as that worker, uploads a file of --gib GiB into the run's trackers' folder (8 MiB chunks,
each with its sha256, then the commit that checks the whole file) and downloads it back (streamed, verified).

Figures are MB/s and ratios to a plain local copy of the same file on the same disk (the baseline, run in the same
process just before), the web server's peak resident memory (VmHWM) and the worker side's growth in peak memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from page_speed import ensure_database, free_port, live_world, setup_django, start_web_server

BLOCK = 64 << 20


def peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def write_file(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = bytearray(os.urandom(BLOCK))
    with path.open("wb") as out:
        written = 0
        while written < size:
            block[:8] = written.to_bytes(8, "little")  # no two blocks alike
            piece = memoryview(block)[: min(BLOCK, size - written)]
            out.write(piece)
            written += len(piece)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="tunedeck_bench")
    parser.add_argument("--gib", type=float, default=5.0)
    args = parser.parse_args()
    size = int(args.gib * 2**30)

    scratch = Path(tempfile.mkdtemp(prefix="transfer-bench-"))
    os.environ["ARTIFACT_STORE"] = str(scratch / "store")
    ensure_database(args.db, reseed=False)
    setup_django(args.db)
    from webapp.training.models import TrainingRun
    from workers.contract.reporter import MemoryReporter
    from workers.contract.store import ArtifactStore
    from workers.runtime.client import WorkerClient
    from workers.runtime.remote import Transfers

    world = live_world("transfer")
    run = TrainingRun.objects.create(name="transfer bench", owner=world.user, base_model=world.base,
                                     dataset=world.dataset, lora_config=world.config, state="running", attempt=1,
                                     worker=world.worker, total_steps=1)
    uri = run.job_spec().tracking_uri
    local = ArtifactStore(scratch / "worker")
    folder = local.path(uri)
    print(f"writing a {args.gib:g} GiB file...", flush=True)
    write_file(folder / "big.bin", size)

    started = time.perf_counter()
    shutil.copyfile(folder / "big.bin", scratch / "copy.bin")
    copy_s = time.perf_counter() - started
    (scratch / "copy.bin").unlink()

    port = free_port()
    server = start_web_server(port)
    try:
        server_before = peak_kib(server.pid)
        client_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        transfers = Transfers(WorkerClient(f"http://127.0.0.1:{port}", world.token, timeout=120), "jobs", run.pk, 1,
                              MemoryReporter())  # type: ignore[arg-type]
        started = time.perf_counter()
        reply = transfers.upload(uri, folder)
        upload_s = time.perf_counter() - started
        entry = next(f for f in transfers.manifest(uri)["files"] if f["path"] == "big.bin")
        started = time.perf_counter()
        transfers.download(uri, entry, scratch / "back.bin")
        download_s = time.perf_counter() - started
        server_peak = peak_kib(server.pid)
        client_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        server.terminate()
        server.wait(timeout=15)
        shutil.rmtree(scratch, ignore_errors=True)
    mb = size / 1e6
    print(f"\n{args.gib:g} GiB, sha256 {reply['sha256'][:12]}… checked at both ends\n")
    print("| transfer | seconds | MB/s | / local copy |")
    print("|---|---|---|---|")
    print(f"| local copy on the same disk (baseline) | {copy_s:.1f} | {mb / copy_s:,.0f} | 1.00× |")
    for name, seconds in (("upload (8 MiB chunks + commit)", upload_s), ("download (streamed, verified)", download_s)):
        print(f"| {name} | {seconds:.1f} | {mb / seconds:,.0f} | {copy_s / seconds:.2f}× |")
    print(f"\nweb server peak RSS {server_peak / 1024:,.0f} MiB ({server_before / 1024:,.0f} MiB before the transfers); "
          f"worker side peak RSS {client_peak / 1024:,.0f} MiB ({client_before / 1024:,.0f} MiB before)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
