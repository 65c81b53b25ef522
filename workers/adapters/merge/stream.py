"""The streamed merge: the base checkpoint shard by shard, the adapter's change added in float32, each sum cast once.

Host memory stays near one output shard plus the adapter whatever the model's size. `peft_merge` is the whole-model
fallback through PEFT's merge_and_unload for adapters the stream cannot reproduce exactly.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.adapters.merge.checkpoint import FLOAT_DTYPES, StreamingUnsupported, checkpoint_index, parse_size
from workers.adapters.merge.lora import LoraFile, LoraModule, is_conv1d
from workers.adapters.merge.memory import release_freed_memory, release_memory
from workers.contract.jobrunner import RunnerError

SAFETENSORS_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "U64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
# LoRA options whose merge is more than W + s·B·A (or DoRA on a linear layer): merged by PEFT instead.
UNSTREAMED_OPTIONS = (
    "lora_bias",
    "use_qalora",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "megatron_config",
    "ensure_weight_tying",
)


@dataclass
class _Entry:
    """One output tensor: where it is read from, what is applied, what it costs."""

    name: str
    source_file: Path
    source_key: str
    dtype: str  # safetensors dtype of the source
    shape: tuple[int, ...]
    replacement: Any = None
    lora: LoraModule | None = None
    transpose: bool = False
    out_dtype: Any = None  # torch dtype written; None keeps the source's (integer buffers)

    @property
    def nbytes(self) -> int:
        itemsize = self.out_dtype.itemsize if self.out_dtype is not None else SAFETENSORS_ITEMSIZE.get(self.dtype, 4)
        return math.prod(self.shape) * itemsize if self.shape else itemsize

    def load(self, device: Any) -> Any:
        import torch
        from safetensors import safe_open

        if self.replacement is not None:
            tensor = self.replacement
        else:  # one open per tensor: the file's mapping, and the pages it made resident, go away at once
            with safe_open(str(self.source_file), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(self.source_key)
        if self.lora is None and self.out_dtype is None:
            return tensor
        if self.lora is None:
            return tensor.to(self.out_dtype)
        weight = tensor.to(device=device, dtype=torch.float32)
        return self.lora.apply(weight, self.transpose).to(device="cpu", dtype=self.out_dtype)


def stream_merge(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: str,
    max_shard_size: int | str = "2GB",
    progress: Callable[[int, int], None] | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Write base + adapter as a full model (safetensors shards and config.json) into out_dir, tensor by tensor.

    Each base tensor is read alone (its file is opened and closed around it), merged in float32 on the GPU when
    there is one, cast once to `dtype` and kept until its output shard is full. Output shards hold consecutive
    tensors, so what is in memory at a time is one output shard (twice while safetensors serialises it), one
    tensor in float32 with its delta, and the adapter.
    Raises StreamingUnsupported (before writing anything) when the adapter needs PEFT's own merge.
    """
    import torch

    max_bytes = parse_size(max_shard_size)
    model = meta_model(base_dir, trust_remote_code)
    lora = LoraFile.read(Path(adapter_dir))
    entries, untie = _plan_entries(base_dir, lora, model, getattr(torch, dtype))
    shards = _assign_shards(entries, max_bytes)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    weight_map: dict[str, str] = {}
    with torch.no_grad():
        for index, shard in enumerate(shards, start=1):
            filename = (
                "model.safetensors" if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            )
            _write_shard(out_dir / filename, {e.name: e.load(device) for e in shard})
            weight_map.update({e.name: filename for e in shard})
            release_freed_memory()
            if progress is not None:
                progress(index, len(shards))
    if len(shards) > 1:
        index_file = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2) + "\n")
    _write_config(base_dir, out_dir, dtype, untie, trust_remote_code)
    return {
        "shards": len(shards),
        "tensors": len(entries),
        "merged_weights": sum(1 for e in entries if e.lora is not None),
        "replaced_weights": sum(1 for e in entries if e.replacement is not None),
        "untied": untie,
    }


def meta_model(base_dir: Path, trust_remote_code: bool = False) -> Any:
    """The base's architecture on the meta device: module types, tied weights; no memory, no weights read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _plan_entries(base_dir: Path, lora: LoraFile, model: Any, dtype: Any) -> tuple[list[_Entry], bool]:
    """The output tensors in checkpoint order, each with the adapter's change that applies to it.

    A weight tied to another (lm_head to the embeddings) that the adapter changes on either side is written out
    separately, and the merged config unties them: the adapter on its base changes only one of the two.
    """
    import torch

    _check_streamable(lora)
    index = checkpoint_index(base_dir)
    prefix = getattr(model, "base_model_prefix", "")
    tied = _tied_pairs(model)  # tied parameter -> the parameter it shares

    def checkpoint_key(param: str) -> str:
        for candidate in (param, param.removeprefix(prefix + "."), f"{prefix}.{param}"):
            if candidate in index:
                return candidate
        if param in tied:
            return param  # a tied weight the checkpoint leaves out: a copy of its source
        raise StreamingUnsupported(f"the base checkpoint has no tensor for {param}")

    def shape_of(key: str) -> tuple[int, ...]:
        return index[key][2] if key in index else index[checkpoint_key(tied[key])][2]

    ops: dict[str, tuple[LoraModule, bool]] = {}
    for module, factors in lora.modules.items():
        key = checkpoint_key(f"{module}.weight")
        transpose = _layer_transpose(model, module, factors)
        _check_shape(key, factors.shape(transpose), shape_of(key), "the adapter's delta")
        ops[key] = (factors, transpose)
    replaced = {checkpoint_key(name): tensor for name, tensor in lora.replacements.items()}
    for key, tensor in replaced.items():
        _check_shape(key, tuple(tensor.shape), shape_of(key), "the adapter's saved module")

    touched = set(ops) | set(replaced)
    untie: dict[str, str] = {}  # source key -> tied key, written right after the source
    for target, source in tied.items():
        target_key, source_key = checkpoint_key(target), checkpoint_key(source)
        if target_key in touched or source_key in touched:
            if target != _output_embeddings_name(model) or not getattr(model.config, "tie_word_embeddings", False):
                raise StreamingUnsupported(f"the adapter changes {target}, which the model ties to {source}")
            untie[source_key] = target_key

    keep_fp32 = _fp32_modules(model, dtype)
    entries: list[_Entry] = []
    for key, (file, st_dtype, shape) in index.items():
        if key in untie.values():
            continue  # its value is its source's, written with it
        for name in [key] + ([untie[key]] if key in untie else []):
            lm: LoraModule | None = ops[name][0] if name in ops else None
            transpose = name in ops and ops[name][1]
            out_dtype = None
            if st_dtype in FLOAT_DTYPES:
                out_dtype = torch.float32 if any(m in name.split(".") for m in keep_fp32) else dtype
            entries.append(_Entry(name, file, key, st_dtype, shape, replaced.get(name), lm, transpose, out_dtype))
    return entries, bool(untie)


def _check_streamable(lora: LoraFile) -> None:
    config = lora.config
    variants = [name for name in requested_variants(config) if name != "use_dora"]
    options = [name for name in UNSTREAMED_OPTIONS if config.get(name)]
    if variants or options:
        raise StreamingUnsupported(f"the adapter uses {', '.join(variants + options)}")
    if lora.unknown:
        raise StreamingUnsupported(f"unknown adapter tensors: {', '.join(lora.unknown[:3])}")


def requested_variants(config: dict[str, Any]) -> list[str]:
    """The LoRA variants a config asks for, found the way PEFT finds them (fields tagged as variants)."""
    import dataclasses

    from peft import LoraConfig

    names = []
    for f in dataclasses.fields(LoraConfig):
        if f.name == "init_lora_weights":
            names += [v for v in f.metadata.get("lora_variants", ()) if config.get(f.name) == v]
        elif f.metadata.get("is_lora_variant") and config.get(f.name):
            names.append(f.name)
    return names


def _layer_transpose(model: Any, module: str, lm: LoraModule) -> bool:
    """Whether the module stores its weight (in, out): decided by its type, as PEFT does when it wraps it."""
    import torch

    try:
        layer = model.get_submodule(module)
    except AttributeError:
        raise StreamingUnsupported(f"the base model has no module {module}") from None
    if lm.embedding:
        if not isinstance(layer, torch.nn.Embedding) or lm.magnitude is not None:
            raise StreamingUnsupported(
                f"{module}: embedding LoRA on a {type(layer).__name__}"
                + (" with DoRA" if lm.magnitude is not None else "")
            )
        return True
    if is_conv1d(layer):
        return True
    if isinstance(layer, torch.nn.Linear):
        return False
    raise StreamingUnsupported(f"{module} is a {type(layer).__name__}, not a linear layer")


def _check_shape(name: str, got: tuple[int, ...], base: tuple[int, ...], what: str) -> None:
    if got != base:
        raise RunnerError(
            f"{what} for {name} has shape {list(got)} but the base's tensor is {list(base)}: the adapter was "
            "trained on another base model"
        )


def _tied_pairs(model: Any) -> dict[str, str]:
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None:  # older transformers: only the output embeddings tie, when the config says so
        tied = (
            {"lm_head.weight": "model.embed_tokens.weight"}
            if getattr(model.config, "tie_word_embeddings", False)
            else {}
        )
    return dict(tied)


def _output_embeddings_name(model: Any) -> str:
    head = model.get_output_embeddings()
    return next((f"{name}.weight" for name, module in model.named_modules() if module is head), "")


def _fp32_modules(model: Any, dtype: Any) -> set[str]:
    """Modules transformers keeps in float32 when it loads this model in `dtype` (a merged copy must too)."""
    import torch

    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return keep


def _assign_shards(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    """Consecutive runs of tensors up to max_bytes each; a tensor larger than that gets a shard of its own."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _write_shard(path: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _write_config(base_dir: Path, out_dir: Path, dtype: str, untie: bool, trust_remote_code: bool) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    config.dtype = dtype
    if untie:
        config.tie_word_embeddings = False
    config.save_pretrained(out_dir)
    if getattr(config, "auto_map", None):  # the model's own code travels with it
        for code in base_dir.glob("*.py"):
            shutil.copy2(code, out_dir / code.name)


def peft_merge(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: str,
    max_shard_size: int | str = "2GB",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """PEFT's merge: the unquantized base in `dtype`, the adapter on it, merge_and_unload, save_pretrained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    merged_weights = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    merged = model.merge_and_unload(safe_merge=True)
    merged.save_pretrained(out_dir, max_shard_size=parse_size(max_shard_size), safe_serialization=True)
    del base, model, merged
    release_memory()
    return {"merged_weights": merged_weights, "untied": False}


def write_companions(base_dir: Path, adapter_dir: Path, out_dir: Path, trust_remote_code: bool = False) -> None:
    """The tokenizer (the adapter's own if it has one, else the base's) and a generation_config.json."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    has_tokenizer = any((adapter_dir / name).exists() for name in ("tokenizer_config.json", "tokenizer.json"))
    source = adapter_dir if has_tokenizer else base_dir
    AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code).save_pretrained(out_dir)
    if (base_dir / "generation_config.json").exists():
        generation = GenerationConfig.from_pretrained(base_dir)
    else:
        generation = GenerationConfig.from_model_config(
            AutoConfig.from_pretrained(out_dir, trust_remote_code=trust_remote_code)
        )
    generation.save_pretrained(out_dir)
