"""The train runner: LoRA / QLoRA fine-tuning of a causal LM with trl, toward the run's objective (objectives/: sft,
dpo, kto, orpo).

`run_training(spec, reporter, store)` is the whole contract: it never touches a database,
it reports through the reporter and writes the adapter into the artifact store.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import PrinterCallback, TrainerCallback

from workers.contract.artifacts import checkpoint_number, latest_checkpoint, saved_checkpoints
from workers.contract.jobrunner import Cancelled, RunnerError, check_cancel, run_reported
from workers.contract.reporter import Reporter
from workers.contract.spec import ANSWER_OBJECTIVES, TrainSpec
from workers.contract.store import ArtifactStore, sha256_of, size_of
from workers.data.datasets import DatasetError, load_trl_rows, numbered_records, unit_of
from workers.data.prompts import FALLBACK_CHAT_TEMPLATE
from workers.data.splits import held_out_indices
from workers.formatting import count, figure, percent, plural
from workers.training.device import Device, pick_device
from workers.training.engine import (
    Plan,
    PlanError,
    plan_estimator,
    prepare_model,
    rank_train_params,
    register_varlen_attention,
    resolve_plan,
    restore_kernels,
)
from workers.training.modelinfo import ModelNotFound, check_source
from workers.training.objectives import objective_for
from workers.training.peftsetup import (
    adapter_params,
    load_parent_adapter,
    prepare_adapter,
    quantization_config,
    restore_trained_adapter,
    save_adapter,
    steady_reference,
)
from workers.training.preview import rows_cut_before_training
from workers.training.ranks import Rank, StopTogether, current_rank, gather
from workers.training.tracking import check_installed, tracking

# Packed batches vary in shape from step to step; expandable segments keep the allocator from
# fragmenting (read once, when CUDA starts: a worker sets it before its first job).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
log = logging.getLogger(__name__)


def run_training(spec: TrainSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any] | None:
    """Run one attempt and report its outcome; returns the result on success."""
    return run_reported(
        reporter,
        lambda: _train(spec, reporter, store),
        expected=(RunnerError, DatasetError, ModelNotFound),
        cancelled_message="Cancelled: training stopped at the user's request.",
        cleanup=restore_kernels,
    )


def _train(spec: TrainSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any]:
    started = time.monotonic()
    problems = {**spec.train.validate(has_eval_dataset=spec.eval_dataset is not None), **spec.lora.validate(spec.train),
                **spec.warm_start_problems()}
    if problems:  # the control plane checks before queueing; a spec from elsewhere gets the same answer
        raise RunnerError("; ".join(f"{name}: {message}" for name, message in problems.items()))
    check_installed(spec.train.trackers)
    reporter.log(f"Attempt {spec.attempt} on {platform.node()}: loading the dataset")
    fmt, rows = load_trl_rows(store.path(spec.dataset.uri))
    train_rows, eval_rows = _split_eval(spec, store, rows)
    if spec.eval_dataset is not None:
        evaluation = f"; evaluating on {len(eval_rows)} rows of the eval dataset ({spec.eval_dataset.format})"
    else:
        evaluation = f"; {len(eval_rows)} held out for evaluation" if eval_rows else ""
    reporter.log(f"Dataset: {len(rows)} rows, format {fmt}{evaluation}")

    rank = current_rank()
    device = pick_device(spec.lora.compute_dtype)
    plan = _plan(spec, device, steps=expected_steps(spec.train, train_rows, device.kind == "cuda"))
    if device.kind == "cuda" and spec.gpu_memory_bytes:
        cap_gpu_memory(spec.gpu_memory_bytes, reporter)
    reporter.log(f"Plan: {plan.describe()}")
    tokenizer = _load_tokenizer(spec, rows, reporter)
    model = _load_model(spec, device, reporter, plan)
    if spec.warm_start:
        model = _start_from_parent(spec, store, model, reporter)
    check_cancel(reporter)

    with tracking(spec, tracking_dir(spec, store), reporter, rank.is_main) as trackers:
        from datasets import Dataset

        callbacks: list[Any] = [ReporterCallback(reporter), HandoverCallback(reporter, bool(spec.checkpoint_uri))]
        if spec.train.early_stopping_patience:
            callbacks.append(EarlyStopping(spec.train.early_stopping_patience, reporter))
        trainer = make_trainer(
            spec, plan, model, tokenizer,
            Dataset.from_list(train_rows), Dataset.from_list(eval_rows) if eval_rows else None,
            callbacks, objective_for(spec.train.objective).config(spec, plan, _work_dir(spec, store), bool(eval_rows)),
        )
        trainer.remove_callback(PrinterCallback)  # progress goes to the reporter, not stdout
        check_rows_left(spec, store, trainer, len(train_rows), tokenizer, reporter)
        # Only rank 0 keeps what prepare_adapter writes (the initial adapter of PiSSA/OLoRA, read back on save).
        scratch = _work_dir(spec, store) if rank.is_main else Path(tempfile.mkdtemp(prefix=f"tunedeck-rank{rank.rank}-"))
        for line in prepare_adapter(trainer.model, adapter_params(spec), spec.base_model, scratch):
            reporter.log(line)
        trainable, total = trainer.model.get_nb_trainable_parameters()
        reporter.log(f"Trainable parameters: {count(trainable)} of {count(total)} ({percent(trainable / total)})")
        resume = latest_checkpoint(store.path(spec.checkpoint_uri)) if spec.checkpoint_uri else None
        if resume:
            reporter.log(f"Resuming from checkpoint {resume.name} of an earlier attempt")
            restore_trained_adapter(trainer.model, resume)
        if rank.distributed:
            trainer.add_callback(StopTogether(reporter))  # last, so that it sees every other callback's stop
        output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if reporter.cancel_requested:
            raise Cancelled()

        adapter_dir = store.path(spec.output_uri)
        _save(trainer, spec, rank, adapter_dir, scratch)
        if rank.is_main:
            tokenizer.save_pretrained(adapter_dir)
            trackers.log_adapter(adapter_dir)
    peaks = gather(_peak_memory(device))
    if not rank.is_main:
        return {}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    result = {
        "adapter_uri": spec.output_uri,
        "size_bytes": size_of(adapter_dir),
        "sha256": sha256_of(adapter_dir),
        "trainable_params": trainable,
        "total_params": total,
        "final_loss": losses[-1] if losses else output.training_loss,
        "train_loss": output.training_loss,
        "eval_loss": eval_losses[-1] if eval_losses else None,
        "steps": trainer.state.global_step,
        "trained_tokens": trained_tokens(trainer, checkpoint_number(resume.name) if resume else None),
        "resumed_from_step": checkpoint_number(resume.name) if resume else None,
        "runtime_s": round(time.monotonic() - started, 2),
        "device": device.kind,
        "dtype": device.dtype_name,
        "plan": plan.as_dict(),
        **peaks[0],
        **_distribution(spec, rank, peaks),
    }
    reporter.log(f"Adapter saved ({result['size_bytes']:,} bytes, sha256 {str(result['sha256'])[:12]}…)")
    return result


def trained_tokens(trainer: Any, resumed_step: int | None) -> int:
    """The tokens trained on, padding excluded, over every step, micro-batch and process: trl's running count
    (the `num_tokens` it logs) for this attempt, plus what the checkpoint's log had counted for a resumed one
    (steps after its last logged step are not in it)."""
    counted = [h for h in trainer.state.log_history if "num_tokens" in h]
    earlier = [h for h in counted if resumed_step is not None and h.get("step", 0) <= resumed_step]
    now = getattr(trainer, "_total_train_tokens", None)  # trl's counter; else the last value this attempt logged
    if not isinstance(now, (int, float)):
        now = counted[-1]["num_tokens"] if len(counted) > len(earlier) else 0
    return int(now + (earlier[-1]["num_tokens"] if earlier else 0))


def _save(trainer: Any, spec: TrainSpec, rank: Rank, adapter_dir: Path, work_dir: Path) -> None:
    """The adapter, un-sharded, written by rank 0 (FSDP gathers the shards on every rank first)."""
    if rank.is_main:
        adapter_dir.mkdir(parents=True, exist_ok=True)
    if spec.train.sharded:
        trainer.save_model(str(adapter_dir))  # a full state dict (fsdp_config), saved by rank 0 alone
    elif rank.is_main:
        save_adapter(trainer.model, adapter_params(spec), adapter_dir, work_dir)


def _distribution(spec: TrainSpec, rank: Rank, peaks: list[dict[str, Any]]) -> dict[str, Any]:
    if not rank.distributed:
        return {}
    micro, accum = spec.train.per_rank_batch() or (spec.train.batch_size, spec.train.grad_accum)
    extra: dict[str, Any] = {
        "num_processes": rank.world_size, "strategy": spec.train.strategy, "per_process_batch": [micro, accum],
    }
    if any(peaks):
        extra["peak_memory_reserved_per_rank"] = [p.get("peak_memory_reserved") for p in peaks]
        extra["peak_memory_allocated_per_rank"] = [p.get("peak_memory_allocated") for p in peaks]
    return extra


def make_trainer(
    spec: TrainSpec, plan: Plan, model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any,
    callbacks: list[Any], args: Any,
) -> Any:
    """The trainer of the run's objective that carries out the plan (shared with bench/train_throughput.py)."""
    trainer = objective_for(spec.train.objective).trainer(
        spec, plan, model, tokenizer, train_dataset, eval_dataset, callbacks, args
    )
    steady_reference(trainer.model)  # a warm start's reference is the parent as it was, dropout or not
    if plan.fused_lora:
        from workers.training.fusedlora import fuse_lora

        fuse_lora(trainer.model)
    from workers.training import engine

    if engine.PREFETCH_OFFLOAD and getattr(trainer.args, "activation_offloading", False):
        from workers.training.offload import ActivationOffload

        # trl built its own offloading context (and the hooks that keep the LM head's tensors on the GPU); the
        # steps run under ours, which brings each layer's tensors back ahead of the backward pass.
        trainer.maybe_activation_offload_context = ActivationOffload()
    return trainer


def check_rows_left(spec: TrainSpec, store: ArtifactStore, trainer: Any, rows: int, tokenizer: Any,
                    reporter: Reporter) -> None:
    """Name the training rows that truncation to max_seq_length leaves with nothing to learn; fail when that is
    every row (SFTTrainer would fail later with `num_samples=0`, or, packing, train on nothing at all).

    The control plane refuses such runs before queueing (webapp/catalog/services.py); this covers a spec from
    elsewhere and rows its bounded check did not reach."""
    if spec.dataset.format == "prompt_only":
        return  # prompts alone: the trainer samples the answers, no row has one that truncation could cut
    max_length = spec.train.max_seq_length
    if trainer.eval_dataset is not None and not _trained_tokens_in(trainer.eval_dataset):
        raise RunnerError(f"no evaluation row keeps a token to evaluate on within max_seq_length {max_length}: "
                          "raise max_seq_length or shorten the prompts of the evaluation rows")
    prepared = trainer.train_dataset
    dropped = rows - len(prepared) if "seq_lengths" not in prepared.column_names else 0  # packed rows differ
    trained = _trained_tokens_in(prepared)
    if trained and not dropped:
        return
    named = rows_cut_before_training(tokenizer, numbered_records(store.path(spec.dataset.uri)), max_length,
                                     spec.train.answers_only, unit=unit_of(spec.dataset.uri))
    listing = ", ".join(str(row) for row in named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
    if not trained:
        remedies = "or shorten the prompts" if spec.train.objective in ANSWER_OBJECTIVES else (
            "shorten the prompts, or turn off completion_only_loss to train on the prompts too")
        raise RunnerError(
            f"none of the {rows} training rows keeps a token to train on within max_seq_length {max_length}: "
            f"their prompts fill it ({listing or 'every row'}). Raise max_seq_length {remedies}")
    reporter.log(f"{dropped} of {rows} training rows train on nothing within max_seq_length {max_length} and are "
                 f"skipped: their prompts fill it ({listing})", level="warning")


def _trained_tokens_in(prepared: Any) -> int:
    """Tokens with a label in a prepared dataset (rows it filtered out have none, so the table may keep them); of a
    dataset prepared by DPO's or KTO's trainer, the chosen answers' (or the answers') tokens before truncation; of
    ORPO's, the chosen answers' labels."""
    import pyarrow.compute as pc

    if len(prepared) == 0:
        return 0
    for answers in ("chosen_ids", "completion_ids"):  # DPOTrainer and KTOTrainer kept rows whose prompt leaves room
        if answers in prepared.column_names:
            return int(pc.sum(pc.list_value_length(prepared.data.column(answers))).as_py() or 0)
    labels = prepared.data.column("chosen_labels" if "chosen_labels" in prepared.column_names else "labels")
    return int(pc.sum(pc.not_equal(pc.list_flatten(labels), -100)).as_py() or 0)


def _work_dir(spec: TrainSpec, store: ArtifactStore) -> Path:
    """The run's own scratch folder, the same for every attempt."""
    if spec.checkpoint_uri:
        return store.path(spec.checkpoint_uri)
    return store.path(spec.output_uri).parent / "trainer"


def tracking_dir(spec: TrainSpec, store: ArtifactStore) -> Path:
    """The folder of the run's trackers' files, the same for every attempt."""
    if spec.tracking_uri:
        return store.path(spec.tracking_uri)
    return store.path(spec.output_uri).parent.parent / "tracking"


def _split_eval(spec: TrainSpec, store: ArtifactStore, rows: list[dict[str, Any]]) -> tuple[list, list]:
    if spec.eval_dataset is not None:
        _, eval_rows = load_trl_rows(store.path(spec.eval_dataset.uri))
        return rows, eval_rows
    if not spec.train.eval_fraction:
        return rows, []
    held = set(held_out_indices(len(rows), spec.train.eval_fraction, spec.train.seed))
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def expected_steps(train: Any, rows: list[dict[str, Any]], cuda: bool) -> int:
    """About how many optimizer steps the run takes, before its rows are tokenized: max_steps, or the epochs over
    the rows per optimizer step. Packed runs count their tokens as characters / 4 (a plan's threshold needs no
    more)."""
    if train.max_steps > 0:
        return int(train.max_steps)
    per_step = max(1, train.batch_size * train.grad_accum)
    batching, _ = train.planned_batching(cuda, False)
    if batching == "pack":
        length = max(1, train.max_seq_length)
        tokens = sum(min(length, max(1, _characters(row) // 4)) for row in rows)
        units = math.ceil(tokens / length)
    else:
        units = len(rows)
    return math.ceil(train.num_epochs * math.ceil(units / per_step))


def _characters(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_characters(v) for v in value.values())
    if isinstance(value, list):
        return sum(_characters(v) for v in value)
    return 0


def cap_gpu_memory(limit: int, reporter: Reporter) -> None:
    """Keep this process's CUDA allocator within `limit` bytes of each GPU it uses (the worker's limit)."""
    import torch

    for index in range(torch.cuda.device_count()):
        total = torch.cuda.get_device_properties(index).total_memory
        if limit < total:
            torch.cuda.set_per_process_memory_fraction(limit / total, index)
    reporter.log(f"GPU memory limited to {limit / 2**30:.1f} GiB per GPU (the worker's limit)")


def _plan(spec: TrainSpec, device: Device, steps: int = 0, gpu_bytes: int = 0) -> Plan:
    """The run's plan on this device, within `gpu_bytes` of the GPU (default: the worker's limit in the spec, else
    all of it)."""
    gpu_bytes = gpu_bytes or spec.gpu_memory_bytes
    from transformers import AutoConfig

    ref = spec.base_model
    check_source(ref.source)
    config = AutoConfig.from_pretrained(
        ref.source, revision=ref.revision or None, trust_remote_code=ref.trust_remote_code
    )
    num_layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 1)
    gpu_total = 0
    if device.kind == "cuda":
        import torch

        gpu_total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        gpu_total = min(gpu_total, gpu_bytes) if gpu_bytes else gpu_total
    try:
        plan = resolve_plan(
            rank_train_params(spec.train), spec.lora, device=device.kind, dtype=device.dtype_name, num_layers=num_layers,
            gpu_total_bytes=gpu_total, estimator=_estimator(config, spec), head_dim=_head_dim(config), steps=steps,
        )
    except PlanError as exc:
        raise RunnerError(str(exc)) from exc
    if plan.attention == "varlen":
        register_varlen_attention()
    return plan


def _head_dim(config: Any) -> int:
    """The attention head dimension of a transformers config (0 when it does not say)."""
    heads = getattr(config, "num_attention_heads", 0) or 0
    explicit = getattr(config, "head_dim", None)
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    hidden = getattr(config, "hidden_size", 0) or 0
    return hidden // heads if heads and hidden else 0


def _estimator(config: Any, spec: TrainSpec) -> Any:
    """The memory estimator for this run, or None: a shape it does not know must not stop training."""
    estimator = plan_estimator(config, spec, objective_for(spec.train.objective).memory_terms)
    if estimator is None:
        return None

    def safe(plan: Plan) -> int | None:
        try:
            return int(estimator(plan))
        except Exception as exc:  # the estimate is advice; log and plan without it
            log.warning("memory estimate failed: %s", exc)
            return None

    return safe


def _peak_memory(device: Device) -> dict[str, Any]:
    if device.kind != "cuda":
        return {}
    import torch

    return {
        "peak_memory_reserved": torch.cuda.max_memory_reserved(),
        "peak_memory_allocated": torch.cuda.max_memory_allocated(),
    }


def _load_tokenizer(spec: TrainSpec, rows: list[dict[str, Any]], reporter: Reporter) -> Any:
    from transformers import AutoTokenizer

    ref = spec.base_model
    check_source(ref.source)
    tokenizer = AutoTokenizer.from_pretrained(
        ref.source, revision=ref.revision or None, trust_remote_code=ref.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    conversational = "text" not in rows[0] and not isinstance(rows[0].get("prompt", []), str)
    if conversational and not tokenizer.chat_template:
        reporter.log("The tokenizer has no chat template: using a ChatML-style template.", level="warning")
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def _load_model(spec: TrainSpec, device: Device, reporter: Reporter, plan: Plan) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    ref, lora = spec.base_model, spec.lora
    dtype = getattr(torch, device.dtype_name)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": ref.trust_remote_code,
        "attn_implementation": plan.attn_implementation,
    }
    if ref.revision:
        kwargs["revision"] = ref.revision
    if device.kind == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    quantization = quantization_config(lora, dtype)
    if quantization is not None and lora.quantization == "4bit" and spec.train.sharded:
        # FSDP shards tensors of one float dtype: the packed 4-bit weights are stored in the compute dtype.
        quantization.bnb_4bit_quant_storage = dtype
        reporter.log(f"FSDP: 4-bit weights stored as {device.dtype_name} (bnb_4bit_quant_storage) so they can be sharded")
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    from workers.training.peftsetup import quantization_label

    reporter.log(f"Loading {ref.source} ({quantization_label(lora)}, compute {device.dtype_name}) on {device.kind}")
    reporter.flush()
    model = AutoModelForCausalLM.from_pretrained(ref.source, **kwargs)
    prepare_model(model, plan)
    if device.kind == "cuda":
        reporter.log(f"GPU memory after load: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    return model


def _start_from_parent(spec: TrainSpec, store: ArtifactStore, model: Any, reporter: Reporter) -> Any:
    """The base wrapped with the run's parent adapter, the adapter it trains (a warm start). A resumed attempt
    starts here too; the trainer then loads its own checkpoint over the parent's weights."""
    if not spec.init_adapter_uri:
        raise RunnerError(f"init_adapter: the parent adapter {spec.init_adapter_name} was deleted, so this run cannot "
                          "start from it any more")
    model = load_parent_adapter(model, spec.lora, store.path(spec.init_adapter_uri), spec.init_adapter_name)
    ignored = f" (the LoRA config's {spec.lora.init} init does not apply)" if spec.lora.init != "default" else ""
    reporter.log(f"Warm start: the adapter starts from the weights of {spec.init_adapter_name or spec.init_adapter_uri}"
                 f"{ignored}; an objective with a reference measures against that adapter, frozen")
    return model


class EarlyStopping(TrainerCallback):  # type: ignore[misc]
    """Stop once the eval loss has not improved for `patience` evaluations (no best-model reload needed)."""

    def __init__(self, patience: int, reporter: Reporter) -> None:
        self.patience, self.reporter = patience, reporter
        self.best: float | None = None
        self.bad = 0

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None, **kwargs: Any) -> None:
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if self.best is None or loss < self.best:
            self.best, self.bad = loss, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            self.reporter.log(
                f"Early stopping at step {state.global_step}: eval loss {loss:.4f} has not improved on "
                f"{self.best:.4f} for {self.bad} evaluation(s)",
                level="warning",
            )
            control.should_training_stop = True


class HandoverCallback(TrainerCallback):  # type: ignore[misc]
    """When the worker shuts down: save a checkpoint at this step and stop, so that the next attempt resumes from
    here. It saves wherever the run has a checkpoint folder, also with save_steps 0 (no periodic checkpoints):
    a handover that saved nothing would start the run again from step 0."""

    def __init__(self, reporter: Reporter, can_save: bool) -> None:
        self.reporter, self.can_save = reporter, can_save

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.reporter.poll_stop()
        if self.reporter.interrupt_reason and not self.reporter.user_cancelled:
            if self.can_save:  # never False: that would take back a periodic save flagged at this step
                control.should_save = True
            control.should_training_stop = True


# Logged numbers that are not curves of the training: how long an evaluation took, and the progress a point has.
NOT_METRICS = ("epoch", "step", "total_flos")
TIMING_SUFFIXES = ("_runtime", "_per_second")


def logged_values(logs: dict[str, Any]) -> dict[str, float]:
    """Every finite number of one trainer log, as metrics: the loss and learning rate, and what the objective's
    trainer adds (trl's rewards/chosen, rewards/margins, kl, reward, rewards/<grader>/mean…), eval_ ones included."""
    return {
        key: float(value) for key, value in logs.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        and key not in NOT_METRICS and not key.endswith(TIMING_SUFFIXES)
    }


def _logged_point(logged: dict[str, Any]) -> dict[str, Any] | None:
    """A metric point from one entry of the trainer's log history (None for entries without a loss)."""
    if logged.get("step") is None or ("loss" not in logged and "eval_loss" not in logged):
        return None
    return {"step": int(logged["step"]), **logged_values(logged)}


def schedule_line(total_steps: int, epochs: float, max_steps: int, per_epoch: int | None) -> str:
    """How long the run trains, as its log says it. max_steps, when set, overrides the epochs: the line says
    so, with the epochs that many steps amount to ("Training: 4,000 steps (max_steps; about 2.33 epochs)").
    `per_epoch`: optimizer steps in one epoch (steps_per_epoch), None where unknown."""
    steps = plural(count(total_steps), "step")
    if max_steps > 0:
        about = f"; about {plural(figure(total_steps / per_epoch), 'epoch')}" if per_epoch else ""
        return f"Training: {steps} (max_steps{about})"
    return f"Training: {plural(figure(epochs), 'epoch')}, {steps}"


def steps_per_epoch(args: Any, dataloader: Any) -> int | None:
    """Optimizer steps in one pass over the training rows, as the trainer counts them (None for an iterable)."""
    try:
        batches = len(dataloader)
    except TypeError:
        return None
    return max(-(-batches // args.gradient_accumulation_steps), 1)


def _reward_figures(logs: dict[str, Any]) -> str:
    """What trl's GRPOTrainer logs of the sampled answers, for the log line: their mean total reward, each
    grader's mean, the KL to the reference (with kl_coef) and the answers' mean length in tokens."""
    if "reward" not in logs:
        return ""
    graders = {key[len("rewards/"):-len("/mean")]: value for key, value in logs.items()
               if key.startswith("rewards/") and key.endswith("/mean")}
    each = f" ({', '.join(f'{name} {value:.3f}' for name, value in graders.items())})" if len(graders) > 1 else ""
    kl = f" kl {logs['kl']:.4f}" if "kl" in logs else ""
    length = f" answers {logs['completions/mean_length']:.1f} tokens" if "completions/mean_length" in logs else ""
    return f" reward {logs['reward']:.3f}{each}{kl}{length}"


def _preference_figures(logs: dict[str, Any]) -> str:
    """What trl's preference trainers log, for the log line: the reward margin (DPO: how much more the adapter
    prefers the chosen answer than the reference does; KTO: desirable answers' reward less undesirable ones'; ORPO:
    beta times the chosen answer's log-probability less the rejected one's), the share of pairs preferred (DPO, ORPO), and
    KTO's KL estimate."""
    if "rewards/margins" not in logs:
        return ""
    figures = f" reward margin {logs['rewards/margins']:.3f}"
    if "rewards/accuracies" in logs:
        figures += f" pairs preferred {logs['rewards/accuracies']:.0%}"
    if "kl" in logs:
        figures += f" kl {logs['kl']:.3f}"
    return figures


class ReporterCallback(TrainerCallback):  # type: ignore[misc]
    """Streams progress to the reporter and stops training at the next step once cancelled."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self._last_time = time.monotonic()
        self._last_tokens = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._last_time = time.monotonic()
        per_epoch = steps_per_epoch(args, kwargs.get("train_dataloader"))
        self.reporter.log(schedule_line(state.max_steps, args.num_train_epochs, args.max_steps, per_epoch))
        # The attempt starts at step 0 or at its checkpoint's: the curve after it is a lost attempt's. The
        # checkpoint's own logged steps come again, for those its attempt died before reporting.
        self.reporter.metric(step=state.global_step, total_steps=state.max_steps, restart=True)
        for logged in state.log_history:
            point = _logged_point(logged)
            if point and point["step"] <= state.global_step:
                self.reporter.metric(**point, total_steps=state.max_steps)
        self.reporter.flush()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.reporter.maybe_flush()
        if self.reporter.cancel_requested:
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The trainer has saved this one and deleted those beyond keep_checkpoints: `kept` lists the steps
        # still on disk, so the run's pages list only checkpoints a retry can resume from.
        kept = sorted(saved_checkpoints(Path(args.output_dir)))
        self.reporter.checkpoint(state.global_step, epoch=state.epoch, kept=kept)
        self.reporter.maybe_flush()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        values = logged_values(logs)
        if "eval_loss" in logs:
            evaluated = {key: value for key, value in values.items() if key.startswith("eval_")}
            self.reporter.metric(step=state.global_step, total_steps=state.max_steps, **evaluated)
            self.reporter.log(f"step {state.global_step}/{state.max_steps} eval loss {logs['eval_loss']:.4f}")
        if "loss" not in logs:
            return
        now = time.monotonic()
        tokens = float(logs.get("num_tokens", 0.0))
        elapsed = max(now - self._last_time, 1e-9)
        tokens_per_s = (tokens - self._last_tokens) / elapsed if tokens else None
        self._last_time, self._last_tokens = now, tokens
        point = {
            **values,
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": round(float(logs.get("epoch", state.epoch or 0.0)), 4),
            "loss": float(logs["loss"]),
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "grad_norm": float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
            "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        }
        self.reporter.metric(**point)
        grad = f" grad_norm {point['grad_norm']:.3f}" if point["grad_norm"] is not None else ""
        speed = f" {point['tokens_per_s']:.0f} tok/s" if point["tokens_per_s"] else ""
        self.reporter.log(
            f"step {state.global_step}/{state.max_steps} epoch {point['epoch']:.2f} "
            f"loss {point['loss']:.4f} lr {point['learning_rate']:.2e}{grad}{speed}{_preference_figures(logs)}"
            f"{_reward_figures(logs)}"
        )
        samples = logs.get("samples")  # GRPO's sampled answers with their rewards (objectives.grpo.SampleCallback)
        if samples and samples["rows"]:
            self.reporter.samples(state.global_step, samples["rows"], samples["errors"])
        self.reporter.maybe_flush()
