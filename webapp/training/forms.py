from __future__ import annotations

import dataclasses
from typing import Any

from django import forms
from django.contrib.auth import get_user_model
from django.db import models, transaction

from webapp.catalog.demo import DEMO_CONFIG, DEMO_DATASET, DEMO_MODEL
from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.catalog.services import truncation_problem
from webapp.jobs.models import RunState
from webapp.training.models import TrainingRun
from workers.contract import spec
from workers.training.engine import check_switches
from workers.training.modelinfo import check_adapter

CHOICE_FIELDS = spec.CHOICES
# Row formats trl trains as chat (formatted with the tokenizer's chat template), and those it trains as plain strings.
CHAT_FORMATS = ("alpaca", "messages", "sharegpt")


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
# The New run page preselects an input where the choice is obvious, so that the README's first run (keep the
# demo model, dataset and config, press Train) needs no choosing: the only row there is, else the demo's.
PRESELECTED_DEMO = {"base_model": DEMO_MODEL, "dataset": DEMO_DATASET, "lora_config": DEMO_CONFIG}


def obvious_choice(queryset: models.QuerySet[Any], demo_name: str) -> Any:
    """The only row of `queryset`, else the one named `demo_name`, else None."""
    first_two = list(queryset[:2])
    if len(first_two) == 1:
        return first_two[0]
    return queryset.filter(name=demo_name).first()


class RunForm(forms.Form):
    name = forms.CharField(max_length=200, required=False, help_text="Optional: a name to find the run by.")
    base_model = forms.ModelChoiceField(queryset=BaseModel.objects.all(), help_text="The model to adapt.")
    dataset = forms.ModelChoiceField(queryset=Dataset.objects.all(), help_text="Training rows.")
    eval_dataset = forms.ModelChoiceField(
        queryset=Dataset.objects.all(), required=False, label="Evaluate on",
        help_text="Optional: rows to evaluate on instead of a held-out fraction of the training rows.")
    lora_config = forms.ModelChoiceField(queryset=LoraConfig.objects.all(), label="LoRA config")
    # Placement (fleet/scheduler.py): which workers may take the run, and how soon (only staff go above 0).
    worker_labels = forms.CharField(
        required=False, max_length=1000, label="Run on workers labelled",
        help_text="Optional: comma-separated labels, e.g. a100, team-nlp; only a worker with all of them takes the run.")
    priority = forms.IntegerField(
        required=False, initial=0, min_value=-100, max_value=100,
        help_text="Higher runs first; 0 is normal, below 0 lets others go first. Only admins may set it above 0.")

    def clean_worker_labels(self) -> list[str]:
        from webapp.fleet.forms import parse_labels

        return parse_labels(self.cleaned_data.get("worker_labels") or "")

    def __init__(self, *args: Any, suggested: spec.TrainParams | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        defaults = suggested or spec.TrainParams()
        for f in dataclasses.fields(spec.TrainParams):
            self.fields[f.name] = _form_field(f, getattr(defaults, f.name))
        if not self.is_bound:
            self._preselect()

    def _preselect(self) -> None:
        for name, demo_name in PRESELECTED_DEMO.items():
            if self.initial.get(name) is None:
                self.initial[name] = obvious_choice(self.fields[name].queryset, demo_name)  # type: ignore[attr-defined]

    @property
    def train_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in TRAIN_FIELDS]

    @property
    def what_fields(self) -> list[forms.BoundField]:
        """The fields of "What to train": the model, the rows and the adapter config."""
        return [self[name] for name in ("name", "base_model", "dataset", "eval_dataset", "lora_config")]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if any(name not in data for name in TRAIN_FIELDS):
            return data  # field errors already reported
        params = spec.TrainParams(**{name: data[name] for name in TRAIN_FIELDS})
        base: BaseModel | None = data.get("base_model")
        eval_dataset: Dataset | None = data.get("eval_dataset")
        for name, message in params.validate(base.max_positions if base else None,
                                             has_eval_dataset=eval_dataset is not None).items():
            self.add_error(name, message)
        if eval_dataset is not None:
            problem = eval_dataset_problem(eval_dataset, data.get("dataset"), base, params)
            if problem:
                self.add_error("eval_dataset", problem)
        if base is not None and "max_seq_length" not in self.errors:
            self._refuse_rows_cut_before_training(data, base, params)
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

    def _refuse_rows_cut_before_training(self, data: dict[str, Any], base: BaseModel, params: spec.TrainParams) -> None:
        """Rows whose prompt fills max_seq_length would train on nothing (and every such row fails the run):
        refused here, where every way of creating a run (page, REST, OpenAI jobs, clone) passes."""
        for name in ("dataset", "eval_dataset"):
            chosen: Dataset | None = data.get(name)
            if chosen is None or name in self.errors:  # one error a field: skip reading and tokenizing the file
                continue
            problem = truncation_problem(chosen, base, params)
            if problem:
                self.add_error(name, problem)

    def refuse_priority_for(self, user: Any) -> None:
        """A priority above 0 is for staff: anyone else gets the field error."""
        if self.is_valid() and (self.cleaned_data.get("priority") or 0) > 0 and not user.is_staff:
            self.add_error("priority", "only an admin can set a priority above 0")

    def create_run(self, owner: Any, via: str = "") -> TrainingRun:
        """The queued run of a valid form, with its placement needs (GPU memory and count, labels, priority)."""
        from webapp.fleet.scheduler import run_needs  # the scheduler imports the run model: import when used
        from webapp.jobs import ledger

        data = self.cleaned_data
        needs = run_needs(data["base_model"], data["lora_config"].lora_params(),
                          spec.build(spec.TrainParams, data["hyperparameters"]), data["hyperparameters"])
        with transaction.atomic():
            run = TrainingRun.objects.create(
                name=data["name"], owner=owner, base_model=data["base_model"], dataset=data["dataset"],
                eval_dataset=data.get("eval_dataset"),
                lora_config=data["lora_config"], hyperparameters=data["hyperparameters"],
                priority=data.get("priority") or 0, needs_labels=data.get("worker_labels") or [], **needs,
            )
            ledger.note(run, f"Queued by {owner}{via}")
        return run


def eval_dataset_problem(eval_dataset: Dataset, dataset: Dataset | None, base: BaseModel | None,
                         params: spec.TrainParams) -> str | None:
    """Why a run cannot evaluate on `eval_dataset`, or None.

    trl prepares the eval rows on their own, so any two formats mix (the eval loss is computed on each row as
    its format is trained) but one: chat rows are formatted with the tokenizer's chat template, and the
    runner supplies a fallback template only when the training rows are chat. Plain-text or prompt/completion
    training on a base without a chat template would fail at the first evaluation."""
    if params.eval_fraction > 0:
        return (f"give an eval dataset or eval_fraction {params.eval_fraction:g} (a held-out fraction of the "
                "training rows), not both: set eval_fraction to 0 to evaluate on this dataset")
    if (dataset is not None and base is not None and not base.has_chat_template
            and eval_dataset.format in CHAT_FORMATS and dataset.format not in CHAT_FORMATS):
        return (f"{eval_dataset} is {eval_dataset.format} rows (chat) but the training dataset {dataset} is "
                f"{dataset.format} rows, and {base} has no chat template to format chat rows with: pick an eval "
                f"dataset of text or prompt_completion rows, or train on chat rows")
    return None


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
