"""Reordering a queue: the owner (or staff) moves a queued job within the owner's own queue.

An owner's queue is their queued jobs of one priority, of every kind together, in `queue_order`
(the scheduler's order among that owner's jobs; owners still take turns, see fleet/placement.py).
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from webapp.jobs.models import RunState
from webapp.jobs.registry import job_models

MOVES = ("top", "up", "down", "bottom")
# Queue orders that were equal (jobs created in the same instant) are pulled apart by this much.
NUDGE = 1e-3


def owner_queue(owner_id: int, priority: int) -> list[Any]:
    """The owner's queued jobs of this priority, in the order the scheduler considers them."""
    jobs: list[Any] = []
    for model in job_models():
        jobs += model.objects.select_for_update().filter(owner_id=owner_id, priority=priority, state=RunState.QUEUED)
    return sorted(jobs, key=lambda j: (j.queue_order, j.created_at, type(j).__name__, j.pk))


def moved(queue: list[Any], job: Any, where: str) -> list[Any]:
    at = next(i for i, j in enumerate(queue) if type(j) is type(job) and j.pk == job.pk)
    rest = queue[:at] + queue[at + 1:]
    target = {"top": 0, "up": max(0, at - 1), "down": min(len(rest), at + 1), "bottom": len(rest)}[where]
    return [*rest[:target], queue[at], *rest[target:]]


def move(job: Any, where: str) -> bool:
    """Move a queued job; False if it is no longer queued. The queue keeps its set of queue_order values,
    handed out again in the new order, so other owners' turns are unchanged."""
    if where not in MOVES:
        raise ValueError(f"unknown move {where!r}: use one of {', '.join(MOVES)}")
    with transaction.atomic():
        queue = owner_queue(job.owner_id, job.priority)
        if not any(type(j) is type(job) and j.pk == job.pk for j in queue):
            return False
        values = sorted(j.queue_order for j in queue)
        for i in range(1, len(values)):
            values[i] = max(values[i], values[i - 1] + NUDGE)
        for item, value in zip(moved(queue, job, where), values, strict=True):
            if item.queue_order != value:
                type(item).objects.filter(pk=item.pk, state=RunState.QUEUED).update(queue_order=value)
    return True
