"""The worker's Celery app, configured from the environment (broker URL, queues); Django-free.

Importing it sets PYTORCH_CUDA_ALLOC_CONF for the job processes the app forks: it is read once, when CUDA starts
in a job's process.
"""

from __future__ import annotations

import os

from celery import Celery

# Packed batches change shape every step, and expandable segments keep the allocator unfragmented.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from workers.config import celery_settings

app = Celery("tunedeck-worker")
app.conf.update(celery_settings())
