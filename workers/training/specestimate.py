"""A training spec's memory estimate: its choices resolved ("auto" settings, the micro batch, how many layers to
checkpoint) against the GPU memory available, then `workers.training.estimate.estimate` on them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from workers.contract.spec import PADDED_OBJECTIVES, PROMPT_LEARNING_METHODS, LoraParams, TrainParams
from workers.training.estimate import Estimate, GiB, estimate
from workers.training.modelshape import VIRTUAL_TOKENS, ModelShape
from workers.training.objectives import objective_for

# Throughput mode turns checkpointing off (or on for fewer layers) only if the run stays under this
# share of the card, as workers/training/engine.py plans it.
FIT_FRACTION = 0.9
COMPUTE_DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Choices:
    """The spec's "auto" switches resolved the way the runner resolves them on a GPU."""

    mode: str
    batching: str
    attention: str
    checkpoint_layers: int
    activation_offload: bool
    liger: bool
    tokens_per_micro_batch: int

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


def _switch(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "on"


def estimate_for_spec(
    shape: ModelShape,
    lora: LoraParams,
    train: TrainParams,
    *,
    gpu_memory_bytes: int | None = None,
    avg_seq_len: int | None = None,
    varlen_available: bool = True,
) -> SpecEstimate:
    """Estimate a run from its LoraParams and TrainParams, resolving "auto" as the runner does on a GPU.

    `gpu_memory_bytes` (the card's total) lets throughput mode keep activations instead of
    recomputing them where they fit; `avg_seq_len` is the mean example length, used for
    padding_free micro-batches (default: max_seq_length, the worst case).
    """
    method = "dora" if getattr(lora, "use_dora", False) else getattr(lora, "method", "lora")
    mode = "throughput" if train.mode == "auto" else train.mode
    notes: list[str] = []
    batching = train.batching
    padded_objective = train.objective in PADDED_OBJECTIVES
    if padded_objective and batching in ("pack", "padding_free"):
        notes.append(f"{train.objective} pads its batches: the runner uses pad, not {batching}")
        batching = "pad"
    if batching == "auto":
        batching = "pad" if method in PROMPT_LEARNING_METHODS or padded_objective else "pack"
    attention = train.attention
    if attention == "auto":
        attention = "varlen" if batching != "pad" and varlen_available else "sdpa"
    seq_len = train.max_seq_length
    if batching == "padding_free" and avg_seq_len:
        seq_len = min(avg_seq_len, train.max_seq_length)
    options: dict[str, Any] = {
        "method": method, "quantization": lora.quantization, "double_quant": lora.double_quant,
        "compute_dtype_bytes": COMPUTE_DTYPE_BYTES.get(lora.compute_dtype, 2), "r": lora.r,
        "targets": lora.target_modules, "dropout": lora.dropout, "seq_len": seq_len, "micro_batch": _gpu_micro_batch(train),
        "batching": batching, "optimizer": train.optimizer, "liger": _switch(train.liger_kernels, True),
        "fused_lm_head": True,  # trl's SFTTrainer always installs its chunked LM head
        "attention": attention,
        "num_virtual_tokens": getattr(lora, "num_virtual_tokens", VIRTUAL_TOKENS),
        "modules_to_save": getattr(lora, "modules_to_save", []),
        "num_gpus": getattr(train, "num_gpus", 1), "strategy": getattr(train, "strategy", "ddp"),
    }
    layers = shape.num_layers
    if train.gradient_checkpointing == "off":
        k = 0
    elif train.gradient_checkpointing == "on" or mode == "memory":
        k = layers
    elif gpu_memory_bytes:
        k = _fewest_checkpointed_layers(shape, options, int(gpu_memory_bytes * FIT_FRACTION))
    else:
        k = layers
        notes.append("gradient checkpointing assumed on: the GPU's memory is unknown")
    offload = _switch(train.activation_offload, mode == "memory")
    if offload and not k:
        notes.append("activation offload needs gradient checkpointing: the runner refuses it without")
        offload = False
    result = estimate(shape, **options, checkpoint_layers=k, activation_offload=offload)
    result = result.plus(objective_for(train.objective).memory_terms(
        result.parts(), shape, train, options["compute_dtype_bytes"]))
    if gpu_memory_bytes and result.device_total > gpu_memory_bytes:
        notes.append(
            f"needs about {result.device_total / GiB:.1f} GiB, more than the GPU's {gpu_memory_bytes / GiB:.1f} GiB"
        )
    choices = Choices(
        mode=mode, batching=batching, attention=attention, checkpoint_layers=k, activation_offload=offload,
        liger=options["liger"], tokens_per_micro_batch=result.tokens,
    )
    return SpecEstimate(result, choices, notes)


def _gpu_micro_batch(train: Any) -> int:
    """Each GPU's micro-batch: the global batch is split across num_gpus (see TrainParams.per_rank_batch)."""
    split = train.per_rank_batch() if hasattr(train, "per_rank_batch") else None
    return split[0] if split else train.batch_size


def _fewest_checkpointed_layers(shape: ModelShape, options: dict[str, Any], budget: int) -> int:
    """Each recomputed layer trades its activations for one more forward: recompute as few as fit."""
    for k in range(shape.num_layers + 1):
        if estimate(shape, **options, checkpoint_layers=k).total <= budget:
            return k
    return shape.num_layers
