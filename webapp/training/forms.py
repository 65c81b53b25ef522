from __future__ import annotations

import dataclasses
from typing import Any

from django import forms

from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from workers import spec
from workers.engine import check_switches
from workers.modelinfo import check_adapter

CHOICE_FIELDS = spec.CHOICES


def _form_field(f: dataclasses.Field[Any], initial: Any) -> forms.Field:
    help_text = f.metadata.get("help", "")
    label = f.name.replace("_", " ").capitalize()
    if f.name in CHOICE_FIELDS:
        return forms.ChoiceField(choices=[(c, c) for c in CHOICE_FIELDS[f.name]], initial=initial, help_text=help_text, label=label)
    if f.type in ("bool", bool):
        return forms.BooleanField(required=False, initial=initial, help_text=help_text, label=label)
    if f.type in ("int", int):
        return forms.IntegerField(initial=initial, help_text=help_text, label=label)
    return forms.FloatField(initial=initial, help_text=help_text, label=label)


TRAIN_FIELDS = [f.name for f in dataclasses.fields(spec.TrainParams)]


class RunForm(forms.Form):
    name = forms.CharField(max_length=200, required=False, help_text="Optional: a name to find the run by.")
    base_model = forms.ModelChoiceField(queryset=BaseModel.objects.all(), help_text="The model to adapt.")
    dataset = forms.ModelChoiceField(queryset=Dataset.objects.all(), help_text="Training rows.")
    lora_config = forms.ModelChoiceField(queryset=LoraConfig.objects.all(), label="LoRA config")

    def __init__(self, *args: Any, suggested: spec.TrainParams | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        defaults = suggested or spec.TrainParams()
        for f in dataclasses.fields(spec.TrainParams):
            self.fields[f.name] = _form_field(f, getattr(defaults, f.name))

    @property
    def train_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in TRAIN_FIELDS]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if any(name not in data for name in TRAIN_FIELDS):
            return data  # field errors already reported
        params = spec.TrainParams(**{name: data[name] for name in TRAIN_FIELDS})
        base: BaseModel | None = data.get("base_model")
        for name, message in params.validate(base.max_positions if base else None).items():
            self.add_error(name, message)
        config_for_switches: LoraConfig | None = data.get("lora_config")
        if config_for_switches:
            for name, message in check_switches(params, config_for_switches.lora_params()).items():
                if name not in self.errors:
                    self.add_error(name, message)
        config: LoraConfig | None = data.get("lora_config")
        if base and config:
            # The same checks the worker makes, from the base's stored module names: refused before queueing.
            adapter_errors = check_adapter(
                config.lora_params(), base.linear_modules, base.model_type,
                train=params, max_positions=base.max_positions, model_name=base.name,
            )
            for name, message in adapter_errors.items():
                if name in TRAIN_FIELDS:
                    if name not in self.errors:
                        self.add_error(name, message)
                else:
                    self.add_error("lora_config", f"{config.name}: {name}: {message}")
        data["hyperparameters"] = dataclasses.asdict(params)
        return data


class DatasetUploadForm(forms.Form):
    name = forms.SlugField(max_length=200, help_text="A unique name (letters, digits, - and _).")
    file = forms.FileField(help_text="JSONL, JSON, CSV or Parquet.")
