"""The training-objective seam: a spec names its objective, and the train runner builds that objective's trainer."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.contract.spec import DATASET_FORMATS, OBJECTIVE_NAMES, TrainParams, TrainSpec
from workers.training.objectives import OBJECTIVES, objective_for


def test_the_contract_names_every_objective_a_worker_has() -> None:
    assert set(OBJECTIVE_NAMES) == set(OBJECTIVES)
    assert TrainParams().objective == "sft"
    assert "objective" not in TrainParams().validate()


def test_an_unknown_objective_is_refused_on_its_field() -> None:
    errors = TrainParams(objective="dpo").validate()
    assert set(errors) == {"objective"}
    assert "sft" in errors["objective"]
    with pytest.raises(ValueError, match="objective must be one of sft"):
        objective_for("dpo")


def test_sft_trains_on_every_row_format() -> None:
    sft = objective_for("sft")
    assert (sft.name, sft.label) == ("sft", "Supervised fine-tuning")
    assert sft.row_formats == DATASET_FORMATS
    assert sft.memory_terms({"activations": 1, "logits": 1}) == {}


def test_make_trainer_builds_an_sft_trainer_through_the_seam(tiny_model_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from workers.contract.spec import DatasetRef, LoraParams, ModelRef, suggest_train_params
    from workers.training.demo import toy_rows
    from workers.training.engine import resolve_plan
    from workers.training.train import make_trainer

    spec = TrainSpec(
        run_id=1, attempt=1, base_model=ModelRef(source=str(tiny_model_dir)),
        dataset=DatasetRef(uri="store://datasets/toy.jsonl", format="alpaca"), lora=LoraParams(dropout=0.0),
        train=suggest_train_params(100_000), output_uri="store://runs/1/attempt-1/adapter",
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plan = resolve_plan(spec.train, spec.lora, device="cpu", dtype="float32", num_layers=model.config.num_hidden_layers)
    objective = objective_for(spec.train.objective)
    args = objective.config(spec, plan, tmp_path / "trainer", has_eval=False)
    rows = [{"prompt": r["instruction"], "completion": r["output"]} for r in toy_rows(8, seed=0)]

    trainer = make_trainer(spec, plan, model, tokenizer, Dataset.from_list(rows), None, [], args)

    assert isinstance(args, SFTConfig) and isinstance(trainer, SFTTrainer)
    assert args.max_length == spec.train.max_seq_length
    assert trainer.model.peft_config["default"].r == spec.lora.r  # the run's adapter, built by the objective
