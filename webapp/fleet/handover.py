"""How long a worker may take to hand its jobs back when it stops (`tunedeck up` gives its local worker that long).

A stopping worker's jobs see the stop at their next step, or once their model has loaded: a training run saves
a checkpoint at that step, every job reports `interrupted`, and the worker exits after its last job. So the
wait is the slowest job's time to its next step, plus an allowance for the checkpoint and the last reports. The
time to the next step is twice the job's pace in this attempt (steps vary: an evaluation, a longer batch); for a
job that has made no step yet, the time to load its base model, or as long again as it has spent so far.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.utils import timezone

from webapp.fleet.models import Worker
from webapp.jobs.models import ACTIVE_STATES
from webapp.jobs.registry import job_models

# The checkpoint of a LoRA adapter with its optimizer states (hundreds of MB for a large rank on a 70B base),
# the last reports and the worker's exit.
CHECKPOINT_AND_REPORTS_S = 60.0
# Loading a base model: its weights in 16 bits read at what a slow disk gives.
LOAD_BYTES_PER_S = 100 * 2**20


def handover_grace(worker: Worker) -> float:
    """Seconds to let `worker` hand its running jobs back before it is killed."""
    now = timezone.now()
    slowest = 0.0
    for model in job_models():
        for job in model.objects.filter(worker=worker, state__in=ACTIVE_STATES).select_related("base_model"):
            slowest = max(slowest, to_next_step(job, now))
    return CHECKPOINT_AND_REPORTS_S + slowest


def to_next_step(job: Any, now: datetime) -> float:
    pace = seconds_per_step(job)
    if pace is not None:
        return 2 * pace
    started = job.started_at or job.claimed_at or job.dispatched_at or now
    elapsed = max((now - started).total_seconds(), 0.0)
    loading = 2 * (job.base_model.num_parameters or 0) / LOAD_BYTES_PER_S
    return max(elapsed, loading)


def seconds_per_step(job: Any) -> float | None:
    """The job's pace in its current attempt, from its first metric point to its latest (None before it has made
    a step: a resumed attempt's first point is the step it resumed from)."""
    points = job.events.filter(attempt=job.attempt, kind="metric").order_by("id").values("data", "created_at")
    first, last = points.first(), points.last()
    if not first or not last:
        return None
    steps = _step(last) - _step(first)
    return (last["created_at"] - first["created_at"]).total_seconds() / steps if steps > 0 else None


def _step(point: dict[str, Any]) -> int:
    step = point["data"].get("step") if isinstance(point["data"], dict) else None
    return step if isinstance(step, int) else 0
