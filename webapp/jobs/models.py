"""What every kind of worker job shares: its lifecycle states, the fields of its ledger row (`LedgerJob`) and of
its append-only events (`LedgerEvent`). Training runs and adapter jobs are concrete kinds of these; the
fenced operations on them are in ledger.py.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from django.db import models
from django.db.models import QuerySet


class RunState(models.TextChoices):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Held by its owner: out of the queue, no worker or GPU, resumed from its latest checkpoint (see ledger.pause).
    PAUSED = "paused"


ACTIVE_STATES = (RunState.DISPATCHED, RunState.RUNNING)
FINAL_STATES = (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)
# Which state a worker may report from which: anything else is refused with 409.
WORKER_TRANSITIONS = {
    RunState.DISPATCHED: {RunState.RUNNING, RunState.FAILED, RunState.CANCELLED},
    RunState.RUNNING: {RunState.RUNNING, RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED},
}


def queue_clock() -> float:
    """A new job's place in its owner's queue: after everything queued before it."""
    return time.time()


class LedgerJob(models.Model):
    """The fields every kind of worker job keeps in its row, the ledger of the job (see ledger.py):
    state, attempt (fencing), the cancel and pause flags, progress and the timestamps of each transition.

    A concrete kind names itself (`NOUN`), its worker's Celery task (`TASK`), the path of its worker API
    (`WORKER_PATH`) and how a worker's page shows it (`ON_WORKER`, `SUMMARY_FIELDS`), has an `owner`, a `worker` and an `events` relation (a `LedgerEvent`), and records
    what a succeeded attempt produced (`record_result`)."""

    NOUN: ClassVar[str] = "job"
    TASK: ClassVar[str] = ""
    WORKER_PATH: ClassVar[str] = ""
    # What a retry's note in the job's log says happens next.
    RETRY_NOTE: ClassVar[str] = "queued again"
    # A worker's active job of this kind, as `<ON_WORKER>_id`, `_state` and each of SUMMARY_FIELDS.
    ON_WORKER: ClassVar[str] = "current_job"
    SUMMARY_FIELDS: ClassVar[tuple[str, ...]] = ()

    state = models.CharField(max_length=16, choices=RunState.choices, default=RunState.QUEUED)
    attempt = models.PositiveIntegerField(default=0)
    cancel_requested = models.BooleanField(default=False)
    # Pause asked while a worker holds the job: the worker saves a checkpoint at its next step and hands the job
    # back, which then waits in `paused` instead of the queue.
    pause_requested = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    # When the job last came back to the queue (requeued from a lost worker or a handover, or retried); null
    # while it has not left it since it was created. The scheduler's reservation wait counts from here.
    queued_at = models.DateTimeField(null=True, blank=True)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    last_report_at = models.DateTimeField(null=True, blank=True)
    # Placement (see fleet/scheduler.py): higher priority first; within a priority, each owner's jobs go in
    # queue_order (the owner may reorder their queued jobs, staff anyone's), owners taking turns.
    priority = models.SmallIntegerField(default=0)
    queue_order = models.FloatField(default=queue_clock)
    # What a worker needs to take the job: all of these labels, this much free GPU memory (None: any device,
    # CPU included), this many GPUs.
    needs_labels = models.JSONField(default=list, blank=True)
    needs_gpu_bytes = models.BigIntegerField(null=True, blank=True)
    needs_gpus = models.PositiveSmallIntegerField(default=1)
    # The GPUs of its worker the current attempt holds (indices into the worker's inventory).
    gpu_indices = models.JSONField(default=list, blank=True)
    # Why a queued job waits (set by the scheduler; empty when it is simply next in line).
    wait_reason = models.CharField(max_length=500, blank=True)
    # Attempts lost to a worker's failure (a graceful handover does not count); past MAX_ATTEMPTS the job fails.
    failures = models.PositiveSmallIntegerField(default=0)
    # One entry per finished attempt: {"attempt", "worker", "outcome", "reason", "at"}.
    attempt_log = models.JSONField(default=list, blank=True)

    class Meta:
        abstract = True

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    def record_result(self, result: dict[str, Any]) -> None:
        """What a succeeded attempt produced (called by the ledger inside the state change's transaction)."""
        raise NotImplementedError

    def on_start(self) -> None:
        """An attempt starts running (inside the state change's transaction)."""

    def fold_events(self, events: list[dict[str, Any]]) -> None:
        """Newly stored events of the job (a retried batch's are passed once), inside their transaction."""

    def fold_metrics(self, fenced: QuerySet[Any], metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """More fields to update from a batch's metric points, inside the transaction that stores the progress;
        `fenced` is the job's row at the reporting attempt."""
        return {}


class LedgerEvent(models.Model):
    """Append-only log lines, metric points and other outputs of a job; the id orders them and is the SSE
    cursor. A concrete kind adds the foreign key to its job (named `JOB_FIELD`, related name `events`)."""

    JOB_FIELD: ClassVar[str] = "job"

    attempt = models.PositiveIntegerField()
    # Per-attempt sequence number from the worker (dedupes retried batches); null for the
    # control plane's own lines (dispatched, requeued...). NULLs never collide in the constraint.
    seq = models.PositiveIntegerField(null=True, blank=True)
    kind = models.CharField(max_length=16)  # log | metric | status | output | checkpoint
    level = models.CharField(max_length=16, default="info")
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        abstract = True
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{getattr(self, f'{self.JOB_FIELD}_id')}#{self.pk} {self.kind}"
