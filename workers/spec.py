"""Job specs: plain dataclasses that travel as JSON between the control plane and workers.

Every field has a default and a one-line help text (shown by the forms); `validate()`
returns field-named errors instead of raising, so callers can show all of them at once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

QUANTIZATIONS = ("none", "4bit")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
BIASES = ("none", "all", "lora_only")
DATASET_FORMATS = ("text", "prompt_completion", "alpaca", "messages", "sharegpt")


def _help(text: str, default: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class LoraParams:
    r: int = _help("Rank of the low-rank update matrices.", 16)
    alpha: int = _help("Scaling numerator: the update is scaled by alpha / r.", 32)
    dropout: float = _help("Dropout on the LoRA input during training.", 0.05)
    target_modules: list[str] = _help(
        "Linear module names to adapt, or ['all-linear'] for every linear layer but the output head.",
        ["all-linear"],
    )
    bias: str = _help("Which biases to train: none, all, or only those of adapted layers.", "none")
    quantization: str = _help("Load the base in 4-bit (QLoRA) or unquantized.", "none")
    quant_type: str = _help("4-bit data type: NF4 (normal float, best for weights) or FP4.", "nf4")
    double_quant: bool = _help("Quantize the quantization constants too (saves ~0.4 bit/param).", True)
    compute_dtype: str = _help(
        "Dtype for matmuls: auto picks bf16 where supported, else fp16 on GPU, fp32 on CPU.", "auto"
    )

    def validate(self) -> dict[str, str]:
        errors: dict[str, str] = {}
        if not 1 <= self.r <= 1024:
            errors["r"] = "must be between 1 and 1024"
        if self.alpha <= 0:
            errors["alpha"] = "must be positive"
        if not 0.0 <= self.dropout < 1.0:
            errors["dropout"] = "must be in [0, 1)"
        if not self.target_modules or any(not str(m).strip() for m in self.target_modules):
            errors["target_modules"] = "name at least one module (or all-linear)"
        for name, allowed in (
            ("bias", BIASES),
            ("quantization", QUANTIZATIONS),
            ("quant_type", QUANT_TYPES),
            ("compute_dtype", COMPUTE_DTYPES),
        ):
            if getattr(self, name) not in allowed:
                errors[name] = f"must be one of {', '.join(allowed)}"
        return errors


@dataclass
class TrainParams:
    learning_rate: float = _help("Peak learning rate of the adapter weights.", 2e-4)
    num_epochs: float = _help("Passes over the training set (ignored when max_steps > 0).", 1.0)
    max_steps: int = _help("Stop after this many optimizer steps; 0 means use num_epochs.", 0)
    batch_size: int = _help(
        "Micro-batch per device: examples (pad), rows of max_seq_length tokens (pack) or examples in one row "
        "(padding_free).",
        8,
    )
    grad_accum: int = _help("Micro-batches accumulated per optimizer step.", 1)
    max_seq_length: int = _help("Longer examples are truncated to this many tokens (also the packed row length).", 512)
    warmup_ratio: float = _help("Fraction of steps spent warming the learning rate up.", 0.03)
    lr_scheduler: str = _help("Learning-rate schedule after warmup.", "cosine")
    optimizer: str = _help(
        "Optimizer: adamw_torch, fused AdamW, 8-bit AdamW (bitsandbytes; paged variants spill to CPU under "
        "memory pressure), Adafactor, SGD, Lion 8-bit.",
        "adamw_torch",
    )
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    max_grad_norm: float = _help("Gradient clipping threshold.", 1.0)
    seed: int = _help("Random seed for initialisation and data order.", 42)
    completion_only_loss: bool = _help(
        "Train on the answer tokens only (prompt tokens masked); whole text when off.", True
    )
    neftune_noise_alpha: float = _help("NEFTune: noise added to embeddings during training (5 is typical); 0 is off.", 0.0)
    batching: str = _help(
        "How examples form batches: pad each micro-batch to its longest example; pack examples into rows of "
        "max_seq_length (each keeps its own positions and attention); padding_free: concatenate a micro-batch "
        "into one row; auto packs on GPUs.",
        "auto",
    )
    mode: str = _help(
        "Speed/memory trade-off: throughput uses the GPU's memory for speed (less recomputation), memory fits "
        "the smallest GPU (recompute and offload activations); auto picks throughput.",
        "auto",
    )
    gradient_checkpointing: str = _help(
        "Recompute activations in the backward pass (much less memory, ~25% more compute); auto: on unless "
        "throughput mode estimates that the run fits without.",
        "auto",
    )
    activation_offload: str = _help(
        "Keep saved activations in pinned CPU memory during the forward pass; auto: on in memory mode.", "auto"
    )
    attention: str = _help(
        "Attention kernel: varlen (FlashAttention over packed rows, skips cross-example work), flex "
        "(FlexAttention block masks), sdpa, eager; auto picks the fastest available.",
        "auto",
    )
    liger_kernels: str = _help(
        "Liger Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy without materialised logits); "
        "auto: on CUDA when installed.",
        "auto",
    )
    torch_compile: bool = _help("Compile the model with torch.compile (slower start, faster steps on some GPUs).", False)
    eval_fraction: float = _help("Hold out this fraction of the rows for evaluation (0 = no split).", 0.0)
    eval_steps: int = _help("Evaluate every this many steps; 0 evaluates at the end of each epoch.", 0)
    logging_steps: int = _help("Report loss and learning rate every this many steps.", 5)
    save_steps: int = _help("Save a resumable checkpoint every this many steps; 0 saves none.", 100)
    keep_checkpoints: int = _help("How many of the latest checkpoints to keep.", 2)
    early_stopping_patience: int = _help(
        "Stop when the eval loss has not improved for this many evaluations; 0 is off (needs an eval set).", 0
    )

    def validate(self, max_positions: int | None = None, has_eval_dataset: bool = False) -> dict[str, str]:
        errors: dict[str, str] = {}
        if not 0 < self.learning_rate <= 1:
            errors["learning_rate"] = "must be in (0, 1]"
        if self.max_steps < 0:
            errors["max_steps"] = "must be 0 or more"
        if self.max_steps == 0 and self.num_epochs <= 0:
            errors["num_epochs"] = "must be positive when max_steps is 0"
        for name in ("batch_size", "grad_accum", "logging_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                errors[name] = "must be at least 1"
        for name in ("eval_steps", "save_steps", "early_stopping_patience"):
            if getattr(self, name) < 0:
                errors[name] = "must be 0 or more"
        if self.max_seq_length < 8:
            errors["max_seq_length"] = "must be at least 8"
        elif max_positions and self.max_seq_length > max_positions:
            errors["max_seq_length"] = f"must not exceed the model's {max_positions} positions"
        if not 0 <= self.warmup_ratio < 1:
            errors["warmup_ratio"] = "must be in [0, 1)"
        if self.weight_decay < 0:
            errors["weight_decay"] = "must be 0 or more"
        if self.max_grad_norm <= 0:
            errors["max_grad_norm"] = "must be positive"
        if self.neftune_noise_alpha < 0:
            errors["neftune_noise_alpha"] = "must be 0 (off) or positive"
        if not 0 <= self.eval_fraction < 0.5:
            errors["eval_fraction"] = "must be in [0, 0.5)"
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                errors[name] = f"must be one of {', '.join(allowed)}"
        if self.early_stopping_patience and not (self.eval_fraction > 0 or has_eval_dataset):
            errors["early_stopping_patience"] = "needs an eval set: set eval_fraction or an eval dataset"
        return errors


SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
)
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd",
    "lion_8bit", "paged_lion_8bit",
)
BATCHINGS = ("auto", "pad", "pack", "padding_free")
MODES = ("auto", "throughput", "memory")
AUTO_ON_OFF = ("auto", "on", "off")
ATTENTIONS = ("auto", "varlen", "flex", "sdpa", "eager")
CHOICES = {
    "lr_scheduler": SCHEDULERS,
    "optimizer": OPTIMIZERS,
    "batching": BATCHINGS,
    "mode": MODES,
    "gradient_checkpointing": AUTO_ON_OFF,
    "activation_offload": AUTO_ON_OFF,
    "attention": ATTENTIONS,
    "liger_kernels": AUTO_ON_OFF,
}
# Values stored before a field became a choice: read them as the choice they meant.
LEGACY_VALUES = {"gradient_checkpointing": {True: "on", False: "off"}}


def suggest_train_params(num_parameters: int | None) -> TrainParams:
    """Defaults by model size: tiny demo models need a far larger step than real LLMs."""
    if num_parameters is not None and num_parameters < 50_000_000:
        return TrainParams(
            learning_rate=5e-3, num_epochs=3, batch_size=16, max_seq_length=64, logging_steps=2,
            gradient_checkpointing="off", save_steps=0,
        )
    if num_parameters is not None and num_parameters > 20_000_000_000:
        return TrainParams(learning_rate=1e-4, batch_size=2, grad_accum=8, max_seq_length=2048)
    return TrainParams()


@dataclass
class ModelRef:
    source: str = _help("Hugging Face hub id or a local directory.", "")
    revision: str = _help("Hub revision (branch, tag or commit); empty for the default.", "")
    trust_remote_code: bool = _help("Run the model's own Python code (admins only).", False)


@dataclass
class DatasetRef:
    uri: str = _help("Store URI of the dataset file.", "")
    format: str = _help("Detected row format.", "text")


@dataclass
class TrainSpec:
    run_id: int
    attempt: int
    base_model: ModelRef
    dataset: DatasetRef
    lora: LoraParams
    train: TrainParams
    output_uri: str
    # Resumable checkpoints live per run, not per attempt: a new attempt resumes from the latest.
    checkpoint_uri: str = ""
    eval_dataset: DatasetRef | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSpec:
        return cls(
            run_id=int(data["run_id"]),
            attempt=int(data["attempt"]),
            base_model=build(ModelRef, data["base_model"]),
            dataset=build(DatasetRef, data["dataset"]),
            lora=build(LoraParams, data["lora"]),
            train=build(TrainParams, data["train"]),
            output_uri=str(data["output_uri"]),
            checkpoint_uri=str(data.get("checkpoint_uri", "")),
            eval_dataset=build(DatasetRef, data["eval_dataset"]) if data.get("eval_dataset") else None,
        )

    @classmethod
    def from_json(cls, text: str) -> TrainSpec:
        return cls.from_dict(json.loads(text))


def build(cls: type[T], data: dict[str, Any]) -> T:
    """Build a flat dataclass from a dict, refusing unknown keys (a typo must not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}")
    data = {k: LEGACY_VALUES.get(k, {}).get(v, v) if isinstance(v, bool) else v for k, v in data.items()}
    return cls(**data)
