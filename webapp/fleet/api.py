"""The worker API: token-authenticated JSON endpoints through which workers report.

A worker can only see and change jobs assigned to it, and only for the attempt it holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.db.models import Q
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from webapp.fleet.models import Worker, WorkerState, hash_token
from webapp.training import ledger
from webapp.training.models import TrainingRun

Handler = Callable[..., dict[str, Any]]


def _error(status: int, detail: str) -> JsonResponse:
    return JsonResponse({"detail": detail}, status=status)


def authenticate(request: HttpRequest) -> Worker | None:
    """The worker whose current token, or previous token within its overlap window, is the bearer token.

    Only hashes are compared; a revoked worker has neither, so nothing matches it.
    """
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme != "Bearer" or not token:
        return None
    digest = hash_token(token)
    current = Q(token_hash=digest)
    previous = Q(previous_token_hash=digest, previous_token_expires__gt=timezone.now())
    return Worker.objects.filter(current | previous).first()


def worker_endpoint(handler: Handler) -> Callable[..., JsonResponse]:
    """Authenticate the bearer token, parse the JSON body, map ledger rejections to statuses."""

    @csrf_exempt
    @require_POST
    @wraps(handler)
    def view(request: HttpRequest, **kwargs: Any) -> JsonResponse:
        worker = authenticate(request)
        if worker is None:
            return _error(401, "invalid worker token")
        try:
            payload = json.loads(request.body or b"{}")
            if not isinstance(payload, dict):
                raise ValueError("the body must be a JSON object")
            return JsonResponse(handler(worker, payload, **kwargs))
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"bad request: {exc}")
        except ledger.Rejected as exc:
            return _error(exc.status, exc.detail)

    return view


def _attempt(payload: dict[str, Any]) -> int:
    return int(payload["attempt"])


@worker_endpoint
def claim(worker: Worker, payload: dict[str, Any], job_id: int, model: Any = TrainingRun) -> dict[str, Any]:
    job = model.objects.get(pk=ledger.claim(worker, job_id, _attempt(payload), model).pk)
    spec = job.job_spec()
    return {
        "spec": json.loads(spec.to_json()) if hasattr(spec, "to_json") else spec,
        "kind": getattr(job, "kind", "train"),
        "cancel": job.cancel_requested,
    }


@worker_endpoint
def events(worker: Worker, payload: dict[str, Any], job_id: int, model: Any = TrainingRun) -> dict[str, Any]:
    attempt = _attempt(payload)
    run = ledger.fenced_run(worker, job_id, attempt, model)
    batch = payload.get("events", [])
    if not isinstance(batch, list):
        raise ValueError("events must be a list")
    ledger.record_events(run, attempt, batch)
    return {"cancel": run.cancel_requested, "stored": len(batch)}


@worker_endpoint
def status(worker: Worker, payload: dict[str, Any], job_id: int, model: Any = TrainingRun) -> dict[str, Any]:
    attempt = _attempt(payload)
    run = ledger.fenced_run(worker, job_id, attempt, model)
    ledger.record_status(run, attempt, str(payload["state"]), payload.get("result") or {}, str(payload.get("error", "")))
    return {"cancel": model.objects.values_list("cancel_requested", flat=True).get(pk=run.pk)}


@worker_endpoint
def heartbeat(worker: Worker, payload: dict[str, Any]) -> dict[str, Any]:
    worker.last_heartbeat = timezone.now()
    worker.inventory = payload.get("inventory") or {}
    if worker.state == WorkerState.OFFLINE:
        worker.state = WorkerState.ONLINE
    worker.save(update_fields=["last_heartbeat", "inventory", "state"])
    active = {"cancel_requested": True, "state__in": ("dispatched", "running")}
    cancel = list(worker.runs.filter(**active).values_list("pk", flat=True))
    cancel_jobs = list(worker.adapter_jobs.filter(**active).values_list("pk", flat=True))
    return {"name": worker.name, "state": worker.state, "cancel": cancel, "cancel_adapter_jobs": cancel_jobs}
