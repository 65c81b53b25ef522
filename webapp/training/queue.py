"""Reordering a queue: the owner (or staff) moves a queued run or adapter job within the owner's own queue.

An owner's queue is their queued jobs of one priority, runs and adapter jobs together, in `queue_order`
(the scheduler's order among that owner's jobs; owners still take turns, see fleet/placement.py).
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from webapp.playground.models import AdapterJob
from webapp.training.models import RunState, TrainingRun

MOVES = ("top", "up", "down", "bottom")
QUEUE_MODELS = (TrainingRun, AdapterJob)
# Queue orders that were equal (jobs created in the same instant) are pulled apart by this much.
NUDGE = 1e-3


def owner_queue(owner_id: int, priority: int) -> list[Any]:
    """The owner's queued jobs of this priority, in the order the scheduler considers them."""
    jobs: list[Any] = []
    for model in QUEUE_MODELS:
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


def _reorder(request: HttpRequest, job: Any, fallback: str) -> HttpResponse:
    user = request.user
    if not (user.is_staff or job.owner_id == user.pk):  # type: ignore[union-attr]
        raise PermissionDenied(f"only the {job.NOUN}'s owner or an admin can reorder it")
    where = request.POST.get("where", "")
    if where not in MOVES:
        messages.error(request, f"Unknown move “{where}”: use one of {', '.join(MOVES)}.")
    elif move(job, where):
        place = f"to the {where} of its owner's queue" if where in ("top", "bottom") else f"{where} one place"
        messages.info(request, f"Moved {job} {place}.")
    else:
        messages.warning(request, f"Only a queued {job.NOUN} can be moved; {job} is already {job.state}.")
    target = request.POST.get("next", "")
    if url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}, require_https=request.is_secure()):
        return redirect(target)
    return redirect(fallback, pk=job.pk)


@login_required
@require_POST
def run_reorder(request: HttpRequest, pk: int) -> HttpResponse:
    return _reorder(request, get_object_or_404(TrainingRun, pk=pk), "run-detail")


@login_required
@require_POST
def job_reorder(request: HttpRequest, pk: int) -> HttpResponse:
    return _reorder(request, get_object_or_404(AdapterJob, pk=pk), "job-detail")
