"""`POST /v1/fine_tuning/jobs`: an OpenAI job request turned into a Tunedeck run request and queued by the run
service (`training/services.py`: the same checks, placement fields included, as the browser's New run page).

The request:

    {"model": "<base model name, or a hub id / local path registered on the fly, or a fine-tuned model>",
     "training_file": "file-<dataset id>",
     "validation_file": "file-<dataset id>",          # optional: evaluate on it (tunedeck eval_fraction must be 0)
     "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 0.5},   # or "auto"
     # (or the same under "method": {"type": "supervised", "supervised": {"hyperparameters": {...}}};
     #  "method": {"type": "dpo", "dpo": {"hyperparameters": {..., "beta": 0.1}}} trains DPO on preference rows;
     #  "method": {"type": "reinforcement", "reinforcement": {"grader": {...}, "hyperparameters": {...,
     #  "compute_multiplier": 1, "eval_interval": 10}}} trains GRPO on prompt_only rows, scored by the grader)
     "suffix": "<the run's name>", "seed": 7,
     "integrations": [{"type": "wandb", "wandb": {"project": "arith", "name": "...", "tags": ["..."]}}],
     # optional: report to W&B (TrainParams report_to, tracking_project, tracking_run_name, tracking_tags); the
     # W&B entity and key are the worker's
     "tunedeck": {                                    # optional; the SDK sends it with extra_body=
         "lora_config": "<a saved LoRA config's name or id>",  # or
         "lora": {...LoraParams fields...},           # an inline adapter config (saved, or reused if equal)
         "hyperparameters": {...TrainParams fields...},
         "labels": ["a100"], "priority": 0}}             # labels: also accepted as worker_labels

A fine-tuned model as `model` (`<base>:ft-<job number>`, a succeeded job's `fine_tuned_model`) continues that
job's adapter: a warm start on its base, with its LoRA config unless tunedeck names another config of its shape
(for DPO, the reference is that adapter as it was). A checkpoint's id (`…:ckpt-step-<n>`) is refused.

The method's type sets TrainParams' objective (supervised: sft, dpo: dpo, reinforcement: grpo), DPO's beta its
beta, reinforcement's grader its graders (OpenAI's grader shapes are Tunedeck's), compute_multiplier its
num_generations (times the suggested 8 answers per prompt) and eval_interval its eval_steps; eval_samples and
reasoning_effort have no counterpart and are refused unless "auto" / "default". GRPO's other settings
(temperature, max_completion_length, kl_coef) go in tunedeck.hyperparameters.
n_epochs, batch_size and seed set TrainParams' num_epochs, batch_size and seed; learning_rate_multiplier
multiplies Tunedeck's suggested learning rate for the base's size. "auto" (or leaving one out) keeps that
suggestion. Setting a field both the OpenAI way and in tunedeck.hyperparameters is refused.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from django.db import IntegrityError, transaction

from webapp.api import access
from webapp.api.openai.errors import OpenAIError
from webapp.api.openai.serializers import FILE_PREFIX, JOB_PREFIX, parse_id
from webapp.api.problems import flatten_errors
from webapp.api.runs import RunCreateSerializer
from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.catalog.services import register_base_model
from webapp.ids import whole
from webapp.training.models import Adapter, TrainingRun
from webapp.training.services import SETTING, TRAIN_FIELDS, RunRefused, RunRequest, queue_run
from workers.contract import spec
from workers.training.modelinfo import ModelNotFound

TOP_LEVEL = {"model", "training_file", "validation_file", "hyperparameters", "method", "suffix", "seed",
             "metadata", "integrations", "tunedeck"}
OPENAI_HYPERPARAMETERS = {"n_epochs": "num_epochs", "batch_size": "batch_size",
                          "learning_rate_multiplier": "learning_rate", "beta": "beta",
                          "compute_multiplier": "num_generations", "eval_interval": "eval_steps"}
# OpenAI's method types Tunedeck trains, the objective each names, and the hyperparameters each takes.
METHODS = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}
METHOD_HYPERPARAMETERS = {"supervised": {"n_epochs", "batch_size", "learning_rate_multiplier"},
                          "dpo": {"n_epochs", "batch_size", "learning_rate_multiplier", "beta"},
                          "reinforcement": {"n_epochs", "batch_size", "learning_rate_multiplier", "compute_multiplier",
                                            "eval_interval", "eval_samples", "reasoning_effort"}}
# OpenAI's hyperparameters with no counterpart in Tunedeck: accepted only as "auto" (or OpenAI's default), and why not.
UNSUPPORTED_HYPERPARAMETERS = {
    "eval_samples": ("auto", "Tunedeck evaluates on the eval set's rows (validation_file or "
                             "tunedeck.hyperparameters.eval_fraction), one answer each"),
    "reasoning_effort": ("default", "Tunedeck's base models have no reasoning-effort setting"),
}
# The settings of each method besides its hyperparameters (reinforcement's grader: TrainParams' graders).
METHOD_SETTINGS = {"supervised": {}, "dpo": {}, "reinforcement": {"grader": "graders"}}
REQUIRED_SETTINGS = {"reinforcement": {"grader"}}
# worker_labels is the name README documented for labels before they took the run request's name: still accepted.
OLD_LABELS_NAME = "worker_labels"
TUNEDECK_KEYS = {"lora_config", "lora", "hyperparameters", "labels", OLD_LABELS_NAME, "priority"}
# Where a request names each of the run request's fields (the OpenAI names, and Tunedeck's own under tunedeck).
PARAMS = {"name": "suffix", "base_model": "model", "dataset": "training_file", "eval_dataset": "validation_file",
          "lora_config": "tunedeck.lora", "priority": "tunedeck.priority", "init_adapter": "model"}
# OpenAI's W&B integration's settings and the TrainParams each sets (its entity is the worker's).
WANDB_SETTINGS = {"project": "tracking_project", "name": "tracking_run_name", "tags": "tracking_tags"}
SUFFIX_MAX = 64
# A fine-tuned model's id as jobs return it (serializers.fine_tuned_model), or one of its checkpoints'.
FINE_TUNED_MODEL = re.compile(r"(?P<base>.+):ft-(?P<job>[0-9]{1,18})(?P<checkpoint>:ckpt-step-[0-9]+)?")


def _bad(message: str, param: str | None, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def _object(value: Any, param: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{param} must be an object", param, "invalid_type")
    return value


def _refuse_unknown(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise _bad(f"unknown field(s) {', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(known))}",
                   prefix + unknown[0], "unknown_parameter")


def resolve_model(model: Any, user: Any) -> BaseModel:
    """A registered base model by name (or by source); else a hub id or local path, registered if it inspects."""
    if not isinstance(model, str) or not model.strip():
        raise _bad("model is required: a registered base model's name, a Hugging Face hub id or a local path",
                   "model", "missing_required_parameter" if not model else "invalid_type")
    model = model.strip()
    base = BaseModel.objects.filter(name=model).first() or BaseModel.objects.filter(source=model).order_by("id").first()
    if base is not None:
        return base
    try:
        return register_base_model(model[:200], model, "", user)
    except ModelNotFound as exc:
        raise _bad(f"model {model!r} is not a registered base model, and registering it failed: {exc}",
                   "model", "model_not_found") from None
    except IntegrityError:  # registered by a concurrent request meanwhile
        return BaseModel.objects.get(name=model[:200])


def fine_tuned_model(model: Any, user: Any) -> tuple[BaseModel, Adapter] | None:
    """The base and the adapter of the fine-tuned model `model` names, to continue (a warm start); None for a base
    model's name."""
    match = FINE_TUNED_MODEL.fullmatch(model.strip()) if isinstance(model, str) else None
    if match is None or BaseModel.objects.filter(name=model.strip()).exists():
        return None
    if match["checkpoint"]:
        raise _bad(f"model {model!r} is a checkpoint, which a job cannot start from: give the fine-tuned model "
                   f"{model.strip().removesuffix(match['checkpoint'])!r}", "model", "model_not_found")
    runs = TrainingRun.objects.select_related("base_model", "lora_config")
    run = access.visible(user, runs).filter(pk=int(match["job"]), base_model__name=match["base"]).first()
    if run is None:
        raise _bad(f"model {model!r} is no fine-tuned model: no job {JOB_PREFIX}{match['job']} trained "
                   f"{match['base']!r}", "model", "model_not_found")
    adapter = Adapter.objects.select_related("base_model", "run__lora_config").filter(run=run).first()
    if adapter is None:
        raise _bad(f"model {model!r}: job {JOB_PREFIX}{run.pk} is {run.state}, and only a succeeded job's model "
                   "can be fine-tuned further", "model", "model_not_found")
    return run.base_model, adapter


def resolve_file(value: Any, param: str) -> Dataset:
    if value is None or value == "":
        raise _bad(f"{param} is required: the id of an uploaded file (file-…)", param, "missing_required_parameter")
    if not isinstance(value, str):
        raise _bad(f"{param} must be the id of an uploaded file (file-…), got {type(value).__name__}", param,
                   "invalid_type")
    try:
        pk = parse_id(value, FILE_PREFIX, "file")
    except OpenAIError as exc:
        raise _bad(exc.message, param, "file_not_found") from None
    dataset = Dataset.objects.filter(pk=pk).first()
    if dataset is None:
        raise _bad(f"No such file: {value!r}", param, "file_not_found")
    return dataset


def _method_settings(kind: str, settings: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """The method's own settings (reinforcement's grader), each as the TrainParams field it sets: (value, param)."""
    found: dict[str, tuple[Any, str]] = {}
    for name, field in METHOD_SETTINGS[kind].items():
        param = f"method.{kind}.{name}"
        if settings.get(name) is None:
            if name in REQUIRED_SETTINGS.get(kind, ()):
                raise _bad(f"{param} is required: the grader that scores each sampled answer, in OpenAI's grader "
                           "shapes (string_check, text_similarity, score_model, multi, python)", param,
                           "missing_required_parameter")
            continue
        found[field] = (_object(settings[name], param), param)
    return found


def _openai_hyperparameters(body: dict[str, Any]) -> tuple[dict[str, Any], str, str | None, dict[str, tuple[Any, str]]]:
    """The OpenAI hyperparameters (top level or under method.<type>), the path they were given at, the method's
    type (None when the request names no method) and the method's own settings (see _method_settings)."""
    top = _object(body.get("hyperparameters"), "hyperparameters")
    method = _object(body.get("method"), "method")
    nested: dict[str, Any] = {}
    where, kind, own = "hyperparameters", None, {}
    if method:
        kind = method.get("type", "supervised")
        if kind not in METHODS:
            raise _bad(f"method.type {kind!r} is not supported: Tunedeck trains {', '.join(METHODS)} "
                       "(LoRA/QLoRA adapters)", "method.type", "unsupported_value")
        _refuse_unknown(method, {"type", kind}, "method")
        settings = _object(method.get(kind), f"method.{kind}")
        _refuse_unknown(settings, {"hyperparameters", *METHOD_SETTINGS[kind]}, f"method.{kind}")
        nested = _object(settings.get("hyperparameters"), f"method.{kind}.hyperparameters")
        own = _method_settings(kind, settings)
    if top and nested:
        raise _bad(f"give hyperparameters either at the top level or in method.{kind}.hyperparameters, not both",
                   "hyperparameters")
    if nested:
        top, where = nested, f"method.{kind}.hyperparameters"
    _refuse_unknown(top, METHOD_HYPERPARAMETERS[kind or "supervised"], where)
    for name, value in top.items():
        if name in UNSUPPORTED_HYPERPARAMETERS and value not in (None, "auto", UNSUPPORTED_HYPERPARAMETERS[name][0]):
            raise _bad(f"{where}.{name} is not supported: {UNSUPPORTED_HYPERPARAMETERS[name][1]}; leave it out or "
                       f"give \"{UNSUPPORTED_HYPERPARAMETERS[name][0]}\"", f"{where}.{name}", "unsupported_parameter")
    return top, where, kind, own


def _number(value: Any, param: str, kind: type) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or value <= 0:
        raise _bad(f"{param} must be \"auto\" or a positive {'integer' if kind is int else 'number'}; got {value!r}",
                   param)
    return kind(value)


def _hyperparameter(name: str, value: Any, param: str, suggested: spec.TrainParams) -> Any:
    """The TrainParams value of one OpenAI hyperparameter: the multipliers scale Tunedeck's suggestion (the learning
    rate for the base's size; compute_multiplier the answers sampled per prompt, at least two)."""
    if name == "learning_rate_multiplier":
        return _number(value, param, float) * suggested.learning_rate
    if name == "compute_multiplier":
        return max(2, round(_number(value, param, float) * suggested.num_generations))
    if name == "beta":
        return _number(value, param, float)
    return _number(value, param, int)


def train_values(body: dict[str, Any], tunedeck: dict[str, Any], base: BaseModel) -> tuple[dict[str, Any], dict[str, str]]:
    """The run's TrainParams as a dict, and for each field set the OpenAI way, the param that set it."""
    extras = _object(tunedeck.get("hyperparameters"), "tunedeck.hyperparameters")
    _refuse_unknown(extras, set(TRAIN_FIELDS), "tunedeck.hyperparameters")
    suggested = spec.suggest_train_params(base.num_parameters)
    values = {**dataclasses.asdict(suggested), **extras}
    origins: dict[str, str] = {}
    openai_hp, where, kind, own = _openai_hyperparameters(body)
    if kind is not None:
        if extras.get("objective", METHODS[kind]) != METHODS[kind]:
            raise _bad(f"method.type {kind} trains objective {METHODS[kind]}, and tunedeck.hyperparameters.objective "
                       f"is {extras['objective']!r}: give one", "method.type")
        values["objective"], origins["objective"] = METHODS[kind], "method.type"
    for field, (value, param) in own.items():
        if field in extras:
            raise _bad(f"{param} and tunedeck.hyperparameters.{field} both set {field}: give one", param)
        values[field], origins[field] = value, param
    for name, value in openai_hp.items():
        if value is None or value == "auto" or name in UNSUPPORTED_HYPERPARAMETERS:
            continue
        field, param = OPENAI_HYPERPARAMETERS[name], f"{where}.{name}"
        if field in extras:
            raise _bad(f"{param} and tunedeck.hyperparameters.{field} both set {field}: give one", param)
        values[field] = _hyperparameter(name, value, param, suggested)
        origins[field] = param
    if body.get("seed") is not None:
        if "seed" in extras:
            raise _bad("seed and tunedeck.hyperparameters.seed both set the seed: give one", "seed")
        seed = body["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise _bad(f"seed must be a non-negative integer; got {seed!r}", "seed")
        values["seed"], origins["seed"] = seed, "seed"
    return values, origins


def integration_values(integrations: Any, tunedeck: dict[str, Any], values: dict[str, Any],
                       ) -> tuple[dict[str, Any], dict[str, str]]:
    """The TrainParams of OpenAI's `integrations`: [{"type": "wandb", "wandb": {"project", "name", "tags"}}] adds
    wandb to report_to (beside trackers tunedeck.hyperparameters.report_to names) and sets tracking_project,
    tracking_run_name and tracking_tags; and for each, the param that set it. The W&B entity and key are the
    worker's (WANDB_ENTITY, WANDB_API_KEY): a job names neither."""
    if integrations is None or integrations == []:
        return {}, {}
    if not isinstance(integrations, list):
        raise _bad("integrations must be a list of objects", "integrations", "invalid_type")
    if len(integrations) > 1:
        raise _bad("integrations: Tunedeck reports a job to one W&B run; give one integration", "integrations")
    param = "integrations[0]"
    item = _object(integrations[0], param)
    if item.get("type") != "wandb":
        raise _bad(f"{param}.type {item.get('type')!r} is not supported: Tunedeck's integration is wandb (TensorBoard "
                   "and MLflow: tunedeck.hyperparameters.report_to)", f"{param}.type", "unsupported_parameter")
    _refuse_unknown(item, {"type", "wandb"}, param)
    wandb = _object(item.get("wandb"), f"{param}.wandb")
    _refuse_unknown(wandb, set(WANDB_SETTINGS) | {"entity"}, f"{param}.wandb")
    if wandb.get("entity") not in (None, ""):
        raise _bad(f"{param}.wandb.entity is set by the worker that trains the job (WANDB_ENTITY, with its key): "
                   "leave it out", f"{param}.wandb.entity", "unsupported_parameter")
    if not isinstance(wandb.get("project"), str) or not wandb["project"].strip():
        raise _bad(f"{param}.wandb.project is required: the W&B project to report to", f"{param}.wandb.project")
    extras = _object(tunedeck.get("hyperparameters"), "tunedeck.hyperparameters")
    trackers = list(values.get("report_to") or [])
    if spec.NO_TRACKER in trackers:
        raise _bad(f"{param} reports to W&B, and tunedeck.hyperparameters.report_to is none: give one", param)
    found = {"report_to": trackers if "wandb" in trackers else [*trackers, "wandb"]}
    origins = {"report_to": param}
    for key, field in WANDB_SETTINGS.items():
        if wandb.get(key) is None:
            continue
        if field in extras:
            raise _bad(f"{param}.wandb.{key} and tunedeck.hyperparameters.{field} both set {field}: give one",
                       f"{param}.wandb.{key}")
        found[field], origins[field] = wandb[key], f"{param}.wandb.{key}"
    return found, origins


def _lora_params(value: dict[str, Any]) -> spec.LoraParams:
    _refuse_unknown(value, {f.name for f in dataclasses.fields(spec.LoraParams)}, "tunedeck.lora")
    try:
        params = spec.LoraParams(**value)
        errors = params.validate()
    except (TypeError, ValueError, AttributeError) as exc:
        raise _bad(f"tunedeck.lora: {exc}", "tunedeck.lora") from None
    if errors:
        name = next(iter(errors))
        text = "; ".join(f"tunedeck.lora.{k}: {v}" for k, v in errors.items())
        raise _bad(text, f"tunedeck.lora.{name}")
    return params


def lora_config_for(tunedeck: dict[str, Any], user: Any, parent: Adapter | None = None) -> LoraConfig:
    """A saved config by name or id; or the inline `lora` as a config, reusing an equal one; with neither, the
    config that trained `parent` (the adapter a warm start continues), else the default LoRA as a config."""
    named, inline = tunedeck.get("lora_config"), tunedeck.get("lora")
    if named is not None and inline is not None:
        raise _bad("give tunedeck.lora_config (a saved config) or tunedeck.lora (inline parameters), not both",
                   "tunedeck.lora")
    if named is None and inline is None and parent is not None and parent.run is not None:
        return parent.run.lora_config
    if named is not None:
        found = LoraConfig.objects.filter(name=str(named)).first()
        pk = whole(named)
        if found is None and pk is not None:
            found = LoraConfig.objects.filter(pk=pk).first()
        if found is None:
            raise _bad(f"no LoRA config named {named!r}", "tunedeck.lora_config", "not_found")
        return found
    params = _lora_params(_object(inline, "tunedeck.lora"))
    normalized = dataclasses.asdict(params)
    for config in LoraConfig.objects.filter(method=params.method).order_by("id"):
        if config.params == normalized:
            return config
    name, n = params.summary()[:190], 1
    while LoraConfig.objects.filter(name=name if n == 1 else f"{name} ({n})").exists():
        n += 1
    return LoraConfig.objects.create(name=name if n == 1 else f"{name} ({n})", params=normalized, created_by=user)


def _refused(errors: dict[str, list[str]], params: dict[str, str]) -> OpenAIError:
    """The run service's (or the settings' check's) field errors as one error naming the first param: `params`
    says where this request set a field, a setting not set the OpenAI way is under tunedeck.hyperparameters."""
    named = []
    for field, messages in errors.items():
        setting = field.removeprefix(SETTING)
        head, _, path = setting.partition(".")  # a path inside a setting: hyperparameters.graders.reference
        within = params.get(SETTING + head) if path else None
        param = params.get(field) or (f"{within}.{path}" if within else None) or (
            f"tunedeck.{field}" if head in TRAIN_FIELDS else None)
        text = "; ".join(str(m) for m in messages)
        if setting in spec.CHOICES and "valid choice" in text:  # the check's message does not list them
            text += f" (one of: {', '.join(spec.CHOICES[setting])})"
        named.append((param, text))
    text = "; ".join(f"{param}: {message}" if param else message for param, message in named)
    return _bad(text, named[0][0] if named else None)


def _labels(tunedeck: dict[str, Any]) -> tuple[list[str], str]:
    """The labels and the param that gave them (a list, or a comma-separated string)."""
    key = OLD_LABELS_NAME if OLD_LABELS_NAME in tunedeck else "labels"
    param, value = f"tunedeck.{key}", tunedeck.get(key)
    if "labels" in tunedeck and OLD_LABELS_NAME in tunedeck:
        raise _bad(f"give tunedeck.labels or tunedeck.{OLD_LABELS_NAME} (its old name), not both", param)
    if value is None:
        return [], param
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value, param
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()], param
    raise _bad(f"{param} must be a list of labels (or a comma-separated string)", param, "invalid_type")


def _settings(values: dict[str, Any], priority: Any, params: dict[str, str]) -> tuple[spec.TrainParams, int]:
    """The training settings and the priority, typed and range-checked as the REST API checks them."""
    checked = RunCreateSerializer(data={"hyperparameters": values, "priority": 0 if priority is None else priority},
                                  partial=True)
    if not checked.is_valid():
        raise _refused(flatten_errors(checked.errors), params)
    data = checked.validated_data
    return spec.TrainParams(**data["hyperparameters"]), data["priority"]


def create_job(body: Any, user: Any) -> TrainingRun:
    """Validate the whole request, then queue the run; every refusal is an OpenAIError naming its param."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_type")
    _refuse_unknown(body, TOP_LEVEL, "")
    if body.get("metadata"):
        raise _bad("metadata is not supported by Tunedeck", "metadata", "unsupported_parameter")
    suffix = body.get("suffix") or ""
    if not isinstance(suffix, str) or len(suffix) > SUFFIX_MAX:
        raise _bad(f"suffix must be a string of at most {SUFFIX_MAX} characters", "suffix")
    tunedeck = _object(body.get("tunedeck"), "tunedeck")
    _refuse_unknown(tunedeck, TUNEDECK_KEYS, "tunedeck")
    dataset = resolve_file(body.get("training_file"), "training_file")
    validation = body.get("validation_file")
    eval_dataset = resolve_file(validation, "validation_file") if validation not in (None, "") else None
    fine_tuned = fine_tuned_model(body.get("model"), user)
    base, parent = fine_tuned if fine_tuned is not None else (resolve_model(body.get("model"), user), None)
    values, origins = train_values(body, tunedeck, base)
    tracked, tracked_origins = integration_values(body.get("integrations"), tunedeck, values)
    values, origins = {**values, **tracked}, {**origins, **tracked_origins}
    labels, labels_param = _labels(tunedeck)
    params = {**PARAMS, **{SETTING + name: param for name, param in origins.items()}, "labels": labels_param}
    with transaction.atomic():  # an inline LoRA config saved for a job that is then refused goes with it
        config = lora_config_for(tunedeck, user, parent)
        hyperparameters, priority = _settings(values, tunedeck.get("priority"), params)
        request = RunRequest(name=suffix, base_model=base, dataset=dataset, eval_dataset=eval_dataset,
                             lora_config=config, hyperparameters=hyperparameters, priority=priority, labels=labels,
                             init_adapter=parent)
        try:
            return queue_run(user, request, via=" through the OpenAI-compatible API")
        except RunRefused as refused:
            raise _refused(refused.errors, params) from None
