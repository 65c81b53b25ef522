"""Warm start through the train runner on a tiny random Llama: a run's adapter starts from an existing adapter's
weights, and DPO measures against that parent adapter, frozen, rather than against the bare base.

The parent is the "add" LoRA of the session's `task_adapters` (supervised on the toy addition task), so its
log-probabilities differ clearly from the random base's.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from tests.workers.test_dpo import write_rows
from workers.contract.reporter import MemoryReporter
from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainSpec, suggest_train_params
from workers.contract.store import ArtifactStore
from workers.training.demo import preference_rows

PARENT_LORA = {"r": 8, "alpha": 16}  # the shape of task_adapters' adapters


def warm_spec(model_dir: Path, parent_uri: str, name: str, objective: str = "sft", **lora: Any) -> TrainSpec:
    train = suggest_train_params(100_000)
    train.objective, train.logging_steps, train.eval_fraction = objective, 1, 0.0
    dataset = (DatasetRef(uri="store://datasets/pairs.jsonl", format="preference") if objective == "dpo"
               else DatasetRef(uri="store://datasets/add.jsonl", format="alpaca"))
    return TrainSpec(
        run_id=1, attempt=1, base_model=ModelRef(source=str(model_dir)), dataset=dataset,
        lora=LoraParams(**{"dropout": 0.0, **PARENT_LORA, **lora}), train=train,
        output_uri=f"store://runs/{name}/attempt-1/adapter", init_adapter_uri=parent_uri, init_adapter_name="add",
    )


def adapter_weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def first_loss(reporter: MemoryReporter) -> float:
    return next(m["loss"] for m in reporter.metrics if "loss" in m)


def test_a_warm_started_run_begins_at_its_parents_weights_not_at_a_fresh_init(
        tiny_model_dir: Path, task_adapters: tuple[ArtifactStore, dict[str, str]]) -> None:
    from workers.training.train import run_training

    store, uris = task_adapters
    parent = adapter_weights(store.path(uris["add"]))

    # One step at a learning rate too small to move a weight: what is saved is where the adapter started.
    still = warm_spec(tiny_model_dir, uris["add"], "still")
    still.train.max_steps, still.train.learning_rate = 1, 1e-12
    reporter = MemoryReporter()
    result = run_training(still, reporter, store)
    assert result is not None, reporter.states[-1]
    started = adapter_weights(store.path(result["adapter_uri"]))
    assert set(started) == set(parent) and any("lora_B" in k for k in parent)
    for name in parent:
        assert float((started[name] - parent[name]).abs().max()) <= 1e-6, name
    assert any("Warm start: the adapter starts from the weights of add" in line for line in reporter.logs)
    assert not (store.path(result["adapter_uri"]) / "ref").exists()  # the reference copy is not part of the adapter

    fresh = warm_spec(tiny_model_dir, "", "fresh")
    fresh.init_adapter_name, fresh.train.max_steps, fresh.train.learning_rate = "", 1, 1e-12
    fresh_reporter = MemoryReporter()
    fresh_result = run_training(fresh, fresh_reporter, store)
    assert fresh_result is not None, fresh_reporter.states[-1]
    new = adapter_weights(store.path(fresh_result["adapter_uri"]))
    assert all(float(new[k].abs().max()) == 0.0 for k in new if "lora_B" in k)  # a new LoRA starts at B = 0
    assert max(float((new[k] - parent[k]).abs().max()) for k in parent if "lora_B" in k) > 1e-3

    # On the parent's own task the warm start's first loss is the trained adapter's, far below the base's.
    print(f"first loss on the parent's task: warm start {first_loss(reporter):.3f}, "
          f"new adapter {first_loss(fresh_reporter):.3f}")
    assert first_loss(reporter) < first_loss(fresh_reporter) * 0.6


def sequence_logps(model: Any, batch: dict[str, Any]) -> Any:
    """Each row's summed log-probability of its completion tokens (trl's completion_mask), computed here."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    per_token = logits.float().log_softmax(-1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    return (per_token * batch["completion_mask"][:, 1:]).sum(dim=1)


def test_dpo_takes_its_reference_from_the_parent_adapter_not_from_the_bare_base(
        tiny_model_dir: Path, task_adapters: tuple[ArtifactStore, dict[str, str]], tmp_path: Path) -> None:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.data.datasets import to_trl_row
    from workers.training.engine import resolve_plan
    from workers.training.objectives import objective_for
    from workers.training.peftsetup import load_parent_adapter
    from workers.training.train import make_trainer

    store, uris = task_adapters
    parent_dir = store.path(uris["add"])
    spec = warm_spec(tiny_model_dir, uris["add"], "reference", objective="dpo", dropout=0.3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plan = resolve_plan(spec.train, spec.lora, device="cpu", dtype="float32", num_layers=2)
    args = objective_for("dpo").config(spec, plan, tmp_path / "trainer", has_eval=False)
    args.disable_dropout = False  # keep the adapters' dropout, as trl's GRPO does by default
    rows = Dataset.from_list([to_trl_row("preference", r) for r in preference_rows(8, seed=11)])
    model = load_parent_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), spec.lora, parent_dir, "add")

    trainer = make_trainer(spec, plan, model, tokenizer, rows, None, [], args)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()  # as trl computes the reference during training: the adapter's dropout is on
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    parent = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), parent_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    chosen_rows = len(ref_chosen)
    by_parent, by_base = sequence_logps(parent, batch), sequence_logps(base, batch)
    print(f"reference log-probs of the chosen answers {ref_chosen.tolist()}; the parent's "
          f"{by_parent[:chosen_rows].tolist()}; the base's {by_base[:chosen_rows].tolist()}")
    assert trainer.ref_model is None and "ref" in trainer.model.peft_config  # no second base: a frozen adapter
    assert trainer.model.peft_config["default"].lora_dropout == 0.3  # the trained adapter keeps the run's dropout
    assert torch.allclose(ref_chosen, by_parent[:chosen_rows], atol=1e-3)
    assert torch.allclose(ref_rejected, by_parent[chosen_rows:], atol=1e-3)
    assert float((by_parent - by_base).abs().max()) > 0.5  # the parent is not the base: the test can tell them apart
    assert not torch.allclose(ref_chosen, by_base[:chosen_rows], atol=0.1)


def test_a_warm_started_dpo_run_starts_level_with_its_reference_and_learns_from_there(
        tiny_model_dir: Path, task_adapters: tuple[ArtifactStore, dict[str, str]]) -> None:
    from workers.training.train import run_training

    store, uris = task_adapters
    write_rows(store.path("store://datasets/pairs.jsonl"), preference_rows(64, seed=12))
    spec = warm_spec(tiny_model_dir, uris["add"], "dpo-level", objective="dpo")
    spec.train.max_steps = 8

    reporter = MemoryReporter()
    result = run_training(spec, reporter, store)

    assert result is not None, reporter.states[-1]
    # At step 1 the policy is the parent and so is the reference: every reward is 0, the sigmoid loss log 2.
    # (Measured against the bare base instead, the parent's log-probs would give rewards far from 0.)
    assert first_loss(reporter) == pytest.approx(math.log(2), abs=1e-4)
    margins = [float(m) for m in re.findall(r"reward margin (-?\d+\.\d+)", "\n".join(reporter.logs))]
    print(f"reward margin by step: {margins}")
    assert margins[0] == pytest.approx(0.0, abs=1e-3) and margins[-1] > margins[0]
    assert set(adapter_weights(store.path(result["adapter_uri"]))) == set(adapter_weights(store.path(uris["add"])))


def test_a_warm_started_dpo_run_lost_mid_way_resumes_from_its_own_checkpoint(
        tiny_model_dir: Path, task_adapters: tuple[ArtifactStore, dict[str, str]]) -> None:
    from tests.workers.test_train_runner import DyingReporter
    from workers.training.train import run_training

    store, uris = task_adapters
    write_rows(store.path("store://datasets/pairs.jsonl"), preference_rows(64, seed=13))

    def spec(attempt: int, name: str) -> TrainSpec:
        s = warm_spec(tiny_model_dir, uris["add"], name, objective="dpo")
        s.attempt, s.checkpoint_uri = attempt, f"store://runs/{name}/checkpoints"
        s.output_uri = f"store://runs/{name}/attempt-{attempt}/adapter"
        s.train.max_steps, s.train.save_steps = 6, 3
        return s

    whole = MemoryReporter()
    assert run_training(spec(1, "whole"), whole, store) is not None, whole.states[-1]
    assert run_training(spec(1, "cut"), DyingReporter(die_at_step=5), store) is None
    resumed = MemoryReporter()
    result = run_training(spec(2, "cut"), resumed, store)

    assert result is not None, resumed.states[-1]
    assert result["resumed_from_step"] == 3 and result["steps"] == 6
    expected = {m["step"]: m["loss"] for m in whole.metrics if "loss" in m}
    got = {m["step"]: m["loss"] for m in resumed.metrics if "loss" in m}
    # Steps 4-6 go on from the checkpoint's adapter against the parent as reference: the same losses as the run
    # that was never lost (from the parent's weights, step 4 would be back at log 2).
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step
    assert abs(got[4] - math.log(2)) > 1e-3


def test_a_qlora_run_continues_an_adapter_trained_on_the_full_precision_base(
        tiny_model_dir: Path, task_adapters: tuple[ArtifactStore, dict[str, str]]) -> None:
    from workers.training.train import run_training

    store, uris = task_adapters
    write_rows(store.path("store://datasets/pairs.jsonl"), preference_rows(16, seed=14))
    spec = warm_spec(tiny_model_dir, uris["add"], "qlora", objective="dpo", quantization="4bit")
    spec.train.max_steps = 2

    reporter = MemoryReporter()
    result = run_training(spec, reporter, store)

    assert result is not None, reporter.states[-1]
    assert any("4-bit NF4" in line for line in reporter.logs) and any("Warm start" in line for line in reporter.logs)
    assert set(adapter_weights(store.path(result["adapter_uri"]))) == set(adapter_weights(store.path(uris["add"])))


def test_a_parent_of_another_shape_or_gone_fails_the_run_naming_init_adapter(
        tiny_model_dir: Path, task_adapters: tuple[ArtifactStore, dict[str, str]]) -> None:
    from workers.training.train import run_training

    store, uris = task_adapters

    reporter = MemoryReporter()
    assert run_training(warm_spec(tiny_model_dir, uris["add"], "wider", r=16), reporter, store) is None
    assert reporter.states[-1][0] == "failed"
    assert "init_adapter: add has r 8 (the run's LoRA config: 16)" in reporter.states[-1][2]

    gone = warm_spec(tiny_model_dir, "", "orphan")
    reporter = MemoryReporter()
    assert run_training(gone, reporter, store) is None
    assert "init_adapter: the parent adapter add was deleted" in reporter.states[-1][2]

    sharded = warm_spec(tiny_model_dir, uris["add"], "sharded")
    sharded.train.num_gpus, sharded.train.strategy = 2, "fsdp"
    reporter = MemoryReporter()
    assert run_training(sharded, reporter, store) is None
    assert "strategy: a warm start (init_adapter) trains with ddp" in reporter.states[-1][2]


def test_the_shape_a_warm_start_must_match_is_the_one_the_parent_saved() -> None:
    from workers.training.peftsetup import shape_differences

    parent = LoraParams(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    assert shape_differences(LoraParams(r=8, alpha=16, target_modules=["v_proj", "q_proj"], dropout=0.2,
                                        quantization="4bit", init="loftq"), parent) == []
    assert shape_differences(LoraParams(r=16, alpha=16, target_modules=["q_proj"]), parent) == [
        "r: the parent's is 8, not 16", "target_modules: the parent's is q_proj, v_proj, not q_proj"]
    # PiSSA saves a plain LoRA of rank 2r, alpha doubled (peftsetup.save_adapter): that is what a child continues.
    pissa = LoraParams(r=8, alpha=16, init="pissa")
    assert shape_differences(LoraParams(r=16, alpha=32), pissa) == []
    assert shape_differences(pissa, pissa) == ["r: the parent's is 16, not 8", "alpha: the parent's is 32, not 16"]


def test_a_checkpoint_with_a_reference_adapter_restores_the_trained_one_from_its_root(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """A warm start's checkpoint holds the trained adapter in its root and trl's frozen `ref` copy in a sub-folder;
    transformers' Trainer before 5.2x restored only the sub-folder on resume (the trained adapter stayed the
    parent's). The runner loads the root itself."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from workers.training.peftsetup import REFERENCE_ADAPTER, TRAINED_ADAPTER, restore_trained_adapter

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    model.add_adapter(REFERENCE_ADAPTER, LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "checkpoint-3")
    assert (tmp_path / "checkpoint-3" / REFERENCE_ADAPTER / "adapter_model.safetensors").is_file()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if f".{TRAINED_ADAPTER}." in n}
    reference = {n: p.detach().clone() for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in trained:
                param.add_(1.0)  # as if the adapter were back at other (the parent's) weights

    assert restore_trained_adapter(model, tmp_path / "checkpoint-3")
    now = dict(model.named_parameters())
    assert trained and all(torch.equal(now[n], w) for n, w in trained.items())
    assert reference and all(torch.equal(now[n], w) for n, w in reference.items())
