from __future__ import annotations

import asyncio
import html
import logging
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import DatabaseError, connections
from django.db.models import F
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.utils import timezone
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_POST

from webapp.catalog.demo import DEMO_MODEL
from webapp.catalog.models import BaseModel
from webapp.health import database_unavailable
from webapp.training import deletion, ledger
from webapp.training.charts import run_charts
from webapp.training.checkpoints import run_checkpoints
from webapp.training.forms import RUN_SORTS, RunFilterForm, RunForm, obvious_choice
from webapp.training.live import feed_for, released
from webapp.training.models import ACTIVE_STATES, Adapter, RunEvent, RunState, TrainingRun
from webapp.training.services import RunRefused, clone_request, queue_run
from workers.contract.spec import suggest_train_params
from workers.contract.store import ArtifactStore
from workers.formatting import size

log = logging.getLogger(__name__)

LOG_TAIL = 500
STREAM_PING_S = 15.0
RUNS_PER_PAGE = 50
ADAPTERS_PER_PAGE = 50
# A runs list page keeps polling its rows while one of these can still change on its own.
LIVE_STATES = (RunState.QUEUED, *ACTIVE_STATES)
RUN_COLUMNS = [("created", "Created"), ("name", "Name"), ("state", "State"), ("step", "Progress"), ("loss", "Loss")]


def _run_for(request: HttpRequest, pk: int) -> TrainingRun:
    """Runs are visible to the whole team; only the owner or staff may act on one (see _check_can_act)."""
    return get_object_or_404(TrainingRun.objects.select_related(
        "base_model", "dataset", "eval_dataset", "lora_config", "owner", "worker"), pk=pk)


def _check_can_act(request: HttpRequest, run: TrainingRun) -> None:
    user = request.user
    if not (user.is_staff or run.owner_id == user.pk):  # type: ignore[union-attr]
        raise PermissionDenied("only the run's owner or an admin can do this")


def _can_act(request: HttpRequest, run: TrainingRun) -> bool:
    return bool(request.user.is_staff or run.owner_id == request.user.pk)  # type: ignore[union-attr]


def _run_ordering(sort: str, descending: bool) -> list[Any]:
    field = RUN_SORTS[sort.lstrip("-")]
    if field == "id":
        return ["-id" if descending else "id"]
    # Runs without a loss yet sort last either way; id breaks ties so pages never overlap.
    primary = F(field).desc(nulls_last=True) if descending else F(field).asc(nulls_last=True)
    return [primary, "-id" if descending else "id"]


def _sort_headers(sort: str) -> list[dict[str, str]]:
    """Column headers: each links to its ascending sort, or to the other direction when it is the current one."""
    headers = []
    for key, label in RUN_COLUMNS:
        current = sort.lstrip("-") == key
        descending = sort.startswith("-")
        headers.append({
            "label": label,
            "sort": (key if descending else f"-{key}") if current else (f"-{key}" if key == "created" else key),
            "aria": ("descending" if descending else "ascending") if current else "none",
        })
    return headers


# A list row needs neither the settings nor the metric curve (up to 2,000 points each).
LIST_DEFERRED = ("hyperparameters", "metric_points", "error")


@login_required
def runs_list(request: HttpRequest) -> HttpResponse:
    """The page, or (for htmx's polling) only its rows: same filters, same sort, same page."""
    form = RunFilterForm(request.GET)
    sort, descending = form.ordering()
    runs = (TrainingRun.objects.filter(**form.filters())
            .select_related("base_model", "dataset", "owner")
            .defer(*LIST_DEFERRED)
            .order_by(*_run_ordering(sort, descending)))
    page = Paginator(runs, RUNS_PER_PAGE).get_page(request.GET.get("page"))
    context = {"form": form, "page": page, "runs": page.object_list, "headers": _sort_headers(sort),
               "live": any(run.state in LIVE_STATES for run in page.object_list)}
    template = "training/partials/runs_rows.html" if request.htmx else "training/runs_list.html"  # type: ignore[attr-defined]
    return render(request, template, context)


def _suggested(base_model_id: Any) -> Any:
    base = BaseModel.objects.filter(pk=base_model_id).first() if str(base_model_id or "").isdigit() else None
    base = base or obvious_choice(BaseModel.objects.all(), DEMO_MODEL) or BaseModel.objects.first()
    return suggest_train_params(base.num_parameters if base else None), base


@login_required
def run_new(request: HttpRequest) -> HttpResponse:
    if request.method == "POST":
        form = RunForm(request.POST)
        if form.is_valid() and form.run_request is not None:
            try:
                run = queue_run(request.user, form.run_request)
            except RunRefused as refused:
                form.show_refusals(refused.errors)
            else:
                return redirect("run-detail", pk=run.pk)
        status = 400
    else:
        clone = TrainingRun.objects.filter(pk=request.GET.get("clone") or 0).first()
        if clone:
            form = RunForm.filled_with(clone_request(clone))
        else:
            suggested, base = _suggested(request.GET.get("base_model"))
            form = RunForm(initial={"base_model": base}, suggested=suggested)
        status = 200
        if request.htmx:  # type: ignore[attr-defined]
            return render(request, "training/partials/train_fields.html", {"form": form})
    return render(request, "training/run_new.html", {"form": form}, status=status)


def _chart_context(run: TrainingRun) -> dict[str, Any]:
    return {"charts": run_charts(run.metric_points)}


def _status_context(run: TrainingRun) -> dict[str, Any]:
    adapter = Adapter.objects.filter(run=run).first()
    checkpoints = run_checkpoints(run)
    return {"run": run, "adapter": adapter, "memory": _memory_context(adapter), "checkpoints": checkpoints.kept,
            "checkpoints_removed": checkpoints.removed, **_chart_context(run)}


def _memory_context(adapter: Adapter | None) -> dict[str, Any] | None:
    """Measured GPU peak next to what the plan estimated, once a GPU run has finished."""
    metrics = adapter.metrics if adapter else {}
    if not metrics.get("peak_memory_reserved"):
        return None
    plan = metrics.get("plan") or {}
    return {
        "measured": metrics["peak_memory_reserved"],
        "allocated": metrics.get("peak_memory_allocated"),
        "estimated": plan.get("estimate_bytes"),
        "plan": plan,
    }


@login_required
def run_detail(request: HttpRequest, pk: int) -> HttpResponse:
    run = _run_for(request, pk)
    if request.htmx and request.GET.get("part") == "actions":  # type: ignore[attr-defined]
        return render(request, "training/partials/run_actions.html", {"run": run, "can_act": _can_act(request, run)})
    if request.htmx:  # type: ignore[attr-defined]
        return render(request, "training/partials/run_status.html", _status_context(run))
    events = _latest_first(run.pk)
    tail = list(events.exclude(kind="metric")[:LOG_TAIL])[::-1]
    last_id = events.values_list("id", flat=True).first() or 0
    context = {
        **_status_context(run), "log_lines": [log_line(e) for e in tail], "last_event_id": last_id,
        "can_act": _can_act(request, run),
    }
    return render(request, "training/run_detail.html", context)


@login_required
def run_status(request: HttpRequest, pk: int) -> HttpResponse:
    return render(request, "training/partials/run_status.html", _status_context(_run_for(request, pk)))


@login_required
@require_POST
def run_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    run = _run_for(request, pk)
    _check_can_act(request, run)
    outcome = ledger.request_cancel(run)
    if not outcome:
        messages.warning(request, f"The run is already {run.state}.")
    elif outcome == "cancelled":
        messages.info(request, "Cancelled before it started.")
    # A running run's pending cancel is said by its status panel, which the live stream replaces when the
    # run stops: a flash message would stay on the page after the run is cancelled.
    return redirect("run-detail", pk=run.pk)


@login_required
@require_POST
def run_retry(request: HttpRequest, pk: int) -> HttpResponse:
    run = _run_for(request, pk)
    _check_can_act(request, run)
    if ledger.retry(run, request.user):
        messages.info(request, "Queued again: the next attempt resumes from the latest checkpoint.")
    else:
        messages.warning(request, f"Only a failed or cancelled run can be retried; this one is {run.state}.")
    return redirect("run-detail", pk=run.pk)


@login_required
def run_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """GET lists what the deletion removes (with the files' sizes) and what it keeps; POST deletes. The rules,
    shared with the API, are in training.deletion."""
    run = _run_for(request, pk)
    _check_can_act(request, run)
    if request.method != "POST":
        return render(request, "training/run_delete.html", {"run": run, "deletion": deletion.plan(run)})
    try:
        gone = deletion.delete_run(run)
    except deletion.DeleteRefused as refused:
        messages.warning(request, f"{run} was not deleted: {refused.message}.")
        return redirect("runs") if refused.status == 404 else redirect("run-detail", pk=run.pk)
    messages.info(request, f"Deleted {run}: {size(gone.freed_bytes)} freed in the artifact store.")
    return redirect("runs")


@login_required
def adapter_download(request: HttpRequest, pk: int) -> FileResponse:
    adapter = Adapter.objects.filter(run_id=pk).first()
    if adapter is None:
        raise Http404("this run has no adapter")
    archive = ArtifactStore(settings.ARTIFACT_STORE).zip_dir(adapter.uri)
    return FileResponse(archive.open("rb"), as_attachment=True, filename=f"tunedeck-run-{pk}-adapter.zip")


def _sse(event: str, data: str, event_id: int | None = None) -> str:
    lines = [f"event: {event}"] + ([f"id: {event_id}"] if event_id is not None else [])
    # split("\n"), not splitlines(): a trailing newline of streamed text must survive ("6\n" -> "data: 6", "data: ")
    lines += [f"data: {line}" for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(lines) + "\n\n"


def _cursor(request: HttpRequest) -> int:
    """Resume after the Last-Event-ID header (a native reconnect) or ?after= (a new connection)."""
    values = [request.headers.get("Last-Event-ID", ""), request.GET.get("after", "")]
    # Only ASCII digits: str.isdigit() also accepts "²" and other digits int() refuses.
    return max((int(v) for v in values if v.strip().isascii() and v.strip().isdigit()), default=0)


def log_line(event: RunEvent) -> str:
    """One log line's HTML, the message escaped. Built in Python, not a template include: the run page
    renders hundreds of them and the stream one per event."""
    when = timezone.localtime(event.created_at)
    kind, level, message = (html.escape(str(v)) for v in (event.kind, event.level, event.message))
    return mark_safe(  # every value from the event is escaped on the line above; the id is an int
        f'<div class="line kind-{kind} {level}" id="ev-{int(event.id)}"><time datetime="{when.isoformat()}">'
        f'{when.strftime("%H:%M:%S")}</time> {message}</div>'
    )


def _latest_first(run_id: int) -> Any:
    """A run's events, newest first, read backwards along the (run, id) index.

    The run is matched as a range, not with =: for an equality PostgreSQL drops run_id from the
    ordering and may walk the whole primary key backwards instead (330 ms on a 1M-event table for a
    run whose events are old; 0.3 ms this way)."""
    return RunEvent.objects.filter(run_id__gte=run_id, run_id__lte=run_id).order_by("-run_id", "-id")


def _next_batch(run_id: int, after: int, known_state: str | None = None) -> tuple[list[str], int, str, bool]:
    """Rendered SSE messages after the cursor, the new cursor, the run's state, whether it is final.

    The status panel (charts, progress) is re-rendered only when metrics came or the state changed:
    a burst of log lines costs one indexed query per poll, not a panel per line."""
    events = list(RunEvent.objects.filter(run_id=run_id, id__gt=after).order_by("id")[:500])
    out, saw_metric = [], False
    for event in events:
        if event.kind == "metric":
            saw_metric = True
            out.append(_sse("tick", "", event.id))  # advances the client's cursor past metric rows too
        else:
            out.append(_sse("log", log_line(event), event.id))
        after = event.id
    state = TrainingRun.objects.filter(pk=run_id).values_list("state", flat=True).first()
    if state is None:  # deleted while streaming
        return out, after, "deleted", True
    final = state in ("succeeded", "failed", "cancelled") and len(events) < 500
    if saw_metric or final or state != known_state:
        run = TrainingRun.objects.select_related("worker").get(pk=run_id)
        out.append(_sse("status", render_to_string("training/partials/run_status.html", _status_context(run))))
    return out, after, state, final


async def event_stream(next_batch: Any, model: Any, job_id: int, after: int) -> AsyncIterator[str]:
    """The SSE loop of a job's page: `next_batch(job_id, after, state)` returns (messages, cursor, state, final).

    An open stream holds no database connection: it gives back its request's before the first message, and
    reads only when the process's feed saw the job change (training/live.py), each read on a pooled
    connection given back at once, in the shared thread pool. A ping keeps proxies from closing a quiet
    stream; "done" ends it. A database that went away ends it too: the client reconnects, and is answered
    503 until the database is back."""
    await sync_to_async(connections.close_all)()  # the request's own: its session, key and job lookups
    yield "retry: 2000\n\n"
    poll = sync_to_async(released(next_batch), thread_sensitive=False)
    state: str | None = None
    async with feed_for(model).watch(job_id, after) as watch:
        while True:
            watch.changed.clear()
            try:
                messages_, after, state, final = await poll(job_id, after, state)
            except DatabaseError as exc:
                if not database_unavailable(exc):
                    raise
                log.warning("stream of %s %s ended: %s", model.__name__, job_id, exc)
                return
            watch.read(state, after)
            for message in messages_:
                yield message
            if final:
                yield _sse("done", "")
                return
            try:
                await asyncio.wait_for(watch.changed.wait(), STREAM_PING_S)
            except TimeoutError:
                yield ": ping\n\n"


def sse_response(stream: AsyncIterator[str]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(stream, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


async def run_stream(request: HttpRequest, pk: int) -> HttpResponseBase:
    user = await request.auser()
    if not user.is_authenticated:
        return HttpResponse("login required", status=401)
    if not await TrainingRun.objects.filter(pk=pk).aexists():
        raise Http404("no such run")
    return sse_response(event_stream(_next_batch, TrainingRun, pk, _cursor(request)))


@login_required
def adapters_list(request: HttpRequest) -> HttpResponse:
    adapters = (
        Adapter.objects.select_related("base_model", "owner", "run__dataset", "run__lora_config")
        .prefetch_related("parent_links__parent")
        .order_by("-id")
    )
    page = Paginator(adapters, ADAPTERS_PER_PAGE).get_page(request.GET.get("page"))
    for adapter in page.object_list:
        adapter.eval_loss = adapter.metrics.get("eval_loss") if isinstance(adapter.metrics, dict) else None
    return render(request, "training/adapters.html", {"adapters": page.object_list, "page": page})
