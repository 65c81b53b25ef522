"""End to end through HTTP: a real worker process, the real broker, the real scheduler code.

Runs on whatever the environment configures: the embedded default (SQLite + filesystem
broker) or PostgreSQL + Redis (CI runs both).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.webapp.factories import demo_objects, make_worker
from tests.webapp.fleetprocs import with_worker_store
from webapp.catalog.models import BaseModel
from webapp.fleet.scheduler import schedule_once
from webapp.training.models import RunEvent, TrainingRun
from workers.adapters.evaluate import completion_loss
from workers.contract.spec import suggest_train_params
from workers.training.demo import toy_rows

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]
WORKER_NAME = f"e2e-{uuid.uuid4().hex[:8]}"
WORKER_TOKEN = f"tdw_{uuid.uuid4().hex}"


class WorkerProcess:
    """One `tunedeck worker` for the module, started once its token is registered (a refused token stops it)."""

    def __init__(self, server: str, store: Any, env: dict[str, str] | None = None):
        self.server, self.store, self.env = server, store, dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = open(store / "worker.log", "wb")

    def start(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            env = with_worker_store({**os.environ, "TUNEDECK_SERVER": self.server, "TUNEDECK_WORKER_TOKEN": WORKER_TOKEN,
                                     "TUNEDECK_HEARTBEAT_INTERVAL": "2", **self.env},
                                    self.store, self.store.parent / f"{self.store.name}-worker")
            self.proc = subprocess.Popen([sys.executable, "-m", "webapp.cli", "worker"], env=env, stdout=self.log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self.proc

    def stop(self) -> None:
        """SIGTERM (a warm shutdown), then SIGKILL of the whole process group after 30 s: at teardown the
        control plane no longer answers (the test database is gone), so a job still handing over would wait."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def worker_process(live_server, tmp_path_factory):  # type: ignore[no-untyped-def]
    worker = WorkerProcess(live_server.url, tmp_path_factory.mktemp("e2e-store"))
    yield worker
    worker.stop()


@pytest.fixture
def setup(worker_process, tiny_model_dir, settings):  # type: ignore[no-untyped-def]
    settings.ARTIFACT_STORE = worker_process.store
    objects = demo_objects(tiny_model_dir)
    make_worker(WORKER_NAME, token=WORKER_TOKEN)  # (again for each test: the database is emptied between tests)
    return (worker_process.start(), worker_process.store, *objects)


def browser(live_server) -> httpx.Client:  # type: ignore[no-untyped-def]
    client = httpx.Client(base_url=live_server.url, follow_redirects=True, timeout=30)
    page = client.get("/login/")
    client.post("/login/", data={"username": "owner", "password": "owner-pass-123", "csrfmiddlewaretoken": csrf(page.text)})
    return client


def csrf(html: str) -> str:
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)  # type: ignore[union-attr]


def create_run(client: httpx.Client, base, dataset, config, **overrides) -> TrainingRun:  # type: ignore[no-untyped-def]
    form = client.get("/runs/new/")
    # What a browser posts for the form's suggested values (an unchecked box is left out).
    suggested = dataclasses.asdict(suggest_train_params(base.num_parameters))
    fields = {k: ("on" if v is True else v) for k, v in suggested.items() if v is not False}
    data = {"csrfmiddlewaretoken": csrf(form.text), "name": "e2e", "base_model": base.pk, "dataset": dataset.pk,
            "lora_config": config.pk, **fields}
    response = client.post("/runs/new/", data={**data, **overrides})
    assert response.status_code == 200 and re.search(r"/runs/\d+/$", str(response.url)), response.text[:2000]
    return TrainingRun.objects.get(pk=int(str(response.url).rstrip("/").rsplit("/", 1)[1]))


def wait_for(run: TrainingRun, states: tuple[str, ...], timeout: float = 240, until=None) -> TrainingRun:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        schedule_once()
        run.refresh_from_db()
        if run.state in states and (until is None or until(run)):
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run.pk} still {run.state} after {timeout}s: {[e.message for e in run.events.all()][-10:]}")


def test_a_run_created_over_http_trains_on_a_real_worker_and_its_adapter_beats_the_base(setup, live_server) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, store, _user, base, dataset, config = setup
    client = browser(live_server)
    run = wait_for(create_run(client, base, dataset, config), ("succeeded", "failed", "cancelled"))
    assert run.state == "succeeded", run.error

    seqs = list(RunEvent.objects.filter(run=run, attempt=run.attempt, seq__isnull=False).order_by("id").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 20
    stream = client.get(f"/runs/{run.pk}/stream/", headers={"Last-Event-ID": str(RunEvent.objects.filter(run=run).order_by("id")[5].pk)})
    ids = [int(i) for i in re.findall(r"^id: (\d+)$", stream.text, re.M)]
    assert ids == list(RunEvent.objects.filter(run=run).order_by("id").values_list("id", flat=True))[6:]

    download = client.get(f"/runs/{run.pk}/adapter.zip")
    assert download.status_code == 200 and download.content[:2] == b"PK"
    adapter_dir = store / run.adapter.uri.removeprefix("store://")
    tokenizer = AutoTokenizer.from_pretrained(base.source)
    held_out = toy_rows(64, seed=4242)
    base_loss = completion_loss(AutoModelForCausalLM.from_pretrained(base.source), tokenizer, held_out)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.source), adapter_dir)
    tuned_loss = completion_loss(tuned, tokenizer, held_out)
    assert tuned_loss < base_loss * 0.6, (base_loss, tuned_loss)


def test_a_bad_base_path_fails_readably_the_worker_keeps_serving_and_cancel_stops_a_run(setup, live_server) -> None:  # type: ignore[no-untyped-def]
    proc, _, _user, base, dataset, config = setup
    client = browser(live_server)
    ghost = BaseModel.objects.create(name="ghost", source="/nonexistent/model", linear_modules=base.linear_modules,
                                     max_positions=256, num_parameters=1000)
    failed = wait_for(create_run(client, ghost, dataset, config), ("succeeded", "failed", "cancelled"))
    assert failed.state == "failed" and "/nonexistent/model" in failed.error and "does not exist" in failed.error
    assert any("does not exist" in e.message for e in failed.events.all())
    assert proc.poll() is None

    long_run = create_run(client, base, dataset, config, max_steps=3000, logging_steps=1)
    running = wait_for(long_run, ("running",), until=lambda r: r.step >= 5)
    page = client.get(f"/runs/{running.pk}/")
    client.post(f"/runs/{running.pk}/cancel/", data={"csrfmiddlewaretoken": csrf(page.text)})
    step_at_cancel = TrainingRun.objects.get(pk=running.pk).step
    done = wait_for(running, ("succeeded", "failed", "cancelled"), timeout=60)
    assert done.state == "cancelled"
    # The page's step lags the worker by up to one report (1 s) and the worker sees the flag at its next
    # report (1 s): at the tiny model's 25-40 steps a second, a prompt stop is well under 150 steps.
    assert done.step - step_at_cancel < 150, (step_at_cancel, done.step)
    assert done.step < 3000
