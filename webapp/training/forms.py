from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib.auth import get_user_model
from django.db import models

from webapp.catalog.demo import DEMO_CONFIG, DEMO_DATASET, DEMO_MODEL
from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.jobs.models import RunState
from webapp.specfields import form_field
from webapp.training.models import Adapter
from webapp.training.services import INIT_ADAPTER_HELP, SETTING, TRAIN_FIELDS, RunRequest, refusals
from workers.contract import spec
from workers.training.objectives import OBJECTIVES

# The New run page preselects an input where the choice is obvious, so that the README's first run (keep the
# demo model, dataset and config, press Train) needs no choosing: the only row there is, else the demo's.
PRESELECTED_DEMO = {"base_model": DEMO_MODEL, "dataset": DEMO_DATASET, "lora_config": DEMO_CONFIG}
# The page's form posted the labels as worker_labels before they took RunRequest's name: a post made that way
# (a script or a saved page) still says where the run may go.
OLD_LABELS_NAME = "worker_labels"


# The New run page asks first what to train and the settings most runs change; the others come in folded groups
# (a setting not named here, such as one added to TrainParams later, goes to the last group). A group opens by
# itself when one of its fields has an error.
MAIN_SETTINGS = ("num_epochs", "max_steps", "learning_rate", "max_seq_length")
SETTING_GROUPS = (
    ("memory", "GPUs, batching and memory",
     ("batch_size", "grad_accum", "num_gpus", "strategy", "batching", "mode", "gradient_checkpointing",
      "activation_offload", "attention", "liger_kernels", "torch_compile")),
    ("schedule", "Schedule and optimizer",
     ("warmup_ratio", "lr_scheduler", "optimizer", "weight_decay", "max_grad_norm", "neftune_noise_alpha", "seed")),
    ("evaluation", "Evaluation and checkpoints",
     ("eval_fraction", "eval_steps", "early_stopping_patience", "logging_steps", "save_steps", "keep_checkpoints")),
)
MORE_GROUP = ("more", "More settings")
SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)\. ")
SHORT_HELP = 90  # characters of a setting's help shown on its line; the whole text is on its ⓘ


def short_help(text: str) -> str:
    """A setting's help in one line: its first sentence, cut at a word under SHORT_HELP characters."""
    first = SENTENCE_END.split(text, maxsplit=1)[0].rstrip(".")
    if len(first) <= SHORT_HELP:
        return first
    return first[:SHORT_HELP].rsplit(" ", 1)[0].rstrip(",;:(") + "…"


@dataclass(frozen=True)
class Setting:
    """A training setting on the page: its field, the objectives it applies to (space-separated; empty for every
    objective) and its help in one line (the field's help_text is the whole)."""

    field: forms.BoundField
    objectives: str
    short_help: str


@dataclass(frozen=True)
class SettingGroup:
    key: str
    title: str
    settings: list[Setting]

    @property
    def has_errors(self) -> bool:
        return any(s.field.errors for s in self.settings)


class OptionDataSelect(forms.Select):
    """A select whose options carry data attributes, `option_data(value)` each: the New run page's script reads
    them (which row formats an objective trains on, which format a dataset holds)."""

    def __init__(self, option_data: Callable[[Any], dict[str, str]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.option_data = option_data

    def create_option(self, name: str, value: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        option = super().create_option(name, value, *args, **kwargs)
        option["attrs"].update(self.option_data(value) if value not in ("", None) else {})
        return option


def with_option_data(field: forms.Field, option_data: Callable[[Any], dict[str, str]]) -> None:
    widget = OptionDataSelect(option_data, choices=field.choices)  # type: ignore[attr-defined]
    widget.is_required = field.required
    field.widget = widget


def objective_data(name: Any) -> dict[str, str]:
    objective = OBJECTIVES.get(str(name))
    return {"data-formats": " ".join(objective.row_formats)} if objective else {}


def dataset_data(value: Any) -> dict[str, str]:
    dataset = getattr(value, "instance", None)  # a ModelChoiceIteratorValue
    return {"data-format": dataset.format} if dataset is not None else {}


def dataset_label(dataset: Dataset) -> str:
    return f"{dataset} ({dataset.format} rows)"


def obvious_choice(queryset: models.QuerySet[Any], demo_name: str) -> Any:
    """The only row of `queryset`, else the one named `demo_name`, else None."""
    first_two = list(queryset[:2])
    if len(first_two) == 1:
        return first_two[0]
    return queryset.filter(name=demo_name).first()


class AdapterChoiceField(forms.ModelChoiceField):
    """An adapter named with the run that trained it, its method and rank (names alone need not be unique)."""

    def label_from_instance(self, obj: Any) -> str:
        return f"{obj} (run {obj.run_id}, {obj.method} r{obj.rank})" if obj.run_id else f"{obj} ({obj.origin})"


class RunForm(forms.Form):
    """The New run page: a RunRequest's fields, the training settings one field each. A valid form has passed
    the run service's checks (`services.refusals`) and holds the request in `run_request`."""

    name = forms.CharField(max_length=200, required=False, help_text="Optional: a name to find the run by.")
    base_model = forms.ModelChoiceField(queryset=BaseModel.objects.all(), help_text="The model to adapt.")
    dataset = forms.ModelChoiceField(queryset=Dataset.objects.all(), help_text="Training rows.")
    eval_dataset = forms.ModelChoiceField(
        queryset=Dataset.objects.all(), required=False, label="Evaluate on",
        help_text="Optional: rows to evaluate on instead of a held-out fraction of the training rows.")
    lora_config = forms.ModelChoiceField(queryset=LoraConfig.objects.all(), label="LoRA config")
    # Any adapter is accepted (the run service names a wrong base or method); the choices offered are the base's.
    init_adapter = AdapterChoiceField(
        queryset=Adapter.objects.select_related("run").order_by("-id"), required=False, label="Start from adapter",
        empty_label="A new adapter", help_text=INIT_ADAPTER_HELP)
    # Placement (fleet/scheduler.py): which workers may take the run, and how soon (only staff go above 0).
    labels = forms.CharField(
        required=False, max_length=1000, label="Run on workers labelled",
        help_text="Optional: comma-separated labels, e.g. a100, team-nlp; only a worker with all of them takes the run.")
    priority = forms.IntegerField(
        required=False, initial=0, min_value=-100, max_value=100,
        help_text="Higher runs first; 0 is normal, below 0 lets others go first. Only admins may set it above 0.")

    run_request: RunRequest | None = None

    def __init__(self, data: Any = None, *args: Any, suggested: spec.TrainParams | None = None, **kwargs: Any) -> None:
        if data is not None and "labels" not in data and OLD_LABELS_NAME in data:
            data = data.copy()
            data["labels"] = data[OLD_LABELS_NAME]
        super().__init__(data, *args, **kwargs)
        defaults = suggested or spec.TrainParams()
        for f in dataclasses.fields(spec.TrainParams):
            self.fields[f.name] = form_field(f, getattr(defaults, f.name), spec.CHOICES)
        self._describe_objectives()
        if not self.is_bound:
            self._preselect()
            self._offer_adapters_of(self.initial.get("base_model"))

    @classmethod
    def filled_with(cls, request: RunRequest) -> RunForm:
        """An unbound form showing `request` (a clone's inputs), to edit before queueing."""
        initial = {f.name: getattr(request, f.name) for f in dataclasses.fields(RunRequest)}
        initial["labels"] = ", ".join(request.labels)
        return cls(initial=initial, suggested=initial.pop("hyperparameters"))

    def _describe_objectives(self) -> None:
        """Each objective named with what it is and the row formats it trains on; each dataset with its format."""
        objective = self.fields["objective"]
        objective.choices = [(name, f"{name}: {OBJECTIVES[name].label}" if name in OBJECTIVES else name)
                             for name, _ in objective.choices]  # type: ignore[attr-defined]
        with_option_data(objective, objective_data)
        for name in ("dataset", "eval_dataset"):
            self.fields[name].label_from_instance = dataset_label  # type: ignore[attr-defined]
            with_option_data(self.fields[name], dataset_data)

    def _preselect(self) -> None:
        for name, demo_name in PRESELECTED_DEMO.items():
            if self.initial.get(name) is None:
                self.initial[name] = obvious_choice(self.fields[name].queryset, demo_name)  # type: ignore[attr-defined]

    def _offer_adapters_of(self, base: Any) -> None:
        """The New run page offers the LoRA adapters trained on the chosen base (the list follows the base)."""
        field: Any = self.fields["init_adapter"]
        field.queryset = field.queryset.filter(base_model=base, method="lora", run__isnull=False)

    @property
    def objective_formats(self) -> str:
        """The row formats of the objective the form shows (the page's script keeps it current)."""
        objective = OBJECTIVES.get(str(self["objective"].value()))
        return ", ".join(objective.row_formats) if objective else ""

    def _setting(self, name: str) -> Setting:
        field = self[name]
        return Setting(field, " ".join(spec.OBJECTIVE_SETTINGS.get(name, ())), short_help(str(field.help_text)))

    @property
    def main_settings(self) -> list[Setting]:
        """The settings most runs change, asked right after what to train."""
        return [self._setting(name) for name in MAIN_SETTINGS]

    @property
    def objective_settings(self) -> list[Setting]:
        """The settings of one objective or a few (the page's script shows the chosen objective's)."""
        return [self._setting(name) for name in TRAIN_FIELDS if name in spec.OBJECTIVE_SETTINGS]

    @property
    def setting_groups(self) -> list[SettingGroup]:
        """The other settings in folded groups; whatever no group names, in the last."""
        named = {*MAIN_SETTINGS, *spec.OBJECTIVE_SETTINGS, "objective"}
        groups = []
        for key, title, names in SETTING_GROUPS:
            groups.append(SettingGroup(key, title, [self._setting(n) for n in names if n in TRAIN_FIELDS]))
            named.update(names)
        rest = [self._setting(name) for name in TRAIN_FIELDS if name not in named]
        return [*groups, SettingGroup(*MORE_GROUP, rest)] if rest else groups

    @property
    def what_fields(self) -> list[forms.BoundField]:
        """The fields of "What to train": the model, the rows, the adapter config and the adapter to start from."""
        return [self[name] for name in ("base_model", "dataset", "lora_config", "eval_dataset", "init_adapter", "name")]

    @property
    def short_helps(self) -> dict[str, str]:
        """Every field's help in one line, by field name (the page shows the whole text on hover or focus)."""
        return {name: short_help(str(field.help_text)) for name, field in self.fields.items()}

    def clean_labels(self) -> list[str]:
        return [part.strip() for part in (self.cleaned_data.get("labels") or "").split(",") if part.strip()]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data  # field errors already reported
        request = RunRequest(
            name=data["name"], base_model=data["base_model"], dataset=data["dataset"],
            eval_dataset=data.get("eval_dataset"), lora_config=data["lora_config"],
            hyperparameters=spec.TrainParams(**{name: data[name] for name in TRAIN_FIELDS}),
            priority=data.get("priority") or 0, labels=data["labels"], init_adapter=data.get("init_adapter"),
        )
        self.show_refusals(refusals(request))
        if not self.errors:
            self.run_request = request
        return data

    def show_refusals(self, errors: dict[str, list[str]]) -> None:
        """The run service's refusals on the fields they name (a training setting is a field of its own here; a
        problem inside one, such as graders.reference, on that setting, named by its path)."""
        for field, messages in errors.items():
            name, _, within = field.removeprefix(SETTING).partition(".")
            for message in messages:
                self.add_error(name, f"{name}.{within}: {message}" if within else message)


# Sort keys of the runs list -> the model field; each has an index with id as the tie-breaker.
RUN_SORTS = {"created": "id", "name": "name", "state": "state", "step": "step", "loss": "last_loss"}
RUN_SORT_CHOICES = [(f"{sign}{key}", f"{key} ({'descending' if sign else 'ascending'})")
                    for key in RUN_SORTS for sign in ("-", "")]


class RunFilterForm(forms.Form):
    """The runs list's GET filters; every field is optional and a bad value is simply ignored."""

    state = forms.ChoiceField(required=False, choices=[("", "Any state"), *RunState.choices])
    owner = forms.ModelChoiceField(required=False, queryset=None, empty_label="Anyone")
    base_model = forms.ModelChoiceField(required=False, queryset=BaseModel.objects.order_by("name"),
                                        empty_label="Any base model")
    dataset = forms.ModelChoiceField(required=False, queryset=Dataset.objects.order_by("name"),
                                     empty_label="Any dataset")
    q = forms.CharField(required=False, max_length=200, label="Search",
                        widget=forms.TextInput(attrs={"type": "search", "placeholder": "Name, note or tag"}))
    sort = forms.ChoiceField(required=False, choices=RUN_SORT_CHOICES, initial="-created")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["owner"].queryset = get_user_model().objects.filter(is_active=True).order_by("username")

    def filters(self) -> dict[str, Any]:
        """Queryset filter kwargs from the valid fields (an invalid field is dropped, not an error page)."""
        self.is_valid()
        data = getattr(self, "cleaned_data", {})
        return {name: data[name] for name in ("state", "owner", "base_model", "dataset") if data.get(name)}

    def ordering(self) -> tuple[str, bool]:
        """(sort key such as "-loss", descending?) with the default when absent or invalid."""
        self.is_valid()
        key = getattr(self, "cleaned_data", {}).get("sort") or "-created"
        return key, key.startswith("-")
