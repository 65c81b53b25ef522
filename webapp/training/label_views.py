"""The inline editor of a run's or an adapter's tags and note (htmx: the form swaps itself for the saved labels)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db import models
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from webapp.training.models import Adapter, TrainingRun
from webapp.training.organise import LabelError, set_labels, split_tags


def labels_context(obj: Any, user: Any, errors: dict[str, list[str]] | None = None,
                   typed: dict[str, str] | None = None) -> dict[str, Any]:
    """What training/partials/labels.html shows: the labels, links to the list filtered by each tag, and the
    editor (for the owner or staff), with what was typed and why it was refused."""
    is_run = isinstance(obj, TrainingRun)
    tags = sorted(tag.name for tag in obj.tags.all())
    return {
        "labelled": obj,
        "tags": tags,
        "list_url": reverse("runs" if is_run else "adapters"),
        "labels_url": reverse("run-labels" if is_run else "adapter-labels", args=[obj.pk]),
        "can_edit": bool(user.is_staff or obj.owner_id == user.pk),
        "errors": errors or {},
        "typed": typed or {"tags": " ".join(tags), "note": obj.note},
        "editing": bool(errors),
    }


def edit_labels(request: HttpRequest, model: type[models.Model], pk: int) -> HttpResponse:
    obj = get_object_or_404(model, pk=pk)
    context = labels_context(obj, request.user)
    if request.method == "POST":
        if not context["can_edit"]:
            raise PermissionDenied("only the owner or an admin can change its tags and note")
        typed = {"tags": request.POST.get("tags", ""), "note": request.POST.get("note", "")}
        try:
            set_labels(obj, split_tags(typed["tags"]), typed["note"])
        except LabelError as refused:
            context = labels_context(obj, request.user, refused.errors, typed)
            return render(request, "training/partials/labels.html", context, status=400 if not request.htmx else 200)  # type: ignore[attr-defined]
        if not request.htmx:  # type: ignore[attr-defined]
            return redirect(request.POST.get("next") or obj_url(obj))
        context = labels_context(obj, request.user)
    return render(request, "training/partials/labels.html", context)


def obj_url(obj: Any) -> str:
    return reverse("run-detail" if isinstance(obj, TrainingRun) else "adapter-detail", args=[obj.pk])


@login_required
@require_http_methods(["GET", "POST"])
def run_labels(request: HttpRequest, pk: int) -> HttpResponse:
    return edit_labels(request, TrainingRun, pk)


@login_required
@require_http_methods(["GET", "POST"])
def adapter_labels(request: HttpRequest, pk: int) -> HttpResponse:
    return edit_labels(request, Adapter, pk)
