"""From an adapter spec to the PEFT and bitsandbytes objects the runner uses."""

from __future__ import annotations

from typing import Any

from workers.modelinfo import linear_module_names, unknown_targets
from workers.spec import LoraParams


class RunnerError(Exception):
    """A problem the user can fix, reported as the run's failure reason without a traceback."""


def quantization_config(lora: LoraParams, dtype: Any) -> Any:
    """The BitsAndBytesConfig for a quantized base, or None."""
    if lora.quantization != "4bit":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=lora.quant_type,
        bnb_4bit_use_double_quant=lora.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def build_peft_config(lora: LoraParams, model: Any) -> Any:
    from peft import LoraConfig

    unknown = unknown_targets(lora.target_modules, linear_module_names(model))
    if unknown:
        raise RunnerError(
            f"unknown target module(s) {', '.join(unknown)}; this model's linear modules are "
            f"{', '.join(linear_module_names(model))}"
        )
    targets: str | list[str] = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
