from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import IntegrityError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.catalog.services import register_dataset
from webapp.training.forms import DatasetUploadForm
from workers.datasets import DatasetError


@login_required
def datasets(request: HttpRequest) -> HttpResponse:
    form = DatasetUploadForm(request.POST or None, request.FILES or None)
    problems: list[str] = []
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            upload = form.cleaned_data["file"]
            try:
                dataset = register_dataset(form.cleaned_data["name"], upload.name, upload.read(), request.user)
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
                return redirect("datasets")
    context = {"form": form, "problems": problems, "datasets": Dataset.objects.all()}
    return render(request, "catalog/datasets.html", context, status=status)


@login_required
def base_models(request: HttpRequest) -> HttpResponse:
    return render(request, "catalog/base_models.html", {"models": BaseModel.objects.all()})


@login_required
def lora_configs(request: HttpRequest) -> HttpResponse:
    return render(request, "catalog/lora_configs.html", {"configs": LoraConfig.objects.all()})
