"""Throughput mode may run an optimizer step's rows in fewer, larger passes (engine._choose_split): that is only
allowed because the split does not change training. Trained on the tiny model, the same rows per optimizer step as
4 x 1, 2 x 2 and 1 x 4 see the same examples at each step, follow the same learning-rate schedule and end on the
same adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workers.contract.reporter import MemoryReporter
from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainParams, TrainSpec
from workers.contract.store import ArtifactStore
from workers.training.demo import write_toy_dataset
from workers.training.train import run_training


def train(model: Path, store: ArtifactStore, run_id: int, batch: int, accum: int
          ) -> tuple[dict[str, torch.Tensor], list[dict]]:  # type: ignore[type-arg]
    spec = TrainSpec(
        run_id=run_id, attempt=1, base_model=ModelRef(source=str(model)),
        dataset=DatasetRef(uri="store://datasets/add.jsonl", format="alpaca"),
        lora=LoraParams(dropout=0.0, r=8, alpha=16),
        train=TrainParams(batch_size=batch, grad_accum=accum, max_steps=6, learning_rate=3e-3, lr_scheduler="linear",
                          warmup_ratio=0.0, logging_steps=1, save_steps=0, max_seq_length=64, seed=7,
                          gradient_checkpointing="off"),
        output_uri=f"store://runs/{run_id}/attempt-1/adapter",
    )
    reporter = MemoryReporter()
    result = run_training(spec, reporter, store)
    assert result is not None, reporter.logs[-5:]
    assert f"micro-batch {batch} x {accum}" in next(line for line in reporter.logs if line.startswith("Plan:"))
    weights = load_file(store.path(result["adapter_uri"]) / "adapter_model.safetensors")
    return weights, [m for m in reporter.metrics if "loss" in m]


@pytest.mark.timeout(600)
def test_the_same_rows_per_step_in_any_split_train_the_same_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    write_toy_dataset(store.path("store://datasets/add.jsonl"), task="add", seed=3)
    runs = {split: train(tiny_model_dir, store, i, *split) for i, split in enumerate(((4, 1), (2, 2), (1, 4)), 1)}
    reference, ref_points = runs[(4, 1)]
    assert [p["step"] for p in ref_points] == [1, 2, 3, 4, 5, 6]
    for split, (weights, points) in runs.items():
        # The same schedule, step by step, and the same losses (the same examples in each step).
        assert [p["learning_rate"] for p in points] == pytest.approx([p["learning_rate"] for p in ref_points], rel=1e-9)
        assert [p["loss"] for p in points] == pytest.approx([p["loss"] for p in ref_points], rel=1e-4), split
        assert weights.keys() == reference.keys()
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5, msg=f"{split}: {name}")
    # Training moved the adapter (a test of equality between untrained adapters would prove nothing).
    lora_b = [v for k, v in reference.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)


def test_the_steps_a_plan_expects_before_tokenizing() -> None:
    from workers.training.train import expected_steps

    rows = [{"prompt": "x" * 300, "completion": "y" * 100}] * 1000  # about 100 tokens each
    assert expected_steps(TrainParams(max_steps=50), rows, cuda=True) == 50
    # Packed on a GPU: ~100,000 tokens in rows of 512 = 196 rows, 4 a step, 2 epochs.
    assert expected_steps(TrainParams(batch_size=4, num_epochs=2, max_seq_length=512), rows, cuda=True) == 98
    # Padded (the CPU): one example a row.
    assert expected_steps(TrainParams(batch_size=4, grad_accum=2, num_epochs=1), rows, cuda=False) == 125
