"""On a CUDA GPU: a QLoRA adapter of a small bfloat16 Llama, merged in bfloat16 and in float32, and checked.

Skipped without a GPU; run with `python -m pytest -s tests/gpu/test_merge_gpu.py` to see the figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def qlora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A 4-layer Llama (hidden 512) saved in bfloat16, and a QLoRA adapter trained on it for 40 steps."""
    from transformers import AutoModelForCausalLM

    from workers.demo import build_tiny_llama, write_toy_dataset
    from workers.reporter import MemoryReporter
    from workers.spec import DatasetRef, LoraParams, ModelRef, TrainSpec, suggest_train_params
    from workers.store import ArtifactStore
    from workers.train import run_training

    root = tmp_path_factory.mktemp("merge-gpu")
    base = build_tiny_llama(root / "llama", hidden_size=512, layers=4, init_std=0.02)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    (base / "model.safetensors").unlink()
    model.save_pretrained(base)
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"

    store = ArtifactStore(root / "store")
    write_toy_dataset(store.path("store://datasets/add.jsonl"))
    train = suggest_train_params(100_000)
    train.max_steps = 40
    spec = TrainSpec(
        run_id=1,
        attempt=1,
        base_model=ModelRef(source=str(base)),
        dataset=DatasetRef(uri="store://datasets/add.jsonl", format="alpaca"),
        lora=LoraParams(dropout=0.0, r=16, alpha=32, quantization="4bit", quant_type="nf4"),
        train=train,
        output_uri="store://adapters/qlora",
    )
    reporter = MemoryReporter()
    result = run_training(spec, reporter, store)
    assert result is not None, reporter.states[-1]
    assert result["dtype"] == "bfloat16"
    return base, store


@pytest.mark.parametrize(("requested", "expected"), [("auto", "bfloat16"), ("float32", "float32")])
def test_a_qlora_adapter_merges_on_the_gpu_and_is_verified(
    qlora: tuple[Path, Any], requested: str, expected: str
) -> None:
    from transformers import AutoModelForCausalLM

    from workers.jobspecs import AdapterRef, MergeSpec
    from workers.merge import TOLERANCES, run_merge
    from workers.reporter import MemoryReporter
    from workers.spec import ModelRef

    base, store = qlora
    adapter = AdapterRef(key="qlora", label="qlora", uri="store://adapters/qlora", r=16)
    adapter.quantization = "4bit"  # type: ignore[attr-defined]
    spec = MergeSpec(
        job_id=1,
        attempt=1,
        base_model=ModelRef(source=str(base)),
        adapter=adapter,
        output_uri=f"store://merged/{requested}",
        dtype=requested,
        max_shard_size="8MB",
    )
    reporter = MemoryReporter()
    result = run_merge(spec, reporter, store)
    assert result is not None, reporter.states[-1]
    check = result["check"]
    print(
        json.dumps(
            {k: result[k] for k in ("dtype", "method", "shards", "verified", "peak_rss_bytes", "runtime_s")}
            | {k: check[k] for k in ("max_abs_logit_diff", "mean_abs_logit_diff", "logit_scale", "token_agreement")}
            | {"greedy_agreement": check["greedy_agreement"], "quantized_gap": check["quantized_gap"]},
            indent=1,
        )
    )
    assert result["dtype"] == expected and result["method"] == "streamed" and result["shards"] > 1
    assert result["verified"] is True, check
    assert check["max_abs_logit_diff"] <= TOLERANCES[expected].max_rel * check["logit_scale"]
    gap = check["quantized_gap"]
    assert "error" not in gap and gap["quantization"] == "4bit nf4"
    assert gap["mean_abs_logit_diff"] > check["mean_abs_logit_diff"]
    merged = AutoModelForCausalLM.from_pretrained(store.path(result["merged_uri"]), dtype="auto")
    assert str(merged.dtype) == f"torch.{expected}"
