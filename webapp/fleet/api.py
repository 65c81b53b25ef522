"""The worker API: token-authenticated JSON endpoints through which workers report.

A worker can only see and change jobs assigned to it, and only for the attempt it holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from webapp.fleet.models import Worker, WorkerState, hash_token
from webapp.jobs import ledger
from webapp.jobs.models import ACTIVE_STATES
from webapp.jobs.registry import worker_paths
from webapp.problem_details import problem_response

Handler = Callable[..., dict[str, Any]]


def _error(request: HttpRequest, status: int, detail: str, code: str = "",
           extra: dict[str, Any] | None = None) -> JsonResponse:
    return problem_response(status, detail, instance=request.path, code=code or None, extra=extra)


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


def worker_call(method: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """A worker API view of this HTTP method: authenticate the bearer token (401), then call
    `handler(request, worker, **kwargs)` and map what it raises to a problem response (400 for a malformed call,
    a ledger rejection's own status, code and fields)."""

    def decorate(handler: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @csrf_exempt
        @require_http_methods([method])
        @wraps(handler)
        def view(request: HttpRequest, **kwargs: Any) -> HttpResponse:
            worker = authenticate(request)
            if worker is None:
                return _error(request, 401, "invalid worker token")
            try:
                return handler(request, worker, **kwargs)
            except (ValueError, KeyError, TypeError) as exc:
                return _error(request, 400, f"bad request: {exc}")
            except ledger.Rejected as exc:
                return _error(request, exc.status, exc.detail, exc.code, exc.extra)

        return view

    return decorate


def worker_endpoint(handler: Handler) -> Callable[..., HttpResponse]:
    """A worker API call that is JSON in and out (POST): `handler(worker, payload, **kwargs)` returns the reply."""

    @worker_call("POST")
    @wraps(handler)
    def view(request: HttpRequest, worker: Worker, **kwargs: Any) -> JsonResponse:
        payload = json.loads(request.body or b"{}")
        if not isinstance(payload, dict):
            raise ValueError("the body must be a JSON object")
        return JsonResponse(handler(worker, payload, **kwargs))

    return view


def _attempt(payload: dict[str, Any]) -> int:
    return int(payload["attempt"])


@worker_endpoint
def claim(worker: Worker, payload: dict[str, Any], job_id: int, path: str) -> dict[str, Any]:
    model = worker_paths()[path]
    job = model.objects.get(pk=ledger.claim(worker, model, job_id, _attempt(payload)).pk)
    spec = job.job_spec()
    return {
        "spec": json.loads(spec.to_json()) if hasattr(spec, "to_json") else spec,
        "kind": getattr(job, "kind", "train"),
        "cancel": job.cancel_requested,
        "gpu_indices": job.gpu_indices,
    }


@worker_endpoint
def events(worker: Worker, payload: dict[str, Any], job_id: int, path: str) -> dict[str, Any]:
    attempt = _attempt(payload)
    job = ledger.fenced_job(worker, worker_paths()[path], job_id, attempt)
    batch = _events(payload.get("events", []))
    ledger.record_events(job, attempt, batch)
    extra = job.worker_reply() if hasattr(job, "worker_reply") else {}
    return {**ledger.worker_flags(job), **extra, "stored": len(batch)}


@worker_endpoint
def status(worker: Worker, payload: dict[str, Any], job_id: int, path: str) -> dict[str, Any]:
    attempt = _attempt(payload)
    model = worker_paths()[path]
    job = ledger.fenced_job(worker, model, job_id, attempt)
    ledger.record_status(job, attempt, str(payload["state"]), storable(payload.get("result") or {}),
                         storable(str(payload.get("error", ""))))
    return ledger.worker_flags(model.objects.get(pk=job.pk))


TELEMETRY_SAMPLES = 60  # heartbeats of history per worker (10 minutes at the default interval)


@worker_endpoint
def heartbeat(worker: Worker, payload: dict[str, Any]) -> dict[str, Any]:
    """The worker is alive: store its inventory and telemetry, say which of its jobs to cancel or stop.

    A worker that comes back after being presumed dead goes online again; a draining one stays draining;
    one that says it is shutting down goes offline at once, so nothing more is placed on it while its
    jobs hand back."""
    inventory = _inventory(payload.get("inventory"))
    sample = _sample(payload.get("telemetry"))
    running = _running(payload.get("running"))
    starting, leaving = _flag(payload, "starting"), _flag(payload, "shutting_down")

    fields = ["last_heartbeat"]
    worker.last_heartbeat = timezone.now()
    if inventory is not None:
        worker.inventory, fields = inventory, [*fields, "inventory"]
    if sample is not None:
        worker.inventory = _with_live_values(worker.inventory, sample)
        point = {"t": int(time.time()), "gpus": [
            {key: gpu.get(key) for key in ("memory_used", "memory_total", "utilization")} for gpu in sample["gpus"]
        ]}
        recent = worker.telemetry if isinstance(worker.telemetry, list) else []
        worker.telemetry = [*recent, point][-TELEMETRY_SAMPLES:]
        fields = [*dict.fromkeys([*fields, "inventory", "telemetry"])]
    worker.save(update_fields=fields)
    # State changes are conditional updates: an admin draining the worker meanwhile is never undone.
    if leaving:
        Worker.objects.filter(pk=worker.pk, state=WorkerState.ONLINE).update(state=WorkerState.OFFLINE)
    else:
        Worker.objects.filter(pk=worker.pk, state=WorkerState.OFFLINE).update(state=WorkerState.ONLINE)
    worker.refresh_from_db(fields=["state", "labels"])
    if starting:
        _take_back_orphans(worker)

    active = {"cancel_requested": True, "state__in": ("dispatched", "running")}
    cancel = list(worker.runs.filter(**active).values_list("pk", flat=True))
    cancel_jobs = list(worker.adapter_jobs.filter(**active).values_list("pk", flat=True))
    return {
        "name": worker.name, "state": worker.state, "labels": worker.labels or [],
        "cancel": cancel, "cancel_adapter_jobs": cancel_jobs, "stop": _moved_on(worker, running),
    }


def _moved_on(worker: Worker, running: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs the worker runs whose attempt the ledger no longer gives it (e.g. moved while it was presumed
    dead): it must stop them."""
    models, stop = worker_paths(), []
    for job in running:
        row = models[job["path"]].objects.filter(pk=job["id"]).values("worker_id", "attempt", "state").first()
        if not (row and row["worker_id"] == worker.pk and row["attempt"] == job["attempt"] and row["state"] in ACTIVE_STATES):
            stop.append(job)
    return stop


def _take_back_orphans(worker: Worker) -> None:
    """A worker process that starts runs nothing yet: jobs it had claimed before died with its previous process."""
    for model in worker_paths().values():
        for job in model.objects.filter(worker=worker, state__in=ACTIVE_STATES, claimed_at__isnull=False):
            ledger.requeue_or_fail(job, f"Worker {worker.name} restarted while running it", settings.MAX_ATTEMPTS)


def _flag(payload: dict[str, Any], field: str) -> bool:
    value = payload.get(field, False)
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be true or false")
    return value


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a JSON object")
    return value


def _list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{field} must be a list")
    return value


def _number(value: Any, field: str, integer: bool = False, maximum: float | None = None) -> Any:
    """A non-negative number (or null: a query the GPU does not support), within maximum if given."""
    if value is None:
        return None
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0 or (maximum is not None and value > maximum):
        what = "integer" if integer else "number"
        bound = f" of at most {maximum:g}" if maximum is not None else ""
        raise ValueError(f"{field} must be a non-negative {what}{bound} or null, not {value!r}")
    return value


def _gpus(value: Any, field: str) -> list[dict[str, Any]]:
    gpus = _list(value, field)
    for i, gpu in enumerate(gpus):
        where = f"{field}[{i}]"
        _object(gpu, where)
        _number(gpu.get("index"), f"{where}.index", integer=True)
        for key in ("memory_total", "memory_free", "memory_used"):
            _number(gpu.get(key), f"{where}.{key}", integer=True)
        _number(gpu.get("utilization"), f"{where}.utilization", maximum=100)
        _number(gpu.get("temperature"), f"{where}.temperature")
        for key in ("name", "uuid"):
            if gpu.get(key) is not None and not isinstance(gpu[key], str):
                raise ValueError(f"{where}.{key} must be a string")
    return gpus


def _inventory(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    inventory = _object(value, "inventory")
    _gpus(inventory.get("gpus", []), "inventory.gpus")
    return inventory


def _sample(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    sample = _object(value, "telemetry")
    for key in ("memory_available", "memory_total"):
        _number(sample.get(key), f"telemetry.{key}", integer=True)
    _gpus(sample.get("gpus", []), "telemetry.gpus")
    artifacts = sample.get("artifacts")
    if artifacts is not None:
        artifacts = _object(artifacts, "telemetry.artifacts")
        _typed(artifacts.get("mode"), "string", "telemetry.artifacts.mode")
        for key in ("cache_used", "cache_max"):
            _number(artifacts.get(key), f"telemetry.artifacts.{key}", integer=True)
    return {**sample, "gpus": sample.get("gpus", [])}


def _running(value: Any) -> list[dict[str, Any]]:
    jobs = []
    for i, job in enumerate(_list(value if value is not None else [], "running")):
        where = f"running[{i}]"
        _object(job, where)
        if job.get("path") not in worker_paths():
            raise ValueError(f"{where}.path must be one of {', '.join(worker_paths())}")
        for key in ("id", "attempt"):
            if _number(job.get(key), f"{where}.{key}", integer=True) is None:
                raise ValueError(f"{where}.{key} is required")
        jobs.append({"path": job["path"], "id": job["id"], "attempt": job["attempt"]})
    return jobs


EVENT_TEXT_FIELDS = {"kind": 16, "level": 16}  # their columns' lengths
# Fields the control plane reads from a metric's or a streamed output's data: typed here, so that folding them
# into the run's progress or a comparison's cells cannot fail once the batch is stored.
METRIC_FIELDS = {"step": "integer", "total_steps": "integer", "loss": "number"}
OUTPUT_FIELDS = {"row": "integer", "column": "string", "text": "string"}


def _events(value: Any) -> list[dict[str, Any]]:
    """A batch of events, every one checked before any is stored: a malformed one is named by its index and
    seq and field, and the whole batch is refused (the worker's retry would otherwise store half of it)."""
    return [_event(storable(event), i) for i, event in enumerate(_list(value, "events"))]


def storable(value: Any) -> Any:
    """`value` with every NUL character in its strings (keys too) replaced by U+FFFD: PostgreSQL's text and jsonb
    cannot hold one, and a model's output may be any byte (a random-weight model writes NULs), so a log line or a
    streamed answer holding one would otherwise refuse its whole batch."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, list):
        return [storable(item) for item in value]
    if isinstance(value, dict):
        return {storable(key): storable(item) for key, item in value.items()}
    return value


def _event(event: Any, index: int) -> dict[str, Any]:
    where = f"events[{index}]"
    _object(event, where)
    seq = event.get("seq")
    if seq is None:
        raise ValueError(f"{where}.seq is required")
    _typed(seq, "integer", f"{where}.seq")
    where = f"{where} (seq {seq})"
    for key, length in EVENT_TEXT_FIELDS.items():
        text = event.get(key)
        if text is not None and not (isinstance(text, str) and len(text) <= length):
            raise ValueError(f"{where}.{key} must be a string of at most {length} characters, not {text!r:.60}")
    if not isinstance(event.get("message", ""), str):
        raise ValueError(f"{where}.message must be a string, not {type(event['message']).__name__}")
    data = event.get("data")
    if data is None:
        return event
    _object(data, f"{where}.data")
    fields = METRIC_FIELDS if event.get("kind") == "metric" else OUTPUT_FIELDS if event.get("kind") == "output" else {}
    for key, kind in fields.items():
        _typed(data.get(key), kind, f"{where}.data.{key}")
    return event


MAX_INTEGER = 2**31 - 1  # the largest value of the integer columns these land in (seq, step, total_steps, row)


def _typed(value: Any, kind: str, field: str) -> None:
    """None passes (the field is optional); a number may be NaN or negative (a diverged run's loss is a fact)."""
    if value is None:
        return
    ok = {"integer": isinstance(value, int) and 0 <= value <= MAX_INTEGER, "number": isinstance(value, (int, float)),
          "string": isinstance(value, str)}[kind]
    if isinstance(value, bool) or not ok:
        what = f"an integer from 0 to {MAX_INTEGER}" if kind == "integer" else f"a {kind}"
        raise ValueError(f"{field} must be {what}, not {value!r:.60}")


def _with_live_values(inventory: Any, sample: dict[str, Any]) -> dict[str, Any]:
    """The inventory with each GPU's memory, utilisation and temperature from the latest sample, so that what
    the scheduler and the workers page read is current between full inventories."""
    if isinstance(inventory, dict) and isinstance(sample.get("artifacts"), dict):
        inventory = {**inventory, "artifacts": sample["artifacts"]}
    if not isinstance(inventory, dict) or not isinstance(inventory.get("gpus"), list):
        return inventory if isinstance(inventory, dict) else {}
    live = {gpu.get("index"): gpu for gpu in sample["gpus"] if gpu.get("index") is not None}
    gpus = []
    for gpu in inventory["gpus"]:
        update = live.get(gpu.get("index")) if isinstance(gpu, dict) else None
        keys = ("memory_total", "memory_free", "memory_used", "utilization", "temperature")
        gpus.append({**gpu, **{k: update[k] for k in keys if k in update}} if update else gpu)
    return {**inventory, "gpus": gpus}
