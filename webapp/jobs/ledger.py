"""State changes of a job, each a conditional update so that two actors never both win.

The database row is the ledger of a job. Every function here changes state with
`filter(pk=..., state=..., attempt=...).update(...)` and checks the row count, so a stale
worker, a double click and the scheduler can race without corrupting a job. The functions serve every
kind of job (a `LedgerJob`): they take the job itself, or its kind and id where a worker names it.
"""

from __future__ import annotations

from typing import Any, Literal

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from webapp.jobs.models import ACTIVE_STATES, WORKER_TRANSITIONS, LedgerJob, RunState, queue_clock


def events_of(model: type[LedgerJob]) -> tuple[Any, str]:
    """The event model of a kind of job and the name of its foreign key (every kind calls them `events`)."""
    related = model.events  # type: ignore[attr-defined]
    return related.rel.related_model, related.field.name


def note(job: LedgerJob, message: str, level: str = "info") -> None:
    """A control-plane line in the job's log (seq is null: it is not one of a worker's events)."""
    model = type(job)
    event_model, fk = events_of(model)
    attempt = model.objects.filter(pk=job.pk).values_list("attempt", flat=True).first() or 0
    event_model.objects.create(**{f"{fk}_id": job.pk}, attempt=attempt, kind="status", level=level, message=message)


def dispatch(job: LedgerJob, worker: Any, gpu_indices: list[int] | None = None) -> int | None:
    """Place a queued job on a worker (holding those of its GPUs); returns the new attempt, or None if someone
    else won."""
    model = type(job)
    now = timezone.now()
    updated = model.objects.filter(pk=job.pk, state=RunState.QUEUED, cancel_requested=False).update(
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
    attempt = model.objects.values_list("attempt", flat=True).get(pk=job.pk)
    gpus = f" (GPU {', '.join(map(str, gpu_indices))})" if gpu_indices else ""
    note(job, f"Attempt {attempt} dispatched to worker {worker.name}{gpus}")
    return int(attempt)


def attempt_entry(job: Any, outcome: str, reason: str) -> dict[str, Any]:
    """One line of a job's attempt_log: how the attempt it is at ended, and why; when it started running and on
    how many GPUs (what usage counts as GPU-hours)."""
    started = job.started_at if job.started_at and (not job.dispatched_at or job.started_at >= job.dispatched_at) else None
    return {
        "attempt": job.attempt,
        "worker": job.worker.name if job.worker_id and job.worker else None,
        "outcome": outcome,
        "reason": reason,
        "at": timezone.now().isoformat(),
        "started": started.isoformat() if started else None,
        "gpus": len(job.gpu_indices or []),
    }


FAILED_OUTCOMES = ("lost", "could not run")  # attempt_log outcomes of an attempt that failed on its worker


def requeue_or_fail(job: Any, reason: str, max_attempts: int, failure: bool = True, outcome: str = "lost") -> str:
    """Take an active job back from its worker: requeue it (or hold it, paused, if its owner asked for a pause),
    or fail it once it has failed max_attempts times.

    A lost worker is a failure; a graceful handover (the worker was shut down or the job paused, and it
    checkpointed first) is not, and always requeues. `outcome`: how the attempt log names a failed attempt
    ("lost", or "could not run" for a worker that handed the job back as unable to run it)."""
    failures = job.failures + (1 if failure else 0)
    with transaction.atomic():
        # The flags as they are now: a pause or a resume may have come since the caller read the job.
        flags = type(job).objects.select_for_update().filter(pk=job.pk).values("cancel_requested", "pause_requested")
        current = flags.first() or {"cancel_requested": job.cancel_requested, "pause_requested": job.pause_requested}
        if current["cancel_requested"]:
            target, error = RunState.CANCELLED, ""
        elif failure and failures >= max_attempts:
            target, error = RunState.FAILED, f"{reason}; gave up after {failures} failed attempt(s)"
        elif current["pause_requested"]:
            target, error = RunState.PAUSED, ""
        else:
            target, error = RunState.QUEUED, ""
        if not failure:
            outcome = "paused" if target == RunState.PAUSED else "handed over"
        fields: dict[str, Any] = {
            "state": target, "worker": None, "gpu_indices": [], "error": error, "failures": failures,
            "pause_requested": False, "attempt_log": [*job.attempt_log, attempt_entry(job, outcome, reason)],
        }
        if target in (RunState.QUEUED, RunState.PAUSED):
            fields["queued_at"] = timezone.now()
        else:
            fields["finished_at"] = timezone.now()
        updated = type(job).objects.filter(pk=job.pk, attempt=job.attempt, state__in=ACTIVE_STATES).update(**fields)
        if updated:
            said = {RunState.QUEUED: "requeued", RunState.PAUSED: "paused until resumed, to continue from its checkpoint"}
            note(job, f"{reason}: {job.NOUN} {said.get(target, target)}", level="warning")
    return str(target)


CancelOutcome = Literal["cancelled", "requested", ""]


def request_cancel(job: LedgerJob) -> CancelOutcome:
    """Cancel a job that no worker has started (queued, paused, or dispatched and not yet claimed) at once: "cancelled";
    flag one a worker holds, for it to stop at its next step: "requested"; "" (false) when it has finished. The
    answer says what this call did, whatever the job's state is by the time the caller reads it."""
    model = type(job)
    with transaction.atomic():
        if model.objects.filter(pk=job.pk, state__in=(RunState.QUEUED, RunState.PAUSED)).update(
            state=RunState.CANCELLED, cancel_requested=True, pause_requested=False, finished_at=timezone.now()
        ):
            note(job, "Cancelled before it started")
            return "cancelled"
        if cancel_unclaimed(job):
            return "cancelled"
        if model.objects.filter(pk=job.pk, state__in=ACTIVE_STATES).update(cancel_requested=True):
            note(job, "Cancel requested: the worker stops at its next step", level="warning")
            return "requested"
    return ""


def cancel_unclaimed(job: LedgerJob) -> bool:
    """Cancel a dispatched attempt that its worker has not claimed: the worker has loaded nothing, so the job
    ends now (its GPUs freed) and the claim, when the wake-up arrives, is refused. The conditional update
    races the claim's: one of them wins."""
    return end_unclaimed(job, RunState.CANCELLED, "cancelled")


def end_unclaimed(job: LedgerJob, target: str, verb: str) -> bool:
    """Take a dispatched attempt that its worker has not claimed to `target` (cancelled or paused) at once."""
    model = type(job)
    locked = model.objects.select_for_update().filter(pk=job.pk).first()
    if locked is None or locked.state != RunState.DISPATCHED or locked.claimed_at is not None:
        return False
    reason = (f"{verb} before worker {locked.worker} claimed it" if locked.worker_id  # type: ignore[attr-defined]
              else f"{verb} before it was claimed")
    fields: dict[str, Any] = {"state": target, "gpu_indices": [],
                              "attempt_log": [*locked.attempt_log, attempt_entry(locked, target, reason)]}
    if target == RunState.CANCELLED:
        fields.update(cancel_requested=True, finished_at=timezone.now())
    else:
        fields.update(worker=None, pause_requested=False, queued_at=timezone.now())
    if not model.objects.filter(pk=job.pk, attempt=locked.attempt, state=RunState.DISPATCHED,
                                claimed_at=None).update(**fields):
        return False
    ending = "Cancelled before it started" if target == RunState.CANCELLED else "Paused before it started"
    note(locked, f"{ending}: attempt {locked.attempt} was {reason}, so nothing ran")
    return True


PauseOutcome = Literal["paused", "requested", ""]
# What a worker is told (the `interrupt` of its replies) when the job it runs is paused.
PAUSE_REASON = "paused at its owner's request"


def request_pause(job: LedgerJob, by: Any) -> PauseOutcome:
    """Pause a job: one no worker has started (queued, or dispatched and not yet claimed) is held at once, in its
    place in the queue: "paused"; one a worker holds is flagged, for the worker to save a checkpoint at its next
    step and hand it back (see requeue_or_fail): "requested"; "" (false) when it is paused or has finished."""
    model = type(job)
    with transaction.atomic():
        if model.objects.filter(pk=job.pk, state=RunState.QUEUED).update(state=RunState.PAUSED, wait_reason=""):
            note(job, f"Paused by {by} while queued: it keeps its place until resumed")
            return "paused"
        if end_unclaimed(job, RunState.PAUSED, f"paused by {by}"):
            return "paused"
        if model.objects.filter(pk=job.pk, state__in=ACTIVE_STATES, cancel_requested=False).update(
            pause_requested=True
        ):
            note(job, f"Pause requested by {by}: the worker saves a checkpoint at its next step and stops",
                 level="warning")
            return "requested"
    return ""


def resume(job: LedgerJob, by: Any) -> bool:
    """Queue a paused job again, in the place it held (its queue_order is kept); its next attempt resumes from its
    latest checkpoint. A pause a worker has not acted on yet is withdrawn instead. False if neither applies."""
    model = type(job)
    with transaction.atomic():
        if model.objects.filter(pk=job.pk, state=RunState.PAUSED).update(
            state=RunState.QUEUED, pause_requested=False, queued_at=timezone.now()
        ):
            note(job, f"Resumed by {by}: queued again, it continues from its latest checkpoint")
            return True
        if model.objects.filter(pk=job.pk, state__in=ACTIVE_STATES, pause_requested=True).update(
            pause_requested=False
        ):
            note(job, f"Resumed by {by} before the worker paused it: the pause is withdrawn")
            return True
    return False


def worker_flags(job: LedgerJob) -> dict[str, Any]:
    """What a worker's replies tell it about a job it runs: stop for good (`cancel`), or save a checkpoint and hand
    it back (`interrupt`, with why: a pause)."""
    return {"cancel": job.cancel_requested,
            "interrupt": PAUSE_REASON if job.pause_requested and not job.cancel_requested else ""}


class Rejected(Exception):
    """A worker's request refused: the HTTP status, what is wrong, and a code a worker can act on (e.g.
    `cancelled`: skip the job, it is no failure)."""

    def __init__(self, status: int, detail: str, code: str = "", extra: dict[str, Any] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.code = status, detail, code
        self.extra = extra or {}  # fields added to the problem body (the server's offset of a 416)


def fenced_job(worker: Any, model: type[LedgerJob], job_id: int, attempt: int) -> Any:
    """The job if this worker holds this attempt of it; 404 for someone else's job, 409 if stale."""
    job = model.objects.filter(pk=job_id).first()
    if job is None or job.worker_id != worker.pk:  # type: ignore[attr-defined]
        raise Rejected(404, "no such job assigned to this worker")
    if attempt != job.attempt:
        raise Rejected(409, f"attempt {attempt} is stale: the {job.NOUN} is at attempt {job.attempt}")
    return job


def claim(worker: Any, model: type[LedgerJob], job_id: int, attempt: int) -> Any:
    """The one claim of an attempt: a redelivered or duplicated wake-up finds it claimed and gets 409, so a job
    never runs twice. A cancelled attempt (or one flagged before its claim) is refused with the code
    `cancelled`, so that the worker skips it before loading anything, and without calling it a failure."""
    job = fenced_job(worker, model, job_id, attempt)
    if job.cancel_requested and job.state == RunState.DISPATCHED and job.claimed_at is None:
        with transaction.atomic():
            cancel_unclaimed(job)
    if model.objects.filter(
        pk=job.pk, attempt=attempt, state=RunState.DISPATCHED, claimed_at=None, cancel_requested=False
    ).update(claimed_at=timezone.now()):
        return job
    state = model.objects.values_list("state", flat=True).get(pk=job.pk)
    if state == RunState.CANCELLED:
        raise Rejected(409, f"the {job.NOUN} was cancelled: nothing to run", code="cancelled")
    if state not in ACTIVE_STATES:
        raise Rejected(409, f"the {job.NOUN} is {state}")
    raise Rejected(409, f"attempt {attempt} of the {job.NOUN} is already claimed")


def record_events(job: LedgerJob, attempt: int, events: list[dict[str, Any]]) -> None:
    if job.state not in ACTIVE_STATES:
        raise Rejected(409, f"the {job.NOUN} is {job.state}")
    model = type(job)
    event_model, fk = events_of(model)
    rows = [
        event_model(
            **{fk: job},
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
        stored = set(event_model.objects.filter(**{fk: job}, attempt=attempt, seq__in=seqs).values_list("seq", flat=True))
        event_model.objects.bulk_create(rows, ignore_conflicts=True)  # a retried batch is stored once
        job.fold_events([e for e in events if int(e["seq"]) not in stored])  # e.g. a comparison's streamed text
    progress: dict[str, Any] = {"last_report_at": timezone.now()}
    metrics = [_timed(e) for e in events if e.get("kind") == "metric"]
    for data in metrics:
        if "step" in data:
            progress["step"] = int(data["step"])
        if data.get("total_steps"):
            progress["total_steps"] = int(data["total_steps"])
    with transaction.atomic():
        fenced = model.objects.filter(pk=job.pk, attempt=attempt)
        if metrics:
            progress.update(job.fold_metrics(fenced, metrics))
        fenced.update(**progress)


def _timed(event: dict[str, Any]) -> dict[str, Any]:
    """A metric event's data with the worker's clock at the report, so curves can be drawn against time."""
    data = event.get("data") or {}
    at = event.get("time")
    return {**data, "time": at} if isinstance(at, int | float) and not isinstance(at, bool) else data


INTERRUPTED = "interrupted"  # a worker's report: it was shut down, saved a checkpoint, and hands the job back
# A worker's report: the job could not run on this worker (its disk is full, the control plane out of reach while
# fetching the inputs), which another attempt may not meet: a failed attempt, requeued until MAX_ATTEMPTS.
REQUEUE = "requeue"


def record_status(job: Any, attempt: int, state: str, result: dict[str, Any], error: str) -> None:
    if state == job.state and job.is_final:
        return  # a retried final report: already recorded
    if state == INTERRUPTED:
        if job.state in ACTIVE_STATES:
            requeue_or_fail(job, error or f"Worker {job.worker} shut down", max_attempts=0, failure=False)
        return
    if state == REQUEUE:
        if job.state in ACTIVE_STATES:
            from django.conf import settings

            requeue_or_fail(job, error or f"Worker {job.worker} could not run it", settings.MAX_ATTEMPTS,
                            outcome="could not run")
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
        fields["attempt_log"] = [*job.attempt_log, attempt_entry(job, state, error[:500])]
    with transaction.atomic():
        if not type(job).objects.filter(pk=job.pk, attempt=attempt, state__in=allowed_from).update(**fields):
            raise Rejected(409, f"cannot go from {job.state} to {state}")
        if state == RunState.SUCCEEDED:
            job.record_result(result)
        elif state == RunState.RUNNING:
            job.on_start()


RETRYABLE_STATES = (RunState.FAILED, RunState.CANCELLED)


def retry(job: LedgerJob, by: Any) -> bool:
    """Put a failed or cancelled job back in the queue.

    The attempt is kept: the scheduler bumps it when it dispatches, so reports of the old
    attempt stay fenced out, and a run's new attempt resumes from its latest checkpoint
    (checkpoints live per run, not per attempt).
    """
    with transaction.atomic():
        updated = type(job).objects.filter(pk=job.pk, attempt=job.attempt, state__in=RETRYABLE_STATES).update(
            state=RunState.QUEUED, cancel_requested=False, error="", worker=None, failures=0, gpu_indices=[],
            queue_order=queue_clock(), dispatched_at=None, claimed_at=None, started_at=None, finished_at=None,
            queued_at=timezone.now(),
        )
        if updated:
            note(job, f"Retry requested by {by}: {job.RETRY_NOTE}")
    return bool(updated)
