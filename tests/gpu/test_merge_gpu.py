"""On a CUDA GPU: a QLoRA adapter of a small bfloat16 Llama, merged in bfloat16 and in float32, and checked; and a
random adapter of a deep bfloat16 Llama, whose bfloat16 merge is held to bfloat16's own rounding noise.

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

    from workers.contract.reporter import MemoryReporter
    from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainSpec, suggest_train_params
    from workers.contract.store import ArtifactStore
    from workers.training.demo import build_tiny_llama, write_toy_dataset
    from workers.training.train import run_training

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

    from workers.adapters.merge.job import run_merge
    from workers.adapters.merge.tolerance import TOLERANCES
    from workers.contract.jobspecs import AdapterRef, MergeSpec
    from workers.contract.reporter import MemoryReporter
    from workers.contract.spec import ModelRef

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
            | {k: check[k] for k in ("greedy_agreement", "exact_reference", "tolerance", "quantized_gap")},
            indent=1,
        )
    )
    assert result["dtype"] == expected and result["method"] == "streamed" and result["shards"] > 1
    assert result["verified"] is True, check
    tolerance = check["tolerance"]
    if expected == "float32":
        assert tolerance["rule"] == "fixed" and check["exact_reference"] is None
        assert check["max_abs_logit_diff"] <= TOLERANCES[expected].max_rel * check["logit_scale"]
    else:
        assert_within_noise_floor(check)
    gap = check["quantized_gap"]
    assert "error" not in gap and gap["quantization"] == "4bit nf4"
    assert gap["mean_abs_logit_diff"] > check["mean_abs_logit_diff"]
    merged = AutoModelForCausalLM.from_pretrained(store.path(result["merged_uri"]), dtype="auto")
    assert str(merged.dtype) == f"torch.{expected}"


def assert_within_noise_floor(check: dict[str, Any]) -> None:
    """The bfloat16 rule: against float32, the merged model within the margins of the bfloat16 reference's error."""
    tolerance, exact = check["tolerance"], check["exact_reference"]
    assert tolerance["rule"] == "noise_floor" and exact["error"] is None, tolerance
    merged, low = exact["merged"], exact["low_precision_reference"]
    assert (
        merged["max_abs_logit_diff"]
        <= tolerance["max_abs"]
        == pytest.approx(tolerance["max_margin"] * low["max_abs_logit_diff"] + tolerance["floor_max_abs"])
    )
    assert (
        merged["mean_abs_logit_diff"]
        <= tolerance["mean_abs"]
        == pytest.approx(tolerance["mean_margin"] * low["mean_abs_logit_diff"] + tolerance["floor_mean_abs"])
    )


def test_a_deep_bfloat16_merge_is_held_to_bfloat16_rounding_and_a_dropped_layer_is_not(tmp_path: Path) -> None:
    """32 layers of 1024 in bfloat16, r16 LoRA on all 7 projections with B ~ N(0, 0.02): the depth at which a fixed
    fraction of the logit scale flagged correct merges of the Llama-3.1-8B shape."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from workers.adapters.merge.stream import stream_merge, write_companions
    from workers.adapters.merge.tolerance import TOLERANCES
    from workers.adapters.merge.verify import verify_merge
    from workers.training.demo import build_tiny_llama

    layers, targets = 32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = build_tiny_llama(tmp_path / "deep", hidden_size=1024, layers=layers, init_std=0.02)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    (base / "model.safetensors").unlink()
    model.save_pretrained(base)
    torch.manual_seed(1)
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    adapter = tmp_path / "adapter"
    lora.save_pretrained(str(adapter))
    del model, lora
    out = tmp_path / "merged"
    stream_merge(base, adapter, out, "bfloat16", "256MB")
    write_companions(base, adapter, out)

    check = verify_merge(base, adapter, out, "bfloat16")
    keys = ("verified", "max_abs_logit_diff", "mean_abs_logit_diff", "logit_scale", "token_agreement")
    print(json.dumps({k: check[k] for k in (*keys, "greedy_agreement", "exact_reference", "tolerance")}, indent=1))
    scale, fixed = check["logit_scale"], TOLERANCES["bfloat16"]
    within_fixed = (
        check["max_abs_logit_diff"] <= fixed.max_rel * scale and check["mean_abs_logit_diff"] <= fixed.mean_rel * scale
    )
    print(f"the fixed bound would have {'passed' if within_fixed else 'flagged'} this correct merge")
    assert check["verified"] is True
    assert_within_noise_floor(check)

    # A middle decoder layer's deltas dropped (its 7 projections are the base's again): flagged.
    base_state: dict[str, Any] = {}
    for file in base.glob("*.safetensors"):
        base_state.update(load_file(file))
    prefix = f"model.layers.{layers // 2}."
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        dropped = [name for name in tensors if name.startswith(prefix) and name.endswith("proj.weight")]
        if dropped:
            tensors.update({name: base_state[name] for name in dropped})
            save_file(tensors, shard, metadata={"format": "pt"})
    corrupted = verify_merge(base, adapter, out, "bfloat16")
    print(json.dumps({"dropped": corrupted["exact_reference"], "tolerance": corrupted["tolerance"]}, indent=1))
    assert corrupted["verified"] is False and corrupted["tolerance"]["rule"] == "noise_floor"
