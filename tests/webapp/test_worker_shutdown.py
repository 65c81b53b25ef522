"""Graceful shutdown: SIGTERM to `tunedeck worker` checkpoints the running training and hands the run back.

The end-to-end test runs real `tunedeck worker` processes against a live server, on whatever the
environment configures (SQLite + filesystem broker, or PostgreSQL + Redis).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid

import pytest

from tests.webapp.factories import demo_objects, make_run
from tests.webapp.fleetprocs import Fleet, run_until, until
from webapp.fleet.models import Worker
from webapp.training.models import TrainingRun
from workers.contract.jobrunner import Cancelled, check_cancel, run_reported
from workers.contract.refusals import StaleAttempt
from workers.contract.reporter import SUPERSEDED, MemoryReporter
from workers.runtime import jobfolder


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_sigterm_checkpoints_the_run_hands_it_back_and_another_worker_resumes_it(
    live_server, tiny_model_dir, tmp_path, settings  # type: ignore[no-untyped-def]
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    settings.ARTIFACT_STORE = store
    user, base, dataset, config = demo_objects(tiny_model_dir)
    # Checkpoints are configured, but the regular ones come only every 1000 steps: the one the next
    # attempt resumes from can only be the handover's.
    run = make_run(user, base, dataset, config, max_steps=120, save_steps=1000, logging_steps=1)
    fleet = Fleet(live_server.url, store)
    first_name, second_name = f"first-{uuid.uuid4().hex[:6]}", f"second-{uuid.uuid4().hex[:6]}"
    first = fleet.start(first_name)
    try:
        until(lambda: TrainingRun.objects.filter(pk=run.pk, state="running", step__gte=3).exists(), 240,
              lambda: "the run to be training on the first worker", tick=True)
        assert TrainingRun.objects.get(pk=run.pk).worker.name == first_name
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0

        run.refresh_from_db()
        assert (run.state, run.failures, run.worker) == ("queued", 0, None), run.error
        assert run.attempt_log[-1]["outcome"] == "handed over" and run.attempt_log[-1]["worker"] == first_name
        assert Worker.objects.get(name=first_name).state == "offline"  # it said it was leaving
        checkpoints = sorted((store / "runs" / str(run.pk) / "checkpoints").glob("checkpoint-*"))
        assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").exists()
        saved_at = int(checkpoints[0].name.split("-")[1])
        assert 3 <= saved_at < 120
        log_text = fleet.log(first_name)
        assert "with concurrency 1 (no GPU: one job at a time)" in log_text
        assert "running jobs save a checkpoint at their next step" in log_text
        messages = list(run.events.values_list("message", flat=True))
        assert any(m.startswith("Interrupted: the worker is shutting down") for m in messages)
        assert f"Checkpoint saved at step {saved_at}" in messages

        fleet.start(second_name, labels=("cpu-pool",))
        done = run_until(run, ("succeeded", "failed"), timeout=240)
        assert done.state == "succeeded", done.error
        assert (done.failures, done.attempt, done.step) == (0, 2, 120)
        assert done.adapter.metrics["resumed_from_step"] == saved_at and done.adapter.metrics["steps"] == 120
        assert any(f"Resuming from checkpoint checkpoint-{saved_at}" in m for m in done.events.values_list("message", flat=True))
        # The labels came back in the first heartbeat: their shared queues are consumed too.
        assert f"consuming tunedeck.worker.{second_name}, tunedeck.label.cpu-pool with" in fleet.log(second_name)
    finally:
        fleet.stop()


# --- The pieces, in one process -------------------------------------------------------------------------


def test_a_shutdown_seen_at_a_step_reports_interrupted_not_cancelled() -> None:
    reporter = MemoryReporter()
    reporter.stop_check = lambda: "the worker is shutting down"

    def body() -> dict:
        check_cancel(reporter)  # an adapter job's step
        raise AssertionError("not reached")

    assert run_reported(reporter, body) is None
    assert reporter.states[-1] == ("interrupted", {}, "the worker is shutting down")
    assert "Interrupted: the worker is shutting down. The job goes back to the queue." in reporter.logs


def test_a_runner_that_stops_with_cancelled_during_a_shutdown_is_reported_interrupted() -> None:
    reporter = MemoryReporter()
    polls = []
    reporter.stop_check = lambda: "the worker is shutting down" if polls.append(1) or len(polls) > 2 else ""

    def body() -> dict:
        while not reporter.cancel_requested:  # how compare, merge and evaluate check at their steps
            reporter.maybe_flush()
        raise Cancelled()

    run_reported(reporter, body)
    assert [state for state, _, _ in reporter.states] == ["running", "interrupted"]


def test_a_user_cancel_wins_over_a_shutdown() -> None:
    reporter = MemoryReporter(cancel_after_events=1)
    reporter.stop_check = lambda: "the worker is shutting down"

    def body() -> dict:
        reporter.log("step")
        check_cancel(reporter)
        return {}

    run_reported(reporter, body)
    assert reporter.states[-1][0] == "cancelled"


def test_a_superseded_job_stops_and_reports_nothing_more() -> None:
    reporter = MemoryReporter()
    reporter.stop_check = lambda: SUPERSEDED

    def body() -> dict:
        reporter.maybe_flush()
        if reporter.cancel_requested:
            raise Cancelled()
        return {}

    with pytest.raises(StaleAttempt):
        run_reported(reporter, body)
    assert [state for state, _, _ in reporter.states] == ["running"]


def test_the_runtime_folder_lists_live_jobs_and_forgets_dead_ones(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for sub in ("running", "stop"):
        (tmp_path / sub).mkdir()
    monkeypatch.setenv(jobfolder.RUNTIME_ENV, str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "running" / jobfolder.job_key("jobs", 7, 1)).write_text(str(dead.pid))
    reporter = MemoryReporter()
    with jobfolder.running_job("adapter-jobs", 3, 2, reporter):
        assert jobfolder.running_jobs(tmp_path) == [{"path": "adapter-jobs", "id": 3, "attempt": 2}]
        assert not (tmp_path / "running" / "jobs.7.1").exists()  # its process is gone
        assert reporter.stop_check is not None and reporter.stop_check() == ""
        jobfolder.stop_jobs(tmp_path, [{"path": "adapter-jobs", "id": 3, "attempt": 2}, {"path": "jobs", "id": 9, "attempt": 1}])
        assert reporter.stop_check() == SUPERSEDED
        assert not (tmp_path / "stop" / "jobs.9.1").exists()  # not running here: nothing to stop
    assert jobfolder.running_jobs(tmp_path) == [] and list((tmp_path / "stop").iterdir()) == []


# --- How long `tunedeck up` lets its local worker hand its jobs back -------------------------------------


@pytest.mark.django_db
def test_the_handover_grace_fits_the_slowest_jobs_step_or_its_models_loading(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from django.utils import timezone

    from tests.webapp.factories import make_worker
    from webapp.fleet.handover import CHECKPOINT_AND_REPORTS_S, LOAD_BYTES_PER_S, handover_grace
    from webapp.training.models import RunEvent

    user, base, dataset, config = demo_objects(tiny_model_dir)
    worker, _ = make_worker("local")
    assert handover_grace(worker) == CHECKPOINT_AND_REPORTS_S  # nothing running: the worker just exits

    now = timezone.now()
    run = make_run(user, base, dataset, config)
    TrainingRun.objects.filter(pk=run.pk).update(state="running", worker=worker, attempt=2, step=130,
                                                 started_at=now - timedelta(seconds=100))
    # This attempt resumed at step 100 and made 30 steps in 90 s: 3 s a step (not 100 s / 130 steps).
    for step, ago in ((100, 90), (115, 45), (130, 0)):
        event = RunEvent.objects.create(run=run, attempt=2, kind="metric", data={"step": step})
        RunEvent.objects.filter(pk=event.pk).update(created_at=now - timedelta(seconds=ago))
    RunEvent.objects.create(run=run, attempt=1, kind="metric", data={"step": 500})  # an earlier attempt's
    assert handover_grace(worker) == pytest.approx(CHECKPOINT_AND_REPORTS_S + 2 * 3, abs=0.1)

    # A run still loading a 7B base: it sees the stop once the weights are in.
    base.num_parameters = 7_000_000_000
    base.save()
    loading = make_run(user, base, dataset, config)
    TrainingRun.objects.filter(pk=loading.pk).update(state="running", worker=worker, attempt=1, started_at=now)
    assert handover_grace(worker) == pytest.approx(CHECKPOINT_AND_REPORTS_S + 2 * 7e9 / LOAD_BYTES_PER_S, rel=0.01)
