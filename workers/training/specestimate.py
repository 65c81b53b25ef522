"""A training spec's memory estimate on a GPU: the plan the runner would make there (workers/training/engine.py's
resolve_plan: "auto" settings, the split of each optimizer step, how many layers to recompute), then
`workers.training.estimate.estimate` on it. The control plane places and shows runs by this, so it is the plan the
worker will pick.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from workers.contract.spec import PROMPT_LEARNING_METHODS, LoraParams, TrainParams
from workers.training.engine import plan_estimates, rank_train_params, resolve_plan
from workers.training.estimate import Estimate, GiB
from workers.training.modelshape import ModelShape
from workers.training.objectives import objective_for

COMPUTE_DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Choices:
    """The plan the runner would make on that GPU (engine.resolve_plan), as the estimate shows it."""

    mode: str
    batching: str
    attention: str
    checkpoint_layers: int
    activation_offload: bool
    liger: bool
    tokens_per_micro_batch: int
    micro_batch: int = 1
    grad_accum: int = 1

    @property
    def gradient_checkpointing(self) -> bool:
        return self.checkpoint_layers > 0


@dataclass(frozen=True)
class SpecEstimate:
    estimate: Estimate
    choices: Choices
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate.as_dict(),
            "choices": {**asdict(self.choices), "gradient_checkpointing": self.choices.gradient_checkpointing},
            "notes": list(self.notes),
        }


def estimate_for_spec(
    shape: ModelShape,
    lora: LoraParams,
    train: TrainParams,
    *,
    gpu_memory_bytes: int | None = None,
    avg_seq_len: int | None = None,
    varlen_available: bool = True,
) -> SpecEstimate:
    """Estimate a run on a GPU: the plan the runner would make there (engine.resolve_plan, with the same estimator),
    then its peak by part. Raises PlanError (a ValueError) for switches that cannot work together.

    `gpu_memory_bytes` (the card's total) lets throughput mode choose the split of each optimizer step and keep
    activations instead of recomputing them where they fit; None: unknown, every layer recomputed. `avg_seq_len`
    is the mean example length, used for padding_free micro-batches (default: max_seq_length, the worst case).
    """
    train = rank_train_params(train)
    batching, _ = train.planned_batching(True, lora.method in PROMPT_LEARNING_METHODS)
    seq_len = min(avg_seq_len, train.max_seq_length) if batching == "padding_free" and avg_seq_len else 0
    estimate_plan = plan_estimates(shape, lora, train, objective_for(train.objective).memory_terms, seq_len=seq_len)
    dtype = "float32" if COMPUTE_DTYPE_BYTES.get(lora.compute_dtype, 2) == 4 else "bfloat16"
    plan = resolve_plan(
        train, lora, device="cuda", dtype=dtype, num_layers=shape.num_layers, gpu_total_bytes=gpu_memory_bytes or 0,
        estimator=lambda p: int(estimate_plan(p).total), head_dim=shape.head_dim, kernels=(varlen_available, True),
    )
    result = estimate_plan(plan)
    notes = list(plan.notes)
    if not gpu_memory_bytes and plan.checkpoint_layers and train.gradient_checkpointing == "auto" \
            and plan.mode == "throughput":
        notes.append("gradient checkpointing assumed on: the GPU's memory is unknown")
    if gpu_memory_bytes and result.device_total > gpu_memory_bytes:
        notes.append(
            f"needs about {result.device_total / GiB:.1f} GiB, more than the GPU's {gpu_memory_bytes / GiB:.1f} GiB"
        )
    choices = Choices(
        mode=plan.mode, batching=plan.batching, attention=plan.attention, checkpoint_layers=plan.checkpoint_layers,
        activation_offload=plan.activation_offload, liger=plan.liger, tokens_per_micro_batch=result.tokens,
        micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
    )
    return SpecEstimate(result, choices, notes)
