"""Tunedeck rows as OpenAI objects: a dataset is a `file`, a run a `fine_tuning.job`, its events
`fine_tuning.job.event` objects and its checkpoint events `fine_tuning.job.checkpoint` objects.

The shapes follow the `openai` package's models (openai/types/file_object.py, fine_tuning/fine_tuning_job.py,
fine_tuning_job_event.py, jobs/fine_tuning_job_checkpoint.py); each object also carries a `tunedeck` member
with what the OpenAI shape has no field for.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any

from django.utils import timezone

from webapp.api.openai.errors import OpenAIError
from webapp.catalog.models import BaseModel, Dataset
from webapp.ids import whole
from webapp.jobs.models import RunState
from webapp.training.models import RunEvent, TrainingRun
from workers.contract.spec import TrainParams, suggest_train_params

FILE_PREFIX, JOB_PREFIX, EVENT_PREFIX, CHECKPOINT_PREFIX = "file-", "ftjob-", "ftevent-", "ftckpt-"
ORGANIZATION = "tunedeck"  # the whole team is one organization: everyone sees every job
# Ledger state -> OpenAI status. Files are validated when uploaded and the whole job when it is created, so
# a job never waits in `validating_files`: it starts `queued`; dispatched (a worker is starting it) is `running`.
STATUSES = {
    RunState.QUEUED: "queued",
    RunState.DISPATCHED: "running",
    RunState.RUNNING: "running",
    RunState.SUCCEEDED: "succeeded",
    RunState.FAILED: "failed",
    RunState.CANCELLED: "cancelled",
    RunState.PAUSED: "paused",
}
LEVELS = {"warning": "warn", "warn": "warn", "error": "error", "critical": "error"}


def unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def parse_id(value: str, prefix: str, noun: str) -> int:
    """The integer id inside "file-12" / "ftjob-7"; anything else is a 404 naming what was asked for."""
    text = str(value)
    digits = text[len(prefix):] if text.startswith(prefix) else ""
    if whole(digits, maximum=10**18 - 1) is None:
        raise OpenAIError(404, f"No such {noun}: {text!r} (ids look like {prefix}123)", code="not_found")
    return int(digits)


# --- files ---------------------------------------------------------------------------------------------


def file_object(dataset: Dataset) -> dict[str, Any]:
    return {
        "id": f"{FILE_PREFIX}{dataset.pk}",
        "object": "file",
        "bytes": dataset.size_bytes,
        "created_at": unix(dataset.created_at),
        "filename": dataset.original_filename,
        "purpose": "fine-tune",
        "status": "processed",
        "status_details": None,
        "expires_at": None,
        "tunedeck": {"dataset_id": dataset.pk, "name": dataset.name, "format": dataset.format,
                     "row_count": dataset.row_count, "sha256": dataset.sha256},
    }


# --- jobs ----------------------------------------------------------------------------------------------


def default_learning_rate(base: BaseModel) -> float:
    """What learning_rate_multiplier multiplies: Tunedeck's suggested learning rate for the base's size."""
    return suggest_train_params(base.num_parameters).learning_rate


def default_generations(base: BaseModel) -> int:
    """What compute_multiplier multiplies: the answers per prompt Tunedeck suggests for a reinforcement run."""
    return suggest_train_params(base.num_parameters).num_generations


def fine_tuned_model(run: TrainingRun) -> str:
    return f"{run.base_model.name}:ft-{run.pk}"


def job_model(run: TrainingRun) -> str:
    """The model the job fine-tunes: its base, or for a warm start the fine-tuned model it continues."""
    parent = run.init_adapter
    return f"{run.base_model.name}:ft-{parent.run_id}" if parent is not None and parent.run_id else run.base_model.name


def train_params(run: TrainingRun) -> TrainParams:
    """The run's settings; fields a row stored under another version are dropped rather than failing a list."""
    try:
        return run.train_params()
    except (TypeError, ValueError):
        known = {f.name for f in dataclasses.fields(TrainParams)}
        try:
            return TrainParams(**{k: v for k, v in (run.hyperparameters or {}).items() if k in known})
        except TypeError:
            return TrainParams()


def openai_hyperparameters(run: TrainingRun) -> dict[str, Any]:
    hp = train_params(run)
    epochs = hp.num_epochs
    values: dict[str, Any] = {
        "n_epochs": int(epochs) if float(epochs).is_integer() else epochs,
        "batch_size": hp.batch_size,
        "learning_rate_multiplier": round(hp.learning_rate / default_learning_rate(run.base_model), 6),
    }
    if hp.objective == "dpo":
        values["beta"] = hp.beta
    if hp.objective == "grpo":
        values["compute_multiplier"] = round(hp.num_generations / default_generations(run.base_model), 6)
        values["eval_interval"] = hp.eval_steps or "auto"
    return values


# Each objective's OpenAI method type (the reverse of the jobs endpoint's METHODS).
METHOD_TYPES = {"sft": "supervised", "dpo": "dpo", "grpo": "reinforcement"}


def openai_method(run: TrainingRun, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's method object of the run: its type by objective, with a reinforcement run's grader."""
    params = train_params(run)
    kind = METHOD_TYPES.get(params.objective, "supervised")
    settings: dict[str, Any] = {"hyperparameters": hyperparameters}
    if kind == "reinforcement":
        settings = {"grader": params.graders, **settings}
    return {"type": kind, kind: settings}


def _error(run: TrainingRun) -> dict[str, Any] | None:
    if run.state != RunState.FAILED:
        return None
    return {"code": "training_failed", "message": run.error or "the run failed", "param": None}


def estimated_finish(run: TrainingRun) -> int | None:
    """Start + elapsed / progress, while the run trains and has made some."""
    if run.state != RunState.RUNNING or not run.started_at or not run.step or not run.total_steps:
        return None
    elapsed = (timezone.now() - run.started_at).total_seconds()
    return int(run.started_at.timestamp() + elapsed * run.total_steps / run.step)


def trained_tokens(adapter: Any) -> int | None:
    """The tokens a succeeded run trained on (padding excluded, every epoch and process), as its runner counted
    them; None before it succeeds (and for runs finished before the runner counted them)."""
    count = (adapter.metrics or {}).get("trained_tokens") if adapter is not None else None
    return int(count) if isinstance(count, (int, float)) and not isinstance(count, bool) else None


def integrations(params: TrainParams) -> list[dict[str, Any]]:
    """The job's W&B integration, as OpenAI shows it, for a run that reports to W&B (its entity is the worker's)."""
    if "wandb" not in params.trackers:
        return []
    return [{"type": "wandb", "wandb": {"project": params.tracking_project, "name": params.tracking_run_name or None,
                                        "entity": None, "tags": list(params.tracking_tags) or None}}]


def job_object(run: TrainingRun) -> dict[str, Any]:
    hyperparameters = openai_hyperparameters(run)
    adapter = getattr(run, "adapter", None) if run.state == RunState.SUCCEEDED else None
    return {
        "id": f"{JOB_PREFIX}{run.pk}",
        "object": "fine_tuning.job",
        "created_at": unix(run.created_at),
        "error": _error(run),
        "fine_tuned_model": fine_tuned_model(run) if run.state == RunState.SUCCEEDED else None,
        "finished_at": unix(run.finished_at) if run.is_final else None,
        "hyperparameters": hyperparameters,
        "model": job_model(run),
        "organization_id": ORGANIZATION,
        "result_files": [],
        "seed": train_params(run).seed,
        "status": STATUSES.get(RunState(run.state), "queued"),
        "trained_tokens": trained_tokens(adapter),
        "training_file": f"{FILE_PREFIX}{run.dataset_id}",
        "validation_file": f"{FILE_PREFIX}{run.eval_dataset_id}" if run.eval_dataset_id else None,
        "estimated_finish": estimated_finish(run),
        "integrations": integrations(train_params(run)),
        "metadata": None,
        "user_provided_suffix": run.name or None,
        "method": openai_method(run, hyperparameters),
        "tunedeck": {
            "run_id": run.pk,
            "state": run.state,
            "attempt": run.attempt,
            "step": run.step,
            "total_steps": run.total_steps,
            "cancel_requested": run.cancel_requested,
            "pause_requested": run.pause_requested,
            "wait_reason": run.wait_reason,
            "owner": run.owner.get_username(),
            "lora_config": run.lora_config.name,
            "lora": run.lora_config.params,
            "hyperparameters": run.hyperparameters,
            "worker_labels": run.needs_labels,
            "priority": run.priority,
            "adapter_id": adapter.pk if adapter else None,
            "init_adapter_id": run.init_adapter_id,
        },
    }


JOB_RELATED = ("base_model", "lora_config", "owner", "adapter", "init_adapter")


# --- events and checkpoints ----------------------------------------------------------------------------


def _metric_message(data: dict[str, Any]) -> str:
    step = f"Step {data.get('step')}" + (f"/{data['total_steps']}" if data.get("total_steps") else "")
    parts = [f"{label}={data[key]:.4f}" for key, label in (("loss", "training loss"), ("eval_loss", "validation loss"))
             if isinstance(data.get(key), (int, float))]
    return f"{step}: {', '.join(parts)}" if parts else step


# Tunedeck's own fields of a metric point that OpenAI's metrics have no name for (kept under `tunedeck`).
POINT_FIELDS = {"step", "total_steps", "epoch", "learning_rate", "grad_norm", "tokens_per_s", "restart"}
OPENAI_NAMES = {"loss": "train_loss", "eval_loss": "valid_loss"}


def openai_metrics(point: dict[str, Any]) -> dict[str, float]:
    """A worker's metric point in OpenAI's names: train_loss, valid_loss, train_mean_token_accuracy,
    valid_mean_token_accuracy, and the objective's own figures the same way (DPO's rewards/margins is
    train_rewards_margins, its eval_rewards/accuracies valid_rewards_accuracies, GRPO's reward train_reward)."""
    metrics: dict[str, float] = {}
    for key, value in point.items():
        if key in POINT_FIELDS or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        name = OPENAI_NAMES.get(key)
        if name is None:
            split, figure = ("valid", key.removeprefix("eval_")) if key.startswith("eval_") else ("train", key)
            name = f"{split}_{figure.replace('/', '_').replace('-', '_').lower()}"
        metrics[name] = float(value)
    return metrics


def _metric_data(data: dict[str, Any]) -> dict[str, Any]:
    """A metrics event's data, shaped like OpenAI's ({"step", "total_steps", "train_loss", ...}), with the worker's
    point as it stored it under `tunedeck`."""
    head = {key: data[key] for key in ("step", "total_steps") if isinstance(data.get(key), int)}
    return {**head, **openai_metrics(data), "tunedeck": data}


def event_object(event: RunEvent) -> dict[str, Any]:
    data = event.data if isinstance(event.data, dict) else {}
    metric = event.kind == "metric"
    return {
        "id": f"{EVENT_PREFIX}{event.pk}",
        "object": "fine_tuning.job.event",
        "created_at": unix(event.created_at),
        "level": LEVELS.get(event.level, "info"),
        "message": event.message or (_metric_message(data) if metric else event.kind),
        "type": "metrics" if metric else "message",
        "data": _metric_data(data) if metric else (data or None),
    }


def points_at(run: TrainingRun, steps: set[int]) -> dict[int, dict[str, Any]]:
    """The run's metric points at these steps, merged by step from its metric events (training and evaluation
    points, later attempts over earlier ones): every figure the worker sent, the objective's included."""
    merged: dict[int, dict[str, Any]] = {}
    events = RunEvent.objects.filter(run=run, kind="metric", data__step__in=sorted(steps)).order_by("id")
    for data in events.values_list("data", flat=True):
        if isinstance(data, dict) and isinstance(data.get("step"), int):
            merged.setdefault(data["step"], {}).update(data)
    return merged


def _metrics_at(points: list[dict[str, Any]], step: int, point: dict[str, Any]) -> dict[str, Any]:
    """The run's metrics at a checkpoint's step: its metric events' point there, else the stored curve's point
    at the step (or the last one before it)."""
    if not point:
        before = [p for p in points if isinstance(p.get("step"), int) and p["step"] <= step]
        point = before[-1] if before else {}
    return {**openai_metrics(point), "step": float(step)}


def checkpoint_step(event: RunEvent) -> int:
    data = event.data if isinstance(event.data, dict) else {}
    return int(data.get("step") or 0)


def checkpoint_object(run: TrainingRun, event: RunEvent, point: dict[str, Any] | None = None) -> dict[str, Any]:
    """A checkpoint, with `point`: the metric point at its step (see points_at)."""
    data = event.data if isinstance(event.data, dict) else {}
    step = checkpoint_step(event)
    return {
        "id": f"{CHECKPOINT_PREFIX}{event.pk}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": unix(event.created_at),
        "fine_tuned_model_checkpoint": f"{fine_tuned_model(run)}:ckpt-step-{step}",
        "fine_tuning_job_id": f"{JOB_PREFIX}{run.pk}",
        "metrics": _metrics_at(run.metric_points, step, point or {}),
        "step_number": step,
        "tunedeck": {"attempt": event.attempt, "epoch": data.get("epoch")},
    }


def page(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "has_more": has_more,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
    }
