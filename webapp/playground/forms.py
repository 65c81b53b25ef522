from __future__ import annotations

import dataclasses
from typing import Any

from django import forms

from webapp.catalog.models import Dataset
from webapp.playground.models import PromptSet
from webapp.training.models import Adapter, TrainingRun
from workers.contract import jobspecs


def _adapter_choices() -> Any:
    return Adapter.objects.select_related("base_model").order_by("-id")


class AdapterLabel(forms.ModelMultipleChoiceField):
    def label_from_instance(self, obj: Adapter) -> str:
        return f"{obj} · {obj.base_model} · {obj.method}" + (f" r{obj.rank}" if obj.rank else "")


class GenerationForm(forms.Form):
    max_new_tokens = forms.IntegerField(min_value=1, max_value=4096, initial=128)
    temperature = forms.FloatField(min_value=0.0, max_value=5.0, initial=0.0)
    top_p = forms.FloatField(min_value=0.01, max_value=1.0, initial=1.0)
    seed = forms.IntegerField(initial=0)
    chat_template = forms.BooleanField(required=False, initial=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(jobspecs.GenerationParams)}
        for name, form_field in self.fields.items():
            form_field.help_text = form_field.help_text or helps.get(name, "")

    def generation(self) -> jobspecs.GenerationParams:
        names = {f.name for f in dataclasses.fields(jobspecs.GenerationParams)}
        return jobspecs.GenerationParams(**{name: self.cleaned_data[name] for name in names if name in self.cleaned_data})


class CompareForm(GenerationForm):
    name = forms.CharField(max_length=200, required=False)
    adapters = AdapterLabel(queryset=Adapter.objects.none(), widget=forms.CheckboxSelectMultiple)
    include_base = forms.BooleanField(required=False, initial=True, label="Include the base model as a column")
    prompt_set = forms.ModelChoiceField(queryset=PromptSet.objects.none(), required=False, empty_label="— new prompts —")
    prompts = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 6}),
        required=False,
        help_text="One prompt per line, or multi-line prompts separated by a line holding only ---.",
    )
    dataset = forms.ModelChoiceField(
        queryset=Dataset.objects.none(), required=False, empty_label="—",
        help_text="Or draw prompts with their reference answers from a dataset.",
    )
    dataset_rows = forms.IntegerField(min_value=1, max_value=512, initial=32, required=False)
    prompt_set_name = forms.CharField(max_length=200, required=False, help_text="Name of the new prompt set.")
    base_precision = forms.ChoiceField(
        choices=[(p, p) for p in jobspecs.BASE_PRECISIONS], initial="auto", required=False,
        help_text=jobspecs.BASE_PRECISION_HELP,
    )

    field_order = ["name", "adapters", "include_base", "prompt_set", "prompts", "dataset", "dataset_rows", "prompt_set_name",
                   "base_precision"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["adapters"].queryset = _adapter_choices()
        self.fields["prompt_set"].queryset = PromptSet.objects.order_by("-id")
        self.fields["dataset"].queryset = Dataset.objects.exclude(format="text").order_by("name")

    def clean_adapters(self) -> list[Adapter]:
        adapters = list(self.cleaned_data["adapters"])
        if len(adapters) > jobspecs.MAX_ADAPTERS:
            raise forms.ValidationError(f"at most {jobspecs.MAX_ADAPTERS} adapters, got {len(adapters)}")
        return adapters

    def clean_base_precision(self) -> str:
        return self.cleaned_data["base_precision"] or "auto"  # a post without the field: as before it existed

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        sources = [bool(data.get("prompt_set")), bool((data.get("prompts") or "").strip()), bool(data.get("dataset"))]
        if sum(sources) != 1:
            raise forms.ValidationError("Pick a saved prompt set, type prompts, or draw them from a dataset (one of the three).")
        return data


class CombineForm(forms.Form):
    name = forms.CharField(max_length=200, required=False, help_text="Name of the new adapter.")
    adapters = AdapterLabel(queryset=Adapter.objects.none(), widget=forms.CheckboxSelectMultiple)
    weights = forms.CharField(
        max_length=500, help_text="One weight per adapter, in the order listed above, comma-separated (e.g. 0.7, 0.3)."
    )
    combination_type = forms.ChoiceField(choices=[(c, c) for c in jobspecs.COMBINATIONS], initial="linear")
    density = forms.FloatField(required=False, min_value=0.0, max_value=1.0,
                               help_text="ties, dare and magnitude_prune: fraction of entries kept.")
    majority_sign_method = forms.ChoiceField(choices=[("total", "total"), ("frequency", "frequency")], initial="total")
    svd_rank = forms.IntegerField(required=False, min_value=1, help_text="svd types: rank of the result.")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["adapters"].queryset = _adapter_choices()

    def clean_weights(self) -> list[float]:
        try:
            return [float(w) for w in self.cleaned_data["weights"].replace(";", ",").split(",") if w.strip()]
        except ValueError as exc:
            raise forms.ValidationError(f"weights must be numbers separated by commas ({exc})") from exc


class EvaluateForm(forms.Form):
    adapters = AdapterLabel(queryset=Adapter.objects.none(), widget=forms.CheckboxSelectMultiple)
    include_base = forms.BooleanField(required=False, initial=True, label="Score the base model too")
    dataset = forms.ModelChoiceField(queryset=Dataset.objects.none(), required=False, empty_label="—")
    held_out_of = forms.ModelChoiceField(
        queryset=TrainingRun.objects.none(), required=False, empty_label="—",
        help_text="Or the rows that a run held out of its own training (same fraction and seed).",
    )
    max_rows = forms.IntegerField(min_value=0, max_value=100_000, initial=200, help_text="0 scores every row.")
    max_new_tokens = forms.IntegerField(min_value=1, max_value=4096, initial=64)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["adapters"].queryset = _adapter_choices()
        self.fields["dataset"].queryset = Dataset.objects.exclude(format="text").order_by("name")
        self.fields["held_out_of"].queryset = TrainingRun.objects.filter(adapter__isnull=False).order_by("-id")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if bool(data.get("dataset")) == bool(data.get("held_out_of")):
            raise forms.ValidationError("Pick a dataset or a run's held-out split (one of the two).")
        return data


class MergeForm(forms.Form):
    dtype = forms.ChoiceField(
        choices=[(d, d) for d in jobspecs.MERGE_DTYPES], initial="auto",
        help_text="Dtype of the merged weights; auto keeps the base checkpoint's own. QLoRA adapters are always "
        "merged into the unquantized base.",
    )


class ExportForm(forms.Form):
    form = forms.ChoiceField(
        choices=[("merged", "merged model (FROM .)"), ("adapter", "adapter on its base (ADAPTER)")], initial="merged",
        help_text="merged: the base with the adapter merged, in safetensors. adapter: the adapter's safetensors "
        "applied by Ollama to the base, which it must know by name (Llama, Mistral and Gemma bases only).",
    )
    name = forms.CharField(max_length=200, initial="tunedeck-model",
                           help_text="The model's name in Ollama: [namespace/]name[:tag].")
    quantize = forms.ChoiceField(
        choices=[("", "none"), *[(q, q) for q in jobspecs.OLLAMA_QUANTIZE]], required=False,
        help_text="Passed to ollama create --quantize (merged form only).",
    )
    system = forms.CharField(widget=forms.Textarea(attrs={"rows": 2}), required=False, max_length=10_000,
                             help_text="A default system prompt (SYSTEM).")
    base_name = forms.CharField(max_length=200, required=False,
                                help_text="Adapter form: the name Ollama knows the base by (default: the base's source).")


class VllmExportForm(forms.Form):
    form = forms.ChoiceField(
        choices=[("adapter", "adapter on its base (--enable-lora)"), ("merged", "merged model")], initial="adapter",
        help_text="adapter: vLLM serves the base with this adapter as a LoRA module. merged: the base with the "
        "adapter merged, served as a model of its own.",
    )
    name = forms.CharField(max_length=200, initial="tunedeck-model", help_text="The LoRA module's name in vLLM.")
    check_prompts = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}), required=False, max_length=40_000,
        help_text="The check's prompts, one per line (default: three short general ones).",
    )
    max_new_tokens = forms.IntegerField(min_value=1, max_value=512, initial=32, help_text="Tokens per check answer.")

    def clean_check_prompts(self) -> list[str]:
        lines = [line.strip() for line in self.cleaned_data["check_prompts"].splitlines() if line.strip()]
        if len(lines) > jobspecs.VLLM_MAX_PROMPTS:
            raise forms.ValidationError(f"at most {jobspecs.VLLM_MAX_PROMPTS} prompts ({len(lines)} given)")
        return lines


class PushForm(forms.Form):
    repo_id = forms.RegexField(
        regex=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$",
        max_length=200,
        error_messages={"invalid": "use namespace/name (letters, digits, - _ .)"},
    )
    private = forms.BooleanField(required=False, initial=True)
    what = forms.ChoiceField(choices=[("adapter", "the adapter")], initial="adapter")
