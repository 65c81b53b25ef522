"""Creating a run: one service behind every way in.

The New run page (`forms.RunForm`), the REST API (`api/runs.py`), the OpenAI-compatible jobs endpoint
(`api/openai/jobs.py`), clone and the CLI's YAML run specs (posted to the REST API) each turn their input into a
`RunRequest` and call `queue_run`. Each front end checks the shape of its own input (types, ids, names); the
checks that need the rows (the base's positions and modules, the datasets' formats and lengths, the adapter
config) and the staff-only priority live here once. A refusal is a `RunRefused` naming each field as
`RunRequest` names it (a training setting as `hyperparameters.<name>`), which each front end shows its own way.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from django import forms
from django.conf import settings
from django.db import transaction

from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.catalog.services import truncation_problem
from webapp.fleet.forms import parse_labels
from webapp.fleet.needs import run_needs
from webapp.jobs import ledger
from webapp.training.models import Adapter, TrainingRun
from workers.contract import spec
from workers.data.datasets import PREVIEW_MORE_FIELDS
from workers.grading import grader_problems
from workers.training.engine import check_switches
from workers.training.modelinfo import check_adapter
from workers.training.objectives import objective_for
from workers.training.peftsetup import shape_differences

TRAIN_FIELDS = [f.name for f in dataclasses.fields(spec.TrainParams)]
SETTING = "hyperparameters."  # a training setting's error is named hyperparameters.<setting>
# Row formats trl trains as chat (formatted with the tokenizer's chat template), and those it trains as plain strings.
CHAT_FORMATS = ("alpaca", "messages", "sharegpt")
# Why a warm start's LoRA config must have its parent's shape, said where the parent is chosen (page, API, CLI).
INIT_ADAPTER_HELP = (
    "Optional warm start: the adapter this run continues (e.g. SFT, then DPO), trained by a run on the same base "
    "model. Training starts from its weights, and DPO's reference is that adapter as it was, not the bare base. "
    "The LoRA config must have its shape (method, r, alpha, target modules, DoRA, rsLoRA, bias, modules to save): "
    "a config of another shape is refused rather than replaced, so that the run always shows the config it trained "
    "with; the parent's own config always fits. Quantization, compute dtype and dropout may differ: a QLoRA run "
    "can continue an adapter trained on the full-precision base."
)


@dataclasses.dataclass(kw_only=True)
class RunRequest:
    """A new run, each field once: what every front end builds (the CLI's run specs have exactly these keys)."""

    base_model: BaseModel
    dataset: Dataset
    lora_config: LoraConfig
    hyperparameters: spec.TrainParams
    name: str = ""
    eval_dataset: Dataset | None = None  # None: eval_fraction decides
    priority: int = 0  # higher runs first; above 0 for staff only
    labels: list[str] = dataclasses.field(default_factory=list)  # only a worker with all of them takes the run
    init_adapter: Adapter | None = None  # warm start: the adapter the run continues (INIT_ADAPTER_HELP)


class RunRefused(Exception):
    """The run was not queued: {field: [messages]}, fields named as RunRequest names them."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("; ".join(f"{field}: {' '.join(messages)}" for field, messages in errors.items()))
        self.errors = errors


def queue_run(owner: Any, request: RunRequest, via: str = "") -> TrainingRun:
    """The queued run, with its placement needs (GPU memory and count, labels, priority); RunRefused if a check
    fails. `via` ends the ledger's "Queued by" note."""
    ignored = request.hyperparameters.ignored_settings()
    request = with_site_trackers(for_objective(request))
    errors = refusals(request)
    if not errors and request.priority > 0 and not owner.is_staff:
        errors["priority"] = ["only an admin can set a priority above 0"]
    if errors:
        raise RunRefused(errors)
    params = request.hyperparameters
    needs = run_needs(request.base_model, request.lora_config.lora_params(), params)
    with transaction.atomic():
        run = TrainingRun.objects.create(
            name=request.name, owner=owner, base_model=request.base_model, dataset=request.dataset,
            eval_dataset=request.eval_dataset, lora_config=request.lora_config,
            hyperparameters=dataclasses.asdict(params), priority=request.priority,
            needs_labels=parse_labels(", ".join(request.labels)), init_adapter=request.init_adapter,
            init_adapter_name=str(request.init_adapter or "")[:200], **needs,
        )
        ledger.note(run, f"Queued by {owner}{via}")
        if ignored:
            ledger.note(run, f"Settings {params.objective} does not use, left at their defaults: {', '.join(ignored)}")
    return run


def with_site_trackers(request: RunRequest) -> RunRequest:
    """`request` with the site's trackers (settings.TUNEDECK_REPORT_TO) when it names none: report_to empty takes
    them, ["none"] keeps none. The run then shows the trackers it reports to."""
    params = request.hyperparameters
    if params.report_to or not settings.TUNEDECK_REPORT_TO:
        return request
    return dataclasses.replace(request, hyperparameters=dataclasses.replace(
        params, report_to=list(settings.TUNEDECK_REPORT_TO)))


def for_objective(request: RunRequest) -> RunRequest:
    """`request` with the settings of other objectives at their defaults (spec.OBJECTIVE_SETTINGS): they are
    ignored, never refused, since the New run page posts the settings it hides too."""
    return dataclasses.replace(request, hyperparameters=request.hyperparameters.for_objective())


def refusals(request: RunRequest) -> dict[str, list[str]]:
    """Every reason the run cannot be queued, by field; {} when it can. The page's form shows them as it validates."""
    errors: dict[str, list[str]] = {}
    request = for_objective(request)

    def add(field: str, message: str) -> None:
        errors.setdefault(field, []).append(message)

    try:
        parse_labels(", ".join(request.labels))
    except forms.ValidationError as exc:
        add("labels", " ".join(exc.messages))
    base, params, eval_dataset = request.base_model, request.hyperparameters, request.eval_dataset
    for name, message in params.validate(base.max_positions, has_eval_dataset=eval_dataset is not None).items():
        add(SETTING + name, message)
    if SETTING + "objective" not in errors:
        _refuse_rows_the_objective_does_not_train_on(request, add)
    if eval_dataset is not None and "eval_dataset" not in errors:
        problem = eval_dataset_problem(eval_dataset, request.dataset, base, params)
        if problem:
            add("eval_dataset", problem)
    if SETTING + "max_seq_length" not in errors:
        _refuse_rows_cut_before_training(request, add, errors)
    if SETTING + "graders" not in errors and SETTING + "objective" not in errors:
        _refuse_bad_graders(request, add)
    if request.init_adapter is not None:
        _refuse_a_parent_the_run_cannot_continue(request, request.init_adapter, add)
    lora = request.lora_config.lora_params()
    for name, message in check_switches(params, lora).items():
        if SETTING + name not in errors:
            add(SETTING + name, message)
    # The same checks the worker makes, from the base's stored module names: refused before queueing.
    adapter_errors = check_adapter(lora, base.linear_modules, base.model_type, train=params,
                                   max_positions=base.max_positions, model_name=base.name)
    for name, message in adapter_errors.items():
        if name not in TRAIN_FIELDS:
            add("lora_config", f"{request.lora_config.name}: {name}: {message}")
        elif SETTING + name not in errors:
            add(SETTING + name, message)
    return errors


def _refuse_rows_the_objective_does_not_train_on(request: RunRequest, add: Any) -> None:
    """Each objective trains on its own row formats (supervised: every format; preference objectives: pairs)."""
    objective = objective_for(request.hyperparameters.objective)
    for name in ("dataset", "eval_dataset"):
        chosen: Dataset | None = getattr(request, name)
        if chosen is not None and chosen.format not in objective.row_formats:
            add(name, f"{chosen} is {chosen.format} rows, and {objective.label.lower()} ({objective.name}) trains on "
                      f"{', '.join(objective.row_formats)} rows: pick a dataset of those or another objective")


def _refuse_a_parent_the_run_cannot_continue(request: RunRequest, parent: Adapter, add: Any) -> None:
    """A warm start continues a LoRA adapter that a run trained on the same base, with a LoRA config of its shape."""
    base = request.base_model
    if parent.base_model_id != base.pk:
        add("init_adapter", f"{parent} is an adapter of {parent.base_model}, and this run trains {base}: pick an "
                            f"adapter of {base}")
    elif parent.method != "lora":
        add("init_adapter", f"{parent} is a {parent.method} adapter: a warm start continues a LoRA adapter (LoRA, "
                            "DoRA, rsLoRA)")
    elif parent.run is None:
        add("init_adapter", f"{parent} is a combination of adapters, with no LoRA config of its own to train it with: "
                            "pick an adapter trained by a run")
    else:
        theirs = parent.run.lora_config
        differences = shape_differences(request.lora_config.lora_params(), theirs.lora_params())
        if differences:
            add("lora_config", f"{request.lora_config.name} does not have the shape of {parent}, which this run "
                               f"continues ({'; '.join(differences)}): use {theirs.name}, the config it was trained "
                               "with, or one of the same shape")
    for name, message in spec.warm_start_problems(request.hyperparameters).items():
        add(SETTING + name, message)


def _refuse_rows_cut_before_training(request: RunRequest, add: Any, errors: dict[str, list[str]]) -> None:
    """Rows whose prompt fills max_seq_length would train on nothing (and every such row fails the run). Prompts
    alone have no answer to cut: the trainer samples it."""
    for name in ("dataset", "eval_dataset"):
        chosen: Dataset | None = getattr(request, name)
        if chosen is None or name in errors or chosen.format == "prompt_only":  # one error a field: skip reading
            continue
        problem = truncation_problem(chosen, request.base_model, request.hyperparameters)
        if problem:
            add(name, problem)


def _refuse_bad_graders(request: RunRequest, add: Any) -> None:
    """Every problem of a GRPO run's grader, named by its path under the setting (hyperparameters.graders.reference),
    each `{{item.<field>}}` checked against the fields of the rows where the datasets' previews show them all (a
    dataset of other rows is refused on its own field); python graders only where an admin allows them
    (TUNEDECK_ALLOW_PYTHON_GRADERS)."""
    params = request.hyperparameters
    if params.objective != "grpo":
        return
    allowed = settings.ALLOW_PYTHON_GRADERS
    fields = [row_fields(d) if d.format == "prompt_only" else None
              for d in (request.dataset, request.eval_dataset) if d is not None]
    known = None if any(f is None for f in fields) else set.intersection(*fields)  # type: ignore[arg-type]
    for path, message in grader_problems(params.graders, known, allow_python=allowed, path="graders").items():
        if path.endswith("type") and not allowed and "python" in json.dumps(params.graders):
            message += " (python graders run only where an admin sets TUNEDECK_ALLOW_PYTHON_GRADERS=1)"
        add(SETTING + path, message)


def row_fields(dataset: Dataset) -> set[str] | None:
    """The fields every previewed row of `dataset` has, which graders may read as {{item.<field>}}; None where the
    preview does not show them (no rows, or a row with more fields than a preview keeps)."""
    rows = dataset.preview_rows()
    if not rows or any(PREVIEW_MORE_FIELDS in row for row in rows):
        return None
    return set.intersection(*(set(row) for row in rows))


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


def train_params(base: BaseModel, given: dict[str, Any]) -> spec.TrainParams:
    """The run's settings: those `given`, the others as suggested for the base's size."""
    return spec.build(spec.TrainParams, {**dataclasses.asdict(spec.suggest_train_params(base.num_parameters)), **given})


def clone_request(run: TrainingRun, name: str = "", owner: Any = None) -> RunRequest:
    """`run`'s inputs as a new run's, named `name` or "<its name> (copy)". For an `owner` who is not staff a
    priority above 0 becomes 0 (theirs to give only by asking an admin). RunRefused for a warm start whose parent
    was deleted since: the copy could only start a new adapter, which is another run."""
    if run.init_adapter_name and run.init_adapter is None:
        raise RunRefused({"init_adapter": [f"run {run.pk} started from the adapter {run.init_adapter_name}, which "
                                           "was deleted since: a copy cannot start from it"]})
    stored = {k: v for k, v in (run.hyperparameters or {}).items() if k in TRAIN_FIELDS}
    priority = run.priority if owner is None or owner.is_staff else min(run.priority, 0)
    return RunRequest(
        name=name or f"{run.name or f'run {run.pk}'} (copy)"[:200], base_model=run.base_model, dataset=run.dataset,
        eval_dataset=run.eval_dataset, lora_config=run.lora_config, hyperparameters=train_params(run.base_model, stored),
        priority=priority, labels=list(run.needs_labels or []), init_adapter=run.init_adapter,
    )
