"""From an adapter spec to the PEFT and bitsandbytes objects the runner uses.

The runner calls, in order: `quantization_config` (loading the base), `build_peft_config` (the trainer wraps
the base with it), `prepare_adapter` (right after the wrap, before training) and `save_adapter` (instead of
`model.save_pretrained`). A warm start wraps the base with its parent adapter instead (`load_parent_adapter`):
no PEFT config, no initialisation. `prepare_adapter` and `save_adapter` matter for three initialisations only:

- loftq: PEFT initialises B·A = 0, then `prepare_adapter` sets B·A to the rank-r SVD of W - dequant(Q(W)), read
  from the base's safetensors, so the 4-bit base plus the adapter starts closer to the full-precision base.
- pissa, pissa_fast, olora: PEFT moves the top of each weight into the adapter (W = W_res + s·B0·A0) and trains
  on W_res. `prepare_adapter` keeps B0, A0; `save_adapter` saves B·A - B0·A0 as a plain LoRA of rank 2r, which
  applies to the original, unchanged base like any other adapter.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from workers.contract.jobrunner import RunnerError
from workers.contract.spec import MUTATING_INITS, LoraParams, ModelRef, TrainSpec
from workers.training.modelinfo import check_adapter, feedforward_targets, linear_module_names, resolve_targets

INIT_LORA_WEIGHTS: dict[str, bool | str] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "pissa_fast": "pissa_niter_16",
    "olora": "olora",
    "orthogonal": "orthogonal",
    "loftq": True,  # PEFT's own "loftq" init quantizes a full-precision base; ours is already 4-bit (prepare_adapter)
}
PROMPT_TUNING_INIT = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}
INITIAL_ADAPTER = "initial-adapter"
TRAINED_ADAPTER = "default"  # PEFT's name of the adapter a run trains
REFERENCE_ADAPTER = "ref"  # trl's name of the frozen copy of it that a warm start's reference objectives measure against
# The LoraParams that shape the weights an adapter holds. A warm start continues its parent's weights, so these are
# the parent's; dropout, init and how the base is loaded (quantization, compute dtype) are the run's own.
SHAPE_FIELDS = ("method", "r", "alpha", "target_modules", "use_dora", "use_rslora", "bias", "modules_to_save")


def quantization_config(lora: LoraParams, dtype: Any) -> Any:
    """The BitsAndBytesConfig for a quantized base, or None."""
    if lora.quantization == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RunnerError(f"quantization {lora.quantization} needs the bitsandbytes package on this worker")
    from transformers import BitsAndBytesConfig

    if lora.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=lora.quant_type,
        bnb_4bit_use_double_quant=lora.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def quantization_label(lora: LoraParams) -> str:
    if lora.quantization == "4bit":
        return f"4-bit {lora.quant_type.upper()}" + (" double-quant" if lora.double_quant else "")
    if lora.quantization == "8bit":
        return "8-bit LLM.int8"
    return "unquantized"


def refuse_what_cannot_train(lora: LoraParams, model: Any) -> None:
    """RunnerError naming each field of `lora` that cannot train on this model (targets, modules, switches)."""
    errors = check_adapter(lora, linear_module_names(model), getattr(model.config, "model_type", ""))
    missing = [m for m in lora.modules_to_save if not _has_module(model, m)]
    if missing:
        errors["modules_to_save"] = f"{', '.join(missing)} not found in the model"
    if lora.use_dora and lora.quantization == "8bit" and _on_cpu(model):
        # bitsandbytes' CPU int8 path drops the weight scales that DoRA's weight norm reads on the next step.
        errors["use_dora"] = "DoRA on an 8-bit base does not train on CPU (it does on CUDA); use 4-bit or none here"
    if lora.method == "prefix_tuning" and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        errors["gradient_checkpointing"] = "prefix tuning does not work with gradient checkpointing (PEFT): set it off"
    if errors:
        raise RunnerError("; ".join(f"{name}: {message}" for name, message in errors.items()))


def build_peft_config(lora: LoraParams, model: Any) -> Any:
    """The PeftConfig of the adapter method; refuses what cannot work on this model with field-named reasons."""
    refuse_what_cannot_train(lora, model)
    linear = linear_module_names(model)
    model_type = getattr(model.config, "model_type", "")
    common: dict[str, Any] = {"task_type": "CAUSAL_LM", "modules_to_save": lora.modules_to_save or None}
    if lora.method == "lora":
        return _lora_config(lora, model, linear, model_type, common)
    if lora.method == "ia3":
        from peft import IA3Config

        targets = resolve_targets(lora.target_modules, linear, model_type)
        return IA3Config(
            target_modules=targets,
            feedforward_modules=feedforward_targets(lora, targets, linear, model_type),
            fan_in_fan_out=_uses_conv1d(model),
            **common,
        )
    if lora.method == "prefix_tuning":
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(
            num_virtual_tokens=lora.num_virtual_tokens,
            prefix_projection=lora.prefix_projection,
            encoder_hidden_size=lora.projection_hidden_size or model.config.hidden_size,
            **common,
        )
    from peft import PromptTuningConfig

    text = lora.prompt_init == "text"
    return PromptTuningConfig(
        num_virtual_tokens=lora.num_virtual_tokens,
        prompt_tuning_init=PROMPT_TUNING_INIT[lora.prompt_init],
        prompt_tuning_init_text=lora.prompt_init_text if text else None,
        tokenizer_name_or_path=model.name_or_path if text else None,
        **common,
    )


def _lora_config(lora: LoraParams, model: Any, linear: list[str], model_type: str, common: dict[str, Any]) -> Any:
    from peft import LoraConfig

    # PEFT's own all-linear also leaves out the output head by identity, whatever its name.
    targets: str | list[str] = (
        "all-linear" if lora.target_preset == "all-linear" else resolve_targets(lora.target_modules, linear, model_type)
    )
    options: dict[str, Any] = {
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": targets,
        "bias": lora.bias,
        "use_dora": lora.use_dora,
        "use_rslora": lora.use_rslora,
        "init_lora_weights": INIT_LORA_WEIGHTS[lora.init],
        "fan_in_fan_out": _uses_conv1d(model),
    }
    return LoraConfig(**options, **common)


def _uses_conv1d(model: Any) -> bool:
    """GPT-2 style Conv1D layers store the weight transposed (fan_in, fan_out)."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


def _on_cpu(model: Any) -> bool:
    return next(model.parameters()).device.type == "cpu"


def _has_module(model: Any, name: str) -> bool:
    return any(n == name or n.endswith("." + name) for n, _ in model.named_modules())


# --- warm start: the parent adapter as the trained one ----------------------------------------------


def saved_shape(lora: LoraParams) -> dict[str, Any]:
    """The SHAPE_FIELDS of the adapter a run with `lora` saves: `lora`'s, but r and alpha as PEFT writes them for
    the inits saved as a plain LoRA of rank 2r (see the module docstring); lists as sorted tuples."""
    shape = {name: getattr(lora, name) for name in SHAPE_FIELDS}
    if lora.is_lora and lora.init in MUTATING_INITS:
        shape["r"] = 2 * lora.r
        shape["alpha"] = lora.alpha * (math.sqrt(2) if lora.use_rslora else 2)
    return {name: tuple(sorted(value)) if isinstance(value, list) else value for name, value in shape.items()}


def shape_differences(lora: LoraParams, parent: LoraParams) -> list[str]:
    """Where a run with `lora` would not continue the adapter that a run with `parent` saved: one "name: the
    parent's value, not this one" each; empty when the shapes match (`lora`'s init does not apply to a warm start)."""
    theirs, ours = saved_shape(parent), saved_shape(dataclasses.replace(lora, init="default"))
    return [f"{name}: the parent's is {_shown(theirs[name])}, not {_shown(ours[name])}"
            for name in SHAPE_FIELDS if theirs[name] != ours[name]]


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ", ".join(value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def adapter_params(spec: TrainSpec) -> LoraParams:
    """The run's LoraParams as its adapter starts: a warm start begins at the parent's weights, so no init applies
    (neither before training nor, for the inits that mutate the base, at save time)."""
    return dataclasses.replace(spec.lora, init="default") if spec.warm_start else spec.lora


def load_parent_adapter(model: Any, lora: LoraParams, parent_dir: Path, parent_name: str = "") -> Any:
    """The base wrapped with the parent adapter as its trainable adapter (a warm start), instead of a new one.

    The parent's own adapter_config.json gives the shape, which must be `lora`'s; `lora` gives the dropout. The
    base's checks (`refuse_what_cannot_train`) apply as to a new adapter."""
    from peft import LoraConfig, PeftConfig, PeftModel

    label = parent_name or str(parent_dir)
    if not (parent_dir / "adapter_config.json").is_file():
        raise RunnerError(f"init_adapter: the files of the parent adapter {label} are not in the artifact store "
                          f"({parent_dir})")
    refuse_what_cannot_train(lora, model)
    config = PeftConfig.from_pretrained(str(parent_dir))
    if not isinstance(config, LoraConfig):
        raise RunnerError(f"init_adapter: {label} is a {config.peft_type} adapter; a warm start continues a LoRA "
                          "adapter (LoRA, DoRA, rsLoRA)")
    differ = [f"{name} {_shown(theirs)} (the run's LoRA config: {ours})" for name, theirs, ours in (
                  ("r", config.r, lora.r), ("alpha", config.lora_alpha, lora.alpha),
                  ("use_dora", config.use_dora, lora.use_dora), ("use_rslora", config.use_rslora, lora.use_rslora))
              if theirs != ours]
    if differ:
        raise RunnerError(f"init_adapter: {label} has {', '.join(differ)}: the run continues its weights, so its "
                          "LoRA config must have their shape")
    config.lora_dropout, config.inference_mode = lora.dropout, False
    return PeftModel.from_pretrained(model, str(parent_dir), adapter_name=TRAINED_ADAPTER, is_trainable=True,
                                     config=config)


def restore_trained_adapter(model: Any, checkpoint: Path) -> bool:
    """Load the trained adapter's weights from `checkpoint` before the trainer resumes from it, where the model
    holds other adapters too (a warm start's frozen reference). Such a checkpoint keeps the trained adapter in its
    root and the others in sub-folders; transformers' Trainer before 5.2x restores only the sub-folders on resume,
    which left the trained adapter at the parent's weights (equal to the reference: every reward 0). Returns whether
    it loaded anything."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = checkpoint / "adapter_model.safetensors"
    if len(getattr(model, "peft_config", {})) < 2 or not weights.is_file():
        return False
    set_peft_model_state_dict(model, load_file(str(weights)), adapter_name=TRAINED_ADAPTER)
    return True


def steady_reference(model: Any) -> int:
    """Switch dropout off in the frozen reference adapter (REFERENCE_ADAPTER), where a warm start's trainer has one;
    returns the layers changed. trl computes the reference in training mode, and where dropout stays on (trl's
    GRPO keeps it by default; its DPO and KTO switch it off) the copied dropout would make the reference differ
    from one forward to the next instead of being the parent as it was."""
    import torch

    layers = [m.lora_dropout for m in model.modules()
              if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict) and REFERENCE_ADAPTER in m.lora_dropout]
    for dropout in layers:
        dropout[REFERENCE_ADAPTER] = torch.nn.Identity()
    return len(layers)


# --- after the wrap, and at save time -------------------------------------------------------------


def prepare_adapter(model: Any, lora: LoraParams, base: ModelRef, work_dir: Path) -> list[str]:
    """Initialisation that needs the wrapped PeftModel: call once the trainer has wrapped the base, before
    training. `work_dir` must be the run's own folder, the same for every attempt. Returns lines for the log."""
    if not lora.is_lora:
        return []
    if lora.init == "loftq":
        count = apply_loftq(model, base)
        return [f"LoftQ: {count} adapted layers start from the rank-{lora.r} SVD of their 4-bit quantization error"]
    if lora.init in MUTATING_INITS:
        initial = work_dir / INITIAL_ADAPTER
        model.save_pretrained(initial, safe_serialization=True)
        return [f"{lora.init}: initial adapter kept to save the result as a plain LoRA of rank {2 * lora.r}"]
    return []


def save_adapter(model: Any, lora: LoraParams, adapter_dir: Path, work_dir: Path) -> None:
    """Save the adapter so that it applies to the original base (see the module docstring)."""
    if lora.is_lora and lora.init in MUTATING_INITS:
        initial = work_dir / INITIAL_ADAPTER
        if not (initial / "adapter_config.json").exists():
            raise RunnerError(f"{lora.init}: the initial adapter is missing (prepare_adapter was not called)")
        model.save_pretrained(
            adapter_dir, safe_serialization=True, selected_adapters=[TRAINED_ADAPTER],
            path_initial_model_for_weight_conversion=str(initial),
        )
        return
    # The trained adapter alone: a warm start's model also holds the reference, a frozen copy of the parent.
    model.save_pretrained(adapter_dir, safe_serialization=True, selected_adapters=[TRAINED_ADAPTER])


def apply_loftq(model: Any, base: ModelRef) -> int:
    """LoftQ on a 4-bit bitsandbytes base: B·A from the SVD of the quantization residual; returns the layer count.

    PEFT's `replace_lora_weights_loftq` does this on CUDA/XPU only (it moves the weights to "cuda"), so on CPU the
    same computation runs here on the layer's own device.
    """
    import torch
    from peft.tuners.lora import Linear4bit

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise RunnerError("init: loftq needs LoRA layers on a 4-bit base, and this model has none")
    weights_dir = _weights_dir(base)
    if torch.cuda.is_available() or _xpu_available():
        from peft import replace_lora_weights_loftq

        replace_lora_weights_loftq(model, model_path=str(weights_dir))
        return len(layers)
    read = _safetensors_reader(weights_dir, getattr(model.get_base_model(), "base_model_prefix", ""))
    for name, module in layers:
        _loftq_layer(module, read(name.removeprefix("base_model.model.") + ".weight"))
    return len(layers)


def _loftq_layer(module: Any, weight: Any, adapter: str = "default") -> None:
    """PEFT's `_loftq_init_new` for one layer, on the layer's device: lora_B·lora_A = top-r SVD of W - deq(Q)."""
    import bitsandbytes as bnb
    import torch

    quantized = module.get_base_layer().weight
    with torch.no_grad():
        dequantized = bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state).to(torch.float32)
        residual = weight.to(device=dequantized.device, dtype=torch.float32) - dequantized
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        r = module.r[adapter]
        root = s[:r].sqrt()
        lora_a, lora_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        lora_a.data = (root[:, None] * vh[:r]).to(lora_a.dtype)
        lora_b.data = (u[:, :r] * root).to(lora_b.dtype)


def _xpu_available() -> bool:
    import torch

    return hasattr(torch, "xpu") and torch.xpu.is_available()


def _weights_dir(base: ModelRef) -> Path:
    """The folder of the base's full-precision safetensors: the local path, or the hub cache (no download)."""
    path = Path(base.source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base.source, revision=base.revision or None, local_files_only=True))
    except Exception as exc:  # the hub client raises several kinds for "not in the cache"
        raise RunnerError(f"init: loftq reads the base's safetensors, which are not on this worker: {exc}") from exc


def _safetensors_reader(weights_dir: Path, prefix: str) -> Any:
    """`name -> tensor` over model.safetensors or its shards; also tries the name without the base prefix."""
    from safetensors import safe_open

    index = weights_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = {k: weights_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    elif (weights_dir / "model.safetensors").exists():
        weight_map = None
    else:
        raise RunnerError(f"init: loftq needs the base in safetensors; none in {weights_dir}")

    def read(name: str) -> Any:
        candidates = [name] + ([name.removeprefix(prefix + ".")] if prefix and name.startswith(prefix + ".") else [])
        for key in candidates:
            file = weight_map.get(key) if weight_map is not None else weights_dir / "model.safetensors"
            if file is None:
                continue
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                if key in handle.keys():
                    return handle.get_tensor(key)
        raise RunnerError(f"init: loftq found no weight {name} in the base's safetensors")

    return read
