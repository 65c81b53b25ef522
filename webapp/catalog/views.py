"""Catalog pages: base models, LoRA configs and datasets. Each view serves its full page and, for htmx
requests, the partial it swaps (form errors come back with status 200 to htmx, which swaps only 2xx)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import IntegrityError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST
from django_htmx.http import HttpResponseClientRedirect

from webapp.catalog.charts import histogram_chart
from webapp.catalog.demo import LORA_PRESETS
from webapp.catalog.forms import (
    LORA_FIELDS,
    AnalysisForm,
    BaseModelForm,
    DatasetUploadForm,
    EstimateForm,
    LoraConfigForm,
)
from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.catalog.services import (
    STATS_SAMPLE_ROWS,
    dataset_row,
    inspect_source,
    length_stats_for,
    model_shape,
    register_base_model,
    register_dataset,
    tokenizer_for,
)
from webapp.ids import whole
from workers.contract import spec
from workers.data.datasets import DatasetError
from workers.training.modelinfo import ModelNotFound
from workers.training.preview import render_pairs, render_row
from workers.training.specestimate import estimate_for_spec


def _invalid_status(request: HttpRequest) -> int:
    return 200 if request.htmx else 400


# --- Base models -------------------------------------------------------------------------------------------


@login_required
def base_models(request: HttpRequest) -> HttpResponse:
    """List and register. "Inspect" shows what the model is before anything is saved; "Save" registers."""
    form = BaseModelForm(request.POST or None)
    info = None
    status = 200
    if request.method == "POST":
        saving = request.POST.get("action") == "save"
        if form.is_valid():
            data = form.cleaned_data
            try:
                if saving:
                    base = register_base_model(data["name"], data["source"], data["revision"], request.user)
                else:
                    info = inspect_source(data["source"], data["revision"])
            except ModelNotFound as exc:
                form.add_error("source", str(exc))
            except IntegrityError:
                form.add_error("name", f"a base model named {data['name']} already exists")
            else:
                if saving:
                    messages.success(request, f"Base model {base.name} registered.")
                    if request.htmx:
                        return HttpResponseClientRedirect(reverse("base-models"))
                    return redirect("base-models")
        if form.errors:
            status = _invalid_status(request)
    context = {"form": form, "info": info}
    if request.htmx:
        return render(request, "catalog/partials/base_model_form.html", context, status=status)
    context["models"] = BaseModel.objects.all()
    return render(request, "catalog/base_models.html", context, status=status)


# --- LoRA configs ------------------------------------------------------------------------------------------


@login_required
def lora_configs(request: HttpRequest) -> HttpResponse:
    """List (presets marked) and create, starting from defaults or from an existing config (?from=<id>)."""
    initial = None
    source = whole(request.GET.get("from")) if request.method == "GET" else None
    if source is not None:
        template = LoraConfig.objects.filter(pk=source).first()
        if template:
            initial = {**template_initial(template), "name": f"{template.name}-copy"}
    form = LoraConfigForm(request.POST or None, initial=initial)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            config = form.save(commit=False)
            config.created_by = request.user if request.user.is_authenticated else None
            config.save()
            messages.success(request, f"LoRA config {config.name} saved: {config.summary()}.")
            return redirect("lora-configs")
        status = 400
    estimate_form = EstimateForm(request.POST or None, initial={"base_model": BaseModel.objects.first()})
    context = {
        "form": form,
        "estimate_form": estimate_form,
        "configs": LoraConfig.objects.all(),
        "presets": set(LORA_PRESETS),
        "estimate": _estimate(form, estimate_form),
    }
    return render(request, "catalog/lora_configs.html", context, status=status)


def template_initial(config: LoraConfig) -> dict[str, Any]:
    return dataclasses.asdict(config.lora_params())


@login_required
@require_POST
def lora_config_estimate(request: HttpRequest) -> HttpResponse:
    """The live estimate of the create form: trainable parameters and GPU memory for the chosen base."""
    context = {"estimate": _estimate(LoraConfigForm(request.POST), EstimateForm(request.POST))}
    return render(request, "catalog/partials/lora_estimate.html", context)


def _estimate(form: LoraConfigForm, estimate_form: EstimateForm) -> dict[str, Any]:
    lora = form.lora_params() if form.is_bound else spec.build(spec.LoraParams, {k: v for k, v in form.initial.items() if k in LORA_FIELDS})
    if lora is None:
        problems = [f"{name}: {'; '.join(errors)}" for name, errors in form.errors.items() if name != "name"]
        return {"problems": problems}
    if estimate_form.is_bound and not estimate_form.is_valid():
        return {"problems": [f"{name}: {'; '.join(e)}" for name, e in estimate_form.errors.items()]}
    choice = estimate_form.cleaned_data if estimate_form.is_bound else {"gpu_gb": 80, **estimate_form.initial}
    base: BaseModel | None = choice["base_model"]
    if base is None:
        return {"problems": ["choose a base model to estimate for"]}
    gpu_bytes = int(choice["gpu_gb"] * 1e9)
    train = spec.TrainParams()
    try:
        result = estimate_for_spec(model_shape(base), lora, train, gpu_memory_bytes=gpu_bytes)
    except (ValueError, ModelNotFound) as exc:  # an unsupported architecture, unknown targets
        return {"problems": [str(exc)], "base": base}
    est = result.estimate
    return {
        "base": base,
        "train": train,
        "result": result,
        "trainable": est.trainable_params,
        "share": est.trainable_params / base.num_parameters if base.num_parameters else None,
        "parts": list(est.parts().items()),
        "device_bytes": est.device_total,
        "gpu_bytes": gpu_bytes,
        "fits": est.device_total <= gpu_bytes,
    }


# --- Datasets ----------------------------------------------------------------------------------------------


@login_required
def datasets(request: HttpRequest) -> HttpResponse:
    form = DatasetUploadForm(request.POST or None, request.FILES or None)
    problems: list[str] = []
    status = 200
    if request.method == "POST":
        if form.is_valid():
            upload = form.cleaned_data["file"]
            try:
                dataset = register_dataset(form.cleaned_data["name"], upload.name, upload.file, request.user)
            except DatasetError as exc:
                problems = [str(p) for p in exc.report.problems]
                if exc.report.truncated:
                    problems.append("… more problems not shown")
                form.add_error("file", f"{upload.name} was not saved: {len(exc.report.problems)} problem(s) found")
            except ValueError as exc:
                form.add_error("file", str(exc))
            except IntegrityError:
                form.add_error("name", "a dataset with this name already exists")
            else:
                messages.success(request, f"Dataset {dataset.name}: {dataset.row_count} rows, format {dataset.format}.")
                url = reverse("dataset-detail", args=[dataset.pk])
                return HttpResponseClientRedirect(url) if request.htmx else redirect(url)
        status = _invalid_status(request)
    context = {"form": form, "problems": problems}
    if request.htmx:
        return render(request, "catalog/partials/dataset_upload.html", context, status=status)
    context["datasets"] = Dataset.objects.all()
    return render(request, "catalog/datasets.html", context, status=status)


@login_required
def dataset_detail(request: HttpRequest, pk: int) -> HttpResponse:
    dataset = get_object_or_404(Dataset, pk=pk)
    form = AnalysisForm(request.GET or None, initial={"batching": "pack", "completion_only_loss": True, "row": 1})
    context: dict[str, Any] = {"dataset": dataset, "form": form, "analysis": _analysis(dataset, form)}
    if request.htmx:
        return render(request, "catalog/partials/dataset_analysis.html", context)
    context["preview"] = [preview_row(row) for row in dataset.preview_rows()]
    context["bases"] = BaseModel.objects.all()
    return render(request, "catalog/dataset_detail.html", context)


# The fields of a preference pair, as the preview lays them out: the prompt above, the two answers side by side.
PAIR_FIELDS = ("prompt", "chosen", "rejected")
PAIR_ROWS = 3  # pairs the analysis renders, from the chosen row on


def field_text(value: Any) -> str:
    """A stored field as text: a string as it is, chat turns one a line ("user: …"), anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(turn, dict) for turn in value):
        turns = [(turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))) for turn in value]
        if all(isinstance(role, str) and isinstance(content, str) for role, content in turns):
            return "\n".join(f"{role}: {content}" for role, content in turns)
    return json.dumps(value, indent=2, ensure_ascii=False)


def preview_row(row: dict[str, Any]) -> dict[str, Any]:
    """One stored row for the page: a preference pair's prompt and answers apart (`pair`), and every other field
    by name (`fields`), whatever the format: a row's fields are what a format is made of."""
    is_pair = all(name in row for name in PAIR_FIELDS)
    pair = {name: field_text(row[name]) for name in PAIR_FIELDS} if is_pair else None
    fields = [(name, field_text(value)) for name, value in row.items() if not (is_pair and name in PAIR_FIELDS)]
    return {"pair": pair, "fields": fields}


def _analysis(dataset: Dataset, form: AnalysisForm) -> dict[str, Any] | None:
    """Length histogram, truncation and one rendered row for the chosen base model (None until one is)."""
    if not form.is_bound or not form.is_valid() or form.cleaned_data["base_model"] is None:
        return None
    data = form.cleaned_data
    base: BaseModel = data["base_model"]
    max_length = data["max_length"] or min(spec.TrainParams().max_seq_length, base.max_positions or 10**9)
    completion_only = data["completion_only_loss"]
    try:
        tokenizer = tokenizer_for(base)
        stats = length_stats_for(dataset, base, max_length, data["batching"], completion_only)
        row_number = min(data["row"] or 1, dataset.row_count)
        rendered = render_row(tokenizer, dataset_row(dataset, row_number), completion_only, max_length,
                              data["batching"])
        pairs = [] if dataset.format != "preference" else render_pairs(tokenizer, [
            dataset_row(dataset, number) for number in range(row_number, min(row_number + PAIR_ROWS, dataset.row_count + 1))
        ], max_length)
    except (ModelNotFound, DatasetError, OSError, ValueError) as exc:
        return {"error": str(exc), "base": base}
    return {
        "base": base,
        "max_length": max_length,
        "stats": stats,
        "chart": histogram_chart(stats.histogram, max_length),
        "sampled": dataset.row_count > STATS_SAMPLE_ROWS,
        "row_number": row_number,
        "row_count": dataset.row_count,
        "rendered": rendered,
        "pairs": pairs,
        "last_pair": row_number + len(pairs) - 1,
    }
