"""The LoRA config form: one field per LoraParams field, with its help text, checked by LoraParams.validate."""

from __future__ import annotations

import dataclasses
from typing import Any

from django import forms

from webapp.catalog.models import LoraConfig
from workers import spec

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


class NameListField(forms.CharField):
    """A list of module names typed as 'q_proj, v_proj'."""

    def prepare_value(self, value: Any) -> Any:
        return ", ".join(value) if isinstance(value, list) else value

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        return [part.strip() for part in str(value or "").replace("\n", ",").split(",") if part.strip()]


def _lora_field(f: dataclasses.Field[Any], initial: Any) -> forms.Field:
    common: dict[str, Any] = {"initial": initial, "help_text": f.metadata.get("help", ""), "label": f.name.replace("_", " ").capitalize()}
    if f.name in LORA_CHOICES:
        return forms.ChoiceField(choices=[(c, c) for c in LORA_CHOICES[f.name]], **common)
    if f.type in ("bool", bool):
        return forms.BooleanField(required=False, **common)
    if f.type in ("int", int):
        return forms.IntegerField(**common)
    if f.type in ("float", float):
        return forms.FloatField(**common)
    if f.type in ("list[str]", list):
        return NameListField(required=False, **common)
    return forms.CharField(required=False, **common)


class LoraConfigForm(forms.ModelForm):
    class Meta:
        model = LoraConfig
        fields = ["name"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        current = self.instance.lora_params() if self.instance.pk else spec.LoraParams()
        for f in dataclasses.fields(spec.LoraParams):
            self.fields[f.name] = _lora_field(f, getattr(current, f.name))

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if any(name not in data for name in LORA_FIELDS):
            return data  # field errors already reported
        params = spec.LoraParams(**{name: data[name] for name in LORA_FIELDS})
        for name, message in params.validate().items():
            self.add_error(name if name in LORA_FIELDS else None, message)
        self.instance.params = dataclasses.asdict(params)
        return data
