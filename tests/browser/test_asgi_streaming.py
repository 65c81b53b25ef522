"""Large downloads from the real ASGI server (uvicorn, as `tunedeck web` runs it) are streamed: the web server's
memory does not grow with the file. Django alone would read a file response whole into memory under ASGI before
sending its first byte (a 16 GB merged model, or a base model fetched by a remote worker)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx
import pytest

from tests.webapp.factories import demo_objects, make_run, make_worker
from webapp.jobs import ledger
from workers.contract.store import ArtifactStore

pytestmark = [pytest.mark.e2e]
SIZE = 256 << 20


def server_pid(url: str) -> int:
    port = url.rsplit(":", 1)[1]
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"uvicorn" in b" ".join(cmdline) and port.encode() in cmdline:
            return int(proc.name)
    raise AssertionError(f"no uvicorn on port {port}")


def peak_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def test_a_large_file_is_streamed_by_the_asgi_server_in_constant_memory(  # type: ignore[no-untyped-def]
    asgi_server, transactional_db, tiny_model_dir, shared_store, local_models, settings
) -> None:
    settings.ARTIFACT_STORE = shared_store
    user, base, dataset, config = demo_objects(tiny_model_dir)
    run = make_run(user, base, dataset, config)
    worker, token = make_worker("streamer")
    attempt = ledger.dispatch(run, worker)
    big = ArtifactStore(shared_store).path(dataset.uri)
    block = os.urandom(1 << 20)
    with big.open("wb") as out:
        for _ in range(SIZE >> 20):
            out.write(block)
    pid = server_pid(asgi_server)
    # A first small request warms the server up (imports, the first connection): what follows is the file alone.
    params = {"attempt": attempt, "uri": dataset.uri, "path": ""}
    headers = {"Authorization": f"Bearer {token}"}
    warm = httpx.get(f"{asgi_server}/api/worker/v1/jobs/{run.pk}/artifacts/file", params=params,
                     headers={**headers, "Range": f"bytes={SIZE - 10}-"}, timeout=60)
    assert warm.status_code == 206 and len(warm.content) == 10
    before = peak_mib(pid)
    digest, received = hashlib.sha256(), 0
    with httpx.stream("GET", f"{asgi_server}/api/worker/v1/jobs/{run.pk}/artifacts/file", params=params,
                      headers=headers, timeout=120) as response:
        assert response.status_code == 200 and int(response.headers["Content-Length"]) == SIZE
        for chunk in response.iter_bytes():
            digest.update(chunk)
            received += len(chunk)
    assert received == SIZE and digest.hexdigest() == hashlib.sha256(big.read_bytes()).hexdigest()
    grown = peak_mib(pid) - before
    assert grown < 64, f"the web server's peak memory grew by {grown:.0f} MiB for a {SIZE >> 20} MiB file"
