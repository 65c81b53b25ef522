"""The train runner on a tiny random Llama, with the in-memory reporter: no Django, no network."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.demo import toy_rows, write_toy_dataset
from workers.evaluate import completion_loss
from workers.reporter import MemoryReporter
from workers.spec import DatasetRef, LoraParams, ModelRef, TrainSpec, suggest_train_params
from workers.store import ArtifactStore


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    store = ArtifactStore(tmp_path / "store")
    write_toy_dataset(store.path("store://datasets/toy.jsonl"))
    return store


def make_spec(model_dir: Path, **lora: object) -> TrainSpec:
    return TrainSpec(
        run_id=1,
        attempt=1,
        base_model=ModelRef(source=str(model_dir)),
        dataset=DatasetRef(uri="store://datasets/toy.jsonl", format="alpaca"),
        lora=LoraParams(dropout=0.0, **lora),  # type: ignore[arg-type]
        train=suggest_train_params(100_000),
        output_uri="store://runs/1/attempt-1/adapter",
    )


def load_adapter(model_dir: Path, adapter_dir: Path):  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return PeftModel.from_pretrained(base, adapter_dir), AutoTokenizer.from_pretrained(model_dir)


def test_lora_run_learns_the_toy_task_and_reports_progress(tiny_model_dir: Path, store: ArtifactStore) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.train import run_training

    reporter = MemoryReporter()
    result = run_training(make_spec(tiny_model_dir), reporter, store)

    assert result is not None and reporter.states[-1][0] == "succeeded"
    assert [s for s, _, _ in reporter.states] == ["running", "succeeded"]
    seqs = [e["seq"] for e in reporter.events]
    assert seqs == list(range(1, len(seqs) + 1))
    losses = [m["loss"] for m in reporter.metrics if "loss" in m]
    assert losses[-1] < losses[0] - 1.0
    adapter_dir = store.path(result["adapter_uri"])
    assert (adapter_dir / "adapter_model.safetensors").exists()
    assert 0 < result["trainable_params"] < result["total_params"]

    held_out = toy_rows(64, seed=999)  # different seed: prompts the run never saw
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base_loss = completion_loss(base, tokenizer, held_out)
    tuned, _ = load_adapter(tiny_model_dir, adapter_dir)
    tuned_loss = completion_loss(tuned, tokenizer, held_out)
    assert tuned_loss < base_loss * 0.6, (base_loss, tuned_loss)


def test_qlora_4bit_nf4_run_succeeds_on_cpu_and_its_adapter_loads(tiny_model_dir: Path, store: ArtifactStore) -> None:
    from workers.train import run_training

    reporter = MemoryReporter()
    result = run_training(make_spec(tiny_model_dir, quantization="4bit", quant_type="nf4", double_quant=True), reporter, store)
    assert result is not None, reporter.states[-1]
    assert any("4-bit NF4" in line for line in reporter.logs)
    model, _ = load_adapter(tiny_model_dir, store.path(result["adapter_uri"]))
    lora_weights = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert lora_weights


def test_a_missing_base_model_path_fails_with_a_readable_reason(tmp_path: Path, store: ArtifactStore) -> None:
    from workers.train import run_training

    reporter = MemoryReporter()
    assert run_training(make_spec(tmp_path / "no-such-model"), reporter, store) is None
    state, _, error = reporter.states[-1]
    assert state == "failed"
    assert "no-such-model" in error and "does not exist" in error
    assert "Traceback" not in error


def test_an_unknown_target_module_fails_with_the_valid_names(tiny_model_dir: Path, store: ArtifactStore) -> None:
    from workers.train import run_training

    reporter = MemoryReporter()
    run_training(make_spec(tiny_model_dir, target_modules=["q_proj", "attn_c"]), reporter, store)
    state, _, error = reporter.states[-1]
    assert state == "failed" and "attn_c" in error and "q_proj, up_proj, v_proj" in error


def test_cancel_stops_training_within_a_few_steps(tiny_model_dir: Path, store: ArtifactStore) -> None:
    from workers.train import run_training

    spec = make_spec(tiny_model_dir)
    spec.train.max_steps, spec.train.logging_steps = 2000, 1
    reporter = MemoryReporter(cancel_after_events=12)
    reporter.flush_interval = 0.0  # ask the "server" at every step
    assert run_training(spec, reporter, store) is None
    assert reporter.states[-1][0] == "cancelled"
    steps = [m["step"] for m in reporter.metrics if "loss" in m]
    assert max(steps) < 20
