"""A LoRA adapter as a merge reads it: its config, its modules' A and B factors and their scaling."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.contract.jobrunner import RunnerError
from workers.contract.jobspecs import AdapterRef
from workers.contract.store import ArtifactStore

PEFT_PREFIX = "base_model.model."


def adapter_label(ref: AdapterRef) -> str:
    return repr(ref.label or ref.key or ref.uri)


def adapter_attr(ref: AdapterRef, name: str, default: Any) -> Any:
    return getattr(ref, name, default)


def trained_quantization(ref: AdapterRef) -> str:
    """The base quantization the adapter was trained on, as the spec states it: "4bit nf4", "8bit" or "none"."""
    quantization = str(adapter_attr(ref, "quantization", "none"))
    if quantization == "4bit":
        return f"4bit {adapter_attr(ref, 'quant_type', 'nf4')}"
    return quantization


def adapter_folder(ref: AdapterRef, store: ArtifactStore) -> Path:
    try:
        path = store.path(ref.uri)
    except ValueError as exc:
        raise RunnerError(f"adapter {adapter_label(ref)}: {exc}") from None
    if not (path / "adapter_config.json").is_file():
        raise RunnerError(f"adapter {adapter_label(ref)}: no adapter_config.json in {path} (not an adapter folder)")
    return path


def read_adapter_config(ref: AdapterRef, adapter_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((adapter_dir / "adapter_config.json").read_text()))
    except (OSError, ValueError) as exc:
        raise RunnerError(f"adapter {adapter_label(ref)}: unreadable adapter_config.json ({exc})") from None


def describe_lora(config: dict[str, Any]) -> str:
    name = "+".join(n for n, key in (("DoRA", "use_dora"), ("rsLoRA", "use_rslora")) if config.get(key)) or "LoRA"
    text = f"{name} r={config.get('r')} alpha={config.get('lora_alpha')}"
    patterns = [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
    return text + (f", {' and '.join(patterns)}" if patterns else "")


@dataclass
class LoraModule:
    """One adapted module of a LoRA adapter file."""

    a: Any  # lora_A: (r, in_features), or (r, num_embeddings) for an embedding
    b: Any  # lora_B: (out_features, r), or (embedding_dim, r)
    scaling: float
    embedding: bool = False
    magnitude: Any = None  # DoRA's magnitude vector, one entry per output feature

    @property
    def r(self) -> int:
        return int(self.a.shape[0])

    def shape(self, transpose: bool) -> tuple[int, ...]:
        out_features, in_features = int(self.b.shape[0]), int(self.a.shape[1])
        return (in_features, out_features) if transpose or self.embedding else (out_features, in_features)

    def delta(self, transpose: bool, device: Any = None) -> Any:
        """scaling · B @ A in float32, in the layout of the module's weight (transposed for Conv1D / embeddings)."""
        import torch

        a = self.a.to(device=device, dtype=torch.float32)
        b = self.b.to(device=device, dtype=torch.float32)
        delta = (b @ a) * self.scaling
        return delta.T if transpose or self.embedding else delta

    def apply(self, weight: Any, transpose: bool) -> Any:
        """The merged weight (float32): W + ΔW, or for DoRA m · (W + ΔW) / ||W + ΔW|| per output feature."""
        import torch

        merged = weight + self.delta(transpose, weight.device)
        if self.magnitude is None:
            return merged
        # Output features are the rows of an (out, in) weight, the columns of a Conv1D's (in, out) one.
        norm = torch.linalg.norm(merged, dim=0 if transpose else 1, keepdim=True)
        return self.magnitude.to(merged).reshape(norm.shape) / norm * merged


@dataclass
class LoraFile:
    """A LoRA adapter folder read into memory: its config, adapted modules and whole-tensor replacements."""

    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)  # module path in the model -> LoRA factors
    replacements: dict[str, Any] = field(default_factory=dict)  # parameter path -> tensor (modules_to_save)
    unknown: list[str] = field(default_factory=list)  # state-dict keys the stream does not know how to merge

    @classmethod
    def read(cls, adapter_dir: Path) -> LoraFile:
        from peft.utils import load_peft_weights

        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        lora = cls(config)
        parts: dict[str, dict[str, Any]] = {}
        suffixes = {
            ".lora_A.weight": "a",
            ".lora_B.weight": "b",
            ".lora_embedding_A": "ea",
            ".lora_embedding_B": "eb",
            ".lora_magnitude_vector": "magnitude",
        }
        for key, tensor in load_peft_weights(str(adapter_dir), device="cpu").items():
            if not key.startswith(PEFT_PREFIX):
                lora.unknown.append(key)
                continue
            name = key.removeprefix(PEFT_PREFIX)
            suffix = next((s for s in suffixes if name.endswith(s)), None)
            if suffix is not None:
                parts.setdefault(name.removesuffix(suffix), {})[suffixes[suffix]] = tensor
            elif ".lora_" in name:
                lora.unknown.append(key)  # lora_B.bias (lora_bias) and other variants' tensors
            else:  # modules_to_save, or a base layer saved with the adapter (embeddings)
                lora.replacements[name.replace(".modules_to_save.", ".").replace(".base_layer.", ".")] = tensor
        for module, found in parts.items():
            embedding = "ea" in found
            a, b = found.get("ea" if embedding else "a"), found.get("eb" if embedding else "b")
            if a is None or b is None:
                lora.unknown.append(f"{module} (lora_A or lora_B missing)")
                continue
            scaling = lora_scaling(config, module, int(a.shape[0]))
            lora.modules[module] = LoraModule(a, b, scaling, embedding, found.get("magnitude"))
        return lora


def lora_scaling(config: dict[str, Any], module: str, r: int) -> float:
    """PEFT's scaling of one module: alpha / r, or alpha / sqrt(r) with rsLoRA; alpha_pattern overrides alpha."""
    from peft.utils.other import get_pattern_key

    alpha_pattern: dict[str, Any] = config.get("alpha_pattern") or {}
    alpha: Any = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config["lora_alpha"])
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def is_conv1d(module: Any) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def stores_transposed(model: Any, module: str) -> bool:
    """Whether the module (or the layer a PEFT wrapper holds) stores its weight (in, out), as Conv1D does."""
    layer = model.get_submodule(module)
    return is_conv1d(layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer)
