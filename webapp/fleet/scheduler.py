"""The scheduler: places queued runs on idle workers and takes runs back from lost workers.

One pass is `schedule_once()`; `manage.py scheduler` (started by `tunedeck up`) loops it.
Wake-ups are sent only after the placing transaction commits.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from webapp.celery import send_wakeup
from webapp.fleet.models import Worker, WorkerState
from webapp.training import ledger
from webapp.training.models import ACTIVE_STATES, RunState, TrainingRun

log = logging.getLogger(__name__)


def mark_lost_workers() -> int:
    """Workers silent past WORKER_OFFLINE_AFTER go offline; their active runs are taken back."""
    cutoff = timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER)
    lost = Worker.objects.exclude(state=WorkerState.OFFLINE).filter(last_heartbeat__lt=cutoff)
    count = 0
    for worker in lost:
        if Worker.objects.filter(pk=worker.pk, last_heartbeat__lt=cutoff).update(state=WorkerState.OFFLINE):
            count += 1
            log.warning("worker %s missed its heartbeats: marked offline", worker.name)
            for run in TrainingRun.objects.filter(worker=worker, state__in=ACTIVE_STATES):
                ledger.requeue_or_fail(run, f"Worker {worker.name} stopped answering", settings.MAX_ATTEMPTS)
    return count


def resend_unclaimed() -> int:
    """A wake-up may be lost (broker restart): send it again. The claim makes duplicates harmless."""
    cutoff = timezone.now() - timedelta(seconds=settings.DISPATCH_RESEND_AFTER)
    stale = TrainingRun.objects.filter(state=RunState.DISPATCHED, claimed_at=None, dispatched_at__lt=cutoff)
    count = 0
    for run in stale.select_related("worker"):
        if run.worker and TrainingRun.objects.filter(pk=run.pk, attempt=run.attempt, claimed_at=None).update(
            dispatched_at=timezone.now()
        ):
            send_wakeup(run.worker.name, run.pk, run.attempt)
            count += 1
    return count


def idle_workers() -> list[Worker]:
    busy = TrainingRun.objects.filter(state__in=ACTIVE_STATES, worker__isnull=False).values("worker_id")
    return list(Worker.objects.filter(state=WorkerState.ONLINE).exclude(pk__in=busy).order_by("last_heartbeat"))


def dispatch_queued() -> int:
    workers = idle_workers()
    if not workers:
        return 0
    queued = list(TrainingRun.objects.filter(state=RunState.QUEUED).order_by("id").values_list("pk", flat=True)[: len(workers)])
    placed = 0
    for run_id, worker in zip(queued, workers, strict=False):
        with transaction.atomic():
            attempt = ledger.dispatch(run_id, worker)
            if attempt is not None:
                name = worker.name
                transaction.on_commit(lambda r=run_id, a=attempt, n=name: send_wakeup(n, r, a))
                placed += 1
    return placed


def schedule_once() -> dict[str, int]:
    return {"lost_workers": mark_lost_workers(), "resent": resend_unclaimed(), "dispatched": dispatch_queued()}
