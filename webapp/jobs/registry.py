"""The kinds of job: every concrete `LedgerJob` model of the installed apps, in the apps' order. The fleet (the
scheduler, the worker API, the queue) works on jobs through this, without importing the apps that define them."""

from __future__ import annotations

from django.apps import apps

from webapp.jobs.models import LedgerJob


def job_models() -> tuple[type[LedgerJob], ...]:
    return tuple(model for model in apps.get_models() if issubclass(model, LedgerJob))


def model_named(name: str) -> type[LedgerJob]:
    """The kind whose model is called `name` (KeyError if none)."""
    return {model.__name__: model for model in job_models()}[name]


def worker_paths() -> dict[str, type[LedgerJob]]:
    """Each kind by the path of its worker API (`/api/worker/v1/<path>/<id>/...`)."""
    return {model.WORKER_PATH: model for model in job_models()}
