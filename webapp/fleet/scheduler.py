"""The scheduler: places queued jobs on workers that fit them and takes jobs back from lost workers.

One pass is `schedule_once()`; `manage.py scheduler` (started by `tunedeck up`) loops it. The rules
(order, fairness, GPUs, reservations against starvation, wait reasons) are in `fleet/placement.py`; this
module reads the rows, commits each placement with the ledger's conditional update and sends the wake-up
after the commit.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Max
from django.utils import timezone

from webapp.celery import send_wakeup
from webapp.fleet import placement
from webapp.fleet.models import Worker, WorkerState
from webapp.jobs import ledger
from webapp.jobs.models import ACTIVE_STATES, RunState
from webapp.jobs.registry import job_models, model_named

log = logging.getLogger(__name__)


def mark_lost_workers() -> int:
    """Workers silent past WORKER_OFFLINE_AFTER lose their active jobs (taken back, their GPUs freed). An online
    one goes offline; a draining one stays draining, so that the admin's drain still holds when it comes back."""
    cutoff = timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER)
    silent = Worker.objects.exclude(state=WorkerState.OFFLINE).filter(last_heartbeat__lt=cutoff)
    count = 0
    for worker in silent:
        if worker.state == WorkerState.ONLINE:
            if not Worker.objects.filter(pk=worker.pk, state=WorkerState.ONLINE, last_heartbeat__lt=cutoff).update(
                state=WorkerState.OFFLINE
            ):
                continue
            count += 1
            log.warning("worker %s missed its heartbeats: marked offline", worker.name)
        for model in job_models():
            for job in model.objects.filter(worker=worker, state__in=ACTIVE_STATES):
                ledger.requeue_or_fail(job, f"Worker {worker.name} stopped answering", settings.MAX_ATTEMPTS)
    return count


def resend_unclaimed() -> int:
    """A wake-up may be lost (broker restart): send it again. The claim makes duplicates harmless."""
    cutoff = timezone.now() - timedelta(seconds=settings.DISPATCH_RESEND_AFTER)
    count = 0
    for model in job_models():
        stale = model.objects.filter(state=RunState.DISPATCHED, claimed_at=None, dispatched_at__lt=cutoff)
        for job in stale.select_related("worker"):
            if job.worker and model.objects.filter(pk=job.pk, attempt=job.attempt, claimed_at=None).update(
                dispatched_at=timezone.now()
            ):
                send_wakeup(job.worker.name, job.pk, job.attempt, model.TASK)
                count += 1
    return count


# --- Reading the fleet and the queue ---------------------------------------------------------------------


def inventory_gpus(inventory: Any) -> tuple[placement.Gpu, ...]:
    """The GPUs a worker's heartbeat reported; a malformed entry is left out, a worker without any is CPU-only."""
    gpus = inventory.get("gpus") if isinstance(inventory, dict) else None
    if not isinstance(gpus, list):
        return ()
    found = []
    for position, gpu in enumerate(gpus):
        if not isinstance(gpu, dict) or not isinstance(gpu.get("memory_total"), int):
            continue
        index = gpu.get("index", position)
        free = gpu.get("memory_free")
        found.append(placement.Gpu(index=index if isinstance(index, int) else position, total=gpu["memory_total"],
                                   free=free if isinstance(free, int) else None))
    return tuple(found)


def online_workers() -> list[Worker]:
    """Workers that may take jobs: online (not draining or offline) with a heartbeat within WORKER_OFFLINE_AFTER."""
    cutoff = timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER)
    return list(Worker.objects.filter(state=WorkerState.ONLINE, last_heartbeat__gte=cutoff).order_by("name"))


def runtime_workers(package: str) -> list[str]:
    """Names of the online workers whose inventory reports the runtime `package` (placement.RUNTIMES)."""
    label = placement.runtime_label(package)
    return [w.name for w in online_workers() if label in placement.runtime_labels(w.inventory)]


def _active_jobs(worker_ids: list[int]) -> list[tuple[int, int, list[Any], int]]:
    """(worker id, owner id, held GPU indices, GPUs needed) of every active job on these workers."""
    rows: list[tuple[int, int, list[Any], int]] = []
    for model in job_models():
        rows += model.objects.filter(state__in=ACTIVE_STATES, worker_id__in=worker_ids).values_list(
            "worker_id", "owner_id", "gpu_indices", "needs_gpus")
    return rows


def _slot(worker: Worker, active: list[tuple[int, int, list[Any], int]]) -> placement.Slot:
    slot = placement.Slot(
        id=worker.pk, name=worker.name,
        labels=frozenset(str(label) for label in worker.labels or []) | placement.runtime_labels(worker.inventory),
        gpus=inventory_gpus(worker.inventory), max_gpu_bytes=worker.max_gpu_bytes, max_jobs=worker.max_jobs,
    )
    unknown = 0
    for _, _, held, needs in active:
        indices = [i for i in held if isinstance(i, int)] if isinstance(held, list) else []
        slot.hold(indices)
        unknown += 0 if indices else max(1, needs)
    # An active job that records no GPUs (placed before GPUs were tracked) holds some anyway: the lowest free ones.
    for gpu in slot.free_gpus()[:unknown] if slot.gpus else []:
        slot.held.add(gpu.index)
    return slot


def fleet() -> tuple[dict[int, Worker], list[placement.Slot]]:
    workers = {w.pk: w for w in online_workers()}
    active = _active_jobs(list(workers))
    slots = [_slot(w, [row for row in active if row[0] == w.pk]) for w in workers.values()]
    return workers, slots


def _timestamp(value: datetime | None) -> float:
    return value.timestamp() if value else 0.0


def queued_jobs() -> list[placement.Job]:
    """The queued jobs as placement values. `queued` (what the reservation wait counts from) is when the job
    last came back to the queue (`queued_at`, set by a requeue or a retry): `created_at` is only when it first
    entered it, and `queue_order` is not a time once the owner reorders their queue (it swaps values)."""
    jobs = []
    for model in job_models():
        rows = model.objects.filter(state=RunState.QUEUED).values_list(
            "pk", "owner_id", "created_at", "priority", "queue_order", "needs_labels", "needs_gpu_bytes", "needs_gpus",
            "wait_reason", "queued_at", "attempt_log")
        for pk, owner, created, priority, queue_order, labels, gpu_bytes, gpus, reason, queued_at, log in rows:
            jobs.append(placement.Job(
                key=(model.__name__, pk), owner=owner, created=_timestamp(created), priority=priority,
                queue_order=queue_order, needs_labels=tuple(str(x) for x in labels or []),
                needs_gpu_bytes=gpu_bytes, needs_gpus=gpus, wait_reason=reason, queued=queued_at.timestamp() if queued_at else None,
                noun=model.NOUN, failed_on=failed_on(log),
            ))
    return jobs


def failed_on(attempt_log: list[dict[str, Any]] | None) -> str:
    """The worker the job's last attempt failed on (it went silent, or handed the job back as unable to run it),
    or "" when its last attempt ended otherwise (handed over at a shutdown, paused)."""
    last = (attempt_log or [{}])[-1]
    return str(last.get("worker") or "") if last.get("outcome") in ledger.FAILED_OUTCOMES else ""


def owners_history(owners: set[int]) -> tuple[dict[int, int], dict[int, float]]:
    """Per owner: active jobs now, and when one of their jobs was last dispatched (the fairness rule's inputs)."""
    active: dict[int, int] = {}
    served: dict[int, float] = {}
    for model in job_models():
        mine = model.objects.filter(owner_id__in=owners)
        for owner, n in mine.filter(state__in=ACTIVE_STATES).values("owner_id").annotate(n=Count("pk")).values_list(
                "owner_id", "n"):
            active[owner] = active.get(owner, 0) + n
        for owner, last in mine.filter(dispatched_at__isnull=False).values("owner_id").annotate(
                last=Max("dispatched_at")).values_list("owner_id", "last"):
            served[owner] = max(served.get(owner, 0.0), _timestamp(last))
    return active, served


# --- One pass ----------------------------------------------------------------------------------------------


def _commit(job: placement.Job, worker: Worker, slot: placement.Slot, gpus: list[int]) -> bool:
    """Place one job: its row moves to dispatched only if it is still queued and the GPUs are still free;
    the wake-up goes after the commit. The worker's row is locked so two passes never hand out one GPU twice."""
    model = model_named(job.key[0])
    with transaction.atomic():
        Worker.objects.select_for_update().filter(pk=worker.pk).values_list("pk", flat=True).first()
        now = _slot(worker, _active_jobs([worker.pk]))
        if now.full or set(gpus) & now.held:
            return False
        attempt = ledger.dispatch(model(pk=job.key[1]), worker, gpu_indices=gpus)  # the job by its kind and id
        if attempt is None:
            return False
        name, job_id, task = worker.name, job.key[1], model.TASK
        transaction.on_commit(lambda: send_wakeup(name, job_id, attempt, task))
    return True


def _write_reasons(jobs: list[placement.Job], reasons: dict[tuple[str, int], str]) -> None:
    """Store each queued job's wait reason, only where it changed (not a write per job per pass)."""
    for job in jobs:
        reason = reasons.get(job.key)
        if reason is not None and reason[:500] != job.wait_reason:
            model_named(job.key[0]).objects.filter(pk=job.key[1], state=RunState.QUEUED).update(wait_reason=reason[:500])


def dispatch_queued() -> int:
    """Place every queued job that fits somewhere now, in the placement order; returns how many were placed."""
    jobs = queued_jobs()
    if not jobs:
        return 0
    workers, slots = fleet()
    active, served = owners_history({job.owner for job in jobs})
    plan = placement.plan(
        jobs, slots, active, served, now=timezone.now().timestamp(), reserve_after=settings.RESERVE_AFTER
    )
    placed = sum(_commit(job, workers[slot.id], slot, gpus) for job, slot, gpus in plan.placements)
    _write_reasons(jobs, plan.reasons)
    return placed


def idle_workers() -> list[Worker]:
    """Online workers with room for another job."""
    workers, slots = fleet()
    return [workers[slot.id] for slot in slots if not slot.full]


# Passes the apps above the fleet add to the scheduler's loop (a sweep asks new trials and prunes, for one): each
# registers itself from its AppConfig.ready, so the fleet never imports them.
EXTRA_PASSES: list[tuple[str, Any]] = []


def register_pass(name: str, run: Any) -> None:
    """Run `run()` on every scheduler pass, after placement; registering the same name twice keeps one."""
    if all(existing != name for existing, _ in EXTRA_PASSES):
        EXTRA_PASSES.append((name, run))


def run_extra_passes() -> None:
    """Each registered pass in turn; one that fails is logged and does not stop the others or the loop."""
    for name, run in EXTRA_PASSES:
        try:
            run()
        except Exception:
            log.exception("scheduler pass %s failed; retrying next pass", name)


def _sweep_store() -> None:
    from webapp.fleet.artifacts import sweep_store

    removed = sweep_store()
    if any(removed.values()):
        log.info("store sweep removed %s", removed)


register_pass("store", _sweep_store)  # staging left by ended attempts, digests of files gone (every 10 min)


def schedule_once() -> dict[str, int]:
    return {"lost_workers": mark_lost_workers(), "resent": resend_unclaimed(), "dispatched": dispatch_queued()}
