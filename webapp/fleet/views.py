"""Staff pages for the worker fleet."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.cache import patch_vary_headers

from webapp.fleet.models import Worker
from webapp.training.models import ACTIVE_STATES, TrainingRun

POLL_SECONDS = 10


def staff_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Anonymous visitors go to the login page; signed-in users who are not staff get 403."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        user = request.user
        if not user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not user.is_staff:
            raise PermissionDenied("the workers page is for admins")
        return view(request, *args, **kwargs)

    return wrapped


def annotate_current_run(workers: QuerySet[Worker]) -> QuerySet[Worker]:
    """Each worker with the id and name of its active run or adapter job (None when idle), in the same query."""
    from webapp.playground.models import AdapterJob

    active = TrainingRun.objects.filter(worker=OuterRef("pk"), state__in=ACTIVE_STATES).order_by("-id")
    job = AdapterJob.objects.filter(worker=OuterRef("pk"), state__in=ACTIVE_STATES).order_by("-id")
    return workers.annotate(
        current_run_id=Subquery(active.values("pk")[:1]),
        current_run_name=Subquery(active.values("name")[:1]),
        current_run_state=Subquery(active.values("state")[:1]),
        # or the adapter job it runs (compare, merge...)
        current_job_id=Subquery(job.values("pk")[:1]),
        current_job_kind=Subquery(job.values("kind")[:1]),
        current_job_state=Subquery(job.values("state")[:1]),
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def gpu_rows(inventory: Any) -> list[dict[str, Any]]:
    """The GPUs of a heartbeat's inventory, with whatever telemetry the worker sent.

    The inventory is the worker's JSON, so every field is checked: a malformed one is left out.
    Telemetry (memory_used, utilization) is optional; memory_total alone is the inventory.
    """
    gpus = inventory.get("gpus") if isinstance(inventory, dict) else None
    rows = []
    for index, gpu in enumerate(gpus if isinstance(gpus, list) else []):
        if not isinstance(gpu, dict):
            continue
        total, used = _number(gpu.get("memory_total")), _number(gpu.get("memory_used"))
        util = _number(gpu.get("utilization"))
        rows.append({
            "index": index,
            "name": str(gpu.get("name") or "GPU"),
            "memory_total": total,
            "memory_used": used,
            "memory_percent": round(100 * used / total) if used is not None and total else None,
            "utilization": round(util) if util is not None else None,
        })
    return rows


@staff_required
def workers(request: HttpRequest) -> HttpResponse:
    rows = list(annotate_current_run(Worker.objects.order_by("name")))
    for worker in rows:
        worker.gpus = gpu_rows(worker.inventory)  # type: ignore[attr-defined]
        inventory = worker.inventory if isinstance(worker.inventory, dict) else {}
        worker.host = {k: inventory.get(k) for k in ("hostname", "cpus", "python", "torch") if inventory.get(k)}  # type: ignore[attr-defined]
    partial = bool(getattr(request, "htmx", False))
    template = "fleet/partials/workers_rows.html" if partial else "fleet/workers.html"
    response = render(request, template, {"workers": rows, "poll_seconds": POLL_SECONDS})
    patch_vary_headers(response, ["HX-Request"])
    return response
