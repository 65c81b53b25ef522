"""State changes of a run, each a conditional update so that two actors never both win.

The database row is the ledger of a job. Every function here changes state with
`filter(pk=..., state=..., attempt=...).update(...)` and checks the row count, so a stale
worker, a double click and the scheduler can race without corrupting a run.
"""

from __future__ import annotations

import bisect
from typing import Any, Literal

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from webapp.training.models import (
    ACTIVE_STATES,
    WORKER_TRANSITIONS,
    RunState,
    TrainingRun,
    queue_clock,
)


def _events_of(model: Any) -> tuple[Any, str]:
    """The event model of a job model and the name of its foreign key (both kinds call it `events`)."""
    related = model.events
    return related.rel.related_model, related.field.name


def note(job: Any, message: str, level: str = "info", model: Any = None) -> None:
    """A control-plane line in the job's log (seq is null: it is not one of a worker's events).

    `job` is a run or an adapter job, or the id of a run (or of a `model` row)."""
    model = model or (TrainingRun if isinstance(job, int) else type(job))
    job_id = job if isinstance(job, int) else job.pk
    event_model, fk = _events_of(model)
    attempt = model.objects.filter(pk=job_id).values_list("attempt", flat=True).first() or 0
    event_model.objects.create(
        **{f"{fk}_id": job_id}, attempt=attempt, kind="status", level=level, message=message
    )


def dispatch(job_id: int, worker: Any, model: Any = TrainingRun, gpu_indices: list[int] | None = None) -> int | None:
    """Place a queued job on a worker (holding those of its GPUs); returns the new attempt, or None if someone
    else won."""
    now = timezone.now()
    updated = model.objects.filter(pk=job_id, state=RunState.QUEUED, cancel_requested=False).update(
        state=RunState.DISPATCHED,
        attempt=F("attempt") + 1,
        worker=worker,
        gpu_indices=list(gpu_indices or []),
        wait_reason="",
        dispatched_at=now,
        claimed_at=None,
    )
    if not updated:
        return None
    attempt = model.objects.values_list("attempt", flat=True).get(pk=job_id)
    gpus = f" (GPU {', '.join(map(str, gpu_indices))})" if gpu_indices else ""
    note(job_id, f"Attempt {attempt} dispatched to worker {worker.name}{gpus}", model=model)
    return int(attempt)


def attempt_entry(job: Any, outcome: str, reason: str) -> dict[str, Any]:
    """One line of a job's attempt_log: how the attempt it is at ended, and why."""
    return {
        "attempt": job.attempt,
        "worker": job.worker.name if job.worker_id and job.worker else None,
        "outcome": outcome,
        "reason": reason,
        "at": timezone.now().isoformat(),
    }


def requeue_or_fail(run: Any, reason: str, max_attempts: int, failure: bool = True) -> str:
    """Take an active job back from its worker: requeue it, or fail it once it has failed max_attempts times.

    A lost worker is a failure; a graceful handover (the worker was shut down and checkpointed first) is not,
    and always requeues."""
    failures = run.failures + (1 if failure else 0)
    if run.cancel_requested:
        target, error = RunState.CANCELLED, ""
    elif failure and failures >= max_attempts:
        target, error = RunState.FAILED, f"{reason}; gave up after {failures} failed attempt(s)"
    else:
        target, error = RunState.QUEUED, ""
    fields: dict[str, Any] = {
        "state": target, "worker": None, "gpu_indices": [], "error": error, "failures": failures,
        "attempt_log": [*run.attempt_log, attempt_entry(run, "lost" if failure else "handed over", reason)],
    }
    if target != RunState.QUEUED:
        fields["finished_at"] = timezone.now()
    else:
        fields["queued_at"] = timezone.now()
    updated = type(run).objects.filter(pk=run.pk, attempt=run.attempt, state__in=ACTIVE_STATES).update(**fields)
    if updated:
        note(run, f"{reason}: {run.NOUN} {'requeued' if target == RunState.QUEUED else target}", level="warning")
    return str(target)


CancelOutcome = Literal["cancelled", "requested", ""]


def request_cancel(run: Any) -> CancelOutcome:
    """Cancel a job that no worker has started (queued, or dispatched and not yet claimed) at once: "cancelled";
    flag one a worker holds, for it to stop at its next step: "requested"; "" (false) when it has finished. The
    answer says what this call did, whatever the job's state is by the time the caller reads it."""
    model = type(run)
    with transaction.atomic():
        if model.objects.filter(pk=run.pk, state=RunState.QUEUED).update(
            state=RunState.CANCELLED, cancel_requested=True, finished_at=timezone.now()
        ):
            note(run, "Cancelled before it started")
            return "cancelled"
        if cancel_unclaimed(run.pk, model):
            return "cancelled"
        if model.objects.filter(pk=run.pk, state__in=ACTIVE_STATES).update(cancel_requested=True):
            note(run, "Cancel requested: the worker stops at its next step", level="warning")
            return "requested"
    return ""


def cancel_unclaimed(job_id: int, model: Any) -> bool:
    """Cancel a dispatched attempt that its worker has not claimed: the worker has loaded nothing, so the job
    ends now (its GPUs freed) and the claim, when the wake-up arrives, is refused. The conditional update
    races the claim's: one of them wins."""
    job = model.objects.select_for_update().filter(pk=job_id).first()
    if job is None or job.state != RunState.DISPATCHED or job.claimed_at is not None:
        return False
    reason = f"cancelled before worker {job.worker} claimed it" if job.worker_id else "cancelled before it was claimed"
    if not model.objects.filter(pk=job_id, attempt=job.attempt, state=RunState.DISPATCHED, claimed_at=None).update(
        state=RunState.CANCELLED, cancel_requested=True, finished_at=timezone.now(), gpu_indices=[],
        attempt_log=[*job.attempt_log, attempt_entry(job, RunState.CANCELLED, reason)],
    ):
        return False
    note(job, f"Cancelled before it started: attempt {job.attempt} was {reason}, so nothing ran")
    return True


class Rejected(Exception):
    """A worker's request refused: the HTTP status, what is wrong, and a code a worker can act on (e.g.
    `cancelled`: skip the job, it is no failure)."""

    def __init__(self, status: int, detail: str, code: str = ""):
        super().__init__(detail)
        self.status, self.detail, self.code = status, detail, code


def fenced_run(worker: Any, run_id: int, attempt: int, model: Any = TrainingRun) -> Any:
    """The job if this worker holds this attempt of it; 404 for someone else's job, 409 if stale."""
    run = model.objects.filter(pk=run_id).first()
    if run is None or run.worker_id != worker.pk:
        raise Rejected(404, "no such job assigned to this worker")
    if attempt != run.attempt:
        raise Rejected(409, f"attempt {attempt} is stale: the {run.NOUN} is at attempt {run.attempt}")
    return run


def claim(worker: Any, run_id: int, attempt: int, model: Any = TrainingRun) -> Any:
    """The one claim of an attempt: a redelivered or duplicated wake-up finds it claimed and gets 409, so a job
    never runs twice. A cancelled attempt (or one flagged before its claim) is refused with the code
    `cancelled`, so that the worker skips it before loading anything, and without calling it a failure."""
    run = fenced_run(worker, run_id, attempt, model)
    if run.cancel_requested and run.state == RunState.DISPATCHED and run.claimed_at is None:
        with transaction.atomic():
            cancel_unclaimed(run.pk, model)
    if model.objects.filter(
        pk=run.pk, attempt=attempt, state=RunState.DISPATCHED, claimed_at=None, cancel_requested=False
    ).update(claimed_at=timezone.now()):
        return run
    state = model.objects.values_list("state", flat=True).get(pk=run.pk)
    if state == RunState.CANCELLED:
        raise Rejected(409, f"the {run.NOUN} was cancelled: nothing to run", code="cancelled")
    if state not in ACTIVE_STATES:
        raise Rejected(409, f"the {run.NOUN} is {state}")
    raise Rejected(409, f"attempt {attempt} of the {run.NOUN} is already claimed")


def record_events(run: Any, attempt: int, events: list[dict[str, Any]]) -> None:
    if run.state not in ACTIVE_STATES:
        raise Rejected(409, f"the {run.NOUN} is {run.state}")
    model = type(run)
    event_model, fk = _events_of(model)
    rows = [
        event_model(
            **{fk: run},
            attempt=attempt,
            seq=int(e["seq"]),
            kind=str(e.get("kind", "log"))[:16],
            level=str(e.get("level", "info"))[:16],
            message=str(e.get("message", "")),
            data=e.get("data") or {},
        )
        for e in events
    ]
    with transaction.atomic():
        seqs = [row.seq for row in rows]
        stored = set(event_model.objects.filter(**{fk: run}, attempt=attempt, seq__in=seqs).values_list("seq", flat=True))
        event_model.objects.bulk_create(rows, ignore_conflicts=True)  # a retried batch is stored once
        fold = getattr(run, "fold_events", None)
        if fold is not None:  # e.g. a comparison's streamed text, appended to its cells once
            fold([e for e in events if int(e["seq"]) not in stored])
    progress: dict[str, Any] = {"last_report_at": timezone.now()}
    metrics = [e.get("data") or {} for e in events if e.get("kind") == "metric"]
    for data in metrics:
        if "step" in data:
            progress["step"] = int(data["step"])
        if data.get("total_steps"):
            progress["total_steps"] = int(data["total_steps"])
        if data.get("loss") is not None and model is TrainingRun:
            progress["last_loss"] = float(data["loss"])
    with transaction.atomic():
        fenced = model.objects.filter(pk=run.pk, attempt=attempt)
        if metrics and model is TrainingRun:
            points = fenced.select_for_update().values_list("metric_points", flat=True).first()
            if points is not None:
                progress["metric_points"] = merge_points(points, metrics)
        fenced.update(**progress)


METRIC_KEYS = ("step", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s")
MAX_METRIC_POINTS = 2000


def merge_points(points: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold metric events into a run's compact curve: one point per step, in step order (a train point and an
    eval point at the same step merge). An attempt opens with a `restart` point at the step it starts from
    (0, or its checkpoint's): the curve after that step is dropped, being the lost attempt's, and the steps
    the checkpoint logged come again (replayed from its trainer state), filling what the lost attempt never
    reported. Past MAX_METRIC_POINTS every other point goes, eval points kept."""
    points = list(points)
    for data in metrics:
        if data.get("step") is None:
            continue
        point = {k: data[k] for k in METRIC_KEYS if isinstance(data.get(k), (int, float))}
        step = int(data["step"])
        if data.get("restart"):
            points = [p for p in points if p["step"] <= step]
        at = bisect.bisect_left([p["step"] for p in points], step)
        if at < len(points) and points[at]["step"] == step:
            points[at].update(point)
        else:
            points.insert(at, point)
    while len(points) > MAX_METRIC_POINTS:
        last = len(points) - 1
        thinned = [p for i, p in enumerate(points) if i % 2 == 0 or i == last or "eval_loss" in p]
        if len(thinned) == len(points):
            break
        points = thinned
    return points


INTERRUPTED = "interrupted"  # a worker's report: it was shut down, saved a checkpoint, and hands the job back


def record_status(run: Any, attempt: int, state: str, result: dict[str, Any], error: str) -> None:
    if state == run.state and run.is_final:
        return  # a retried final report: already recorded
    if state == INTERRUPTED:
        if run.state in ACTIVE_STATES:
            requeue_or_fail(run, error or f"Worker {run.worker} shut down", max_attempts=0, failure=False)
        return
    allowed_from = [s for s, targets in WORKER_TRANSITIONS.items() if state in targets]
    if not allowed_from:
        raise Rejected(400, f"unknown state {state!r}")
    now = timezone.now()
    fields: dict[str, Any] = {"state": state, "last_report_at": now}
    if state == RunState.RUNNING:
        fields["started_at"] = now
    else:
        fields.update(finished_at=now, error=error[:10000], gpu_indices=[])
        fields["attempt_log"] = [*run.attempt_log, attempt_entry(run, state, error[:500])]
    with transaction.atomic():
        if not type(run).objects.filter(pk=run.pk, attempt=attempt, state__in=allowed_from).update(**fields):
            raise Rejected(409, f"cannot go from {run.state} to {state}")
        if state == RunState.SUCCEEDED:
            run.record_result(result)
        elif state == RunState.RUNNING and hasattr(run, "on_start"):
            run.on_start()


RETRYABLE_STATES = (RunState.FAILED, RunState.CANCELLED)


def retry(run: Any, by: Any) -> bool:
    """Put a failed or cancelled run back in the queue.

    The attempt is kept: the scheduler bumps it when it dispatches, so reports of the old
    attempt stay fenced out, and the new attempt resumes from the run's latest checkpoint
    (checkpoints live per run, not per attempt).
    """
    with transaction.atomic():
        updated = type(run).objects.filter(pk=run.pk, attempt=run.attempt, state__in=RETRYABLE_STATES).update(
            state=RunState.QUEUED, cancel_requested=False, error="", worker=None, failures=0, gpu_indices=[],
            queue_order=queue_clock(), dispatched_at=None, claimed_at=None, started_at=None, finished_at=None,
            queued_at=timezone.now(),
        )
        if updated:
            note(run, f"Retry requested by {by}: " + (
                "the next attempt resumes from the latest checkpoint" if isinstance(run, TrainingRun) else "queued again"
            ))
    return bool(updated)
