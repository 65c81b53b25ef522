"""ORPO through the train runner on a tiny random Llama: it learns a preference the base lacks, with no reference.

The toy preference (workers.training.demo.preference_rows): to "What is a + b?", the chosen answer is written with
even digits only, the rejected one with odd digits only. The random base prefers either about as often; after ORPO
the adapter prefers the chosen answer on held-out pairs it never trained on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.workers.test_dpo import learned_preference, preference_spec, write_rows
from tests.workers.test_objectives import SHAPE
from workers.contract.spec import TrainParams, TrainSpec
from workers.training.demo import preference_rows


def orpo_spec(model_dir: Path) -> TrainSpec:
    return preference_spec(model_dir, "orpo")


def test_orpo_makes_the_adapter_prefer_the_chosen_answers_of_held_out_pairs(tiny_model_dir: Path,
                                                                           tmp_path: Path) -> None:
    reporter, result = learned_preference(tiny_model_dir, tmp_path, orpo_spec(tiny_model_dir),
                                          preference_rows(128, seed=0))

    assert any("format preference" in line for line in reporter.logs)
    assert any(re.search(r"reward margin -?\d+\.\d{3} pairs preferred \d+%", line) for line in reporter.logs)
    assert result["eval_loss"] is not None and any("16 held out for evaluation" in line for line in reporter.logs)


def test_orpo_trains_on_pairs_and_counts_both_answers_but_no_reference_in_memory() -> None:
    from workers.training.objectives import objective_for

    orpo = objective_for("orpo")
    assert (orpo.name, orpo.label, orpo.row_formats) == ("orpo", "Odds ratio preference optimization", ("preference",))
    terms = orpo.memory_terms({"weights": 100, "activations": 10, "logits": 4}, SHAPE, TrainParams(), 2)
    assert terms == {"activations": 10, "logits": 4}


def test_openai_dpo_jsonl_loads_as_conversational_pairs_and_its_problems_name_openais_fields(tmp_path: Path) -> None:
    from workers.data.datasets import load_trl_rows, validate_bytes

    def openai_row(prompt: str, preferred: str, rejected: str) -> dict[str, object]:
        return {"input": {"messages": [{"role": "system", "content": "Answer in digits."},
                                       {"role": "user", "content": prompt}], "tools": [], "parallel_tool_calls": True},
                "preferred_output": [{"role": "assistant", "content": preferred}],
                "non_preferred_output": [{"role": "assistant", "content": rejected}]}

    path = tmp_path / "openai.jsonl"
    write_rows(path, [openai_row(r["prompt"], r["chosen"], r["rejected"]) for r in preference_rows(3, seed=7)])

    fmt, rows = load_trl_rows(path)

    assert fmt == "preference" and len(rows) == 3
    first = preference_rows(3, seed=7)[0]
    assert rows[0] == {"prompt": [{"role": "system", "content": "Answer in digits."},
                                  {"role": "user", "content": first["prompt"]}],
                       "chosen": [{"role": "assistant", "content": first["chosen"]}],
                       "rejected": [{"role": "assistant", "content": first["rejected"]}]}

    good = openai_row("Say hi.", "hi", "bye")
    wrong_role = {**good, "preferred_output": [{"role": "user", "content": "hi"}]}
    no_messages = {**good, "input": {"messages": "Say hi."}}
    same = {**good, "non_preferred_output": good["preferred_output"]}
    ends_on_assistant = {**good, "input": {"messages": [{"role": "user", "content": "Say hi."},
                                                        {"role": "assistant", "content": "hi"}]}}
    report = validate_bytes("".join(json.dumps(r) + "\n" for r in (
        good, wrong_role, no_messages, same, ends_on_assistant)).encode(), "openai.jsonl")
    assert report.format == "preference" and report.row_count == 5
    assert [(p.line, p.field) for p in report.problems] == [
        (2, "preferred_output[0].role"), (3, "input.messages"), (4, "non_preferred_output"),
        (5, "input.messages[1].role")]
    assert "the pair teaches no preference" in report.problems[2].message


def test_the_orpo_objective_builds_trls_orpo_trainer_with_beta_as_lambda_and_no_reference(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from workers.data.datasets import to_trl_row
    from workers.training.engine import resolve_plan
    from workers.training.objectives import objective_for
    from workers.training.train import make_trainer

    spec = orpo_spec(tiny_model_dir)
    spec.train.beta, spec.train.max_seq_length = 0.25, 16
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plan = resolve_plan(spec.train, spec.lora, device="cpu", dtype="float32", num_layers=2)
    args = objective_for("orpo").config(spec, plan, tmp_path / "trainer", has_eval=False)
    rows = [to_trl_row("preference", r) for r in preference_rows(8, seed=1)]
    rows[3]["prompt"] = "add these numbers: " + " + ".join(str(k) for k in range(12)) + "\n"  # fills max_length

    trainer = make_trainer(spec, plan, model, tokenizer, Dataset.from_list(rows), None, [], args)

    assert trainer.model.peft_config["default"].r == spec.lora.r and not hasattr(trainer, "ref_model")
    assert len(trainer.train_dataset) == 7  # the pair whose prompt fills max_length is dropped, to be named
    assert {"chosen_input_ids", "chosen_labels", "rejected_input_ids"} <= set(trainer.train_dataset.column_names)
    assert isinstance(args, ORPOConfig) and isinstance(trainer, ORPOTrainer)
    assert (args.beta, args.max_length) == (0.25, 16)
