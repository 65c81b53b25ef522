"""The base checkpoint a merge reads (where it is, its dtype, quantized or not) and the folder it writes."""

from __future__ import annotations

import json
from pathlib import Path

from workers.adapters.merge.tolerance import TOLERANCES
from workers.contract.jobrunner import RunnerError
from workers.contract.reporter import Reporter
from workers.contract.spec import ModelRef
from workers.contract.store import ArtifactStore
from workers.training.modelinfo import ModelNotFound

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class StreamingUnsupported(Exception):
    """The streamed merge cannot reproduce this adapter exactly; the message says why."""


EXPECTED_ERRORS = (RunnerError, ModelNotFound)  # their message alone says what went wrong


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


def output_dir(uri: str, store: ArtifactStore) -> Path:
    try:
        return store.path(uri)
    except ValueError as exc:
        raise RunnerError(f"output_uri: {exc}") from None


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


def refuse_quantized_checkpoint(base_dir: Path) -> None:
    quantization = json.loads((base_dir / "config.json").read_text()).get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "quantized")
        raise RunnerError(
            f"the base checkpoint in {base_dir} is itself quantized ({method}): a merge needs the full-precision "
            "weights; point the merge at the unquantized model the adapter was trained on"
        )


def checkpoint_index(base_dir: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
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
