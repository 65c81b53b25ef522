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
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
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
    learning_rate: float = _help("Peak learning rate of the LoRA weights.", 2e-4)
    num_epochs: float = _help("Passes over the training set (ignored when max_steps > 0).", 1.0)
    max_steps: int = _help("Stop after this many optimizer steps; 0 means use num_epochs.", 0)
    batch_size: int = _help("Sequences per device per step.", 8)
    grad_accum: int = _help("Micro-batches accumulated per optimizer step.", 1)
    max_seq_length: int = _help("Longer examples are truncated to this many tokens.", 512)
    warmup_ratio: float = _help("Fraction of steps spent warming the learning rate up.", 0.03)
    lr_scheduler: str = _help("Learning-rate schedule after warmup.", "cosine")
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    max_grad_norm: float = _help("Gradient clipping threshold.", 1.0)
    seed: int = _help("Random seed for initialisation and data order.", 42)
    logging_steps: int = _help("Report loss and learning rate every this many steps.", 5)
    gradient_checkpointing: bool = _help(
        "Recompute activations in the backward pass: much less memory for ~20-30% more time.", True
    )
    completion_only_loss: bool = _help(
        "Train on the answer tokens only (prompt tokens masked); whole text when off.", True
    )

    def validate(self, max_positions: int | None = None) -> dict[str, str]:
        errors: dict[str, str] = {}
        if not 0 < self.learning_rate <= 1:
            errors["learning_rate"] = "must be in (0, 1]"
        if self.max_steps < 0:
            errors["max_steps"] = "must be 0 or more"
        if self.max_steps == 0 and self.num_epochs <= 0:
            errors["num_epochs"] = "must be positive when max_steps is 0"
        for name in ("batch_size", "grad_accum", "logging_steps"):
            if getattr(self, name) < 1:
                errors[name] = "must be at least 1"
        if self.max_seq_length < 8:
            errors["max_seq_length"] = "must be at least 8"
        elif max_positions and self.max_seq_length > max_positions:
            errors["max_seq_length"] = f"must not exceed the model's {max_positions} positions"
        if not 0 <= self.warmup_ratio < 1:
            errors["warmup_ratio"] = "must be in [0, 1)"
        if self.lr_scheduler not in SCHEDULERS:
            errors["lr_scheduler"] = f"must be one of {', '.join(SCHEDULERS)}"
        if self.weight_decay < 0:
            errors["weight_decay"] = "must be 0 or more"
        if self.max_grad_norm <= 0:
            errors["max_grad_norm"] = "must be positive"
        return errors


def suggest_train_params(num_parameters: int | None) -> TrainParams:
    """Defaults by model size: tiny demo models need a far larger step than real LLMs."""
    if num_parameters is not None and num_parameters < 50_000_000:
        return TrainParams(
            learning_rate=5e-3, num_epochs=3, batch_size=16, max_seq_length=64, logging_steps=2,
            gradient_checkpointing=False,
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
    return cls(**data)
