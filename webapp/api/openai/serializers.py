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
}
LEVELS = {"warning": "warn", "warn": "warn", "error": "error", "critical": "error"}


def unix(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def parse_id(value: str, prefix: str, noun: str) -> int:
    """The integer id inside "file-12" / "ftjob-7"; anything else is a 404 naming what was asked for."""
    text = str(value)
    digits = text[len(prefix):] if text.startswith(prefix) else ""
    if not digits.isdigit() or len(digits) > 18:
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
    return values


def openai_method(run: TrainingRun, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's method object of the run: dpo for a DPO run, supervised otherwise."""
    kind = "dpo" if train_params(run).objective == "dpo" else "supervised"
    return {"type": kind, kind: {"hyperparameters": hyperparameters}}


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
        "integrations": [],
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


def _metric_data(data: dict[str, Any]) -> dict[str, Any]:
    """The worker's metric point with OpenAI's names beside Tunedeck's (train_loss = loss, valid_loss = eval_loss)."""
    extra = {name: data[key] for key, name in (("loss", "train_loss"), ("eval_loss", "valid_loss")) if key in data}
    return {**data, **extra}


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


def _metrics_at(points: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """The run's curve at a checkpoint's step (or the last point before it)."""
    before = [p for p in points if isinstance(p.get("step"), int) and p["step"] <= step]
    point = before[-1] if before else {}
    metrics: dict[str, Any] = {"step": float(step)}
    if isinstance(point.get("loss"), (int, float)):
        metrics["train_loss"] = float(point["loss"])
    if isinstance(point.get("eval_loss"), (int, float)):
        metrics["valid_loss"] = float(point["eval_loss"])
    return metrics


def checkpoint_object(run: TrainingRun, event: RunEvent) -> dict[str, Any]:
    data = event.data if isinstance(event.data, dict) else {}
    step = int(data.get("step") or 0)
    return {
        "id": f"{CHECKPOINT_PREFIX}{event.pk}",
        "object": "fine_tuning.job.checkpoint",
        "created_at": unix(event.created_at),
        "fine_tuned_model_checkpoint": f"{fine_tuned_model(run)}:ckpt-step-{step}",
        "fine_tuning_job_id": f"{JOB_PREFIX}{run.pk}",
        "metrics": _metrics_at(run.metric_points, step),
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
