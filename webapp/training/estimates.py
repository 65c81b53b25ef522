"""What a run would take before it is queued: the plan the engine would pick, its peak GPU memory by part, the
online workers it fits on (or why none) and how long it would train, from the dataset's token count and the
throughput measured by earlier finished runs of the same base model on the same kind of GPU.

The New run page asks for it as its fields change (`run_estimate`, from whatever the form holds so far: a field
that is missing or invalid is named, never an error page); a queued run keeps the figures (`TrainingRun.estimates`)
so that its page can set them beside what it measured.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from dataclasses import dataclass, field
from typing import Any

from django import forms

from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.fleet import placement, scheduler
from webapp.jobs.models import RunState
from webapp.training.models import TrainingRun
from workers.contract import spec

log = logging.getLogger(__name__)

GiB = 2**30
# The inputs without which there is nothing to estimate, and the training settings the figures depend on (an
# invalid value of another setting does not stop the estimate).
REQUIRED_INPUTS = ("base_model", "dataset", "lora_config")
ESTIMATED_SETTINGS = ("num_epochs", "max_steps", "batch_size", "grad_accum", "max_seq_length", "num_gpus", "mode",
                      "batching", "gradient_checkpointing", "activation_offload", "attention", "liger_kernels",
                      "optimizer", "objective", "eval_fraction", "strategy", "completion_only_loss")
# Throughput history: the latest finished runs of a base model read, and the parts of their curves that count.
HISTORY_RUNS = 20
CPU = "CPU"


@dataclass(frozen=True)
class WorkerFit:
    name: str
    gpu: str  # the GPU's model name ("CPU" for a CPU-only worker)
    gpu_bytes: int | None  # what a job may use of its largest GPU
    fits: bool
    reason: str = ""  # why not, when it does not fit


@dataclass(frozen=True)
class Duration:
    seconds: float | None
    tokens: int | None
    gpu: str | None
    tokens_per_s: float | None = None
    runs: int = 0  # the finished runs the throughput comes from
    note: str = ""  # why there is no figure, or what it rests on


@dataclass
class RunEstimate:
    """The estimate panel's contents; `missing` lists what to fill (or fix) before anything can be estimated."""

    missing: list[str] = field(default_factory=list)
    base: BaseModel | None = None
    plan: dict[str, Any] = field(default_factory=dict)
    parts: list[tuple[str, int]] = field(default_factory=list)
    peak_bytes: int | None = None
    needs_bytes: int | None = None  # what placement asks of each GPU (None: a CPU will do)
    rough: str = ""  # why the memory figure is only the weights plus a margin
    notes: list[str] = field(default_factory=list)
    workers: list[WorkerFit] = field(default_factory=list)
    misfit: str | None = None
    duration: Duration | None = None

    @property
    def bars(self) -> list[dict[str, Any]]:
        """The memory parts as a stacked bar: each one's name, bytes, and place (x, width) in percent."""
        total = sum(value for _, value in self.parts)
        bars, x = [], 0.0
        for name, value in self.parts:
            width = 100 * value / total if total else 0
            bars.append({"name": name, "bytes": value, "x": f"{x:.2f}", "width": f"{width:.2f}"})
            x += width
        return bars

    @property
    def fitting(self) -> list[WorkerFit]:
        return [w for w in self.workers if w.fits]

    def stored(self) -> dict[str, Any]:
        """What a queued run keeps of it (`TrainingRun.estimates`)."""
        duration = self.duration or Duration(None, None, None)
        return {"peak_gpu_bytes": self.peak_bytes, "needs_gpu_bytes": self.needs_bytes,
                "seconds": round(duration.seconds) if duration.seconds else None, "tokens": duration.tokens,
                "gpu": duration.gpu, "tokens_per_s": duration.tokens_per_s, "plan": self.plan}


def _label(form: forms.Form, name: str) -> str:
    return str(form.fields[name].label or name.replace("_", " ")).lower()


def read_inputs(form: forms.Form) -> tuple[dict[str, Any], list[str]]:
    """The form's values field by field as far as they are valid, and the labels of the missing or invalid ones
    the estimate needs (a bound form's own validation would also run the run service's checks, too slow and too
    strict for a half-filled form)."""
    values: dict[str, Any] = {}
    missing: list[str] = []
    for name in (*REQUIRED_INPUTS, "labels", *(f.name for f in dataclasses.fields(spec.TrainParams))):
        if name not in form.fields:
            continue
        if name not in REQUIRED_INPUTS and name not in form.data and form.fields[name].required:
            continue  # a setting left out of the post keeps its default (an unchecked box is left out too: False)
        try:
            values[name] = form.fields[name].clean(form[name].data)
        except forms.ValidationError:
            if name in REQUIRED_INPUTS or name in ESTIMATED_SETTINGS:
                missing.append(_label(form, name))
            continue
        if name in REQUIRED_INPUTS and values[name] is None:
            missing.append(_label(form, name))
    values["labels"] = [p.strip() for p in str(values.get("labels") or "").split(",") if p.strip()]
    return values, missing


def run_estimate(form: forms.Form) -> RunEstimate:
    """The estimate for what `form` (a bound RunForm) holds so far."""
    values, missing = read_inputs(form)
    if missing:
        return RunEstimate(missing=missing)
    params = spec.TrainParams(**{f.name: values[f.name] for f in dataclasses.fields(spec.TrainParams)
                                 if f.name in values})
    base: BaseModel = values["base_model"]
    problems = params.validate(base.max_positions)
    wrong = [f"{_label(form, name)} ({problems[name]})" for name in ESTIMATED_SETTINGS if name in problems]
    if wrong:
        return RunEstimate(missing=wrong)
    return estimate_run(base, values["dataset"], values["lora_config"], params.for_objective(), values["labels"])


def estimate_run(base: BaseModel, dataset: Dataset, config: LoraConfig, params: spec.TrainParams,
                 labels: list[str] | tuple[str, ...] = ()) -> RunEstimate:
    result = RunEstimate(base=base)
    lora = config.lora_params()
    smallest = _memory(base, lora, params, None)  # every layer recomputed: what placement asks of a GPU
    result.needs_bytes = placement.gpu_bytes_or_cpu(smallest.total if smallest else None)
    if smallest is None:
        per_param = placement.WEIGHT_BYTES_PER_PARAM.get(lora.quantization, 2.0)
        rough = placement.rough_bytes(base.num_parameters, per_param)
        result.peak_bytes, result.needs_bytes = rough, placement.gpu_bytes_or_cpu(rough)
        result.rough = f"the config of {base.name} cannot be read here: its weights plus a margin"
    _place(result, params, labels)
    # The plan on the GPU the scheduler would pick (the smallest that fits), else on an unknown GPU.
    chosen = min((w for w in result.fitting if w.gpu_bytes), key=lambda w: w.gpu_bytes or 0, default=None)
    planned = _memory(base, lora, params, chosen.gpu_bytes if chosen else None) if smallest else None
    if planned is not None:
        result.peak_bytes = planned.total
        result.parts = planned.parts
        result.plan = {**planned.plan, "on": chosen.name if chosen else None}
        result.notes = planned.notes
    result.duration = _duration(base, dataset, params, chosen.gpu if chosen else None, bool(result.fitting))
    return result


@dataclass(frozen=True)
class _Memory:
    total: int
    parts: list[tuple[str, int]]
    plan: dict[str, Any]
    notes: list[str]


def _memory(base: BaseModel, lora: spec.LoraParams, params: spec.TrainParams, gpu_bytes: int | None) -> _Memory | None:
    """The engine's estimate on a GPU offering `gpu_bytes` (None: unknown, every layer recomputed); None where
    the base's shape cannot be read here."""
    from webapp.catalog.services import model_shape
    from workers.training.modelinfo import ModelNotFound
    from workers.training.specestimate import estimate_for_spec

    try:
        shape = model_shape(base)
        found = estimate_for_spec(shape, lora, params, gpu_memory_bytes=gpu_bytes)
    except (ModelNotFound, ValueError) as exc:
        log.info("no memory estimate for %s: %s", base.name, exc)
        return None
    choices = found.choices
    plan = {
        "mode": choices.mode, "batching": choices.batching, "attention": choices.attention,
        "micro_batch": choices.micro_batch, "grad_accum": choices.grad_accum, "num_gpus": params.num_gpus,
        "checkpoint_layers": choices.checkpoint_layers, "layers": shape.num_layers,
        "activation_offload": choices.activation_offload, "tokens_per_micro_batch": choices.tokens_per_micro_batch,
    }
    parts = [(name, value) for name, value in found.estimate.parts().items() if value]
    parts.append(("CUDA context", found.estimate.cuda_context))
    notes = [note for note in found.notes if "GPU's memory is unknown" not in note]
    return _Memory(found.estimate.device_total, parts, plan, notes)


def gpu_name(inventory: Any) -> str:
    """A worker's GPU model as its heartbeat named it (the first GPU's), or CPU."""
    gpus = inventory.get("gpus") if isinstance(inventory, dict) else None
    if isinstance(gpus, list) and gpus and isinstance(gpus[0], dict):
        return str(gpus[0].get("name") or "GPU")
    return CPU


def _place(result: RunEstimate, params: spec.TrainParams, labels: list[str] | tuple[str, ...]) -> None:
    """Which online workers could take the run when idle, as the scheduler decides it (placement.misfit)."""
    workers, slots = scheduler.fleet()
    job = placement.Job(key=("run", 0), owner=0, created=0.0, needs_labels=tuple(labels),
                        needs_gpu_bytes=result.needs_bytes, needs_gpus=max(1, params.num_gpus), noun="run")
    result.misfit = placement.misfit(job, slots)
    for slot in slots:
        reason = placement.misfit(job, [slot])
        largest = max((slot.usable(g) for g in slot.gpus), default=None)
        result.workers.append(WorkerFit(slot.name, gpu_name(workers[slot.id].inventory), largest, reason is None,
                                        reason or ""))


def dataset_tokens(dataset: Dataset, base: BaseModel, params: spec.TrainParams) -> tuple[float | None, str]:
    """The mean tokens of one of the dataset's rows as the run trains it (cut to max_seq_length), from the
    catalog's sample of its rows tokenized for `base`; None with why where that cannot be read here."""
    from webapp.catalog.services import length_stats_for
    from workers.training.modelinfo import ModelNotFound

    try:
        stats = length_stats_for(dataset, base, params.max_seq_length, params.batching, params.completion_only_loss)
    except (ModelNotFound, OSError, ValueError) as exc:
        return None, f"the rows of {dataset.name} cannot be tokenized here ({exc})"
    kept = [min(upper - 1, params.max_seq_length) for _, upper, _ in stats.histogram]
    counts = [rows for _, _, rows in stats.histogram]
    # The histogram's bins bound each row's length; the mean (before truncation) bounds the whole.
    cut_mean = sum(k * c for k, c in zip(kept, counts, strict=True)) / max(1, sum(counts)) if counts else stats.mean
    return min(stats.mean, cut_mean, float(params.max_seq_length)), ""


def run_tokens(dataset: Dataset, params: spec.TrainParams, per_row: float) -> int:
    """The tokens a run trains on: its epochs over the training rows (less the eval share), or its max_steps'
    global batches (of packed rows, max_seq_length tokens each, where it packs)."""
    if params.max_steps > 0:
        row = params.max_seq_length if params.batching == "pack" else per_row
        return round(params.max_steps * params.batch_size * params.grad_accum * row)
    rows = dataset.row_count * (1 - params.eval_fraction)
    return round(rows * params.num_epochs * per_row)


def measured_throughput(base: BaseModel, gpu: str) -> tuple[float | None, int]:
    """The median throughput (tokens/s) of the latest finished runs of `base` on a worker whose GPUs are `gpu`,
    and how many runs that is. A run's own figure is its tokens over its time from start to end, as its adapter's
    metrics record them (loading and evaluation included, as a duration should); a run without them (one resumed
    from a checkpoint times its last attempt only) counts the median of the tokens/s its steps logged."""
    rows = list(TrainingRun.objects.filter(base_model=base, state=RunState.SUCCEEDED, worker__isnull=False)
                .order_by("-id").values_list("id", "worker__inventory", "adapter__metrics")[:HISTORY_RUNS])
    speeds, logged = [], []
    for run_id, inventory, metrics in rows:
        if gpu_name(inventory) != gpu:
            continue
        whole = _whole_run_speed(metrics)
        if whole:
            speeds.append(whole)
        else:
            logged.append(run_id)
    for points in TrainingRun.objects.filter(pk__in=logged).values_list("metric_points", flat=True):
        values = [p["tokens_per_s"] for p in points if isinstance(p, dict)
                  and isinstance(p.get("tokens_per_s"), int | float) and p["tokens_per_s"] > 0] if isinstance(points, list) else []
        if values:
            speeds.append(statistics.median(values))
    return (statistics.median(speeds) if speeds else None), len(speeds)


def _whole_run_speed(metrics: Any) -> float | None:
    if not isinstance(metrics, dict) or metrics.get("resumed_from_step") is not None:
        return None
    tokens, seconds = metrics.get("trained_tokens"), metrics.get("runtime_s")
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (tokens, seconds))
    return tokens / seconds if numbers and tokens > 0 and seconds > 0 else None


def _duration(base: BaseModel, dataset: Dataset, params: spec.TrainParams, gpu: str | None,
              fits: bool) -> Duration:
    batching, _ = params.planned_batching(gpu not in (None, CPU), False)
    planned = dataclasses.replace(params, batching=batching)
    per_row, why = dataset_tokens(dataset, base, planned)
    tokens = run_tokens(dataset, planned, per_row) if per_row else None
    if gpu is None:
        where = "no online worker fits it" if not fits else "the worker's GPU is unknown"
        return Duration(None, tokens, None, note=f"no duration: {where}")
    if tokens is None:
        return Duration(None, None, gpu, note=f"no duration: {why}")
    speed, runs = measured_throughput(base, gpu)
    if speed is None:
        on = "a CPU worker" if gpu == CPU else gpu
        return Duration(None, tokens, gpu, note=f"no finished run of {base.name} on {on} yet")
    plural = "s" if runs != 1 else ""
    return Duration(tokens / speed, tokens, gpu, speed, runs,
                    note=f"at the median {speed:,.0f} tokens/s of {runs} finished run{plural} of {base.name} on {gpu}")


def estimated_vs_measured(run: TrainingRun, adapter: Any) -> dict[str, Any] | None:
    """The run page's comparison: what was estimated when the run was queued beside what it measured (peak GPU
    memory, from its adapter's metrics; time, from its start to its end). None for a run queued without one."""
    stored = run.estimates if isinstance(run.estimates, dict) else {}
    if not stored:
        return None
    metrics = adapter.metrics if adapter is not None and isinstance(adapter.metrics, dict) else {}
    measured_bytes = metrics.get("peak_memory_reserved")
    took = (run.finished_at - run.started_at).total_seconds() if run.finished_at and run.started_at else None
    return {
        "memory": stored.get("peak_gpu_bytes"), "measured_memory": measured_bytes,
        "memory_ratio": _ratio(measured_bytes, stored.get("peak_gpu_bytes")),
        "seconds": stored.get("seconds"), "measured_seconds": took if run.state == RunState.SUCCEEDED else None,
        "seconds_ratio": _ratio(took, stored.get("seconds")) if run.state == RunState.SUCCEEDED else None,
        "gpu": stored.get("gpu"), "tokens": stored.get("tokens"), "final": run.is_final,
        "plan": chosen_plan(metrics.get("plan")),
    }


def chosen_plan(stored: Any) -> str:
    """The plan a run's worker chose (its result's "plan"), as the worker's log line says it; "" if not readable."""
    from workers.training.engine import Plan

    if not isinstance(stored, dict):
        return ""
    names = {f.name for f in dataclasses.fields(Plan)}
    try:
        return Plan(**{k: v for k, v in stored.items() if k in names}).describe()
    except (TypeError, ValueError, AttributeError):
        return ""


def _ratio(measured: Any, estimated: Any) -> float | None:
    ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (measured, estimated))
    return measured / estimated if ok and estimated else None
