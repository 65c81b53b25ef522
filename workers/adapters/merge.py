"""Merge a LoRA adapter into its base model, check the merge, and combine adapters into a new one.

`run_merge(spec, reporter, store)` and `run_combine(spec, reporter, store)` have the train runner's contract
(workers/training/train.py): they report through the reporter, write into the artifact store, and return the result, or None
when the job failed or was cancelled.

Merging streams the base checkpoint (`stream_merge`): each safetensors tensor is read on its own, the adapter's change
is added in float32 and the sum is cast once to the merge dtype, and output shards are written as they fill, so host
memory stays near one output shard plus the adapter whatever the model's size. An adapter the stream cannot reproduce
exactly (an unusual layer, a LoRA variant) is merged by PEFT's merge_and_unload on the whole model instead
(`peft_merge`), and the log says so. Every merge is then checked against the adapter applied to the unquantized base
(`verify_merge`); a bfloat16 or float16 merge is held to that dtype's own rounding noise, measured against the same
reference run in float32 (`Tolerance`).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.contract.jobrunner import Cancelled, RunnerError, run_reported
from workers.contract.jobspecs import EQUAL_RANK_COMBINATIONS, SVD_COMBINATIONS, AdapterRef, CombineSpec, MergeSpec
from workers.contract.reporter import Reporter
from workers.contract.spec import ModelRef
from workers.contract.store import ArtifactStore, sha256_of, size_of
from workers.training.modelinfo import ModelNotFound, check_source

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
# Prompts of varied content (prose, code, arithmetic, structured data, other languages) that probe a merged model.
PROBE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "What is 17 + 25?",
    "Once upon a time, in a small village by the sea,",
    '{"name": "Ada Lovelace", "born": 1815, "known_for": ',
    "Der schnelle braune Fuchs springt über",
)
GREEDY_TOKENS = 16
MAX_PROBE_TOKENS = 48  # prompt tokens kept per probe: the reference logits of every probe are held in memory
# PEFT's combination types that add the adapters' A and B factors entry-wise, so every layer needs one rank.
# Tunedeck's "linear" is not among them: it is the exact weighted sum of the deltas (see combine_adapters).
FACTORWISE_COMBINATIONS = tuple(c for c in EQUAL_RANK_COMBINATIONS if c != "linear")
COMBINE_SEED = 0  # dare drops entries at random: a fixed seed makes a combination reproducible
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
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class StreamingUnsupported(Exception):
    """The streamed merge cannot reproduce this adapter exactly; the message says why."""


@dataclass(frozen=True)
class Tolerance:
    """How close the merged model's logits must be to the adapter applied to its unquantized base (the reference).

    S, the logit scale, is the largest |logit| the reference in the merge dtype produces on the probes.

    float32: fixed bounds, max |Δlogit| <= max_rel · S and mean |Δlogit| <= mean_rel · S against the reference,
    1e-3 and 1e-4. The merged layer computes (W + s·B·A)·x where the reference computes W·x + s·B·(A·x), the same
    function in another order, so they differ by float32 rounding (u = 6e-8, about u·sqrt(fan_in) per layer):
    measured max 7e-7 to 2e-6 of S on random Llamas of 2 to 16 layers; deeper and wider models add an order of
    magnitude or two, which the bound still covers, while dropping the delta of one layer of a trained adapter moves
    the logits by far more (the tests drop one down_proj: see test_merge.py).

    bfloat16 and float16: relative to the dtype's own rounding noise, measured on the model at hand. A fixed
    fraction of S cannot fit every model: rounding noise grows with depth and width (a correct bfloat16 merge of a
    32-layer Llama-3.1-8B-shaped random model was off its bfloat16 reference by max 8.2 % of S, over the 8 % once
    fixed from 2- and 16-layer models), and a bound wide enough for the deepest model misses real errors in small
    ones. So the reference is also run in float32, the exact result to float32 rounding, and the merged model and
    the reference in the merge dtype are both scored against it on the same sequences. The merge is verified when
    it is no further from the exact result than computing in the dtype costs anyway:

        merged max |Δ| <= max_margin · reference max |Δ| + floor_max_rel · S
        merged mean |Δ| <= mean_margin · reference mean |Δ| + floor_mean_rel · S

    The two err in comparable amounts, not equal ones: the merged model rounds W + ΔW to the dtype once where the
    reference keeps W as loaded and rounds the sum of its base and LoRA outputs. For correct merges of random Llamas
    (2 layers of 64 to 32 of 128, 16 of 256 and 4 of 512; trained and random adapters on every projection; float32
    and bfloat16 checkpoints; on the CPU) the merged/reference ratio measured 0.92-1.14 for the mean and 0.36-1.22
    for the max, a noisier extreme: hence margins 1.5 (mean) and 2 (max). The floors, about a tenth of the smallest
    noise measured (1e-3 and 1e-4 of S for bfloat16, 8x less for float16's three more mantissa bits), only matter
    where the reference's own error is near zero. Dropping one layer's delta gave mean ratios of 3.8 to 600, and
    scaling one layer's delta by 1.1 gave 1.1 to 5.8 in bfloat16: such a change is caught where it moves the logits
    more than rounding does (the tests scale a deep o_proj's delta: ratio 4, which the fixed bound let through).
    Token and greedy agreement are not criteria: rounding flips near-tied tokens, and random weights give
    near-uniform logits, all near-ties.

    When the float32 reference cannot be run (it would not fit in memory, or failed), the fixed bounds apply to
    bfloat16 and float16 too, against the reference in the merge dtype: bfloat16 8e-2 (max) and 1e-2 (mean),
    float16 1e-2 and 1.25e-3. Measured max 1.7-1.9 % and mean 0.22-0.28 % of S for bfloat16, 0.2 % and 0.03 % for
    float16, on 2 and 16 layers; deep, wide models can exceed them (the 8B shape above), and the figures say which
    rule was applied and why.
    """

    max_rel: float
    mean_rel: float
    max_margin: float = 0.0  # 0: fixed bounds only
    mean_margin: float = 0.0
    floor_max_rel: float = 0.0
    floor_mean_rel: float = 0.0

    @property
    def noise_floor(self) -> bool:
        """Whether the merge dtype is held to its own rounding noise (measured against a float32 reference)."""
        return self.mean_margin > 0


TOLERANCES = {
    "float32": Tolerance(max_rel=1e-3, mean_rel=1e-4),
    "bfloat16": Tolerance(
        max_rel=8e-2, mean_rel=1e-2, max_margin=2.0, mean_margin=1.5, floor_max_rel=1e-3, floor_mean_rel=1e-4
    ),
    "float16": Tolerance(
        max_rel=1e-2, mean_rel=1.25e-3, max_margin=2.0, mean_margin=1.5, floor_max_rel=1.25e-4, floor_mean_rel=1.25e-5
    ),
}
EXPECTED_ERRORS = (RunnerError, ModelNotFound)  # their message alone says what went wrong
FLOAT32_HEADROOM = 1.2  # the float32 reference is run when its weights times this fit in the free memory


# --- the job contract ---------------------------------------------------------------------------------------------


def run_merge(spec: MergeSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any] | None:
    """Merge spec.adapter into spec.base_model, save the full model at spec.output_uri and check it."""
    return run_reported(reporter, lambda: _merge(spec, reporter, store), expected=EXPECTED_ERRORS)


def run_combine(spec: CombineSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any] | None:
    """Combine spec.adapters into one new LoRA adapter saved at spec.output_uri (see combine_adapters)."""
    return run_reported(reporter, lambda: _combine(spec, reporter, store), expected=EXPECTED_ERRORS)


def check_cancel(reporter: Reporter) -> None:
    reporter.maybe_flush()
    if reporter.cancel_requested:
        raise Cancelled()


# --- merge -------------------------------------------------------------------------------------------------------


def _merge(spec: MergeSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any]:
    started = time.monotonic()
    max_shard_bytes = _validate_merge(spec)
    adapter_dir = _adapter_dir(spec.adapter, store)
    adapter_config = _read_adapter_config(spec.adapter, adapter_dir)
    if adapter_config.get("peft_type") != "LORA":
        raise RunnerError(
            f"adapter {_label(spec.adapter)} is a {adapter_config.get('peft_type')} adapter (adapter_config.json); "
            "only LoRA adapters are merged into the base weights"
        )
    out_dir = _output_dir(spec.output_uri, store)
    base_dir = base_weights_dir(spec.base_model, reporter)
    dtype = merge_dtype(spec.dtype, base_dir)
    _refuse_quantized_checkpoint(base_dir)
    quantization = _trained_quantization(spec.adapter)
    reporter.log(f"Merging {_label(spec.adapter)} ({_describe_lora(adapter_config)}) into {spec.base_model.source}")
    if quantization != "none":
        reporter.log(
            f"The adapter was trained on a {quantization} base; it is merged into the unquantized base weights "
            f"in {dtype} (merging into quantized weights would round the result to the quantization grid)"
        )
    else:
        reporter.log(f"Merge dtype: {dtype}" + (" (the base checkpoint's own)" if spec.dtype == "auto" else ""))

    written = _write_merged(spec, base_dir, adapter_dir, out_dir, dtype, max_shard_bytes, reporter)
    check = verify_merge(
        ModelRef(source=str(base_dir), trust_remote_code=spec.base_model.trust_remote_code),
        adapter_dir,
        out_dir,
        dtype,
        spec.probe_prompts,
        quantization=quantization,
        quant_type=_adapter_attr(spec.adapter, "quant_type", "nf4"),
        double_quant=bool(_adapter_attr(spec.adapter, "double_quant", True)),
    )
    _log_check(check, reporter)
    return {
        "merged_uri": spec.output_uri,
        "dtype": dtype,
        "size_bytes": size_of(out_dir),
        "sha256": sha256_of(out_dir),
        "shards": len(list(out_dir.glob("*.safetensors"))),
        "verified": check["verified"],
        "check": check,
        **written,
        "runtime_s": round(time.monotonic() - started, 2),
    }


def _write_merged(
    spec: MergeSpec,
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: str,
    max_shard_bytes: int,
    reporter: Reporter,
) -> dict[str, Any]:
    """Write the merged model into a .part folder (streamed, else by PEFT), then move it into place."""
    part = out_dir.with_name(out_dir.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    scope = "merge" if _reset_peak_rss() else "process"
    rss_start = _rss_bytes()

    def progress(done: int, total: int) -> None:
        reporter.log(f"Wrote shard {done}/{total}")
        check_cancel(reporter)

    trust_remote_code = spec.base_model.trust_remote_code
    try:
        try:
            stats = stream_merge(base_dir, adapter_dir, part, dtype, max_shard_bytes, progress, trust_remote_code)
            method = "streamed"
        except StreamingUnsupported as exc:
            reporter.log(
                f"The streamed merge cannot reproduce this adapter exactly ({exc}); merging with PEFT's "
                "merge_and_unload instead, which holds the whole model in memory",
                level="warning",
            )
            reporter.flush()
            stats = peft_merge(base_dir, adapter_dir, part, dtype, max_shard_bytes, trust_remote_code)
            method = "peft"
        peak_rss = _peak_rss_bytes()
        write_companions(base_dir, adapter_dir, part, trust_remote_code)
        check_cancel(reporter)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(part, out_dir)
    if stats["untied"]:
        reporter.log("The adapter changes a tied embedding: the merged model keeps lm_head and the embeddings apart")
    reporter.log(
        f"Merged model written ({method}): {size_of(out_dir):,} bytes; peak host memory {peak_rss / 2**20:,.0f} MiB "
        f"({(peak_rss - rss_start) / 2**20:,.0f} MiB above the start)"
    )
    reporter.flush()
    return {
        "method": method,
        "merged_weights": stats["merged_weights"],
        "peak_rss_bytes": peak_rss,
        "rss_at_start_bytes": rss_start,
        "peak_rss_scope": scope,
    }


def _validate_merge(spec: MergeSpec) -> int:
    problems = spec.validate()
    try:
        max_shard_bytes = parse_size(spec.max_shard_size)
    except ValueError as exc:
        problems["max_shard_size"] = str(exc)
        max_shard_bytes = 0
    if problems:
        raise RunnerError("; ".join(f"{name}: {message}" for name, message in problems.items()))
    check_source(spec.base_model.source)
    return max_shard_bytes


def parse_size(size: int | str) -> int:
    """Bytes of a shard size such as "2GB", "500MB" or "1GiB" (the units of transformers' max_shard_size)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = int(convert_file_size_to_int(size))
    except (ValueError, TypeError):
        raise ValueError(f"{size!r} is not a size: write it like 2GB, 500MB or 1GiB") from None
    if value <= 0:
        raise ValueError(f"{size!r} must be above zero")
    return value


def _label(ref: AdapterRef) -> str:
    return repr(ref.label or ref.key or ref.uri)


def _adapter_attr(ref: AdapterRef, name: str, default: Any) -> Any:
    return getattr(ref, name, default)


def _trained_quantization(ref: AdapterRef) -> str:
    """The base quantization the adapter was trained on, as the spec states it: "4bit nf4", "8bit" or "none"."""
    quantization = str(_adapter_attr(ref, "quantization", "none"))
    if quantization == "4bit":
        return f"4bit {_adapter_attr(ref, 'quant_type', 'nf4')}"
    return quantization


def _adapter_dir(ref: AdapterRef, store: ArtifactStore) -> Path:
    try:
        path = store.path(ref.uri)
    except ValueError as exc:
        raise RunnerError(f"adapter {_label(ref)}: {exc}") from None
    if not (path / "adapter_config.json").is_file():
        raise RunnerError(f"adapter {_label(ref)}: no adapter_config.json in {path} (not an adapter folder)")
    return path


def _read_adapter_config(ref: AdapterRef, adapter_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((adapter_dir / "adapter_config.json").read_text()))
    except (OSError, ValueError) as exc:
        raise RunnerError(f"adapter {_label(ref)}: unreadable adapter_config.json ({exc})") from None


def _output_dir(uri: str, store: ArtifactStore) -> Path:
    try:
        return store.path(uri)
    except ValueError as exc:
        raise RunnerError(f"output_uri: {exc}") from None


def _describe_lora(config: dict[str, Any]) -> str:
    name = "+".join(n for n, key in (("DoRA", "use_dora"), ("rsLoRA", "use_rslora")) if config.get(key)) or "LoRA"
    text = f"{name} r={config.get('r')} alpha={config.get('lora_alpha')}"
    patterns = [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
    return text + (f", {' and '.join(patterns)}" if patterns else "")


def base_weights_dir(ref: ModelRef, reporter: Reporter | None = None) -> Path:
    """The folder holding the base's config and safetensors: the local path, or a hub snapshot (fetched if needed)."""
    path = Path(ref.source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    if reporter is not None:
        reporter.log(f"Fetching {ref.source} (config, tokenizer and safetensors)")
        reporter.flush()
    try:
        return Path(
            snapshot_download(
                ref.source,
                revision=ref.revision or None,
                allow_patterns=["*.json", "*.safetensors", "*.py", "*.model", "*.txt", "*.jinja", "tokenizer*"],
            )
        )
    except Exception as exc:  # the hub client raises many kinds (not found, gated, offline)
        raise RunnerError(f"base model {ref.source!r} could not be fetched: {exc}") from exc


def merge_dtype(requested: str, base_dir: Path) -> str:
    """The merge dtype: the requested one, or for "auto" the base checkpoint's own (float32 if it names none)."""
    if requested != "auto":
        return requested
    config = json.loads((base_dir / "config.json").read_text())
    own = config.get("dtype") or config.get("torch_dtype") or "float32"
    return own if own in TOLERANCES else "float32"


def _refuse_quantized_checkpoint(base_dir: Path) -> None:
    quantization = json.loads((base_dir / "config.json").read_text()).get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "quantized")
        raise RunnerError(
            f"the base checkpoint in {base_dir} is itself quantized ({method}): a merge needs the full-precision "
            "weights; point the merge at the unquantized model the adapter was trained on"
        )


# --- reading a LoRA adapter --------------------------------------------------------------------------------------


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


def _is_conv1d(module: Any) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _stores_transposed(model: Any, module: str) -> bool:
    """Whether the module (or the layer a PEFT wrapper holds) stores its weight (in, out), as Conv1D does."""
    layer = model.get_submodule(module)
    return _is_conv1d(layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer)


# --- the streamed merge ------------------------------------------------------------------------------------------

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


def _checkpoint_index(base_dir: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Checkpoint key -> (file, dtype, shape), in file order then key order, read from the headers only."""
    from safetensors import safe_open

    index_file = base_dir / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted({base_dir / name for name in weight_map.values()})
    elif (base_dir / "model.safetensors").exists():
        files = [base_dir / "model.safetensors"]
    else:
        raise StreamingUnsupported(f"the base in {base_dir} has no safetensors weights")
    index: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                part = handle.get_slice(key)
                index[key] = (file, part.get_dtype(), tuple(part.get_shape()))
    return index


def _plan_entries(base_dir: Path, lora: LoraFile, model: Any, dtype: Any) -> tuple[list[_Entry], bool]:
    """The output tensors in checkpoint order, each with the adapter's change that applies to it.

    A weight tied to another (lm_head to the embeddings) that the adapter changes on either side is written out
    separately, and the merged config unties them: the adapter on its base changes only one of the two.
    """
    import torch

    _check_streamable(lora)
    index = _checkpoint_index(base_dir)
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
    variants = [name for name in _requested_variants(config) if name != "use_dora"]
    options = [name for name in UNSTREAMED_OPTIONS if config.get(name)]
    if variants or options:
        raise StreamingUnsupported(f"the adapter uses {', '.join(variants + options)}")
    if lora.unknown:
        raise StreamingUnsupported(f"unknown adapter tensors: {', '.join(lora.unknown[:3])}")


def _requested_variants(config: dict[str, Any]) -> list[str]:
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
    if _is_conv1d(layer):
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
    _release_memory()
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


# --- memory figures ----------------------------------------------------------------------------------------------


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim).

    Tensors of a few MB come from the heap rather than their own mappings; without a trim, each shard's freed
    tensors leave holes that the next shard's do not fit exactly, and the process's RSS creeps up shard by shard.
    """
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False  # not glibc (musl, macOS): nothing to do
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


def _reset_peak_rss() -> bool:
    """Start the peak-RSS figure afresh (Linux: clear_refs 5 resets the high-water mark getrusage reports)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# --- checking a merge ----------------------------------------------------------------------------------------------


@dataclass
class _Probe:
    ids: Any  # (1, n) prompt token ids
    continuation: Any = None  # (1, GREEDY_TOKENS) the first reference run's greedy tokens: every model scores these
    greedy: Any = None  # (1, GREEDY_TOKENS) the greedy tokens of the reference in the merge dtype
    logits: Any = None  # the merge-dtype reference's logits over ids + continuation, kept in the dtype they come in
    exact: Any = None  # float32 logits of the float32 reference (bfloat16 and float16 merges only)


def verify_merge(
    base: ModelRef | str | Path,
    adapter_dir: Path,
    merged_dir: Path,
    dtype: str,
    prompts: Sequence[str] = (),
    quantization: str = "none",
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> dict[str, Any]:
    """Compare a merged model with the adapter applied to its unquantized base (PeftModel), on probe prompts.

    Every model scores the same token sequences: each prompt followed by GREEDY_TOKENS greedy tokens of the first
    reference run. The models are loaded one after the other, each freed before the next, and only the reference
    logits are kept. For a bfloat16 or float16 merge the first is the reference in float32 (the exact result), then
    the reference in the merge dtype, then the merged model; both of the latter are scored against the exact result
    and the merge is verified by Tolerance's noise-floor rule. For float32, or when the float32 reference cannot be
    run (it would not fit in memory, or loading it failed), the merged model is held to TOLERANCES[dtype]'s fixed
    bounds against the reference in the merge dtype.

    Returns, against the reference in the merge dtype: max/mean |Δlogit|, the fraction of positions whose argmax
    agrees (token_agreement) and of probes whose own greedy continuation is identical (greedy_agreement); the same
    figures of the merged model and of the merge-dtype reference against the float32 one (exact_reference, None for
    float32 merges); the adapter's own effect on the logits (adapter on vs off, for scale); `tolerance`, the rule
    applied and its bounds; and `verified`. With quantization "4bit <type>" or "8bit" it also records, for
    information, how far the adapter on the quantized base it was trained on is from the merged model.
    """
    import torch
    from transformers import AutoTokenizer

    ref = base if isinstance(base, ModelRef) else ModelRef(source=str(base))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    probes = [_Probe(ids) for ids in _probe_ids(tokenizer, list(prompts) or list(PROBE_PROMPTS))]
    tolerance = TOLERANCES[dtype]
    torch_dtype = getattr(torch, dtype)

    effect: dict[str, float | None] | None = None
    exact_error: str | None = None
    if tolerance.noise_floor:
        effect, exact_error = _run_exact_reference(ref, adapter_dir, probes, tokenizer)

    reference = _load_with_adapter(ref, adapter_dir, torch_dtype)
    low_vs_exact = _Scores()
    with torch.no_grad():
        for probe, greedy in zip(probes, _greedy(reference, probes, tokenizer), strict=True):
            probe.greedy = greedy
            if probe.continuation is None:
                probe.continuation = greedy
            probe.logits = _logits(reference, probe)
            if probe.exact is not None:
                low_vs_exact.add(probe.logits, probe.exact, probe.greedy, probe.continuation)
        if effect is None:
            effect = _adapter_effect(reference, probes)
    del reference
    _release_memory()
    if any(p.exact is not None and not bool(p.exact.isfinite().all()) for p in probes):
        exact_error = "the float32 reference's logits are not finite"
        for probe in probes:
            probe.exact = None

    merged = _load_plain(merged_dir, torch_dtype)
    figures, merged_vs_exact = _compare(merged, probes, tokenizer)
    del merged
    _release_memory()
    scale = max(float(p.logits.abs().max()) for p in probes)
    exact = None
    if merged_vs_exact is not None:
        exact = {
            "dtype": "float32",
            "merged": merged_vs_exact.figures(),
            "low_precision_reference": low_vs_exact.figures(),
            "error": None,
        }
    elif tolerance.noise_floor:
        exact = {"dtype": "float32", "merged": None, "low_precision_reference": None, "error": exact_error}
    verified, bounds = _judge(tolerance, dtype, figures, exact, scale)
    result: dict[str, Any] = {
        "verified": verified,
        **figures,
        "logit_scale": scale,
        "tolerance": bounds,
        "exact_reference": exact,
        "probes": len(probes),
        "greedy_tokens": GREEDY_TOKENS,
        "adapter_effect": effect,
        "quantized_gap": None,
    }
    for probe in probes:
        probe.exact = None
    if quantization != "none":
        result["quantized_gap"] = _quantized_gap(
            ref, adapter_dir, torch_dtype, quantization, quant_type, double_quant, probes, tokenizer
        )
    return result


def _judge(
    tolerance: Tolerance, dtype: str, figures: dict[str, Any], exact: dict[str, Any] | None, scale: float
) -> tuple[bool, dict[str, Any]]:
    """Whether the merge is verified, and the rule applied with the bounds it gave (see Tolerance)."""
    finite_scale = math.isfinite(scale)
    merged = exact["merged"] if exact else None
    low = exact["low_precision_reference"] if exact else None
    if merged and low and low["max_abs_logit_diff"] is not None and finite_scale:
        floor_max, floor_mean = tolerance.floor_max_rel * scale, tolerance.floor_mean_rel * scale
        max_abs = tolerance.max_margin * low["max_abs_logit_diff"] + floor_max
        mean_abs = tolerance.mean_margin * low["mean_abs_logit_diff"] + floor_mean
        verified = (
            merged["max_abs_logit_diff"] is not None
            and merged["max_abs_logit_diff"] <= max_abs
            and merged["mean_abs_logit_diff"] <= mean_abs
        )
        return verified, {
            "dtype": dtype,
            "rule": "noise_floor",
            "description": (
                f"against the float32 reference, the merged model's max |Δlogit| may be at most "
                f"{tolerance.max_margin:g}x the {dtype} reference's plus {tolerance.floor_max_rel:g} of the logit "
                f"scale, and its mean {tolerance.mean_margin:g}x plus {tolerance.floor_mean_rel:g}"
            ),
            "max_abs": max_abs,
            "mean_abs": mean_abs,
            "max_margin": tolerance.max_margin,
            "mean_margin": tolerance.mean_margin,
            "floor_max_abs": floor_max,
            "floor_mean_abs": floor_mean,
            "merged_to_reference_max": _ratio(merged["max_abs_logit_diff"], low["max_abs_logit_diff"]),
            "merged_to_reference_mean": _ratio(merged["mean_abs_logit_diff"], low["mean_abs_logit_diff"]),
        }
    bounds: dict[str, Any] = {
        "dtype": dtype,
        "rule": "fixed",
        "description": (
            f"against the {dtype} reference, max |Δlogit| at most {tolerance.max_rel:g} and mean at most "
            f"{tolerance.mean_rel:g} of the logit scale"
        ),
        "max_abs": tolerance.max_rel * scale,
        "mean_abs": tolerance.mean_rel * scale,
        "max_rel": tolerance.max_rel,
        "mean_rel": tolerance.mean_rel,
    }
    if exact is not None:
        bounds["fallback_reason"] = exact["error"] or f"the {dtype} reference's logits are not finite"
    verified = (
        figures["max_abs_logit_diff"] is not None
        and finite_scale
        and figures["max_abs_logit_diff"] <= bounds["max_abs"]
        and figures["mean_abs_logit_diff"] <= bounds["mean_abs"]
    )
    return verified, bounds


def _ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def _run_exact_reference(
    ref: ModelRef, adapter_dir: Path, probes: list[_Probe], tokenizer: Any
) -> tuple[dict[str, float | None] | None, str | None]:
    """The adapter on its base in float32: sets each probe's continuation and exact logits.

    Returns (the adapter's effect on the logits, None), or (None, why) when the float32 model does not fit in memory
    or could not be run; the probes are then left as they were.
    """
    import torch

    too_big = _float32_shortfall(ref)
    if too_big:
        return None, too_big
    model: Any = None
    try:
        model = _load_with_adapter(ref, adapter_dir, torch.float32)
        with torch.no_grad():
            for probe, continuation in zip(probes, _greedy(model, probes, tokenizer), strict=True):
                probe.continuation = continuation
                probe.exact = _logits(model, probe).float()
            effect = _adapter_effect(model, probes)
    except Exception as exc:  # out of memory above all: the check goes on with the fixed tolerance
        for probe in probes:
            probe.continuation = probe.exact = None
        first_line = next(iter(str(exc).splitlines()), "")[:300]  # CUDA's out-of-memory advice runs long
        return None, f"the float32 reference could not be run: {type(exc).__name__}: {first_line}"
    finally:
        del model
        _release_memory()
    return effect, None


def _float32_shortfall(ref: ModelRef) -> str | None:
    """Why the float32 reference would not fit in the free GPU memory (or the available host memory without a GPU);
    None when it fits or its size cannot be told from a local checkpoint."""
    import torch

    source = Path(ref.source)
    try:
        index = _checkpoint_index(source) if source.is_dir() else {}
    except (StreamingUnsupported, OSError, ValueError):
        index = {}
    needed = sum(4 * math.prod(shape) for _, st_dtype, shape in index.values() if st_dtype in FLOAT_DTYPES)
    if not needed:
        return None
    if torch.cuda.is_available():
        free, where = int(torch.cuda.mem_get_info()[0]), "free GPU memory"
    else:
        free, where = _available_host_bytes(), "available host memory"
    if free and needed * FLOAT32_HEADROOM > free:
        return f"the float32 reference needs about {_size(needed)} for its weights and the {where} is {_size(free)}"
    return None


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _available_host_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _adapter_effect(model: Any, probes: list[_Probe]) -> dict[str, float | None]:
    """The adapter on vs off, on the probes' sequences, against the logits just taken with it on."""
    effect = _Diffs()
    with model.disable_adapter():
        for probe in probes:
            effect.add(_logits(model, probe), probe.exact if probe.exact is not None else probe.logits)
    return effect.figures()


def _quantized_gap(
    ref: ModelRef,
    adapter_dir: Path,
    dtype: Any,
    quantization: str,
    quant_type: str,
    double_quant: bool,
    probes: list[_Probe],
    tokenizer: Any,
) -> dict[str, Any]:
    """The adapter on the quantized base it was trained on, against the probes: for information only."""
    try:
        quantized = _load_with_adapter(ref, adapter_dir, dtype, quantization, quant_type, double_quant)
    except Exception as exc:  # bitsandbytes missing or without this platform: the figure is optional
        return {"quantization": quantization, "error": f"{type(exc).__name__}: {exc}"}
    gap = {"quantization": quantization, **_compare(quantized, probes, tokenizer)[0]}
    del quantized
    _release_memory()
    return gap


def _probe_ids(tokenizer: Any, prompts: list[str]) -> list[Any]:
    """Each prompt as plain text, and also as a user turn when the tokenizer has a chat template."""
    texts = list(prompts)
    if getattr(tokenizer, "chat_template", None):
        texts += [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    ids = []
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"][:, :MAX_PROBE_TOKENS]
        if encoded.shape[1]:
            ids.append(encoded)
    return ids


def _device() -> Any:
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _load_plain(
    path: Path | str, dtype: Any, revision: str = "", trust_remote_code: bool = False, **kwargs: Any
) -> Any:
    from transformers import AutoModelForCausalLM

    device = _device()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        revision=revision or None,
        trust_remote_code=trust_remote_code,
        device_map={"": device.index or 0} if device.type == "cuda" else None,
        **kwargs,
    )
    return model.eval()


def _load_with_adapter(
    ref: ModelRef,
    adapter_dir: Path,
    dtype: Any,
    quantization: str = "none",
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> Any:
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    kwargs: dict[str, Any] = {}
    if quantization.startswith("4bit"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    base = _load_plain(ref.source, dtype, ref.revision, ref.trust_remote_code, **kwargs)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def _release_memory() -> None:
    """Give back what a model just deleted held (host memory, and the CUDA cache)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _greedy(model: Any, probes: list[_Probe], tokenizer: Any) -> list[Any]:
    """GREEDY_TOKENS greedy tokens after each prompt, all probes in one left-padded batch; the end-of-text token
    is held back so that every probe yields the same count."""
    import torch
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    width = max(p.ids.shape[1] for p in probes)
    ids = torch.full((len(probes), width), pad, dtype=torch.long)
    mask = torch.zeros((len(probes), width), dtype=torch.long)
    for row, probe in enumerate(probes):
        ids[row, width - probe.ids.shape[1] :] = probe.ids[0]
        mask[row, width - probe.ids.shape[1] :] = 1
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=GREEDY_TOKENS,
        min_new_tokens=GREEDY_TOKENS if eos is not None else 0,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    return [out[row : row + 1, width:].cpu() for row in range(len(probes))]


def _logits(model: Any, probe: _Probe) -> Any:
    """The model's logits over the probe's prompt and continuation, on the CPU, in the dtype the model gives."""
    import torch

    device = next(model.parameters()).device
    sequence = torch.cat([probe.ids, probe.continuation], dim=1).to(device)
    return model(input_ids=sequence).logits[0].cpu()


@dataclass
class _Diffs:
    """Running max and mean of |a - b| over logits, without keeping them; None where a logit is not finite."""

    largest: float = 0.0
    total: float = 0.0
    count: int = 0

    def add(self, a: Any, b: Any) -> None:
        diff = (a.float() - b.float()).abs()
        largest = float(diff.max())
        self.largest = max(self.largest, largest) if math.isfinite(largest) else math.inf
        self.total += float(diff.sum())
        self.count += diff.numel()

    def figures(self) -> dict[str, float | None]:
        if not math.isfinite(self.largest):
            return {"max_abs_logit_diff": None, "mean_abs_logit_diff": None}
        return {"max_abs_logit_diff": self.largest, "mean_abs_logit_diff": self.total / max(self.count, 1)}


@dataclass
class _Scores:
    """One model's logits and greedy continuations against another's, accumulated probe by probe."""

    diffs: _Diffs = field(default_factory=_Diffs)
    agree: int = 0
    positions: int = 0
    same_greedy: int = 0
    probes: int = 0

    def add(self, logits: Any, reference: Any, greedy: Any, reference_greedy: Any) -> None:
        import torch

        self.diffs.add(logits, reference)
        self.agree += int((logits.float().argmax(-1) == reference.float().argmax(-1)).sum())
        self.positions += logits.shape[0]
        self.same_greedy += int(torch.equal(greedy, reference_greedy))
        self.probes += 1

    def figures(self) -> dict[str, float | None]:
        return {
            **self.diffs.figures(),
            "token_agreement": self.agree / max(self.positions, 1),
            "greedy_agreement": self.same_greedy / max(self.probes, 1),
        }


def _compare(model: Any, probes: list[_Probe], tokenizer: Any) -> tuple[dict[str, Any], _Scores | None]:
    """The model's logits on the probes' sequences and its own greedy continuations against the merge-dtype
    reference's, and against the float32 reference's where the probes hold its logits (else None)."""
    import torch

    scores = _Scores()
    exact = _Scores() if all(p.exact is not None for p in probes) else None
    with torch.no_grad():
        continuations = _greedy(model, probes, tokenizer)
        for probe, greedy in zip(probes, continuations, strict=True):
            logits = _logits(model, probe)
            scores.add(logits, probe.logits, greedy, probe.greedy)
            if exact is not None:
                exact.add(logits, probe.exact, greedy, probe.continuation)
    return scores.figures(), exact


def _log_check(check: dict[str, Any], reporter: Reporter) -> None:
    tol = check["tolerance"]
    dtype = tol["dtype"]
    effect = f"the adapter itself moves the logits by {_fmt(check['adapter_effect']['mean_abs_logit_diff'])} on average"
    agreement = (
        f"argmax agreement {100 * check['token_agreement']:.1f}%, identical {check['greedy_tokens']}-token greedy "
        f"continuations {100 * check['greedy_agreement']:.0f}% over {check['probes']} probes"
    )
    if tol["rule"] == "noise_floor":
        merged, low = check["exact_reference"]["merged"], check["exact_reference"]["low_precision_reference"]
        figures = (
            f"against the adapter on its base in float32, the merged model is off by max |Δlogit| "
            f"{_fmt(merged['max_abs_logit_diff'])} (allowed {tol['max_abs']:.3g}) and mean "
            f"{_fmt(merged['mean_abs_logit_diff'])} (allowed {tol['mean_abs']:.3g}), the adapter on its base in "
            f"{dtype} by max {_fmt(low['max_abs_logit_diff'])} and mean {_fmt(low['mean_abs_logit_diff'])} (allowed: "
            f"{tol['max_margin']:g}x and {tol['mean_margin']:g}x these, plus {tol['floor_max_abs']:.3g} and "
            f"{tol['floor_mean_abs']:.3g}). Against the adapter on its base in {dtype}: max |Δlogit| "
            f"{_fmt(check['max_abs_logit_diff'])}, mean {_fmt(check['mean_abs_logit_diff'])}, {agreement} (for "
            f"information: rounding flips near-tied tokens); {effect}"
        )
        if check["verified"]:
            reporter.log(f"Check passed: merging added no error beyond {dtype}'s own rounding: {figures}")
        else:
            reporter.log(
                f"Check FAILED: the merged model is further from the exact result than {dtype} rounding explains: "
                f"{figures}. The merged model is kept but flagged unverified.",
                level="warning",
            )
    else:
        if "fallback_reason" in tol:
            reporter.log(
                f"The float32 reference was not run ({tol['fallback_reason']}), so {dtype}'s own rounding noise is "
                f"not measured: the merge is held to the fixed {dtype} tolerance instead ({tol['max_rel']:g} and "
                f"{tol['mean_rel']:g} of the logit scale), which deep, wide models can exceed",
                level="warning",
            )
        figures = (
            f"max |Δlogit| {_fmt(check['max_abs_logit_diff'])} (tolerance {tol['max_abs']:.3g}), mean "
            f"{_fmt(check['mean_abs_logit_diff'])} (tolerance {tol['mean_abs']:.3g}), {agreement}; {effect}"
        )
        if check["verified"]:
            reporter.log(f"Check passed: the merged model matches the adapter on its base in {dtype}: {figures}")
        else:
            reporter.log(
                f"Check FAILED: the merged model differs from the adapter on its base by more than the {dtype} "
                f"tolerance: {figures}. The merged model is kept but flagged unverified.",
                level="warning",
            )
    gap = check.get("quantized_gap")
    if gap and "error" in gap:
        reporter.log(f"The {gap['quantization']} base could not be loaded for comparison: {gap['error']}")
    elif gap:
        reporter.log(
            f"For information, the adapter on the {gap['quantization']} base it was trained on differs from the "
            f"merged model by max |Δlogit| {_fmt(gap['max_abs_logit_diff'])}, mean {_fmt(gap['mean_abs_logit_diff'])}; "
            f"argmax agreement {100 * gap['token_agreement']:.1f}%, identical greedy continuations "
            f"{100 * gap['greedy_agreement']:.0f}%"
        )


def _fmt(value: float | None) -> str:
    return "not finite (NaN or infinite logits)" if value is None else f"{value:.3g}"


# --- combining adapters ------------------------------------------------------------------------------------------


@dataclass
class _Input:
    ref: AdapterRef
    path: Path
    config: dict[str, Any]
    ranks: dict[str, int]  # module -> r, from the tensors' shapes

    @property
    def label(self) -> str:
        return self.ref.label or self.ref.key


def _combine(spec: CombineSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any]:
    started = time.monotonic()
    problems = spec.validate()
    if not all(math.isfinite(w) for w in spec.weights):
        problems["weights"] = "every weight must be a finite number"
    if problems:
        raise RunnerError("; ".join(f"{name}: {message}" for name, message in problems.items()))
    check_source(spec.base_model.source)
    inputs = [_read_input(ref, store) for ref in spec.adapters]
    check_combinable(spec.combination_type, inputs)
    _log_bases(spec, inputs, reporter)
    out_dir = _output_dir(spec.output_uri, store)
    part = out_dir.with_name(out_dir.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    reporter.log(
        f"Combining {', '.join(f'{i.label} (r={max(i.ranks.values())}) × {w:g}' for i, w in zip(inputs, spec.weights, strict=True))}"
        f" with {spec.combination_type}"
        + (" (the exact weighted sum of the deltas, via PEFT's cat)" if spec.combination_type == "linear" else "")
    )
    reporter.flush()
    stats = combine_adapters(
        spec.base_model,
        [i.path for i in inputs],
        spec.weights,
        spec.combination_type,
        part,
        density=spec.density,
        majority_sign_method=spec.majority_sign_method,
        svd_rank=spec.svd_rank,
    )
    tokenizer_source = next((i.path for i in inputs if (i.path / "tokenizer_config.json").exists()), None)
    if tokenizer_source is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(part)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(part, out_dir)
    error = stats["weighted_sum_rel_error"]
    if error is not None:
        what = (
            f"truncation error of the rank-{stats['r']} SVD" if spec.combination_type in SVD_COMBINATIONS else "error"
        )
        reporter.log(f"Against the exact weighted sum of the deltas: relative {what} {error:.3g}")
    reporter.log(f"Combined adapter saved: r={stats['r']}, {stats['trainable_params']:,} parameters")
    return {
        "adapter_uri": spec.output_uri,
        "size_bytes": size_of(out_dir),
        "sha256": sha256_of(out_dir),
        "trainable_params": stats["trainable_params"],
        "total_params": stats["total_params"],
        "r": stats["r"],
        "combination_type": spec.combination_type,
        "peft_combination_type": stats["peft_combination_type"],
        "weights": list(spec.weights),
        "density": spec.density,
        "weighted_sum_rel_error": error,
        "runtime_s": round(time.monotonic() - started, 2),
    }


def _read_input(ref: AdapterRef, store: ArtifactStore) -> _Input:
    from safetensors import safe_open

    path = _adapter_dir(ref, store)
    config = _read_adapter_config(ref, path)
    ranks: dict[str, int] = {}
    weights = path / "adapter_model.safetensors"
    if config.get("peft_type") == "LORA":
        if not weights.exists():
            raise RunnerError(f"adapter {_label(ref)}: no adapter_model.safetensors in {path}")
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                for suffix in (".lora_A.weight", ".lora_embedding_A"):
                    if key.endswith(suffix):
                        ranks[key.removeprefix(PEFT_PREFIX).removesuffix(suffix)] = handle.get_slice(key).get_shape()[0]
        if not ranks:
            raise RunnerError(f"adapter {_label(ref)}: adapter_model.safetensors holds no LoRA weights")
    return _Input(ref, path, config, ranks)


def check_combinable(combination_type: str, inputs: list[_Input]) -> None:
    """Refuse, naming the adapters and the reason, what add_weighted_adapter would reject or get wrong."""
    problems = []
    for item in inputs:
        config, name = item.config, repr(item.label)
        if config.get("peft_type") != "LORA":
            problems.append(f"{name} is a {config.get('peft_type')} adapter, and only LoRA adapters can be combined")
            continue
        if config.get("use_dora"):
            problems.append(f"{name} is a DoRA adapter: its magnitude vectors cannot be weighted (merge it instead)")
        if config.get("modules_to_save"):
            problems.append(
                f"{name} trains whole modules ({', '.join(config['modules_to_save'])}), which cannot be weighted"
            )
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            problems.append(f"{name} trains biases, which a combination would drop")
        variants = [v for v in _requested_variants(config) if v != "use_dora"]
        variants += [o for o in ("use_qalora", "target_parameters", "trainable_token_indices") if config.get(o)]
        if variants:
            problems.append(f"{name} uses {', '.join(variants)}, which add_weighted_adapter does not combine")
    if problems:
        raise RunnerError("; ".join(problems))
    if combination_type in FACTORWISE_COMBINATIONS:
        ranks = {item.label: sorted(set(item.ranks.values())) for item in inputs}
        if len({r for rs in ranks.values() for r in rs}) > 1:
            listed = ", ".join(f"{label!r} r={'/'.join(map(str, rs))}" for label, rs in ranks.items())
            raise RunnerError(
                f"{combination_type} adds the adapters' A and B factors entry-wise, so every layer of every adapter "
                f"needs one rank; got {listed} (linear, cat and the svd types combine mixed ranks)"
            )
    forms = {item.label: isinstance(item.config.get("target_modules"), str) for item in inputs}
    if len(set(forms.values())) > 1:
        by_pattern = ", ".join(repr(label) for label, is_str in forms.items() if is_str)
        by_list = ", ".join(repr(label) for label, is_str in forms.items() if not is_str)
        raise RunnerError(
            f"{by_pattern} name their target modules by a pattern and {by_list} by a list; PEFT cannot combine the "
            "two forms"
        )


def _log_bases(spec: CombineSpec, inputs: list[_Input], reporter: Reporter) -> None:
    bases = {i.label: i.config.get("base_model_name_or_path") or "" for i in inputs}
    if len(set(bases.values())) > 1 or any(b and b != spec.base_model.source for b in bases.values()):
        listed = ", ".join(f"{label!r}: {base or '?'}" for label, base in bases.items())
        reporter.log(
            f"The adapters name different bases ({listed}; this job's base is {spec.base_model.source}); they are "
            "combined on this job's base, and shapes that do not fit fail",
            level="warning",
        )


def combine_adapters(
    base: ModelRef,
    adapter_dirs: Sequence[Path],
    weights: Sequence[float],
    combination_type: str,
    out_dir: Path,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
) -> dict[str, Any]:
    """Combine LoRA adapters with PEFT's add_weighted_adapter and save only the new adapter in out_dir.

    With wᵢ the weights and ΔWᵢ = sᵢ·Bᵢ·Aᵢ each adapter's delta (sᵢ its scaling), per adapted layer:

    - linear: ΔW = Σ wᵢ·ΔWᵢ exactly. PEFT's own "linear" scales each Aᵢ and Bᵢ by √(wᵢsᵢ) and sums them
      separately, so its B·A carries cross terms Bᵢ·Aⱼ and is not the weighted sum; Tunedeck's linear runs PEFT's
      "cat" instead, which stacks the wᵢsᵢ·Aᵢ and the Bᵢ: exact, of rank Σ rᵢ, and mixed ranks are fine.
      (For the rank of one adapter, svd gives the best approximation of that same sum.)
    - cat: the same exact sum, under PEFT's name.
    - svd: the best rank-k approximation (truncated SVD) of Σ wᵢ·ΔWᵢ, k = svd_rank or the largest rᵢ.
    - ties, dare_linear, dare_ties, magnitude_prune: PEFT applies the method to the Aᵢ (weighted by
      sign(wᵢ)·√|wᵢsᵢ|) and to the Bᵢ (by √|wᵢsᵢ|) separately; the result is rank r and, like PEFT's linear, not
      the method applied to the deltas. Equal ranks needed. ties keeps the `density` fraction of largest entries
      of each, elects a sign per entry (by total mass or by count: majority_sign_method) and averages the entries
      that agree; dare drops entries at random with probability 1 - density and rescales the rest by 1/density
      (dare_ties then elects signs like ties); magnitude_prune keeps the largest `density` fraction and sums.
    - ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: the method applied to the deltas wᵢ·ΔWᵢ
      themselves, then the truncated SVD to rank k.

    The base's weights are never read: the adapters only need its architecture, so the model is built from its
    config with uninitialised storage (never touched, so it takes address space, not memory). dare's random drops
    use a fixed seed, so a combination is reproducible.
    """
    import torch
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    model = _empty_model(base)
    base_params = sum(p.numel() for p in model.parameters())
    names = [f"input{i}" for i in range(len(adapter_dirs))]
    peft_model: Any = None
    for name, path in zip(names, adapter_dirs, strict=True):
        config = LoraConfig.from_pretrained(str(path))
        config.init_lora_weights = True  # the saved weights replace the init; other inits would read the base
        config.inference_mode = True
        if peft_model is None:
            peft_model = PeftModel(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        loaded = set_peft_model_state_dict(peft_model, load_peft_weights(str(path), device="cpu"), adapter_name=name)
        unexpected: list[str] = list(getattr(loaded, "unexpected_keys", []))
        if unexpected:
            raise RunnerError(f"{path}: weights the base model has no place for: {', '.join(unexpected[:3])}")

    peft_type = "cat" if combination_type == "linear" else combination_type
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(COMBINE_SEED)
        peft_model.add_weighted_adapter(
            adapters=names,
            weights=list(weights),
            adapter_name="default",
            combination_type=peft_type,
            svd_rank=svd_rank,
            density=density,
            majority_sign_method=majority_sign_method,
        )
    config = peft_model.peft_config["default"]
    # The new A and B already hold the scaling (PEFT sets alpha = r); rsLoRA copied from the first input would
    # scale them again by sqrt(r) when the adapter is loaded.
    config.use_rslora = False
    config.base_model_name_or_path = base.source
    config.revision = base.revision or None
    for module_name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            lora_a: Any = module.lora_A["default"]
            r = int(lora_a.weight.shape[0])
            if r != config.r:  # a layer whose result came out of lower rank (an svd over a small layer)
                config.rank_pattern[module_name] = r
                config.alpha_pattern[module_name] = r
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), selected_adapters=["default"], save_embedding_layers=False)
    _check_coverage(adapter_dirs, out_dir)
    trainable = sum(t.numel() for t in load_peft_weights(str(out_dir), device="cpu").values())
    error = None
    if peft_type in ("cat", "svd"):
        error = _weighted_sum_error(adapter_dirs, weights, out_dir, peft_model.base_model.model)
        if peft_type == "cat" and error > 1e-5:
            raise RunnerError(f"the combined adapter is off the weighted sum of the deltas by {error:.3g} (relative)")
    return {
        "r": config.r,
        "trainable_params": trainable,
        "total_params": base_params + trainable,
        "peft_combination_type": peft_type,
        "weighted_sum_rel_error": error,
    }


def _empty_model(base: ModelRef) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        base.source, revision=base.revision or None, trust_remote_code=base.trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=base.trust_remote_code, dtype=torch.float32)
    return model.to_empty(device="cpu")


def _check_coverage(adapter_dirs: Sequence[Path], out_dir: Path) -> None:
    """Every module some input adapts must be adapted by the result (PEFT copies the first input's config)."""
    from safetensors import safe_open

    def modules(path: Path) -> set[str]:
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt", device="cpu") as handle:
            found = (re.fullmatch(r"(.*)\.lora_(?:A\.weight|embedding_A)", key) for key in handle.keys())
            return {match.group(1) for match in found if match}

    missing = set().union(*(modules(Path(p)) for p in adapter_dirs)) - modules(out_dir)
    if missing:
        raise RunnerError(f"the combined adapter lost {len(missing)} adapted module(s), e.g. {sorted(missing)[0]}")


def _weighted_sum_error(adapter_dirs: Sequence[Path], weights: Sequence[float], out_dir: Path, model: Any) -> float:
    """max |ΔW_combined - Σ wᵢ ΔWᵢ| / max |Σ wᵢ ΔWᵢ| over all adapted layers."""
    inputs = [LoraFile.read(Path(p)) for p in adapter_dirs]
    combined = LoraFile.read(out_dir)
    worst, largest = 0.0, 0.0
    for module, lm in combined.modules.items():
        transpose = _stores_transposed(model, module)
        expected = sum(
            w * f.modules[module].delta(transpose) for w, f in zip(weights, inputs, strict=True) if module in f.modules
        )
        worst = max(worst, float((lm.delta(transpose) - expected).abs().max()))
        largest = max(largest, float(expected.abs().max()))
    return worst / largest if largest else worst
