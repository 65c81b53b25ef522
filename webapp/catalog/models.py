from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models

from workers import spec


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
    preview = models.JSONField(default=list, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class LoraConfig(models.Model):
    name = models.CharField(max_length=200, unique=True)
    method = models.CharField(max_length=16, choices=[("lora", "LoRA")], default="lora")
    r = models.PositiveIntegerField(default=16)
    alpha = models.PositiveIntegerField(default=32)
    dropout = models.FloatField(default=0.05)
    target_modules = models.JSONField(default=list)
    bias = models.CharField(max_length=16, choices=_choices(spec.BIASES), default="none")
    quantization = models.CharField(max_length=8, choices=_choices(spec.QUANTIZATIONS), default="none")
    quant_type = models.CharField(max_length=8, choices=_choices(spec.QUANT_TYPES), default="nf4")
    double_quant = models.BooleanField(default=True)
    compute_dtype = models.CharField(max_length=16, choices=_choices(spec.COMPUTE_DTYPES), default="auto")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def lora_params(self) -> spec.LoraParams:
        fields: dict[str, Any] = {
            name: getattr(self, name)
            for name in ("r", "alpha", "dropout", "target_modules", "bias", "quantization", "quant_type", "double_quant", "compute_dtype")
        }
        return spec.LoraParams(**fields)
