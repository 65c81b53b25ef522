"""The columns of a generation grid: the name an adapter key is loaded under in PEFT, and whether PEFT can mix a
loaded model's adapters in one batch."""

from __future__ import annotations

import hashlib
from typing import Any


def peft_adapter_name(key: str) -> str:
    """The name an adapter key is loaded under in PEFT: the key itself, unless torch or PEFT would trip on it.

    PEFT keeps adapters in ModuleDicts, so a key like "double" or "train" (an nn.Module method) cannot be a name,
    and a name inside a PEFT weight prefix ("lo" in "lora_") can get its weights re-initialised on loading."""
    import torch
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    clashes = (
        "." in key
        or hasattr(torch.nn.ModuleDict(), key)
        or any(key in prefix for prefix in PEFT_TYPE_TO_PREFIX_MAPPING.values())
    )
    return f"adapter_{hashlib.sha1(key.encode()).hexdigest()[:12]}" if clashes else key


def mixed_batch_refusals(model: Any, labels: dict[str, str] | None = None) -> list[str]:
    """Why PEFT would refuse (or silently misapply) `adapter_names` on this loaded model; empty when it can batch.

    `labels` (adapter key -> label) names the adapters in the reasons; by default they go by their PEFT names."""
    from peft import PeftModel, PeftType
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return []
    names = {peft_adapter_name(key): label for key, label in (labels or {}).items()}
    reasons = [
        f"{names.get(name, name)}: {peft_type_name(config)} adapters cannot be mixed in one batch"
        for name, config in model.peft_config.items()
        if config.peft_type != PeftType.LORA
    ]
    if reasons:
        return reasons
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    dora = sorted({name for layer in layers for name, on in layer.use_dora.items() if on})
    reasons += [f"{names.get(name, name)}: DoRA adapters cannot be mixed in one batch (PEFT)" for name in dora]
    if any(layer.merged for layer in layers):
        reasons.append("an adapter is merged into the base weights; mixed batches need unmerged adapters")
    return reasons


def peft_type_name(config: Any) -> str:
    return str(getattr(config.peft_type, "value", config.peft_type)).lower()
