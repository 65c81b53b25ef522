"""The control plane's Celery app: it only sends wake-ups by task name, never runs ML code."""

from __future__ import annotations

from celery import Celery
from django.conf import settings

from workers.config import queue_for

TRAIN_TASK = "tunedeck.run_job"

app = Celery("tunedeck")
app.conf.update(settings.CELERY)


def send_wakeup(worker_name: str, run_id: int, attempt: int) -> None:
    """Wake the worker up for (run, attempt). Safe to deliver twice: the claim is fenced."""
    app.send_task(
        TRAIN_TASK,
        kwargs={"job_id": run_id, "attempt": attempt},
        queue=queue_for(worker_name),
    )
