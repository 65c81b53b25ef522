"""Aliases on the adapter page: the aliases pointing at the adapter, the base's aliases with their latest moves,
and the form that moves one here (optionally only if this adapter wins a required evaluation)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from webapp.catalog.models import Dataset
from webapp.playground import aliases
from webapp.playground.models import AdapterAlias, AliasMove
from webapp.training.models import Adapter

MOVES_SHOWN = 10


class AliasMoveForm(forms.Form):
    name = forms.CharField(max_length=200, label="Alias", help_text="e.g. production or candidate")
    require = forms.BooleanField(required=False, label="Only if it beats the current holder")
    dataset = forms.ModelChoiceField(queryset=Dataset.objects.exclude(format="text").order_by("name"), required=False,
                                     label="On evaluation set", empty_label="(choose a dataset)")
    metric = forms.ChoiceField(choices=[(k, aliases.METRIC_LABELS[k]) for k in aliases.METRICS], required=False,
                               initial="rouge_l", label="Score")
    margin = forms.FloatField(min_value=0.0, initial=0.0, required=False, label="By at least")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("require") and not data.get("dataset"):
            self.add_error("dataset", "choose the evaluation set both adapters were evaluated on")
        return data

    def requirement(self) -> aliases.Requirement | None:
        data = self.cleaned_data
        if not data.get("require"):
            return None
        return aliases.Requirement(data["dataset"], data.get("metric") or "rouge_l", data.get("margin") or 0.0)


def alias_context(adapter: Adapter) -> dict[str, Any]:
    base_aliases = list(AdapterAlias.objects.filter(base_model_id=adapter.base_model_id).select_related("adapter"))
    moves = (AliasMove.objects.filter(alias__base_model_id=adapter.base_model_id)
             .select_related("alias", "by")[:MOVES_SHOWN])
    return {
        "adapter": adapter,
        "held": [a for a in base_aliases if a.adapter_id == adapter.pk],
        "base_aliases": base_aliases,
        "moves": moves,
        "alias_form": AliasMoveForm(),
    }


@login_required
@require_POST
def adapter_alias(request: HttpRequest, pk: int) -> HttpResponse:
    adapter = get_object_or_404(Adapter.objects.select_related("base_model"), pk=pk)
    back = reverse("adapter-detail", args=[pk]) + "#aliases-heading"
    form = AliasMoveForm(request.POST)
    if not form.is_valid():
        said = "; ".join(f"{name}: {' '.join(errs)}" for name, errs in form.errors.items())
        messages.error(request, f"Alias not moved: {said}")
        return redirect(back)
    if adapter.base_model is None:
        messages.error(request, "Alias not moved: this adapter has no base model")
        return redirect(back)
    try:
        alias = aliases.move(adapter.base_model, form.cleaned_data["name"], adapter, request.user, form.requirement())
    except aliases.AliasError as refused:
        messages.error(request, f"Alias not moved: {refused}")
    except aliases.MoveRefused as refused:
        messages.error(request, refused.move.message)
    else:
        messages.success(request, alias.moves.first().message if alias.moves.exists() else f"{alias.name} moved")
    return redirect(back)
