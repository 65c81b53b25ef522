"""A base model and its adapters loaded for generation: the base once, each adapter attached under its key.

Also which adapters can share a mixed-adapter batch (`can_batch`, `mixed_batch_refusals`), and a 4-bit base's
weights dequantized once for generation (`dequantize_for_generation`).
"""

from __future__ import annotations

import math
import warnings
from functools import cache
from pathlib import Path
from typing import Any

from workers.contract.jobrunner import RunnerError
from workers.contract.jobspecs import AdapterRef, LoadParams
from workers.contract.reporter import Reporter
from workers.contract.spec import PROMPT_LEARNING_METHODS, LoraParams, ModelRef
from workers.contract.store import ArtifactStore
from workers.data.prompts import FALLBACK_CHAT_TEMPLATE
from workers.generation.columns import peft_adapter_name, peft_type_name
from workers.training.device import Device, pick_device
from workers.training.modelinfo import check_source
from workers.training.peftsetup import quantization_config, quantization_label

# --- loading ---------------------------------------------------------------------------------------------


def load_for_inference(
    base: ModelRef, adapters: list[AdapterRef], load: LoadParams, store: ArtifactStore, reporter: Reporter | None = None
) -> tuple[Any, Any, Device]:
    """Load tokenizer + base once (quantization per `load`, device/dtype as workers.training.device.pick_device), then every
    adapter onto it under its `key` (PeftModel.from_pretrained for the first, load_adapter for the rest).
    Returns (model, tokenizer, device), the model in eval mode. With no adapters returns the plain base model.
    Left padding, pad token set, chat template fallback when the tokenizer has none.

    Raises RunnerError naming the adapter for a missing folder, adapters of different PEFT types (one PeftModel
    holds one type) and an adapter whose weights do not fit this base."""
    folders = {ref.key: _adapter_folder(ref, store) for ref in adapters}
    _check_one_peft_type(adapters, folders)
    check_source(base.source)
    device = pick_device(load.compute_dtype)
    tokenizer = _load_tokenizer(base, reporter)
    model = _load_base(base, load, device, reporter)
    for ref in adapters:
        model = _attach_adapter(model, ref, folders[ref.key], base)
        _say(reporter, f"Adapter {_name(ref)} loaded as {ref.key!r}")
    model.eval()
    return model, tokenizer, device


def _say(reporter: Reporter | None, message: str, level: str = "info") -> None:
    if reporter is not None:
        reporter.log(message, level=level)


def _name(ref: AdapterRef) -> str:
    return f"{ref.label or ref.key!r} ({ref.uri})"


def _adapter_folder(ref: AdapterRef, store: ArtifactStore) -> Path:
    try:
        folder = store.path(ref.uri)
    except ValueError as exc:
        raise RunnerError(f"adapter {_name(ref)}: {exc}") from exc
    if not folder.is_dir():
        raise RunnerError(f"adapter {_name(ref)}: the folder does not exist in the artifact store")
    if not (folder / "adapter_config.json").is_file():
        raise RunnerError(f"adapter {_name(ref)}: no adapter_config.json in the folder (not a PEFT adapter)")
    return folder


def _check_one_peft_type(adapters: list[AdapterRef], folders: dict[str, Path]) -> None:
    from peft import PeftConfig

    types: dict[str, list[str]] = {}
    for ref in adapters:
        try:
            peft_type = peft_type_name(PeftConfig.from_pretrained(str(folders[ref.key])))
        except Exception as exc:  # PEFT raises several kinds for a broken config
            raise RunnerError(f"adapter {_name(ref)}: unreadable adapter_config.json: {exc}") from exc
        types.setdefault(peft_type, []).append(ref.label or ref.key)
    if len(types) > 1:
        kinds = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in types.items())
        raise RunnerError(f"adapters: PEFT holds adapters of one type per model, these mix several ({kinds})")


def _load_tokenizer(base: ModelRef, reporter: Reporter | None) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        base.source, revision=base.revision or None, trust_remote_code=base.trust_remote_code
    )
    tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        _say(reporter, "The tokenizer has no chat template: using a ChatML-style template.", level="warning")
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def _load_base(base: ModelRef, load: LoadParams, device: Device, reporter: Reporter | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    quantized = LoraParams(quantization=load.quantization, compute_dtype=load.compute_dtype)
    dtype = getattr(torch, device.dtype_name)
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": base.trust_remote_code}
    if base.revision:
        kwargs["revision"] = base.revision
    if device.kind == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    quantization = quantization_config(quantized, dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    _say(reporter, f"Loading {base.source} in {precision_label(load, device)} on {device.kind}")
    return AutoModelForCausalLM.from_pretrained(base.source, **kwargs)


def precision_label(load: LoadParams, device: Device) -> str:
    """The base's precision as loaded: its weights' dtype, or their quantization and the compute dtype."""
    if load.quantization == "none":
        return device.dtype_name
    quantized = LoraParams(quantization=load.quantization, compute_dtype=load.compute_dtype)
    return f"{quantization_label(quantized)} (compute {device.dtype_name})"


def _attach_adapter(model: Any, ref: AdapterRef, folder: Path, base: ModelRef) -> Any:
    from peft import PeftModel

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Adapter weights in the base's dtype: PEFT's default upcast of bf16/fp16 to fp32 helps training only.
            name = peft_adapter_name(ref.key)
            if isinstance(model, PeftModel):
                missing = model.load_adapter(str(folder), name, autocast_adapter_dtype=False).missing_keys
            else:
                model = PeftModel.from_pretrained(model, str(folder), name, autocast_adapter_dtype=False)
                missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RunnerError(f"adapter {_name(ref)} does not fit the base {base.source}: {_load_failure(exc)}") from exc
    if missing:
        raise RunnerError(
            f"adapter {_name(ref)} does not fit the base {base.source}: the base has layers the adapter has no "
            f"weights for ({str(missing[0])[:200]}); was it trained on another base model?"
        )
    return model


def _load_failure(exc: Exception) -> str:
    """The first concrete line of a PEFT/torch loading error (size mismatches come one per line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    mismatch = next((line for line in lines if line.startswith("size mismatch")), None)
    if mismatch:
        return f"{mismatch} (shapes differ: was it trained on another base model?)"
    return lines[0] if lines else type(exc).__name__


# --- which adapters share a batch -------------------------------------------------------------------------


def can_batch(adapters: list[AdapterRef]) -> bool:
    """Whether PEFT can serve these adapters in one mixed batch (adapter_names=[...]), as far as the refs tell.

    Only LoRA layers read `adapter_names`: prompt-learning methods pass it on to the base model and IA3 drops it
    (every row would get the active adapter). DoRA and merged layers are refused by PEFT too, but those show only
    once loaded: `mixed_batch_refusals(model)` checks the loaded model."""
    return not ref_refusals(adapters)


def ref_refusals(adapters: list[AdapterRef]) -> list[str]:
    return [
        f"{ref.label or ref.key}: {ref.method.replace('_', ' ')} adapters cannot be mixed in one batch"
        + (" (virtual tokens change the input itself)" if ref.method in PROMPT_LEARNING_METHODS else "")
        for ref in adapters
        if ref.method != "lora"
    ]


# --- 4-bit bases: dequantized once for generation ---------------------------------------------------------

GENERATION_SLACK_BYTES = 2 * 2**30  # activations and allocator slack beyond the weights and the KV cache


def kv_cache_bytes(model: Any, rows: int, positions: int) -> int:
    """Bytes of a KV cache of `rows` rows and `positions` positions for this model, in its compute dtype."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * heads * head_dim * rows * positions * itemsize


def dequantize_for_generation(model: Any, reserve_bytes: int = 0, force: bool | None = None) -> str:
    """Replace every bitsandbytes 4-bit Linear by an `nn.Linear` holding its weight dequantized once in its compute
    dtype, where the GPU has room; returns what was done, with sizes, for the job's log ("" for no 4-bit layers).

    A 4-bit layer dequantizes its weight at every call (on the GPU a kernel and a full-size write per layer and
    decode step); dequantized once, a step reads the compute-dtype weights and nothing else, and transformers can
    compile the step (it compiles no bitsandbytes layers, so the quantization config goes as in its own
    `dequantize()`). The values are bitsandbytes' own (`dequantize_4bit` of the stored blocks), so answers do not
    change. A LoRA layer keeps its type (and stays stackable): its `base_layer` is what is replaced.

    force=None: on CUDA where the free memory exceeds the dequantized size + `reserve_bytes` (the KV cache) +
    GENERATION_SLACK_BYTES, never on the CPU (bitsandbytes' CPU 4-bit matmul does not pay that cost per step);
    True / False: always / never (benchmarks, tests)."""
    import torch

    from workers.formatting import size

    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit bases either
        return ""
    layers: list[tuple[str, Any]] = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    if not layers:
        return ""
    if any(getattr(module.weight.quant_state, "packing_format_for_cpu", False) for _, module in layers):
        # On a CPU with AVX512-BF16, a first forward repacks the weights with bfloat16 scales: the blocks are gone.
        return "Kept 4-bit weights: bitsandbytes repacked them for its CPU kernel, so they cannot be dequantized"
    dtype = _compute_dtype(layers[0][1])
    needed = sum(math.prod(module.weight.quant_state.shape) for _, module in layers) * dtype.itemsize
    device = layers[0][1].weight.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch, unused
        room = f"{size(free)} free"
        wanted = needed + reserve_bytes + GENERATION_SLACK_BYTES
        if force is None:
            force = free > wanted
        if not force:
            return f"Kept 4-bit weights, dequantized at every step: {room}, {size(wanted)} needed to dequantize once"
    elif not force:
        return "Kept 4-bit weights (bitsandbytes' own 4-bit matmul on the CPU)"
    else:
        room = "on the CPU"
    for name, module in layers:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _dequantized(module))
    quantizer = getattr(_unwrapped(model), "hf_quantizer", None)
    if quantizer is not None:  # no bitsandbytes layer is left: transformers' own dequantize() does the same
        quantizer.remove_quantization_config(_unwrapped(model))
    label = str(dtype).removeprefix("torch.")
    return f"Dequantized {size(needed)} of 4-bit weights once into {label} ({len(layers)} layers; {room})"


def _unwrapped(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _compute_dtype(layer: Any) -> Any:
    """The dtype a 4-bit layer computes in: its compute_dtype, else the dtype its weights were quantized from."""
    return layer.compute_dtype or layer.weight.quant_state.dtype


@cache
def _dequantized_linear() -> type:
    """The nn.Linear that stands for a dequantized 4-bit layer (made on first use: torch is imported lazily)."""
    import torch

    class DequantizedLinear(torch.nn.Linear):
        """A 4-bit layer's weight dequantized once; computes as bitsandbytes does: in the weight's dtype."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    return DequantizedLinear


def _dequantized(layer: Any) -> Any:
    """An nn.Linear computing what the 4-bit `layer` computes: input cast to the compute dtype, output back."""
    import torch
    from bitsandbytes.functional import dequantize_4bit

    dtype = _compute_dtype(layer)
    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
    linear = _dequantized_linear()(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device="meta")
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        linear.bias = torch.nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
    return linear
