from __future__ import annotations

import html
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import transaction
from django.db.models import Max
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_POST

from webapp.catalog.models import Dataset
from webapp.fleet.scheduler import runtime_workers
from webapp.ids import whole
from webapp.jobs import views as job_views
from webapp.jobs.downloads import zip_response
from webapp.jobs.stream import batch_reader, sse
from webapp.playground import deletion, services, thumbs, votedata, votes
from webapp.playground.forms import (
    CombineForm,
    CompareForm,
    EvaluateForm,
    ExportForm,
    MergeForm,
    PushForm,
    VllmExportForm,
)
from webapp.playground.kinds import JobKind
from webapp.playground.models import AdapterJob, Comparison, JobEvent, MergedModel, PromptSet
from webapp.training.models import Adapter, TrainingRun
from workers.contract import jobspecs
from workers.contract.store import ArtifactStore
from workers.formatting import size

MERGED_PER_PAGE = 50


def _store() -> ArtifactStore:
    return ArtifactStore(settings.ARTIFACT_STORE)


def _check_can_act(request: HttpRequest, owner_id: int | None) -> None:
    user = request.user
    if not (user.is_staff or owner_id == user.pk):  # type: ignore[union-attr]
        raise PermissionDenied("only its owner or an admin can do this")


def _selected_ids(request: HttpRequest) -> list[int]:
    return [pk for pk in (whole(v) for v in request.GET.getlist("adapters")) if pk is not None]


def _form_errors(form: Any, error: services.JobError) -> None:
    for name, message in error.errors.items():
        form.add_error(name if name in form.fields else None, message)


# --- adapters -----------------------------------------------------------------------------------------


@login_required
def adapter_detail(request: HttpRequest, pk: int) -> HttpResponse:
    adapter = get_object_or_404(Adapter.objects.select_related("base_model", "owner", "run__dataset", "run__lora_config"), pk=pk)
    context = {
        "adapter": adapter,
        "parents": adapter.parent_links.select_related("parent"),
        "children": adapter.children.all(),
        "merged": adapter.merged_models.select_related("job"),
        "jobs": adapter.jobs.select_related("owner").order_by("-id")[:20],
        "merge_form": MergeForm(),
        "export_form": ExportForm(),
        "vllm_form": VllmExportForm(),
        "vllm_workers": runtime_workers("vllm"),
        "push_form": PushForm() if settings.HF_TOKEN else None,
        "can_act": request.user.is_staff or adapter.owner_id == request.user.pk,  # type: ignore[union-attr]
    }
    return render(request, "playground/adapter_detail.html", context)


@login_required
def adapter_zip(request: HttpRequest, pk: int) -> HttpResponseBase:
    adapter = get_object_or_404(Adapter, pk=pk)
    folder = _store().path(adapter.uri)
    if not folder.is_dir():
        raise Http404("the adapter's files are missing from the artifact store")
    return zip_response(folder, f"tunedeck-adapter-{adapter.pk}.zip")


@login_required
@require_POST
def adapter_merge(request: HttpRequest, pk: int) -> HttpResponse:
    adapter = get_object_or_404(Adapter.objects.select_related("base_model"), pk=pk)
    form = MergeForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Merge refused: {form.errors.as_text()}")
        return redirect("adapter-detail", pk=pk)
    try:
        job = services.start_merge(request.user, adapter, form.cleaned_data["dtype"])
    except services.JobError as exc:
        messages.error(request, f"Merge refused: {exc}")
        return redirect("adapter-detail", pk=pk)
    return redirect("job-detail", pk=job.pk)


@login_required
@require_POST
def adapter_export(request: HttpRequest, pk: int) -> HttpResponse:
    adapter = get_object_or_404(Adapter.objects.select_related("base_model"), pk=pk)
    vllm = request.POST.get("target") == "vllm"
    form = VllmExportForm(request.POST) if vllm else ExportForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Export refused: {form.errors.as_text()}")
        return redirect("adapter-detail", pk=pk)
    data = form.cleaned_data
    try:
        if vllm:
            job = services.start_export(request.user, adapter, data["form"], data["name"], target="vllm",
                                        check_prompts=data["check_prompts"], max_new_tokens=data["max_new_tokens"])
        else:
            job = services.start_export(request.user, adapter, data["form"], data["name"], data["quantize"],
                                        data["system"], data["base_name"])
    except services.JobError as exc:
        messages.error(request, f"Export refused: {exc}")
        return redirect("adapter-detail", pk=pk)
    return redirect("job-detail", pk=job.pk)


@login_required
@require_POST
def adapter_push(request: HttpRequest, pk: int) -> HttpResponse:
    adapter = get_object_or_404(Adapter.objects.select_related("base_model"), pk=pk)
    _check_can_act(request, adapter.owner_id)
    form = PushForm(request.POST)
    merged_id = request.POST.get("merged")
    source = adapter.uri
    if merged_id:
        source = get_object_or_404(MergedModel, pk=merged_id, adapter=adapter).uri
    try:
        if not form.is_valid():
            raise services.JobError({k: " ".join(v) for k, v in form.errors.items()})
        job = services.start_push(request.user, adapter, source, form.cleaned_data["repo_id"], form.cleaned_data["private"])
    except services.JobError as exc:
        messages.error(request, f"Push refused: {exc}")
        return redirect("adapter-detail", pk=pk)
    return redirect("job-detail", pk=job.pk)


@login_required
def combine_new(request: HttpRequest) -> HttpResponse:
    form = CombineForm(request.POST or None, initial={"adapters": _selected_ids(request)})
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            job = services.start_combine(
                request.user, list(data["adapters"]), data["weights"], data["combination_type"],
                density=data["density"], majority_sign_method=data["majority_sign_method"],
                svd_rank=data["svd_rank"], name=data["name"],
            )
        except services.JobError as exc:
            _form_errors(form, exc)
        else:
            return redirect("job-detail", pk=job.pk)
    return render(request, "playground/combine_new.html", {"form": form})


# --- runs ----------------------------------------------------------------------------------------------


@login_required
def run_delete(request: HttpRequest, pk: int) -> HttpResponse:
    """GET lists what the deletion removes (with the files' sizes) and what it keeps; POST deletes. The rules,
    shared with the API, are in playground.deletion (a run's deletion reaches its adapter's jobs)."""
    run = get_object_or_404(TrainingRun.objects.select_related(
        "base_model", "dataset", "eval_dataset", "lora_config", "owner", "worker"), pk=pk)
    job_views.check_can_act(request, run)
    if request.method != "POST":
        return render(request, "training/run_delete.html", {"run": run, "deletion": deletion.plan(run)})
    try:
        gone = deletion.delete_run(run)
    except deletion.DeleteRefused as refused:
        messages.warning(request, f"{run} was not deleted: {refused.message}.")
        return redirect("runs") if refused.status == 404 else redirect("run-detail", pk=run.pk)
    messages.info(request, f"Deleted {run}: {size(gone.freed_bytes)} freed in the artifact store.")
    return redirect("runs")


# --- merged models --------------------------------------------------------------------------------------


@login_required
def merged_models(request: HttpRequest) -> HttpResponse:
    """Every merged model and export, newest first: its adapter, dtype, check, size and download."""
    rows = MergedModel.objects.select_related("adapter__base_model", "job__owner").order_by("-id")
    page = Paginator(rows, MERGED_PER_PAGE).get_page(request.GET.get("page"))
    return render(request, "playground/merged_models.html", {"merged": page.object_list, "page": page})


@login_required
def merged_zip(request: HttpRequest, pk: int) -> HttpResponseBase:
    merged = get_object_or_404(MergedModel, pk=pk)
    folder = _store().path(merged.uri)
    if not folder.is_dir():
        raise Http404("the merged model's files are missing from the artifact store")
    return zip_response(folder, f"tunedeck-merged-{merged.pk}.zip")


@login_required
def merged_file(request: HttpRequest, pk: int, name: str) -> FileResponse:
    """One file of a merged model or export (a shard, the config, the Modelfile, adapter/...), for tools that fetch
    files one by one."""
    merged = get_object_or_404(MergedModel, pk=pk)
    folder = _store().path(merged.uri).resolve()
    target = (folder / name).resolve()
    if "\\" in name or not target.is_relative_to(folder) or not target.is_file():
        raise Http404("no such file in this merged model")
    return FileResponse(target.open("rb"), as_attachment=True, filename=target.name)


def merged_files(merged: MergedModel) -> list[dict[str, Any]]:
    """Every file of the folder, by its path in it (an adapter-form export keeps the adapter in adapter/)."""
    folder = _store().path(merged.uri)
    if not folder.is_dir():
        return []
    return [{"name": f.relative_to(folder).as_posix(), "size": f.stat().st_size}
            for f in sorted(folder.rglob("*")) if f.is_file()]


# --- comparisons ----------------------------------------------------------------------------------------


@login_required
def comparisons(request: HttpRequest) -> HttpResponse:
    rows = Comparison.objects.select_related("owner", "base_model", "prompt_set", "job").order_by("-id")[:100]
    prompt_sets = PromptSet.objects.select_related("owner").order_by("-id")[:100]
    return render(request, "playground/comparisons.html", {"comparisons": rows, "prompt_sets": prompt_sets})


def _compare_initial(request: HttpRequest) -> dict[str, Any]:
    initial: dict[str, Any] = {"adapters": _selected_ids(request)}
    source = Comparison.objects.filter(pk=request.GET.get("from") or 0).select_related("job").first()
    if source is not None:  # re-run a saved comparison: same prompts and settings, adapters to choose
        initial.update(source.generation, prompt_set=source.prompt_set_id, include_base=source.include_base,
                       name=f"{source} (again)")
        if source.job:
            initial["base_precision"] = source.job.params.get("base_precision", "auto")
        if not initial["adapters"] and source.job:
            initial["adapters"] = list(source.job.adapters.values_list("pk", flat=True))
    prompt_set = whole(request.GET.get("prompt_set"))
    if prompt_set is not None:
        initial["prompt_set"] = prompt_set
    return initial


@login_required
def compare_new(request: HttpRequest) -> HttpResponse:
    form = CompareForm(request.POST or None, initial=_compare_initial(request))
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            with transaction.atomic():
                prompt_set = data["prompt_set"] or _new_prompt_set(request, data)
                comparison = services.start_compare(
                    request.user, prompt_set, data["adapters"], form.generation(),
                    include_base=data["include_base"], name=data["name"], base_precision=data["base_precision"],
                )
        except services.JobError as exc:
            _form_errors(form, exc)
        else:
            return redirect("comparison-detail", pk=comparison.pk)
    return render(request, "playground/compare_new.html", {"form": form})


def _new_prompt_set(request: HttpRequest, data: dict[str, Any]) -> PromptSet:
    if data.get("dataset"):
        rows = services.dataset_prompts(data["dataset"], data.get("dataset_rows") or 32)
        default_name = f"{len(rows)} rows of {data['dataset']}"
    else:
        rows = services.parse_prompts(data["prompts"])
        default_name = f"{len(rows)} prompts"
    return PromptSet.objects.create(
        name=data.get("prompt_set_name") or default_name, owner=request.user, rows=rows, source_dataset=data.get("dataset")
    )


def grid(comparison: Comparison) -> tuple[list[dict[str, Any]], int]:
    """Rows of the grid with every column's text so far, and the event id they include (the stream's cursor).

    Read under the comparison's row lock, which the worker API's fold also takes, so the texts and
    the cursor agree: nothing streamed twice, nothing missed."""
    with transaction.atomic():
        Comparison.objects.select_for_update().filter(pk=comparison.pk).first()
        cells = {(c.row, c.column): c for c in comparison.cells.all()}
        last = JobEvent.objects.filter(job_id=comparison.job_id).aggregate(last=Max("id"))["last"] or 0
    columns = comparison.columns()
    rows = []
    for index, prompt in enumerate(comparison.prompt_set.rows):
        rows.append({
            "index": index,
            "prompt": prompt.get("prompt", ""),
            "reference": prompt.get("reference", ""),
            "cells": [{"key": key, "label": label, "cell": cells.get((index, key))} for key, label in columns],
        })
    return rows, last


@login_required
def comparison_detail(request: HttpRequest, pk: int) -> HttpResponse:
    comparison = get_object_or_404(Comparison.objects.select_related("owner", "base_model", "prompt_set", "job"), pk=pk)
    rows, last = grid(comparison)
    context = {
        "comparison": comparison,
        "job": comparison.job,
        "columns": comparison.columns(),
        "rows": rows,
        "last_event_id": last,
        "win_rates": comparison.win_rates(),
        "base_precision": loaded_base(comparison.job),
        "vote_count": comparison.votes.count(),
        "my_votes": comparison.votes.filter(user=request.user).count(),
        "open": votes.is_open(comparison),
        **training_data(comparison),
    }
    if context["open"]:
        given = thumbs.tallies(comparison, request.user)
        for row in rows:
            for c in row["cells"]:
                c["thumbs"] = given.get((row["index"], c["key"]), {"up": 0, "down": 0, "mine": None})
    return render(request, "playground/comparison_detail.html", context)


def training_data(comparison: Comparison) -> dict[str, Any]:
    """What the comparison's votes and thumbs would give as datasets, and the datasets made from it so far."""
    if not votes.is_open(comparison):
        return {"made": []}
    _, pairs = votedata.preference_rows(comparison)
    _, feedback = votedata.feedback_rows(comparison)
    return {"pairs": pairs, "feedback": feedback,
            "made": comparison.datasets.select_related("dataset", "comparison").order_by("-id")}


@login_required
@require_POST
def comparison_thumb(request: HttpRequest, pk: int) -> HttpResponse:
    """Thumbs up or down on one output of the grid (`value` up, down or none); htmx swaps the cell's buttons."""
    comparison = get_object_or_404(Comparison.objects.select_related("prompt_set", "job", "base_model"), pk=pk)
    try:
        thumbs.give(comparison, request.user, request.POST.get("row", ""), request.POST.get("column", ""),
                    request.POST.get("value", ""))
    except votes.VoteRefused as refused:
        text = f"{refused.field}: {refused.message}" if refused.field else refused.message
        return HttpResponse(html.escape(text), status=refused.status)
    if not request.htmx:  # type: ignore[attr-defined]
        return redirect("comparison-detail", pk=comparison.pk)
    row, column = int(request.POST["row"]), request.POST["column"]
    context = {"comparison": comparison, "row_index": row, "column": column,
               "thumbs": thumbs.tally(comparison, request.user, row, column)}
    return render(request, "playground/partials/thumbs.html", context)


@login_required
@require_POST
def comparison_to_dataset(request: HttpRequest, pk: int) -> HttpResponse:
    """Make a preference dataset of the votes (or a feedback dataset of the thumbs), then show it with where it
    came from (the rules are in playground.votedata, shared with the API)."""
    comparison = get_object_or_404(Comparison.objects.select_related("prompt_set", "job", "base_model"), pk=pk)
    try:
        source = votedata.make_dataset(comparison, request.user, request.POST.get("kind", ""),
                                       request.POST.get("name", ""))
    except votedata.DatasetRefused as refused:
        messages.error(request, f"No dataset made: {refused.field + ': ' if refused.field else ''}{refused.message}")
        return redirect("comparison-detail", pk=comparison.pk)
    messages.success(request, f"Made {source.dataset}: {source.summary}.")
    return redirect("dataset-detail", pk=source.dataset_id)


@login_required
def comparison_vote(request: HttpRequest, pk: int) -> HttpResponse:
    """Blind voting: each row's outputs in an order shuffled per voter, names hidden until the row is voted
    (the rules, shared with the API, are in playground.votes)."""
    comparison = get_object_or_404(Comparison.objects.select_related("prompt_set", "job", "base_model"), pk=pk)
    if request.method == "POST":
        return _cast_vote(request, comparison)
    context = {"comparison": comparison, "rows": votes.ballot(comparison, request.user), "ready": votes.is_open(comparison)}
    return render(request, "playground/comparison_vote.html", context)


def _cast_vote(request: HttpRequest, comparison: Comparison) -> HttpResponse:
    try:
        # The page posts the option letter of the voter's own ballot, never a column key: the page's source
        # must not say which output is whose.
        row = votes.check_row(comparison, request.POST.get("row", ""))
        choice = votes.key_of_option(comparison, request.user.pk, row, request.POST.get("choice", ""))
        vote = votes.cast(comparison, request.user, row, choice)
    except votes.VoteRefused as refused:
        text = f"{refused.field}: {refused.message}" if refused.field else refused.message
        return HttpResponse(html.escape(text), status=refused.status)
    context = {"comparison": comparison, "row": votes.ballot(comparison, request.user, [vote.row])[0]}
    if request.htmx:  # type: ignore[attr-defined]
        return render(request, "playground/partials/vote_row.html", context)
    return redirect("comparison-vote", pk=comparison.pk)


@login_required
def dataset_file(request: HttpRequest, pk: int) -> FileResponse:
    """A dataset's stored file as it was validated (a dataset made from votes is a JSONL file like an upload)."""
    dataset = get_object_or_404(Dataset, pk=pk)
    path = _store().path(dataset.uri)
    if not path.is_file():
        raise Http404("the dataset's file is missing from the artifact store")
    return FileResponse(path.open("rb"), as_attachment=True, filename=path.name.split("-", 1)[-1])


# --- evaluations ----------------------------------------------------------------------------------------


@login_required
def evaluate_new(request: HttpRequest) -> HttpResponse:
    form = EvaluateForm(request.POST or None, initial={"adapters": _selected_ids(request)})
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            job = services.start_evaluate(
                request.user, list(data["adapters"]), dataset=data["dataset"], held_out_of=data["held_out_of"],
                include_base=data["include_base"], max_rows=data["max_rows"],
                generation=jobspecs.GenerationParams(max_new_tokens=data["max_new_tokens"]),
            )
        except services.JobError as exc:
            _form_errors(form, exc)
        else:
            return redirect("job-detail", pk=job.pk)
    return render(request, "playground/evaluate_new.html", {"form": form})


SCORE_METRICS = [
    ("loss", "Loss on references", False),
    ("perplexity", "Perplexity", False),
    ("exact_match", "Exact match", True),
    ("rouge_l", "ROUGE-L F1", True),
]


def evaluation_table(job: AdapterJob) -> dict[str, Any] | None:
    """Scores per column, and for each metric bars scaled to its best value (plotted as CSS bars)."""
    result = job.result or {}
    scores = result.get("scores") or {}
    if not scores:
        return None
    labels = {jobspecs.BASE_KEY: f"{job.base_model} (base)"}
    labels.update({a["key"]: a["label"] for a in job.params.get("adapters", [])})
    columns = [c for c in result.get("columns", list(scores)) if c in scores]
    metrics = []
    for key, title, higher_is_better in SCORE_METRICS:
        values = [scores[c].get(key) for c in columns]
        numbers = [v for v in values if isinstance(v, (int, float))]
        if not numbers:
            continue
        top = max(numbers) or 1.0
        best = max(numbers) if higher_is_better else min(numbers)
        metrics.append({
            "key": key, "title": title, "higher_is_better": higher_is_better,
            "bars": [
                {"label": labels.get(c, c), "value": v, "pct": round(100 * v / top, 1) if isinstance(v, (int, float)) and top else 0,
                 "best": v == best}
                for c, v in zip(columns, values, strict=True)
            ],
        })
    rows = [{"label": labels.get(c, c), **scores[c]} for c in columns]
    return {"metrics": metrics, "rows": rows, "samples": result.get("samples", [])[:20], "labels": labels, "columns": columns}


# --- jobs -----------------------------------------------------------------------------------------------


@login_required
def jobs(request: HttpRequest) -> HttpResponse:
    kind = request.GET.get("kind", "")
    rows = AdapterJob.objects.select_related("owner", "base_model", "worker").order_by("-id")
    if kind in JobKind.values:
        rows = rows.filter(kind=kind)
    return render(request, "playground/jobs.html", {"jobs": rows[:200], "kind": kind, "kinds": JobKind.choices})


def loaded_base(job: AdapterJob | None) -> dict[str, str] | None:
    """A compare or evaluate job's base precision for its page: what the worker loaded (else what the choice
    resolved to), and the choice."""
    precision = job.base_precision() if job is not None else None
    if precision is None:
        return None
    if precision["used"]:
        loaded = precision["used"]
    elif precision["quantization"] != "none":
        loaded = precision["quantization"]
    elif precision["compute_dtype"] != "auto":
        loaded = precision["compute_dtype"]
    else:
        loaded = "unquantized, in the worker's compute dtype"
    return {"loaded": loaded, "chosen": precision["chosen"]}


def _job_context(job: AdapterJob) -> dict[str, Any]:
    context: dict[str, Any] = {"job": job, "base_precision": loaded_base(job)}
    if job.kind == JobKind.EVALUATE:
        context["evaluation"] = evaluation_table(job)
    if job.kind in (JobKind.MERGE, JobKind.EXPORT):
        merged = MergedModel.objects.filter(job=job).first()
        context["merged"] = merged
        context["merged_files"] = merged_files(merged) if merged else []
    if job.kind == JobKind.COMBINE and (job.result or {}).get("adapter_id"):
        context["new_adapter"] = Adapter.objects.filter(pk=job.result["adapter_id"]).first()
    return context


@login_required
def job_detail(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_object_or_404(AdapterJob.objects.select_related("owner", "base_model", "worker"), pk=pk)
    if job.kind == JobKind.COMPARE and hasattr(job, "comparison"):
        return redirect("comparison-detail", pk=job.comparison.pk)
    context = {**_job_context(job), "adapters": job.adapters.all(), **job_views.log_tail(job),
               "can_act": job_views.can_act(request, job)}
    return render(request, "playground/job_detail.html", context)


@login_required
def job_status(request: HttpRequest, pk: int) -> HttpResponse:
    job = get_object_or_404(AdapterJob.objects.select_related("base_model", "worker"), pk=pk)
    return render(request, "playground/partials/job_status.html", _job_context(job))


@login_required
@require_POST
def job_cancel(request: HttpRequest, pk: int) -> HttpResponse:
    return job_views.cancel(request, get_object_or_404(AdapterJob, pk=pk), "job-detail")


@login_required
@require_POST
def job_retry(request: HttpRequest, pk: int) -> HttpResponse:
    return job_views.retry(request, get_object_or_404(AdapterJob, pk=pk), "job-detail")


@login_required
@require_POST
def job_reorder(request: HttpRequest, pk: int) -> HttpResponse:
    return job_views.reorder(request, get_object_or_404(AdapterJob, pk=pk), "job-detail")


# --- live stream ----------------------------------------------------------------------------------------


def cell_event(row: int, column: str) -> str:
    """The SSE event name of one grid cell (column keys are a<id> or __base__: safe in a name)."""
    return f"c-{int(row)}-{''.join(ch for ch in column if ch.isalnum() or ch == '_')}"


def job_message(event: JobEvent) -> str:
    """A stream's message for an event: streamed text goes to its grid cell, the rest as on every job's page."""
    if event.kind == "output":
        data = event.data or {}
        return sse(cell_event(data.get("row", 0), str(data.get("column", ""))), html.escape(str(data.get("text", ""))),
                   event.pk)
    return job_views.log_message(event)


def job_status_html(job: AdapterJob) -> str:
    return render_to_string("playground/partials/job_status.html", _job_context(job))


next_batch = batch_reader(AdapterJob, job_message, job_status_html, related=("base_model", "worker"))


async def job_stream(request: HttpRequest, pk: int) -> HttpResponseBase:
    return await job_views.stream(request, AdapterJob, pk, next_batch)
