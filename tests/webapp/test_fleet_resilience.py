"""The fleet under failure, with real worker processes, the real broker and the real scheduler code.

- A worker killed with SIGKILL mid-training (supervised or DPO): after the heartbeat timeout its run resumes on
  another worker from the latest checkpoint and ends where an uninterrupted run of the same seed ends.
- A duplicated wake-up runs the job once.
- A Redis restart during a run (a private Redis server, so the shared one is never touched): the run
  succeeds, nothing runs twice, no event is lost, and the worker takes the next job after reconnecting.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.webapp.factories import demo_objects, make_run
from tests.webapp.fleetprocs import Fleet, run_until, until
from webapp.fleet.models import Worker
from webapp.training.models import RunEvent, TrainingRun

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]

# Long enough that a kill lands between checkpoints, short enough for CI: checkpoints every 10 steps. The
# tiny model trains ~25 steps a second here: 160 steps leave the tests several seconds to see a run mid-way
# (at 80, a loaded machine's slower polls sometimes saw it only once it had ended).
HP = {"max_steps": 160, "save_steps": 10, "keep_checkpoints": 2, "logging_steps": 1, "seed": 7,
      "eval_fraction": 0.0, "batch_size": 4, "max_seq_length": 64, "warmup_ratio": 0.1, "lr_scheduler": "cosine"}


@pytest.fixture
def fleet(live_server, tmp_path, settings, request) -> Iterator[Fleet]:  # type: ignore[no-untyped-def]
    settings.ARTIFACT_STORE = tmp_path / "store"
    settings.ARTIFACT_STORE.mkdir()
    settings.WORKER_OFFLINE_AFTER = 6
    settings.DISPATCH_RESEND_AFTER = 3
    fleet = Fleet(live_server.url, tmp_path / "store", remote=getattr(request, "param", "local") == "remote")
    yield fleet
    fleet.stop()


def lr_by_step(run: TrainingRun) -> dict[int, float]:
    return {p["step"]: p["learning_rate"] for p in run.metric_points if "learning_rate" in p}


@pytest.mark.parametrize(("objective", "fleet"), [("sft", "local"), ("dpo", "local"), ("sft", "remote")],
                         indirect=["fleet"])
def test_a_worker_killed_mid_run_hands_its_run_to_another_that_resumes_from_the_checkpoint(
    fleet: Fleet, tiny_model_dir: Path, objective: str
) -> None:
    """Remote: each worker has its own folder; the checkpoints reach the control plane by upload, and the
    survivor downloads the latest complete one."""
    user, base, dataset, config = demo_objects(tiny_model_dir)
    # A remote worker's checkpoints are reported once uploaded (a second or so behind): a longer run leaves the
    # test time to see one reported well before the end.
    hp = {**HP, "max_steps": 2 * HP["max_steps"]} if fleet.remote else HP
    if objective == "dpo":  # preference pairs, trained against the reference (the adapter switched off)
        from webapp.catalog.services import register_dataset
        from workers.training.demo import preference_rows

        dataset = register_dataset("pairs", "pairs.jsonl",
                                   "".join(json.dumps(row) + "\n" for row in preference_rows(256, 0)).encode())
    fleet.start("w-alpha")
    fleet.start("w-beta")
    fleet.wait_ready("w-alpha", "w-beta")
    reference = make_run(user, base, dataset, config, objective=objective, **hp)
    victim = make_run(user, base, dataset, config, objective=objective, **hp)

    # Kill the victim's worker once the run has saved its second checkpoint (and well before it ends).
    def checkpointed() -> bool:
        victim.refresh_from_db()
        assert victim.state not in ("succeeded", "failed"), f"the run ended before the kill: {victim.error} {[e.message for e in victim.events.order_by('id')][-40:]}"
        return RunEvent.objects.filter(run=victim, kind="checkpoint", attempt=1, data__step__gte=20).exists()

    until(checkpointed, 300, lambda: [e.message for e in victim.events.order_by("id")][-8:], tick=True)
    victim.refresh_from_db()
    lost = victim.worker.name
    os.killpg(fleet.procs[lost].pid, signal.SIGKILL)
    step_at_kill = victim.step

    run_until(victim, ("succeeded", "failed"), timeout=400)
    run_until(reference, ("succeeded", "failed"), timeout=300)
    assert reference.state == "succeeded", reference.error
    assert victim.state == "succeeded", victim.error
    survivor = "w-beta" if lost == "w-alpha" else "w-alpha"
    assert victim.attempt == 2 and victim.worker.name == survivor
    assert victim.failures == 1
    assert [e["outcome"] for e in victim.attempt_log] == ["lost", "succeeded"]
    assert lost in victim.attempt_log[0]["reason"]
    assert Worker.objects.get(name=lost).state == "offline"

    resumed = victim.adapter.metrics["resumed_from_step"]
    # From the latest checkpoint on disk: at least the one the test saw reported, at most those written in the
    # last report interval (1 s, ~25-40 steps here) before the kill, which the control plane had not heard of.
    assert resumed is not None and 20 <= resumed <= step_at_kill + 50, (resumed, step_at_kill)
    # The resumed run ends where the uninterrupted one does: same step count, same learning-rate schedule,
    # the same loss within a small tolerance (the data order and the RNG state are restored with the checkpoint).
    assert victim.adapter.metrics["steps"] == reference.adapter.metrics["steps"] == hp["max_steps"]
    ref_lr, vic_lr = lr_by_step(reference), lr_by_step(victim)
    assert sorted(vic_lr) == sorted(ref_lr) == list(range(1, hp["max_steps"] + 1))
    assert all(abs(vic_lr[s] - ref_lr[s]) <= 1e-9 + 1e-6 * abs(ref_lr[s]) for s in ref_lr)
    ref_loss, vic_loss = reference.adapter.final_loss, victim.adapter.final_loss
    assert abs(vic_loss - ref_loss) <= 0.02 * abs(ref_loss) + 0.005, (vic_loss, ref_loss)
    # The dead worker's attempt left no report after the kill: every event after the handover is attempt 2's.
    handover = victim.events.filter(kind="status", message__contains="requeued").first()
    assert handover is not None
    assert not victim.events.filter(id__gt=handover.id, attempt=1).exists()


def test_the_same_wake_up_delivered_twice_runs_the_job_once(fleet: Fleet, tiny_model_dir: Path) -> None:
    from webapp.celery import send_wakeup
    from webapp.jobs import ledger

    user, base, dataset, config = demo_objects(tiny_model_dir)
    fleet.start("w-dup")
    fleet.wait_ready("w-dup")
    run = make_run(user, base, dataset, config, **{**HP, "max_steps": 6, "save_steps": 0})
    worker = Worker.objects.get(name="w-dup")
    attempt = ledger.dispatch(run, worker)
    assert attempt == 1
    for _ in range(3):  # the scheduler's wake-up, a broker redelivery, a resend
        send_wakeup(worker.name, run.pk, attempt)
    run_until(run, ("succeeded", "failed"), timeout=300)
    assert run.state == "succeeded", run.error
    # The two extra deliveries are refused at claim (already claimed, or the run already over: whichever comes first).
    until(lambda: fleet.log("w-dup").count("not ours to run") == 2, 60, lambda: fleet.log("w-dup")[-3000:])
    assert run.attempt == 1
    assert run.events.filter(kind="status", message__startswith="Attempt").count() == 1
    started = [e for e in run.events.filter(kind="log") if e.message.startswith("Trainable parameters")]
    assert len(started) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A Redis server of the test's own on a free port (nothing kept on disk), restartable at will."""

    def __init__(self, folder: Path):
        self.port, self.folder = _free_port(), folder
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        until(lambda: subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout.strip()
              == b"PONG", 30)

    def shutdown(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True)
        if self.proc is not None:
            self.proc.wait(timeout=30)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to run a private Redis")
def test_a_redis_restart_during_a_run_loses_nothing_and_runs_nothing_twice(
    live_server, tmp_path, settings, monkeypatch, tiny_model_dir: Path  # type: ignore[no-untyped-def]
) -> None:
    from celery import Celery

    import webapp.celery
    from workers.config import celery_settings

    redis = PrivateRedis(tmp_path)
    redis.start()
    settings.ARTIFACT_STORE = tmp_path
    settings.DISPATCH_RESEND_AFTER = 3
    monkeypatch.setenv("CELERY_BROKER_URL", redis.url)
    sender = Celery("tunedeck-test")
    sender.conf.update(celery_settings())
    monkeypatch.setattr(webapp.celery, "app", sender)  # the control plane's wake-ups go to the private Redis
    fleet = Fleet(live_server.url, tmp_path, env={"CELERY_BROKER_URL": redis.url})
    try:
        user, base, dataset, config = demo_objects(tiny_model_dir)
        fleet.start("w-redis")
        fleet.wait_ready("w-redis")
        run = make_run(user, base, dataset, config, **HP)

        def training() -> bool:
            run.refresh_from_db()
            return run.state == "running" and run.step >= 5

        until(training, 300, lambda: (run.state, fleet.log("w-redis")[-2000:]), tick=True)
        redis.shutdown()
        time.sleep(3)
        redis.start()
        run_until(run, ("succeeded", "failed"), timeout=400)
        assert run.state == "succeeded", run.error
        assert run.attempt == 1  # it ran once, never redispatched
        # No event lost: the worker's events of the attempt are numbered without a gap.
        seqs = sorted(run.events.filter(attempt=1, seq__isnull=False).values_list("seq", flat=True))
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        assert [p["step"] for p in run.metric_points] == list(range(0, HP["max_steps"] + 1))

        # After the restart the worker has reconnected and takes the next job (its wake-up resent if it was lost).
        second = make_run(user, base, dataset, config, **{**HP, "max_steps": 4, "save_steps": 0})
        run_until(second, ("succeeded", "failed"), timeout=300)
        assert second.state == "succeeded" and second.attempt == 1, second.error
    finally:
        fleet.stop()
        redis.shutdown()


class LateServer:
    """The live server reached through a port that starts listening only after `delay` seconds: a control plane
    that starts after its worker (`tunedeck up` on a loaded machine, a compose file, a reboot)."""

    def __init__(self, target: str, delay: float) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target, self.delay, self.stopped = (host, int(port)), delay, False
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import threading

        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        time.sleep(self.delay)
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen()
            listener.settimeout(0.5)
            while not self.stopped:
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                upstream = socket.create_connection(self.target)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_a_worker_started_before_its_control_plane_waits_for_it(live_server, tmp_path, settings) -> None:  # type: ignore[no-untyped-def]
    settings.ARTIFACT_STORE = tmp_path
    late = LateServer(live_server.url, delay=12)  # longer than one heartbeat's own retries (7.5 s)
    late.start()
    fleet = Fleet(late.url, tmp_path)
    fleet.start("w-early")
    try:
        fleet.wait_ready("w-early", timeout=90)
        assert "does not answer yet" in fleet.log("w-early")
        assert fleet.procs["w-early"].poll() is None
    finally:
        fleet.stop()
        late.stopped = True
