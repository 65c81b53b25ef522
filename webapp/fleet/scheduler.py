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
from webapp.playground.models import AdapterJob
from webapp.training import ledger
from webapp.training.models import ACTIVE_STATES, RunState, TrainingRun

# Every kind of job the workers run: training runs and adapter jobs (compare, merge, combine, evaluate, push).
JOB_MODELS = (TrainingRun, AdapterJob)

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
            for model in JOB_MODELS:
                for job in model.objects.filter(worker=worker, state__in=ACTIVE_STATES):
                    ledger.requeue_or_fail(job, f"Worker {worker.name} stopped answering", settings.MAX_ATTEMPTS)
    return count


def resend_unclaimed() -> int:
    """A wake-up may be lost (broker restart): send it again. The claim makes duplicates harmless."""
    cutoff = timezone.now() - timedelta(seconds=settings.DISPATCH_RESEND_AFTER)
    count = 0
    for model in JOB_MODELS:
        stale = model.objects.filter(state=RunState.DISPATCHED, claimed_at=None, dispatched_at__lt=cutoff)
        for job in stale.select_related("worker"):
            if job.worker and model.objects.filter(pk=job.pk, attempt=job.attempt, claimed_at=None).update(
                dispatched_at=timezone.now()
            ):
                send_wakeup(job.worker.name, job.pk, job.attempt, model.TASK)
                count += 1
    return count


def idle_workers() -> list[Worker]:
    workers = Worker.objects.filter(state=WorkerState.ONLINE)
    for model in JOB_MODELS:
        workers = workers.exclude(pk__in=model.objects.filter(state__in=ACTIVE_STATES, worker__isnull=False).values("worker_id"))
    return list(workers.order_by("last_heartbeat"))


def dispatch_queued() -> int:
    """Oldest queued job first, whatever its kind, one per idle worker."""
    workers = idle_workers()
    if not workers:
        return 0
    queued = sorted(
        ((created, model, pk) for model in JOB_MODELS
        for pk, created in model.objects.filter(state=RunState.QUEUED).order_by("id").values_list("pk", "created_at")[
            : len(workers)
        ]),
        key=lambda item: (item[0], item[2]),
    )
    placed = 0
    for (_, model, job_id), worker in zip(queued, workers, strict=False):
        with transaction.atomic():
            attempt = ledger.dispatch(job_id, worker, model)
            if attempt is not None:
                name = worker.name
                transaction.on_commit(lambda j=job_id, a=attempt, n=name, t=model.TASK: send_wakeup(n, j, a, t))
                placed += 1
    return placed


def schedule_once() -> dict[str, int]:
    return {"lost_workers": mark_lost_workers(), "resent": resend_unclaimed(), "dispatched": dispatch_queued()}
