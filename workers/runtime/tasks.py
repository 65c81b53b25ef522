"""The worker's Celery tasks: thin wrappers that claim a job and run it.

Every job runs in a fresh pool process (prefork, one per GPU, one task per process), which picks its GPUs with
CUDA_VISIBLE_DEVICES before anything starts CUDA; it marks itself running in the runtime folder
(workers.runtime.jobfolder), where the main process can tell it to stop.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from workers.contract.refusals import CancelledBeforeStart, NotAssigned, StaleAttempt
from workers.runtime.celeryapp import app
from workers.runtime.client import HttpReporter, process_client
from workers.runtime.jobfolder import running_job

log = logging.getLogger("tunedeck.worker")


def claim(job_id: int, attempt: int, path: str) -> dict[str, Any] | None:
    """The claim reply, or None where the wake-up was not ours to act on (forged, stale, duplicated)."""
    try:
        return process_client().claim_job(job_id, attempt, path=path)
    except CancelledBeforeStart as exc:
        log.info("%s %s attempt %s cancelled before it started: skipped, nothing loaded (%s)", path, job_id, attempt, exc)
        return None
    except (NotAssigned, StaleAttempt) as exc:
        log.warning("%s %s attempt %s not ours to run: %s", path, job_id, attempt, exc)
        return None


def use_gpus(indices: Any) -> None:
    """Show this job's process only the GPUs the scheduler gave the attempt (NVML's indices, in PCI order).

    No indices (a CPU job, or a control plane that does not assign GPUs) leaves the worker's own setting."""
    if not isinstance(indices, list) or not indices:
        return
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        log.warning("ignoring malformed gpu_indices %r", indices)
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.warning("CUDA already started in this process: GPUs %s cannot be selected", indices)
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # the order NVML numbers them in
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in indices)
    log.info("using GPU(s) %s", os.environ["CUDA_VISIBLE_DEVICES"])


@app.task(name="tunedeck.run_job", ignore_result=True)
def run_job(job_id: int, attempt: int) -> None:
    claimed = claim(job_id, attempt, "jobs")
    if claimed is None:
        return
    use_gpus(claimed.get("gpu_indices"))  # before the ML stack is imported

    from workers.contract.spec import TrainSpec
    from workers.runtime.launch import run_training_job
    from workers.runtime.remote import job_reporter, job_store

    spec = TrainSpec.from_dict(claimed["spec"])
    log.info("job %s attempt %s claimed", job_id, attempt)
    reporter = job_reporter(process_client(), job_id, attempt, "jobs", spec)
    with running_job("jobs", job_id, attempt, reporter):
        try:
            store = job_store(reporter)
            if store is not None:
                run_training_job(spec, lambda: reporter, store)
        except StaleAttempt as exc:
            log.warning("job %s attempt %s superseded: %s", job_id, attempt, exc)
    log.info("job %s attempt %s done", job_id, attempt)


@app.task(name="tunedeck.run_adapter_job", ignore_result=True)
def run_adapter_job(job_id: int, attempt: int) -> None:
    claimed = claim(job_id, attempt, "adapter-jobs")
    if claimed is None:
        return
    use_gpus(claimed.get("gpu_indices"))

    import importlib

    from workers.contract.kinds import KINDS, spec_from_dict
    from workers.runtime.remote import job_reporter, job_store

    kind = str(claimed.get("kind"))
    reporter = HttpReporter(process_client(), job_id, attempt, path="adapter-jobs")
    try:
        decl = KINDS[kind]
        spec = spec_from_dict(kind, claimed["spec"])
    except (KeyError, TypeError, ValueError) as exc:  # a control plane newer than this worker
        reporter.started()
        reporter.log(f"This worker cannot run this {kind} job: {exc}", level="error")
        reporter.finish("failed", error=f"the worker cannot read this {kind} job: {exc}")
        return
    reporter = job_reporter(process_client(), job_id, attempt, "adapter-jobs", spec)
    reporter.flush_interval = decl.flush_interval
    log.info("%s job %s attempt %s claimed", kind, job_id, attempt)
    runner = getattr(importlib.import_module(decl.runner_module), decl.runner_function)
    with running_job("adapter-jobs", job_id, attempt, reporter):
        try:
            store = job_store(reporter)
            if store is not None:
                runner(spec, reporter, store)
        except StaleAttempt as exc:
            log.warning("adapter job %s attempt %s superseded: %s", job_id, attempt, exc)
    log.info("%s job %s attempt %s done", kind, job_id, attempt)
