"""The control plane's Celery app: it only sends wake-ups by task name, never runs ML code."""

from __future__ import annotations

from celery import Celery
from django.conf import settings

from workers.config import queue_for

TRAIN_TASK = "tunedeck.run_job"
ADAPTER_JOB_TASK = "tunedeck.run_adapter_job"

app = Celery("tunedeck")
app.conf.update(settings.CELERY)


def send_wakeup(worker_name: str, run_id: int, attempt: int, task: str = TRAIN_TASK) -> None:
    """Wake the worker up for (job, attempt). Safe to deliver twice: the claim is fenced."""
    app.send_task(
        task,
        kwargs={"job_id": run_id, "attempt": attempt},
        queue=queue_for(worker_name),
    )
