"""The training-objective seam: a spec names its objective, and the train runner builds that objective's trainer."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from workers.contract.spec import DATASET_FORMATS, EXAMPLE_FORMATS, OBJECTIVE_NAMES, LoraParams, TrainParams, TrainSpec
from workers.training.modelshape import ModelShape
from workers.training.objectives import OBJECTIVES, objective_for

# A Llama-shaped model of 2 layers whose KV cache holds 2 x 2 layers x 2 heads x 16 = 128 values a token.
SHAPE = ModelShape.from_config(SimpleNamespace(
    model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=320, tie_word_embeddings=False))


def test_the_contract_names_every_objective_a_worker_has() -> None:
    assert set(OBJECTIVE_NAMES) == set(OBJECTIVES)
    assert TrainParams().objective == "sft"
    assert "objective" not in TrainParams().validate()


def test_an_unknown_objective_is_refused_on_its_field() -> None:
    errors = TrainParams(objective="kto").validate()
    assert set(errors) == {"objective"}
    assert "sft, dpo" in errors["objective"]
    with pytest.raises(ValueError, match="objective must be one of sft, dpo"):
        objective_for("kto")


def test_sft_trains_on_every_row_format_but_preference_pairs() -> None:
    sft = objective_for("sft")
    assert (sft.name, sft.label) == ("sft", "Supervised fine-tuning")
    assert sft.row_formats == EXAMPLE_FORMATS
    assert set(DATASET_FORMATS) - set(sft.row_formats) == {"preference", "prompt_only"}
    assert sft.memory_terms({"activations": 1, "logits": 1}, SHAPE, TrainParams(), 2) == {}


def test_dpo_trains_on_pairs_and_counts_both_answers_and_the_reference_in_memory() -> None:
    dpo = objective_for("dpo")
    assert (dpo.name, dpo.label, dpo.row_formats) == ("dpo", "Direct preference optimization", ("preference",))
    assert dpo.memory_terms({"weights": 100, "activations": 10, "logits": 4}, SHAPE, TrainParams(), 2) == {
        "activations": 10, "logits": 12}


def test_dpo_settings_are_validated_on_their_fields() -> None:
    assert TrainParams(objective="dpo").validate() == {}
    errors = TrainParams(objective="dpo", beta=0.0, dpo_loss="kto_pair").validate()
    assert errors["beta"] == "must be positive"
    assert errors["dpo_loss"].startswith("must be one of sigmoid, ipo")


def test_the_plan_pads_dpo_batches_and_says_so_when_packing_was_asked() -> None:
    from workers.training.engine import PlanError, resolve_plan

    lora = LoraParams()
    auto = resolve_plan(TrainParams(objective="dpo"), lora, device="cuda", dtype="bfloat16", num_layers=2)
    assert auto.batching == "pad" and not auto.notes
    packed = resolve_plan(TrainParams(objective="dpo", batching="pack"), lora, device="cpu", dtype="float32",
                          num_layers=2)
    assert packed.batching == "pad"
    assert "batching pack asked, pad used" in packed.describe()
    with pytest.raises(PlanError, match=r"attention: varlen .* dpo pads"):
        resolve_plan(TrainParams(objective="dpo", attention="varlen"), lora, device="cuda", dtype="bfloat16",
                     num_layers=2)


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


def test_a_dpo_estimate_pads_and_adds_the_second_answer_and_the_reference_logits() -> None:
    from workers.training.estimate import GiB
    from workers.training.modelshape import ModelShape
    from workers.training.specestimate import estimate_for_spec

    shape = ModelShape.from_config(_llama_8b_config())
    lora = LoraParams(quantization="4bit")
    sft = estimate_for_spec(shape, lora, TrainParams(batch_size=4, max_seq_length=2048, batching="pad"))
    dpo = estimate_for_spec(shape, lora, TrainParams(batch_size=4, max_seq_length=2048, objective="dpo"))
    packed = estimate_for_spec(shape, lora, TrainParams(batch_size=4, max_seq_length=2048, objective="dpo",
                                                        batching="pack"))

    assert dpo.choices.batching == "pad" and dpo.choices.attention == "sdpa"
    assert dpo.estimate.activations == 2 * sft.estimate.activations
    assert dpo.estimate.logits == 4 * sft.estimate.logits
    assert dpo.estimate.weights == sft.estimate.weights  # the reference is the same weights, adapter off
    assert dpo.estimate.total > sft.estimate.total + 1 * GiB
    assert packed.estimate.total == dpo.estimate.total and "dpo pads its batches" in packed.notes[0]


def _llama_8b_config():  # type: ignore[no-untyped-def]
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    )
