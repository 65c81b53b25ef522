from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import F
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_POST

from webapp.catalog.demo import DEMO_MODEL
from webapp.catalog.models import BaseModel
from webapp.ids import whole
from webapp.jobs import views as jobs
from webapp.jobs.downloads import zip_response
from webapp.jobs.models import ACTIVE_STATES, RunState
from webapp.jobs.stream import batch_reader
from webapp.training.charts import run_charts
from webapp.training.checkpoints import run_checkpoints
from webapp.training.estimates import estimate_run, estimated_vs_measured
from webapp.training.estimates import run_estimate as estimate_for_form
from webapp.training.forms import RUN_SORTS, RunFilterForm, RunForm, obvious_choice
from webapp.training.models import Adapter, TrainingRun
from webapp.training.organise import filter_labels
from webapp.training.services import RunRefused, clone_request, queue_run
from webapp.training.tracking import trackers_with_files, tracking_folder
from workers.contract.spec import applies_to, suggest_train_params
from workers.contract.store import ArtifactStore

RUNS_PER_PAGE = 50
ADAPTERS_PER_PAGE = 50
# A runs list page keeps polling its rows while one of these can still change on its own.
LIVE_STATES = (RunState.QUEUED, *ACTIVE_STATES)
RUN_COLUMNS = [("created", "Created"), ("name", "Name"), ("state", "State"), ("step", "Progress"), ("loss", "Loss")]


def _run_for(request: HttpRequest, pk: int) -> TrainingRun:
    """Runs are visible to the whole team; only the owner or staff may act on one (see jobs.check_can_act)."""
    return get_object_or_404(TrainingRun.objects.select_related(
        "base_model", "dataset", "eval_dataset", "lora_config", "owner", "worker", "init_adapter"), pk=pk)


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
            .defer(*LIST_DEFERRED).prefetch_related("tags")
            .order_by(*_run_ordering(sort, descending)))
    tags = request.GET.getlist("tag")
    runs = filter_labels(runs, tags, getattr(form, "cleaned_data", {}).get("q", ""))
    page = Paginator(runs, RUNS_PER_PAGE).get_page(request.GET.get("page"))
    context = {"form": form, "page": page, "runs": page.object_list, "headers": _sort_headers(sort), "tags": tags,
               "live": any(run.state in LIVE_STATES for run in page.object_list)}
    template = "training/partials/runs_rows.html" if request.htmx else "training/runs_list.html"  # type: ignore[attr-defined]
    return render(request, template, context)


def _suggested(base_model_id: Any) -> Any:
    pk = whole(base_model_id)
    base = BaseModel.objects.filter(pk=pk).first() if pk is not None else None
    base = base or obvious_choice(BaseModel.objects.all(), DEMO_MODEL) or BaseModel.objects.first()
    return suggest_train_params(base.num_parameters if base else None), base


@login_required
def run_new(request: HttpRequest) -> HttpResponse:
    refused: list[str] = []
    if request.method == "POST":
        form = RunForm(request.POST)
        if form.is_valid() and form.run_request is not None:
            try:
                run = queue_run(request.user, form.run_request)
            except RunRefused as refusal:
                form.show_refusals(refusal.errors)
            else:
                _record_estimate(run)
                return redirect("run-detail", pk=run.pk)
        status = 400
    else:
        clone = TrainingRun.objects.filter(pk=request.GET.get("clone") or 0).first()
        form, refused = _new_run_form(request, clone)
        status = 200
        if request.htmx:  # type: ignore[attr-defined]
            # The base model changed: its suggested settings, and (out of band) the adapters it can start from.
            return render(request, "training/partials/base_fields.html", {"form": form})
    return render(request, "training/run_new.html", {"form": form, "refused": refused}, status=status)


def _record_estimate(run: TrainingRun) -> None:
    """What the page estimated for the run as queued, kept to set beside what it measures."""
    found = estimate_run(run.base_model, run.dataset, run.lora_config, run.train_params(), run.needs_labels)
    TrainingRun.objects.filter(pk=run.pk).update(estimates=found.stored())


@login_required
@require_POST
def run_estimate(request: HttpRequest) -> HttpResponse:
    """The New run page's estimate panel for what its form holds so far (htmx posts the form as it changes)."""
    return render(request, "training/partials/run_estimate.html", {"estimate": estimate_for_form(RunForm(request.POST))})


def _new_run_form(request: HttpRequest, clone: TrainingRun | None) -> tuple[RunForm, list[str]]:
    """The New run page's form: a clone's inputs, or the base's suggestions; and why a clone could not be made."""
    if clone:
        try:
            return RunForm.filled_with(clone_request(clone)), []
        except RunRefused as refused:
            suggested, base = _suggested(clone.base_model_id)
            reasons = [message for messages in refused.errors.values() for message in messages]
            return RunForm(initial={"base_model": base}, suggested=suggested), reasons
    suggested, base = _suggested(request.GET.get("base_model"))
    # Other fields given in the query string (e.g. a dataset made from votes, its objective) are shown filled.
    return RunForm(initial={**request.GET.dict(), "base_model": base}, suggested=suggested), []


def _chart_context(run: TrainingRun) -> dict[str, Any]:
    return {"charts": run_charts(run.metric_points)}


def _status_context(run: TrainingRun) -> dict[str, Any]:
    adapter = Adapter.objects.filter(run=run).first()
    checkpoints = run_checkpoints(run)
    return {"run": run, "adapter": adapter, "memory": _memory_context(adapter), "checkpoints": checkpoints.kept,
            "checkpoints_removed": checkpoints.removed, "tracker_files": trackers_with_files(run)}


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
        return render(request, "training/partials/run_actions.html", {"run": run, "can_act": jobs.can_act(request, run)})
    if request.htmx:  # type: ignore[attr-defined]
        return render(request, "training/partials/run_status.html", _status_context(run))
    context = {**_status_context(run), **_chart_context(run), **jobs.log_tail(run), "can_act": jobs.can_act(request, run),
               "settings": _settings_used(run.hyperparameters or {})}
    context["estimated"] = estimated_vs_measured(run, context["adapter"])
    return render(request, "training/run_detail.html", context)


def _settings_used(hyperparameters: dict[str, Any]) -> list[tuple[str, Any]]:
    """The run's settings but those of other objectives than its own (it trained with their defaults)."""
    objective = str(hyperparameters.get("objective", "sft"))
    return [(name, value) for name, value in hyperparameters.items() if applies_to(name, objective)]


@login_required
def run_status(request: HttpRequest, pk: int) -> HttpResponse:
    return render(request, "training/partials/run_status.html", _status_context(_run_for(request, pk)))


@login_required
@require_POST
def run_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    return jobs.cancel(request, _run_for(request, pk), "run-detail")


@login_required
@require_POST
def run_pause(request: HttpRequest, pk: int) -> HttpResponse:
    return jobs.pause(request, _run_for(request, pk), "run-detail")


@login_required
@require_POST
def run_resume(request: HttpRequest, pk: int) -> HttpResponse:
    return jobs.resume(request, _run_for(request, pk), "run-detail")


@login_required
@require_POST
def run_retry(request: HttpRequest, pk: int) -> HttpResponse:
    return jobs.retry(request, _run_for(request, pk), "run-detail")


@login_required
@require_POST
def run_reorder(request: HttpRequest, pk: int) -> HttpResponse:
    return jobs.reorder(request, get_object_or_404(TrainingRun, pk=pk), "run-detail")


@login_required
def adapter_download(request: HttpRequest, pk: int) -> FileResponse:
    adapter = Adapter.objects.filter(run_id=pk).first()
    if adapter is None:
        raise Http404("this run has no adapter")
    archive = ArtifactStore(settings.ARTIFACT_STORE).zip_dir(adapter.uri)
    return FileResponse(archive.open("rb"), as_attachment=True, filename=f"tunedeck-run-{pk}-adapter.zip")


@login_required
def tracking_download(request: HttpRequest, pk: int) -> HttpResponseBase:
    """The run's trackers' files as a zip (TensorBoard: `tensorboard --logdir` on the unpacked tensorboard/)."""
    folder = tracking_folder(get_object_or_404(TrainingRun, pk=pk))
    if not folder.is_dir():
        raise Http404("this run has no tracker files")
    return zip_response(folder, f"tunedeck-run-{pk}-tracking.zip")


def run_status_html(run: Any) -> str:
    return render_to_string("training/partials/run_status.html", _status_context(run))


# The run page's stream: its log lines, and its status panel (charts, progress) when metrics came or the
# state changed.
next_batch = batch_reader(TrainingRun, jobs.log_message, run_status_html, related=("worker",))


async def run_stream(request: HttpRequest, pk: int) -> HttpResponseBase:
    return await jobs.stream(request, TrainingRun, pk, next_batch)


@login_required
def adapters_list(request: HttpRequest) -> HttpResponse:
    adapters = (
        Adapter.objects.select_related("base_model", "owner", "run__dataset", "run__lora_config")
        .prefetch_related("parent_links__parent", "tags")
        .order_by("-id")
    )
    tags, q = request.GET.getlist("tag"), request.GET.get("q", "")[:200]
    adapters = filter_labels(adapters, tags, q)
    page = Paginator(adapters, ADAPTERS_PER_PAGE).get_page(request.GET.get("page"))
    for adapter in page.object_list:
        adapter.eval_loss = adapter.metrics.get("eval_loss") if isinstance(adapter.metrics, dict) else None
    return render(request, "training/adapters.html", {"adapters": page.object_list, "page": page, "tags": tags, "q": q})
