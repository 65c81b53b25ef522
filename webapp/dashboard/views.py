"""The overview page: what the team is running now.

One view serves the whole page and, for htmx's polling, only its sections. Every section is a
fixed number of queries whatever the number of runs or events (see tests/webapp/test_dashboard_pages.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.contrib.auth.decorators import login_required
from django.db.models import IntegerField, OuterRef, QuerySet, Subquery
from django.db.models.fields.json import KT
from django.db.models.functions import Cast
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.cache import patch_vary_headers

from webapp.fleet.models import Worker
from webapp.fleet.views import annotate_current_run, gpu_rows
from webapp.jobs.models import ACTIVE_STATES, RunState
from webapp.training.models import Adapter, RunEvent, TrainingRun

# The page shows at most this many rows per section; counts tell how many more there are.
ACTIVE_LIMIT = 50
QUEUE_LIMIT = 50
ADAPTER_LIMIT = 10
WORKER_LIMIT = 100
# The step rate is measured over this many of the run's latest metric points (of its current attempt).
RATE_WINDOW = 20
POLL_SECONDS = 5


@dataclass
class ActiveRow:
    run: TrainingRun
    rate: float | None  # steps per second
    eta: timedelta | None

    @property
    def finish_at(self) -> datetime | None:
        return timezone.now() + self.eta if self.eta is not None else None


def _metrics() -> QuerySet[RunEvent]:
    # Metric points of the outer run's current attempt (a resumed attempt repeats steps), with
    # the step as a number: served by the (run, kind, id) index.
    events = RunEvent.objects.filter(run=OuterRef("pk"), attempt=OuterRef("attempt"), kind="metric")
    return events.annotate(metric_step=Cast(KT("data__step"), IntegerField()))


def _metric_at(offset: int, field: str) -> Subquery:
    """A field of the run's offset-th latest metric point."""
    return Subquery(_metrics().order_by("-id").values(field)[offset:offset + 1])


def _first_metric(field: str) -> Subquery:
    return Subquery(_metrics().order_by("id").values(field)[:1])


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def step_rate(run: Any, now: datetime) -> float | None:
    """Steps per second: over the latest metric points when there are two, else since the start."""
    last_step, first_step = _as_int(run.rate_last_step), _as_int(run.rate_first_step)
    last_at, first_at = run.rate_last_at, run.rate_first_at
    if None not in (last_step, first_step, last_at, first_at) and last_at > first_at and last_step > first_step:
        return (last_step - first_step) / (last_at - first_at).total_seconds()
    if run.started_at and run.step:
        elapsed = (now - run.started_at).total_seconds()
        return run.step / elapsed if elapsed > 0 else None
    return None


def _active_rows(now: datetime) -> list[ActiveRow]:
    runs = (
        TrainingRun.objects.filter(state__in=ACTIVE_STATES)
        .select_related("base_model", "dataset", "owner", "worker")
        .defer("hyperparameters", "metric_points", "error")
        .annotate(
            rate_last_step=_metric_at(0, "metric_step"),
            rate_last_at=_metric_at(0, "created_at"),
            # The window's first point: the RATE_WINDOW-th latest one, or the attempt's first if fewer.
            rate_first_step=_metric_at(RATE_WINDOW - 1, "metric_step"),
            rate_first_at=_metric_at(RATE_WINDOW - 1, "created_at"),
            rate_start_step=_first_metric("metric_step"),
            rate_start_at=_first_metric("created_at"),
        )
        .order_by("id")[:ACTIVE_LIMIT]
    )
    rows = []
    for run in runs:
        if run.rate_first_at is None:
            run.rate_first_step, run.rate_first_at = run.rate_start_step, run.rate_start_at
        rate = step_rate(run, now)
        eta = None
        if rate and run.total_steps and run.step < run.total_steps:
            eta = timedelta(seconds=round((run.total_steps - run.step) / rate))
        rows.append(ActiveRow(run=run, rate=rate, eta=eta))
    return rows


def overview_context() -> dict[str, Any]:
    now = timezone.now()
    queued = TrainingRun.objects.filter(state=RunState.QUEUED)
    queue = list(queued.select_related("base_model", "dataset", "owner").defer("hyperparameters", "metric_points")
                 .order_by("id")[:QUEUE_LIMIT])
    queue_count = len(queue) if len(queue) < QUEUE_LIMIT else queued.count()
    workers = list(annotate_current_run(Worker.objects.order_by("name"))[:WORKER_LIMIT])
    for worker in workers:
        worker.gpus = gpu_rows(worker.inventory)
    active = _active_rows(now)
    adapters = (
        Adapter.objects.select_related("base_model", "owner").order_by("-id")[:ADAPTER_LIMIT]
    )
    return {
        "now": now,
        "active": active,
        "queue": queue,
        "queue_count": queue_count,
        "queue_more": max(0, queue_count - len(queue)),
        "workers": workers,
        "adapters": list(adapters),
        "poll_seconds": POLL_SECONDS,
    }


@login_required
def overview(request: HttpRequest) -> HttpResponse:
    partial = bool(getattr(request, "htmx", False))
    template = "dashboard/partials/overview_sections.html" if partial else "dashboard/overview.html"
    response = render(request, template, overview_context())
    # The same URL answers with the page or its sections: caches must key on the header.
    patch_vary_headers(response, ["HX-Request"])
    return response
