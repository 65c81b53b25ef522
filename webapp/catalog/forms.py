"""The LoRA config form: one field per LoraParams field, with its help text, checked by LoraParams.validate."""

from __future__ import annotations

import dataclasses
from typing import Any

from django import forms
from django.conf import settings
from django.core.exceptions import NON_FIELD_ERRORS

from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.catalog.services import local_model_roots
from webapp.specfields import form_field
from workers.contract import spec
from workers.training.preview import BATCHINGS

LORA_CHOICES: dict[str, tuple[str, ...]] = {
    "method": spec.METHODS,
    "bias": spec.BIASES,
    "init": spec.INITS,
    "prompt_init": spec.PROMPT_INITS,
    "quantization": spec.QUANTIZATIONS,
    "quant_type": spec.QUANT_TYPES,
    "compute_dtype": spec.COMPUTE_DTYPES,
}
LORA_FIELDS = [f.name for f in dataclasses.fields(spec.LoraParams)]


class LoraConfigForm(forms.ModelForm):
    class Meta:
        model = LoraConfig
        fields = ["name"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        current = self.instance.lora_params() if self.instance.pk else spec.LoraParams()
        for f in dataclasses.fields(spec.LoraParams):
            self.fields[f.name] = form_field(f, getattr(current, f.name), LORA_CHOICES)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if any(name not in data for name in LORA_FIELDS):
            return data  # field errors already reported
        params = spec.LoraParams(**{name: data[name] for name in LORA_FIELDS})
        for name, message in params.validate().items():
            self.add_error(name if name in LORA_FIELDS else None, message)
        self.instance.params = dataclasses.asdict(params)
        return data

    def lora_params(self) -> spec.LoraParams | None:
        """The adapter the fields describe, or None while a field is invalid (the name is not needed)."""
        self.is_valid()
        if any(name in self.errors for name in LORA_FIELDS) or NON_FIELD_ERRORS in self.errors:
            return None
        return spec.LoraParams(**{name: self.cleaned_data[name] for name in LORA_FIELDS})

    @property
    def lora_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in LORA_FIELDS]


class EstimateForm(forms.Form):
    """What the live estimate needs besides the adapter: a registered base model and the GPU's size."""

    base_model = forms.ModelChoiceField(queryset=BaseModel.objects.all(), required=False, empty_label="(choose a base model)",
                                        help_text="The estimate is for this model with the default training settings.")
    gpu_gb = forms.FloatField(label="GPU memory (GB)", initial=80, min_value=1, max_value=4096,
                              help_text="The card's total memory, in GB (10⁹ bytes).")


class BaseModelForm(forms.Form):
    source = forms.CharField(max_length=500, label="Hub id or local path",
                             help_text="e.g. Qwen/Qwen2.5-0.5B, or the absolute path of a model folder under the "
                                       "local model roots, the same on the workers.")
    revision = forms.CharField(max_length=200, required=False, help_text="Optional: a branch, tag or commit on the hub.")
    name = forms.CharField(max_length=200, required=False,
                           help_text="Optional: how the dashboard names it (default: the last part of the source).")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        roots = ", ".join(str(root) for root in local_model_roots())
        self.fields["source"].help_text += f" Local model roots: {roots}."

    def clean_source(self) -> str:
        return str(self.cleaned_data["source"]).strip()

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        source = data.get("source")
        if source and not data.get("name"):
            data["name"] = source.rstrip("/").rsplit("/", 1)[-1][:200]
        name = data.get("name")
        if name and BaseModel.objects.filter(name=name).exists():
            self.add_error("name", f"a base model named {name} already exists")
        return data


class DatasetUploadForm(forms.Form):
    name = forms.SlugField(max_length=200, help_text="A unique name (letters, digits, - and _).")
    file = forms.FileField(help_text="JSONL, JSON, CSV or Parquet.")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["file"].help_text = f"JSONL, JSON, CSV or Parquet; at most {settings.TUNEDECK_MAX_UPLOAD_MB} MB."

    def clean_file(self) -> Any:
        upload = self.cleaned_data["file"]
        limit = settings.TUNEDECK_MAX_UPLOAD_MB * 2**20
        if upload.size > limit:
            raise forms.ValidationError(
                f"{upload.name} is {upload.size / 2**20:.1f} MB: the limit is {settings.TUNEDECK_MAX_UPLOAD_MB} MB"
            )
        return upload

    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if Dataset.objects.filter(name=name).exists():
            raise forms.ValidationError("a dataset with this name already exists")
        return name


class AnalysisForm(forms.Form):
    """The dataset detail page's choices: read from the query string, so a view of the data can be linked."""

    base_model = forms.ModelChoiceField(queryset=BaseModel.objects.all(), required=False, empty_label="(choose a base model)")
    max_length = forms.IntegerField(min_value=1, max_value=1_048_576, required=False, label="Max length (tokens)",
                                    help_text="max_seq_length of the run: longer rows are truncated.")
    batching = forms.ChoiceField(choices=[(b, b) for b in BATCHINGS], initial="pack",
                                 help_text="pack is what 'auto' picks for LoRA on a GPU.")
    completion_only_loss = forms.BooleanField(required=False, initial=True, label="Train on completions only")
    row = forms.IntegerField(min_value=1, initial=1, required=False, label="Row to show")
