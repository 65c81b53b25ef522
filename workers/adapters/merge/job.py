"""The merge job: merge a LoRA adapter into its base model, save the full model and check it.

`run_merge(spec, reporter, store)` has the train runner's contract (workers/training/train.py): it reports through the
reporter, writes into the artifact store, and returns the result, or None when the job failed or was cancelled.

Merging streams the base checkpoint (workers.adapters.merge.stream): each safetensors tensor is read on its own, the
adapter's change is added in float32 and the sum is cast once to the merge dtype, and output shards are written as they
fill, so host memory stays near one output shard plus the adapter whatever the model's size. An adapter the stream
cannot reproduce exactly (an unusual layer, a LoRA variant) is merged by PEFT's merge_and_unload on the whole model
instead (`peft_merge`), and the log says so. Every merge is then checked against the adapter applied to the
unquantized base (workers.adapters.merge.verify).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from workers.adapters.merge.checkpoint import (
    EXPECTED_ERRORS,
    StreamingUnsupported,
    base_weights_dir,
    merge_dtype,
    output_dir,
    parse_size,
    refuse_quantized_checkpoint,
)
from workers.adapters.merge.lora import (
    adapter_attr,
    adapter_folder,
    adapter_label,
    describe_lora,
    read_adapter_config,
    trained_quantization,
)
from workers.adapters.merge.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from workers.adapters.merge.stream import peft_merge, stream_merge, write_companions
from workers.adapters.merge.verify import log_check, verify_merge
from workers.contract.jobrunner import Cancelled, RunnerError, run_reported
from workers.contract.jobspecs import MergeSpec
from workers.contract.reporter import Reporter
from workers.contract.spec import ModelRef
from workers.contract.store import ArtifactStore, sha256_of, size_of
from workers.training.modelinfo import check_source


def run_merge(spec: MergeSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any] | None:
    """Merge spec.adapter into spec.base_model, save the full model at spec.output_uri and check it."""
    return run_reported(reporter, lambda: merge_and_check(spec, reporter, store), expected=EXPECTED_ERRORS)


def check_cancel(reporter: Reporter) -> None:
    reporter.maybe_flush()
    if reporter.cancel_requested:
        raise Cancelled()


def merge_and_check(spec: MergeSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any]:
    """The merge job's body, for jobs that merge on the way (an export): raises where run_merge reports."""
    started = time.monotonic()
    max_shard_bytes = _validate_merge(spec)
    adapter_dir = adapter_folder(spec.adapter, store)
    adapter_config = read_adapter_config(spec.adapter, adapter_dir)
    if adapter_config.get("peft_type") != "LORA":
        raise RunnerError(
            f"adapter {adapter_label(spec.adapter)} is a {adapter_config.get('peft_type')} adapter (adapter_config.json); "
            "only LoRA adapters are merged into the base weights"
        )
    out_dir = output_dir(spec.output_uri, store)
    base_dir = base_weights_dir(spec.base_model, reporter)
    dtype = merge_dtype(spec.dtype, base_dir)
    refuse_quantized_checkpoint(base_dir)
    quantization = trained_quantization(spec.adapter)
    reporter.log(f"Merging {adapter_label(spec.adapter)} ({describe_lora(adapter_config)}) into {spec.base_model.source}")
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
        quant_type=adapter_attr(spec.adapter, "quant_type", "nf4"),
        double_quant=bool(adapter_attr(spec.adapter, "double_quant", True)),
    )
    log_check(check, reporter)
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
    scope = "merge" if reset_peak_rss() else "process"
    rss_start = rss_bytes()

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
        # The kernel's high-water mark and per-thread RSS counters are updated lazily (they can read a few pages
        # below an RSS sampled earlier): the peak is at least every RSS seen during the merge.
        peak_rss = max(peak_rss_bytes(), rss_start, rss_bytes())
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
