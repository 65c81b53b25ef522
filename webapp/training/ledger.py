"""State changes of a run, each a conditional update so that two actors never both win.

The database row is the ledger of a job. Every function here changes state with
`filter(pk=..., state=..., attempt=...).update(...)` and checks the row count, so a stale
worker, a double click and the scheduler can race without corrupting a run.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from webapp.training.models import (
    ACTIVE_STATES,
    FINAL_STATES,
    WORKER_TRANSITIONS,
    Adapter,
    RunEvent,
    RunState,
    TrainingRun,
)


def note(run: TrainingRun | int, message: str, level: str = "info") -> None:
    """A control-plane line in the run's log (seq is null: it is not one of a worker's events)."""
    run_id = run if isinstance(run, int) else run.pk
    attempt = TrainingRun.objects.filter(pk=run_id).values_list("attempt", flat=True).first() or 0
    RunEvent.objects.create(run_id=run_id, attempt=attempt, kind="status", level=level, message=message)


def dispatch(run_id: int, worker: Any) -> int | None:
    """Place a queued run on a worker; returns the new attempt, or None if someone else won."""
    now = timezone.now()
    updated = TrainingRun.objects.filter(pk=run_id, state=RunState.QUEUED, cancel_requested=False).update(
        state=RunState.DISPATCHED,
        attempt=F("attempt") + 1,
        worker=worker,
        dispatched_at=now,
        claimed_at=None,
    )
    if not updated:
        return None
    attempt = TrainingRun.objects.values_list("attempt", flat=True).get(pk=run_id)
    note(run_id, f"Attempt {attempt} dispatched to worker {worker.name}")
    return int(attempt)


def requeue_or_fail(run: TrainingRun, reason: str, max_attempts: int) -> str:
    """Take an active run back from a lost worker: requeue it, or fail it after max_attempts."""
    if run.cancel_requested:
        target, error = RunState.CANCELLED, ""
    elif run.attempt >= max_attempts:
        target, error = RunState.FAILED, f"{reason}; gave up after {run.attempt} attempt(s)"
    else:
        target, error = RunState.QUEUED, ""
    fields: dict[str, Any] = {"state": target, "worker": None, "error": error}
    if target != RunState.QUEUED:
        fields["finished_at"] = timezone.now()
    updated = TrainingRun.objects.filter(pk=run.pk, attempt=run.attempt, state__in=ACTIVE_STATES).update(**fields)
    if updated:
        note(run, f"{reason}: run {'requeued' if target == RunState.QUEUED else target}", level="warning")
    return str(target)


def request_cancel(run: TrainingRun) -> bool:
    """Cancel a queued run at once; flag an active one for its worker to stop at the next step."""
    with transaction.atomic():
        if TrainingRun.objects.filter(pk=run.pk, state=RunState.QUEUED).update(
            state=RunState.CANCELLED, cancel_requested=True, finished_at=timezone.now()
        ):
            note(run, "Cancelled before it started")
            return True
        if TrainingRun.objects.filter(pk=run.pk, state__in=ACTIVE_STATES).update(cancel_requested=True):
            note(run, "Cancel requested: the worker stops at its next step", level="warning")
            return True
    return False


class Rejected(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def fenced_run(worker: Any, run_id: int, attempt: int) -> TrainingRun:
    """The run if this worker holds this attempt of it; 404 for someone else's job, 409 if stale."""
    run = TrainingRun.objects.filter(pk=run_id).first()
    if run is None or run.worker_id != worker.pk:
        raise Rejected(404, "no such job assigned to this worker")
    if attempt != run.attempt:
        raise Rejected(409, f"attempt {attempt} is stale: the run is at attempt {run.attempt}")
    return run


def claim(worker: Any, run_id: int, attempt: int) -> TrainingRun:
    run = fenced_run(worker, run_id, attempt)
    if run.state == RunState.DISPATCHED and run.claimed_at is None:
        TrainingRun.objects.filter(pk=run.pk, attempt=attempt, claimed_at=None).update(claimed_at=timezone.now())
    elif run.state not in ACTIVE_STATES:
        raise Rejected(409, f"the run is {run.state}")
    return run


def record_events(run: TrainingRun, attempt: int, events: list[dict[str, Any]]) -> None:
    if run.state not in ACTIVE_STATES:
        raise Rejected(409, f"the run is {run.state}")
    rows = [
        RunEvent(
            run=run,
            attempt=attempt,
            seq=int(e["seq"]),
            kind=str(e.get("kind", "log"))[:16],
            level=str(e.get("level", "info"))[:16],
            message=str(e.get("message", "")),
            data=e.get("data") or {},
        )
        for e in events
    ]
    RunEvent.objects.bulk_create(rows, ignore_conflicts=True)  # a retried batch is stored once
    progress: dict[str, Any] = {"last_report_at": timezone.now()}
    metrics = [e.get("data") or {} for e in events if e.get("kind") == "metric"]
    for data in metrics:
        if "step" in data:
            progress["step"] = int(data["step"])
        if data.get("total_steps"):
            progress["total_steps"] = int(data["total_steps"])
        if data.get("loss") is not None:
            progress["last_loss"] = float(data["loss"])
    with transaction.atomic():
        fenced = TrainingRun.objects.filter(pk=run.pk, attempt=attempt)
        if metrics:
            points = fenced.select_for_update().values_list("metric_points", flat=True).first()
            if points is not None:
                progress["metric_points"] = merge_points(points, metrics)
        fenced.update(**progress)


METRIC_KEYS = ("step", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s")
MAX_METRIC_POINTS = 2000


def merge_points(points: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold metric events into a run's compact curve: one point per step (a train point and an eval
    point at the same step merge; a resumed attempt's steps replace those after its checkpoint);
    past MAX_METRIC_POINTS every other point goes, eval points kept."""
    points = list(points)
    for data in metrics:
        if data.get("step") is None:
            continue
        point = {k: data[k] for k in METRIC_KEYS if isinstance(data.get(k), (int, float))}
        step = int(data["step"])
        if points and points[-1]["step"] > step:
            points = [p for p in points if p["step"] < step]
        if points and points[-1]["step"] == step:
            points[-1].update(point)
        else:
            points.append(point)
    while len(points) > MAX_METRIC_POINTS:
        last = len(points) - 1
        thinned = [p for i, p in enumerate(points) if i % 2 == 0 or i == last or "eval_loss" in p]
        if len(thinned) == len(points):
            break
        points = thinned
    return points


def record_status(run: TrainingRun, attempt: int, state: str, result: dict[str, Any], error: str) -> None:
    if state == run.state and run.is_final:
        return  # a retried final report: already recorded
    allowed_from = [s for s, targets in WORKER_TRANSITIONS.items() if state in targets]
    if not allowed_from:
        raise Rejected(400, f"unknown state {state!r}")
    now = timezone.now()
    fields: dict[str, Any] = {"state": state, "last_report_at": now}
    if state == RunState.RUNNING:
        fields["started_at"] = now
    else:
        fields.update(finished_at=now, error=error[:10000])
    with transaction.atomic():
        if not TrainingRun.objects.filter(pk=run.pk, attempt=attempt, state__in=allowed_from).update(**fields):
            raise Rejected(409, f"cannot go from {run.state} to {state}")
        if state == RunState.SUCCEEDED:
            Adapter.objects.update_or_create(
                run=run,
                defaults={
                    "uri": result["adapter_uri"],
                    "size_bytes": int(result["size_bytes"]),
                    "sha256": str(result["sha256"]),
                    "trainable_params": int(result["trainable_params"]),
                    "total_params": int(result["total_params"]),
                    "final_loss": result.get("final_loss"),
                    "metrics": result,
                },
            )


RETRYABLE_STATES = (RunState.FAILED, RunState.CANCELLED)


def retry(run: TrainingRun, by: Any) -> bool:
    """Put a failed or cancelled run back in the queue.

    The attempt is kept: the scheduler bumps it when it dispatches, so reports of the old
    attempt stay fenced out, and the new attempt resumes from the run's latest checkpoint
    (checkpoints live per run, not per attempt).
    """
    with transaction.atomic():
        updated = TrainingRun.objects.filter(pk=run.pk, attempt=run.attempt, state__in=RETRYABLE_STATES).update(
            state=RunState.QUEUED, cancel_requested=False, error="", worker=None,
            dispatched_at=None, claimed_at=None, started_at=None, finished_at=None,
        )
        if updated:
            note(run, f"Retry requested by {by}: the next attempt resumes from the latest checkpoint")
    return bool(updated)


def delete_finished(run: TrainingRun) -> bool:
    """Delete a run with its events and adapter row, only if it has finished (never under a worker's feet)."""
    with transaction.atomic():
        locked = TrainingRun.objects.select_for_update().filter(pk=run.pk, state__in=FINAL_STATES).first()
        if locked is None:
            return False
        locked.delete()  # events and the adapter row go with it (on_delete=CASCADE)
    return True
