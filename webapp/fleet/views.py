"""Staff pages for the worker fleet."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from datetime import timedelta
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers, patch_vary_headers
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.debug import sensitive_variables
from django.views.decorators.http import require_POST

from webapp.fleet import placement
from webapp.fleet.forms import RegisterWorkerForm, WorkerSettingsForm
from webapp.fleet.models import Worker, WorkerState
from webapp.jobs.models import ACTIVE_STATES
from webapp.jobs.registry import job_models
from workers.formatting import size

POLL_SECONDS = 10
# The GPU charts ask for a worker's telemetry this often while their page shows; a heartbeat adds a sample
# every TUNEDECK_HEARTBEAT_INTERVAL seconds (10 by default), so a new one shows within 5 s of arriving.
TELEMETRY_POLL_SECONDS = 5
GIB = 2**30
TOKEN_FILE = "~/.tunedeck-token"


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
    """Each worker with its active job of each kind (None when idle), in the same query: for a run
    `current_run_id`, `current_run_name` and `current_run_state`, for an adapter job `current_job_id`,
    `current_job_kind`... (each kind's ON_WORKER prefix and SUMMARY_FIELDS)."""
    columns = {}
    for model in job_models():
        active = model.objects.filter(worker=OuterRef("pk"), state__in=ACTIVE_STATES).order_by("-id")
        for field in ("pk", *model.SUMMARY_FIELDS, "state"):
            columns[f"{model.ON_WORKER}_{'id' if field == 'pk' else field}"] = Subquery(active.values(field)[:1])
    return workers.annotate(**columns)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _gpu_row(index: int, gpu: dict[str, Any], latest: dict[str, Any]) -> dict[str, Any]:
    """One GPU's figures: the inventory's, else the latest telemetry sample's."""
    total = _number(gpu.get("memory_total")) or _number(latest.get("memory_total"))
    used = _number(gpu.get("memory_used"))
    util = _number(gpu.get("utilization"))
    used = used if used is not None else _number(latest.get("memory_used"))
    util = util if util is not None else _number(latest.get("utilization"))
    return {
        "index": index,
        "name": str(gpu.get("name") or "GPU"),
        "memory_total": total,
        "memory_used": used,
        "memory_percent": round(100 * used / total) if used is not None and total else None,
        "utilization": round(util) if util is not None else None,
    }


def gpu_rows(inventory: Any, telemetry: Any = None) -> list[dict[str, Any]]:
    """The GPUs of a heartbeat's inventory, with whatever telemetry the worker sent.

    The inventory is the worker's JSON, so every field is checked: a malformed one is left out.
    Telemetry (memory_used, utilization) is optional; memory_total alone is the inventory. With
    `telemetry` (Worker.telemetry), a GPU that only the samples name gets a row too, and the latest
    sample fills in the figures the inventory lacks.
    """
    gpus = inventory.get("gpus") if isinstance(inventory, dict) else None
    gpus = [gpu if isinstance(gpu, dict) else None for gpu in (gpus if isinstance(gpus, list) else [])]
    samples = _samples(telemetry)
    latest = samples[-1]["gpus"] if samples else []
    rows = []
    for index in range(max(len(gpus), len(latest))):
        gpu = gpus[index] if index < len(gpus) else {}
        if gpu is None:
            continue
        last = latest[index] if index < len(latest) and isinstance(latest[index], dict) else {}
        rows.append(_gpu_row(index, gpu, last))
    return rows


def _samples(telemetry: Any) -> list[dict[str, Any]]:
    """Well-formed telemetry samples ({"t": epoch_s, "gpus": [...]}), oldest first."""
    if not isinstance(telemetry, list):
        return []
    samples = [s for s in telemetry if isinstance(s, dict) and _number(s.get("t")) is not None
               and isinstance(s.get("gpus"), list)]
    return sorted(samples, key=lambda s: float(s["t"]))


def _percent(value: float) -> float:
    """Clamped to 0..100: the charts' scale (a driver may report a share a little past 100)."""
    return min(max(value, 0.0), 100.0)


def _point(t: float, gpu: Any, inventory_total: float | None) -> dict[str, float] | None:
    """One GPU of one sample as a chart point, with the figures it has; None when it has none."""
    if not isinstance(gpu, dict):
        return None
    used, util = _number(gpu.get("memory_used")), _number(gpu.get("utilization"))
    total = _number(gpu.get("memory_total")) or inventory_total
    point = {"time": t}
    if used is not None:
        point["memory_used_gib"] = round(used / GIB, 2)
        if total:
            point["memory_percent"] = round(_percent(100 * used / total), 1)
    if util is not None:
        point["utilization"] = round(_percent(util), 1)
    return point if len(point) > 1 else None


def gpu_series(inventory: Any, telemetry: Any) -> list[dict[str, Any]]:
    """Per GPU (as gpu_rows lists them): a chart title, its memory, and its samples as points
    {"time": epoch_s, "memory_used_gib", "memory_percent", "utilization"}, oldest first; a point carries
    only the figures its sample had, and a sample with none for this GPU is left out."""
    samples = _samples(telemetry)
    series = []
    for row in gpu_rows(inventory, telemetry):
        index, total = row["index"], row["memory_total"]
        points = [point for sample in samples if index < len(sample["gpus"])
                  if (point := _point(float(sample["t"]), sample["gpus"][index], total)) is not None]
        series.append({"index": index, "title": f"GPU {index} · {row['name']}",
                       "memory_total_gib": round(total / GIB, 2) if total else None, "points": points})
    return series


def _worker_rows(workers: QuerySet[Worker]) -> list[Worker]:
    rows = list(annotate_current_run(workers))
    for worker in rows:
        worker.gpus = gpu_rows(worker.inventory, worker.telemetry)  # type: ignore[attr-defined]
        # The GPU previews' JSON, for a worker whose heartbeats have carried GPU samples.
        sampled = any(sample["gpus"] for sample in _samples(worker.telemetry))
        worker.telemetry_url = reverse("worker-telemetry", args=[worker.pk]) if sampled else ""  # type: ignore[attr-defined]
        inventory = worker.inventory if isinstance(worker.inventory, dict) else {}
        worker.host = {k: inventory.get(k) for k in ("hostname", "cpus", "python", "torch", *placement.RUNTIMES)  # type: ignore[attr-defined]
                       if inventory.get(k)}
        worker.busy = bool(worker.current_run_id or worker.current_job_id)  # type: ignore[attr-defined]
        worker.artifacts = artifacts_line(inventory.get("artifacts"))  # type: ignore[attr-defined]
    return rows


def artifacts_line(artifacts: Any) -> str:
    """How the worker has its artifacts, from its latest heartbeat: the shared store, or its own folder (remote)
    with its input cache's use."""
    if not isinstance(artifacts, dict):
        return ""
    if artifacts.get("mode") == "local":
        return "shared store"
    if artifacts.get("mode") != "remote":
        return str(artifacts.get("error") or "")
    used, bound = artifacts.get("cache_used"), artifacts.get("cache_max")
    cache = f" · cache {size(used)} of {size(bound)}" if isinstance(used, int) and isinstance(bound, int) else ""
    return f"own folder, through the worker API{cache}"


@staff_required
def workers(request: HttpRequest) -> HttpResponse:
    return _workers_page(request, RegisterWorkerForm())


def _workers_page(request: HttpRequest, form: RegisterWorkerForm, status: int = 200) -> HttpResponse:
    rows = _worker_rows(Worker.objects.order_by("name"))
    partial = bool(getattr(request, "htmx", False))
    template = "fleet/partials/workers_rows.html" if partial else "fleet/workers.html"
    response = render(request, template, {"workers": rows, "poll_seconds": POLL_SECONDS, "form": form}, status=status)
    patch_vary_headers(response, ["HX-Request"])
    return response


def _server_url(request: HttpRequest) -> str:
    """This control plane's URL as the browser reached it: what a worker on another machine should use."""
    return request.build_absolute_uri("/").rstrip("/")


@sensitive_variables("token")
def _token_page(request: HttpRequest, worker: Worker, token: str, rotated: bool) -> HttpResponse:
    """The token, shown this once, and the commands that start the worker with it. Never cached."""
    server = shlex.quote(_server_url(request))
    context = {
        "worker": worker, "token": token, "rotated": rotated, "server": server,
        "env_command": f"TUNEDECK_WORKER_TOKEN={token} tunedeck worker --server {server}",
        "file_commands": [f"(umask 077 && echo {token} > {TOKEN_FILE})",
                          f"tunedeck worker --server {server} --token-file {TOKEN_FILE}"],
        "overlap_until": worker.previous_token_valid_until(),
    }
    response = render(request, "fleet/worker_token.html", context)
    add_never_cache_headers(response)
    return response


@staff_required
@require_POST
@sensitive_variables("token")
def worker_register(request: HttpRequest) -> HttpResponse:
    form = RegisterWorkerForm(request.POST)
    registered = form.register(created_by=request.user) if form.is_valid() else None
    if registered is None:
        return _workers_page(request, form, status=400)
    worker, token = registered
    return _token_page(request, worker, token, rotated=False)


def _worker_for(pk: int) -> Worker:
    rows = _worker_rows(Worker.objects.filter(pk=pk))
    if not rows:
        get_object_or_404(Worker, pk=pk)
    return rows[0]


@staff_required
def worker_detail(request: HttpRequest, pk: int) -> HttpResponse:
    """The worker's settings (labels, limits: POST saves them), its token and its actions."""
    worker = _worker_for(pk)
    status = 200
    if request.method == "POST":
        form = WorkerSettingsForm(request.POST)
        if form.is_valid():
            form.apply(worker)
            worker.save(update_fields=["labels", "max_gpu_bytes", "max_jobs"])
            messages.success(request, f"Saved the labels and limits of {worker.name}.")
            return redirect("worker-detail", pk=worker.pk)
        status = 400
    else:
        form = WorkerSettingsForm(initial=WorkerSettingsForm.initial_for(worker))
    context = {"worker": worker, "form": form, "overlap_until": worker.previous_token_valid_until(),
               "telemetry_poll_seconds": TELEMETRY_POLL_SECONDS}
    return render(request, "fleet/worker_detail.html", context, status=status)


@staff_required
def worker_telemetry(request: HttpRequest, pk: int) -> JsonResponse:
    """The worker's GPU charts (gpu_series) from its recent heartbeats, for its page and the workers list.

    The whole window each time (at most TELEMETRY_SAMPLES samples per GPU, a few KiB): one row read by key."""
    worker = get_object_or_404(Worker.objects.only("pk", "name", "inventory", "telemetry"), pk=pk)
    return JsonResponse({"worker": worker.name, "poll_seconds": TELEMETRY_POLL_SECONDS,
                         "gpus": gpu_series(worker.inventory, worker.telemetry)})


@staff_required
@require_POST
@sensitive_variables("token")
def worker_rotate(request: HttpRequest, pk: int) -> HttpResponse:
    """A new token shown once; the old one keeps working for TOKEN_OVERLAP seconds (a revoked worker: none does)."""
    with transaction.atomic():
        worker = get_object_or_404(Worker.objects.select_for_update(), pk=pk)
        token = worker.rotate_token(settings.TOKEN_OVERLAP)
        worker.save(update_fields=["token_hash", "token_issued_at", "previous_token_hash", "previous_token_expires"])
    return _token_page(request, worker, token, rotated=True)


@staff_required
@require_POST
def worker_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    worker = get_object_or_404(Worker, pk=pk)
    worker.revoke_token()
    worker.save(update_fields=["token_hash", "previous_token_hash", "previous_token_expires"])
    messages.warning(request, f"Revoked the token of {worker.name}: it is refused from now on. Rotate to give it a new one.")
    return redirect("worker-detail", pk=worker.pk)


def _back(request: HttpRequest) -> HttpResponse:
    """To the page the form was on (a local path only), else the workers page."""
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()},
                                                  require_https=request.is_secure()):
        return redirect(target)
    return redirect("workers")


@staff_required
@require_POST
def worker_drain(request: HttpRequest, pk: int) -> HttpResponse:
    """An online worker finishes its jobs and takes no new ones until resumed."""
    worker = get_object_or_404(Worker, pk=pk)
    if Worker.objects.filter(pk=pk, state=WorkerState.ONLINE).update(state=WorkerState.DRAINING):
        messages.info(request, f"Draining {worker.name}: it finishes its current jobs and takes no new ones.")
    else:
        messages.warning(request, f"Only an online worker can be drained; {worker.name} is {worker.state}.")
    return _back(request)


@staff_required
@require_POST
def worker_resume(request: HttpRequest, pk: int) -> HttpResponse:
    """A draining worker takes jobs again: online if it has been heard from lately, else offline until it is."""
    worker = get_object_or_404(Worker, pk=pk)
    cutoff = timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER)
    alive = worker.last_heartbeat is not None and worker.last_heartbeat >= cutoff
    state = WorkerState.ONLINE if alive else WorkerState.OFFLINE
    if Worker.objects.filter(pk=pk, state=WorkerState.DRAINING).update(state=state):
        messages.info(request, f"Resumed {worker.name}: it is {state} and takes new jobs.")
    else:
        messages.warning(request, f"{worker.name} is not draining (it is {worker.state}).")
    return _back(request)


@staff_required
def worker_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """GET asks for confirmation; POST deletes a worker that holds no active job (its past jobs keep their rows)."""
    worker = _worker_for(pk)
    if request.method == "POST":
        with transaction.atomic():
            locked = get_object_or_404(Worker.objects.select_for_update(), pk=pk)
            if any(model.objects.filter(worker=locked, state__in=ACTIVE_STATES).exists() for model in job_models()):
                messages.warning(request, f"{worker.name} has an active job: drain it and wait until the job ends.")
                return redirect("worker-detail", pk=pk)
            locked.delete()
        messages.info(request, f"Deleted worker {worker.name}; its token is refused from now on.")
        return redirect("workers")
    return render(request, "fleet/worker_delete.html", {"worker": worker})
