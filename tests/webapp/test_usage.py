"""Usage: GPU-hours over attempts (wall time times GPUs held), tokens trained and runs, per person and per ISO week, from
runs with known times; the API's parameters; and the attempt log keeping each attempt's start and GPUs."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from tests.webapp.api_helpers import bearer, key_for, problem_of
from tests.webapp.factories import make_worker
from tests.webapp.team import make
from webapp.jobs import ledger
from webapp.training.models import Adapter, TrainingRun
from webapp.training.usage import attempt_spans, run_usage, usage

pytestmark = pytest.mark.django_db

MONDAY = dt.datetime(2026, 11, 30, 9, 0, tzinfo=dt.UTC)  # ISO week 2026-W49


def at(days: float = 0, hours: float = 0) -> dt.datetime:
    return MONDAY + dt.timedelta(days=days, hours=hours)


def attempt(n: int, start: dt.datetime, end: dt.datetime, gpus: int, outcome: str = "lost") -> dict[str, Any]:
    return {"attempt": n, "worker": "w", "outcome": outcome, "reason": "", "at": end.isoformat(),
            "started": start.isoformat(), "gpus": gpus}


def finished(team: Any, who: str, created: dt.datetime, log: list[dict[str, Any]], tokens: int = 0,
             state: str = "succeeded") -> TrainingRun:
    run = make(team, owner=who, state=state, attempt=len(log),
               attempt_log=log, finished_at=dt.datetime.fromisoformat(log[-1]["at"]))
    TrainingRun.objects.filter(pk=run.pk).update(created_at=created)
    if tokens:
        Adapter.objects.create(run=run, name="a", owner=run.owner, base_model=run.base_model, uri="store://x",
                               size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=2,
                               metrics={"trained_tokens": tokens})
    run.refresh_from_db()
    return run


@pytest.fixture
def history(team: Any) -> dict[str, TrainingRun]:
    return {
        # A lost attempt of 2 h on 4 GPUs, then a succeeded one of 1.5 h on 2 GPUs: 8 + 3 GPU-hours.
        "retried": finished(team, "owner", at(0), [attempt(1, at(0, 1), at(0, 3), 4),
                                                   attempt(2, at(0, 4), at(0, 5.5), 2, "succeeded")], tokens=1_000_000),
        # Next week: 30 minutes on one GPU, failed (no tokens counted).
        "failed": finished(team, "owner", at(7), [attempt(1, at(7, 1), at(7, 1.5), 1, "failed")], state="failed"),
        # A teammate's, on a CPU-only worker: no GPU held.
        "cpu": finished(team, "mate", at(1), [attempt(1, at(1), at(1, 2), 0, "succeeded")], tokens=5_000),
    }


def test_a_runs_gpu_hours_sum_its_attempts_and_its_tokens_come_from_its_adapter(history: dict[str, Any]) -> None:
    figures = run_usage(history["retried"])
    assert (figures["gpu_hours"], figures["attempts"], figures["tokens"]) == (pytest.approx(11.0), 2, 1_000_000)
    assert run_usage(history["cpu"])["gpu_hours"] == 0.0


def test_usage_per_user_and_per_iso_week(history: dict[str, Any]) -> None:
    assert usage(group="user") == [
        {"user": "owner", "gpu_hours": 11.5, "tokens": 1_000_000, "runs": 2},
        {"user": "mate", "gpu_hours": 0.0, "tokens": 5_000, "runs": 1},
    ]
    assert usage(group="week") == [
        {"week": "2026-W49", "gpu_hours": 11.0, "tokens": 1_005_000, "runs": 2},
        {"week": "2026-W50", "gpu_hours": 0.5, "tokens": 0, "runs": 1},
    ]
    # From Tuesday on: the first run's attempts ended on Monday; the CPU run was created on Tuesday.
    assert usage(since=at(1), group="week") == [
        {"week": "2026-W49", "gpu_hours": 0.0, "tokens": 5_000, "runs": 1},
        {"week": "2026-W50", "gpu_hours": 0.5, "tokens": 0, "runs": 1},
    ]


def test_a_running_attempt_counts_up_to_now(team: Any) -> None:
    run = make(team, state="running", attempt=1, gpu_indices=[0, 1])
    TrainingRun.objects.filter(pk=run.pk).update(started_at=at(0), dispatched_at=at(0, -0.1))
    run.refresh_from_db()
    spans = attempt_spans(run, now=at(0, 3))
    assert [(s.gpus, s.gpu_hours) for s in spans] == [(2, pytest.approx(6.0))]


def test_the_api_groups_and_checks_its_parameters(client: Client, team: Any, history: dict[str, Any]) -> None:
    raw = key_for(team[0]["mate"], "read")
    body = client.get("/api/v1/usage/?group=week&since=2026-12-01", **bearer(raw)).json()
    assert body["group"] == "week" and body["since"].startswith("2026-12-01T00:00:00")
    assert [(r["week"], r["runs"]) for r in body["results"]] == [("2026-W49", 1), ("2026-W50", 1)]
    assert client.get("/api/v1/usage/", **bearer(raw)).json()["results"][0]["user"] == "owner"
    assert problem_of(client.get("/api/v1/usage/?group=team", **bearer(raw)), 400)["errors"]["group"] == [
        "must be one of user, week; got 'team'"]
    assert list(problem_of(client.get("/api/v1/usage/?since=last-week", **bearer(raw)), 400)["errors"]) == ["since"]


def test_the_attempt_log_keeps_each_attempts_start_and_gpus(team: Any) -> None:
    """What usage reads is written by the ledger: a lost attempt's entry has when it started running and its GPUs."""
    run = make(team)
    worker, _ = make_worker("gpu-box")
    ledger.dispatch(run, worker, gpu_indices=[0, 1, 2])
    run.refresh_from_db()
    ledger.record_status(run, run.attempt, "running", {}, "")
    run.refresh_from_db()
    started = run.started_at
    ledger.requeue_or_fail(run, "worker lost", max_attempts=3)
    run.refresh_from_db()
    entry = run.attempt_log[-1]
    assert (entry["outcome"], entry["gpus"], entry["started"]) == ("lost", 3, started.isoformat())
    assert timezone.now() - started < dt.timedelta(minutes=1)
