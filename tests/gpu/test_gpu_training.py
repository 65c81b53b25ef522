"""On a CUDA GPU: the runner's fast path (packing, varlen attention, Liger) trains and learns.

Skipped without a GPU (CI has none); run on a GPU machine with `python -m pytest tests/gpu`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("mode", ["throughput", "memory"])
def test_qlora_on_the_gpu_fast_path_learns(tiny_model_dir: Path, tmp_path: Path, mode: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.adapters.evaluate import completion_loss
    from workers.contract.reporter import MemoryReporter
    from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainSpec, suggest_train_params
    from workers.contract.store import ArtifactStore
    from workers.training.demo import toy_rows, write_toy_dataset
    from workers.training.train import run_training

    store = ArtifactStore(tmp_path / "store")
    write_toy_dataset(store.path("store://datasets/toy.jsonl"))
    train = suggest_train_params(100_000)
    train.mode = mode
    spec = TrainSpec(
        run_id=1, attempt=1, base_model=ModelRef(source=str(tiny_model_dir)),
        dataset=DatasetRef(uri="store://datasets/toy.jsonl", format="alpaca"),
        lora=LoraParams(dropout=0.0, quantization="4bit"), train=train,
        output_uri="store://runs/1/attempt-1/adapter", checkpoint_uri="store://runs/1/checkpoints",
    )
    reporter = MemoryReporter()
    result = run_training(spec, reporter, store)
    assert result is not None, reporter.states[-1]
    plan = result["plan"]
    assert plan["batching"] == "pack" and plan["attention"] == "varlen"
    assert result["peak_memory_reserved"] > 0
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    held_out = toy_rows(64, seed=999)
    base_loss = completion_loss(base, tokenizer, held_out)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), store.path(result["adapter_uri"]))
    assert completion_loss(tuned, tokenizer, held_out) < base_loss * 0.7
