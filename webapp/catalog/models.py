from __future__ import annotations

import dataclasses
from typing import Any

from django.conf import settings
from django.db import models

from workers.contract import spec


def _choices(values: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(v, v) for v in values]


class BaseModel(models.Model):
    name = models.CharField(max_length=200, unique=True)
    source = models.CharField(max_length=500, help_text="Hugging Face hub id or a local directory on the workers.")
    revision = models.CharField(max_length=200, blank=True)
    trust_remote_code = models.BooleanField(default=False)
    architecture = models.CharField(max_length=200, blank=True)
    model_type = models.CharField(max_length=100, blank=True)
    num_parameters = models.BigIntegerField(null=True, blank=True)
    max_positions = models.IntegerField(null=True, blank=True)
    linear_modules = models.JSONField(default=list, blank=True)
    has_chat_template = models.BooleanField(default=False)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def model_ref(self) -> spec.ModelRef:
        return spec.ModelRef(source=self.source, revision=self.revision, trust_remote_code=self.trust_remote_code)


class Dataset(models.Model):
    name = models.CharField(max_length=200, unique=True)
    uri = models.CharField(max_length=500)
    original_filename = models.CharField(max_length=255)
    format = models.CharField(max_length=32, choices=_choices(spec.DATASET_FORMATS))
    row_count = models.IntegerField()
    size_bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def preview_rows(self) -> list[dict[str, Any]]:
        """The first rows, texts clipped, as the upload's validation kept them (one query)."""
        rows = DatasetPreview.objects.filter(dataset=self).values_list("rows", flat=True).first()
        return list(rows or [])


class DatasetPreview(models.Model):
    """A dataset's preview, in a table of its own so that no list of datasets or runs ever loads it."""

    dataset = models.OneToOneField(Dataset, on_delete=models.CASCADE, primary_key=True, related_name="+")
    rows = models.JSONField(default=list, blank=True)

    def __str__(self) -> str:
        return f"preview of dataset {self.dataset_id}"


METHOD_LABELS = {"lora": "LoRA", "ia3": "IA3", "prefix_tuning": "Prefix tuning", "prompt_tuning": "Prompt tuning"}
METHOD_CHOICES = [(m, METHOD_LABELS.get(m, m)) for m in spec.METHODS]


class LoraConfig(models.Model):
    """A named, reusable adapter preset. `params` holds a whole `workers.contract.spec.LoraParams` (every field, so a
    saved config keeps its meaning when defaults change); `method` repeats params["method"] for lists."""

    name = models.CharField(max_length=200, unique=True)
    method = models.CharField(max_length=16, choices=METHOD_CHOICES, default="lora", editable=False)
    params = models.JSONField(default=dict, blank=True, help_text="The adapter's LoraParams, field by field.")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, **kwargs: Any) -> None:
        # Normalise on every save: unknown keys are refused, missing ones get their defaults.
        params = self.lora_params()
        self.params, self.method = dataclasses.asdict(params), params.method
        update_fields = kwargs.get("update_fields")
        if update_fields is not None and "params" in update_fields:
            kwargs["update_fields"] = {*update_fields, "method"}
        super().save(*args, **kwargs)

    def lora_params(self) -> spec.LoraParams:
        return spec.build(spec.LoraParams, self.params or {})

    def summary(self) -> str:
        return self.lora_params().summary()
