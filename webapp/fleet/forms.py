"""Forms for registering and editing workers: the workers page and `manage.py register_worker` share them."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from django import forms
from django.core.validators import validate_slug
from django.db import IntegrityError, transaction

from webapp.fleet.models import Worker

GIB = 2**30
MAX_LABELS = 20
LABEL = re.compile(r"[a-z0-9][a-z0-9_-]{0,49}")


def parse_labels(raw: str) -> list[str]:
    """Comma-separated lowercase slugs, in order and without repeats; every bad one is named."""
    labels: list[str] = []
    bad: list[str] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        if not LABEL.fullmatch(item):
            bad.append(item)
        elif item not in labels:
            labels.append(item)
    if bad:
        names = ", ".join(f"“{b}”" for b in bad)
        raise forms.ValidationError(
            f"{names}: a label is a lowercase slug of at most 50 characters "
            "(letters a-z, digits, - and _, starting with a letter or digit), e.g. a100, team-nlp")
    if len(labels) > MAX_LABELS:
        raise forms.ValidationError(f"at most {MAX_LABELS} labels (got {len(labels)})")
    return labels


class WorkerSettingsForm(forms.Form):
    """What an admin may change on a worker: labels and optional limits."""

    labels = forms.CharField(
        required=False, max_length=1000,
        help_text="Comma-separated lowercase slugs, e.g. a100, team-nlp. Jobs asking for labels run only where all match.")
    max_gpu_gib = forms.DecimalField(
        label="Max GPU memory per job (GiB)", required=False, min_value=Decimal("0.1"), max_value=Decimal(100_000),
        decimal_places=2, help_text="Optional: jobs estimated to need more are not placed here.")
    max_jobs = forms.IntegerField(
        label="Max jobs at once", required=False, min_value=1, max_value=1000,
        help_text="Optional: at most this many jobs at once (default: one per GPU).")

    @classmethod
    def initial_for(cls, worker: Worker) -> dict[str, Any]:
        gib = f"{Decimal(worker.max_gpu_bytes) / GIB:.2f}".rstrip("0").rstrip(".") if worker.max_gpu_bytes else None
        return {"labels": ", ".join(worker.labels or []), "max_jobs": worker.max_jobs, "max_gpu_gib": gib}

    def clean_labels(self) -> list[str]:
        return parse_labels(self.cleaned_data.get("labels") or "")

    def apply(self, worker: Worker) -> None:
        data = self.cleaned_data
        worker.labels = data["labels"]
        gib = data.get("max_gpu_gib")
        worker.max_gpu_bytes = int(gib * GIB) if gib is not None else None
        worker.max_jobs = data.get("max_jobs")


class RegisterWorkerForm(WorkerSettingsForm):
    name = forms.CharField(
        max_length=100, validators=[validate_slug],
        help_text="A slug naming the machine, e.g. gpu-a100-1. It cannot be changed later.")

    field_order = ["name", "labels", "max_gpu_gib", "max_jobs"]

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if Worker.objects.filter(name=name).exists():
            raise forms.ValidationError(f"a worker named “{name}” already exists: rotate its token on its page instead")
        return name

    def register(self, created_by: Any = None) -> tuple[Worker, str] | None:
        """Create the worker and return it with its token (the only time the token is ever visible); None if the
        name was taken meanwhile (the form then carries the error)."""
        worker = Worker(name=self.cleaned_data["name"], created_by=created_by)
        self.apply(worker)
        token = worker.set_new_token()
        try:
            with transaction.atomic():
                worker.save()
        except IntegrityError:  # registered by someone else since clean_name looked
            self.add_error("name", f"a worker named “{worker.name}” already exists: rotate its token on its page instead")
            return None
        return worker, token
