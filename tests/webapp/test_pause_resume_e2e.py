"""Pause and resume end to end: a real `tunedeck worker` trains the tiny model; `tunedeck runs pause` makes it save
a checkpoint at the step it reached and free the run; `tunedeck runs resume` queues it again and the next attempt
continues from that checkpoint to the step count and learning-rate schedule of an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.webapp.factories import demo_objects, make_run
from tests.webapp.fleetprocs import Fleet, run_until, until
from webapp.api.models import ApiKey
from webapp.fleet.models import Worker
from webapp.fleet.scheduler import schedule_once
from webapp.training.models import TrainingRun

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]
STEPS = 400


def cli(server: str, raw: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`tunedeck ...` as a user's shell runs it: this server and key, no other TUNEDECK_ setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEDECK_")}
    env.update(TUNEDECK_SERVER=server, TUNEDECK_API_KEY=raw, TUNEDECK_CONFIG=str(tmp_path / "cli.toml"))
    return subprocess.run([sys.executable, "-m", "webapp.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def scheduled_rate(step: int, peak: float) -> float:
    """The linear schedule without warmup as an uninterrupted run follows it: the rate step `step` (from 1) trains at,
    as the trainer logs it."""
    return peak * (STEPS - step + 1) / STEPS


def test_a_paused_run_checkpoints_frees_its_worker_and_resumes_to_the_uninterrupted_schedule(
    live_server: Any, tiny_model_dir: Path, tmp_path: Path, settings: Any
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    settings.ARTIFACT_STORE = store
    user, base, dataset, config = demo_objects(tiny_model_dir)
    _, raw = ApiKey.issue(user, "cli", ["read", "write"])
    # Periodic checkpoints only every 1000 steps: the one the resumed attempt starts from can only be the pause's.
    run = make_run(user, base, dataset, config, max_steps=STEPS, save_steps=1000, logging_steps=1, lr_scheduler="linear",
                   warmup_ratio=0.0, max_seq_length=64, gradient_checkpointing="off")
    peak = run.train_params().learning_rate
    fleet = Fleet(live_server.url, store)
    fleet.start("w-pause")
    try:
        until(lambda: TrainingRun.objects.filter(pk=run.pk, state="running", step__gte=3).exists(), 240,
              lambda: fleet.log("w-pause")[-2000:], tick=True)
        paused_cli = cli(live_server.url, raw, tmp_path, "runs", "pause", str(run.pk))
        assert paused_cli.returncode == 0 and f"Run {run.pk} pause requested" in paused_cli.stdout, paused_cli

        run = run_until(run, ("paused", "succeeded", "failed"), timeout=120)
        assert (run.state, run.worker, run.gpu_indices, run.failures) == ("paused", None, [], 0), run.error
        assert run.attempt_log[-1]["outcome"] == "paused"
        checkpoints = sorted((store / "runs" / str(run.pk) / "checkpoints").glob("checkpoint-*"))
        assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").exists()
        saved_at = int(checkpoints[0].name.split("-")[1])
        assert 3 <= saved_at < STEPS and run.step == saved_at
        messages = list(run.events.values_list("message", flat=True))
        assert "Pause requested by owner: the worker saves a checkpoint at its next step and stops" in messages
        assert f"Checkpoint saved at step {saved_at}" in messages
        # The worker is still up, free: a paused run holds no GPU and is not placed while the scheduler ticks.
        assert fleet.procs["w-pause"].poll() is None and Worker.objects.get(name="w-pause").state == "online"
        for _ in range(8):
            schedule_once()
        assert TrainingRun.objects.get(pk=run.pk).state == "paused"

        resumed = cli(live_server.url, raw, tmp_path, "runs", "resume", str(run.pk))
        assert resumed.returncode == 0 and f"Run {run.pk} resumed: queued" in resumed.stdout, resumed
        done = run_until(run, ("succeeded", "failed", "cancelled"), timeout=240)
        assert done.state == "succeeded", done.error
        assert (done.failures, done.attempt, done.step, done.total_steps) == (0, 2, STEPS, STEPS)
        assert done.adapter.metrics["resumed_from_step"] == saved_at and done.adapter.metrics["steps"] == STEPS
        events = list(done.events.values_list("message", flat=True))
        assert any(f"Resuming from checkpoint checkpoint-{saved_at}" in m for m in events)
        assert "Resumed by owner: queued again, it continues from its latest checkpoint" in events
        # Exact resume: every step was trained once, at the rate the uninterrupted schedule gives it.
        rates = {p["step"]: p["learning_rate"] for p in done.metric_points if "learning_rate" in p}
        assert sorted(rates) == list(range(1, STEPS + 1))
        for step, rate in rates.items():
            assert rate == pytest.approx(scheduled_rate(step, peak), rel=1e-6, abs=1e-12), step
    finally:
        fleet.stop()
