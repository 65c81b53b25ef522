"""KTO through the train runner on a tiny random Llama: it learns from labelled answers a preference the base lacks.

The toy feedback (workers.training.demo.feedback_rows): to "What is a + b?", one answer, labelled true when written
with even digits only and false when with odd digits only. No row pairs two answers; the random base prefers either
kind about as often. After KTO the adapter gives even-digit answers more log-probability than odd-digit ones on
held-out pairs (workers.training.demo.preference_rows) whose prompts and answers it never trained on.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.workers.test_dpo import learned_preference, preference_spec, write_rows
from tests.workers.test_objectives import SHAPE
from workers.contract.reporter import MemoryReporter
from workers.contract.spec import TrainParams, TrainSpec
from workers.contract.store import ArtifactStore
from workers.data.datasets import DatasetError, load_trl_rows, validate_bytes
from workers.training.demo import feedback_rows


def kto_spec(model_dir: Path) -> TrainSpec:
    return preference_spec(model_dir, "kto", "feedback", epochs=1, uri="store://datasets/feedback.jsonl")


def test_kto_makes_the_adapter_prefer_desirable_answers_on_held_out_prompts(tiny_model_dir: Path,
                                                                            tmp_path: Path) -> None:
    # Trained on unpaired feedback, measured on held-out pairs of an even (desirable) and an odd answer.
    reporter, result = learned_preference(tiny_model_dir, tmp_path, kto_spec(tiny_model_dir),
                                          feedback_rows(128, seed=0))

    assert any("format feedback" in line for line in reporter.logs)
    assert any(re.search(r"reward margin -?\d+\.\d{3} kl -?\d+\.\d{3}", line) for line in reporter.logs)
    assert result["eval_loss"] is not None and any("16 held out for evaluation" in line for line in reporter.logs)


def test_a_feedback_dataset_with_malformed_rows_is_refused_with_their_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "feedback.jsonl"
    rows: list[dict[str, Any]] = feedback_rows(4, seed=0)
    rows[1]["completion"] = ""
    rows[2]["label"] = "yes"
    rows[3]["prompt"] = ["not turns"]
    write_rows(path, rows)

    with pytest.raises(DatasetError) as refused:
        load_trl_rows(path)

    problems = {(p.line, p.field): p.message for p in refused.value.report.problems}
    assert problems == {
        (2, "completion"): "must not be empty",
        (3, "label"): "must be true (a desirable answer) or false (an undesirable one), got a string 'yes'",
        (4, "prompt[0]"): "must be an object with 'role' and 'content'",
        (4, "completion"): "must be a non-empty list of assistant turns, as the prompt is a list of turns",
    }


def test_feedback_is_read_from_csv_with_boolean_labels_and_from_parquet_as_turns() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv = validate_bytes(b"prompt,completion,label\nSay hi.,hi,true\nSay hi.,bye,FALSE\nSay hi.,hey,1\n"
                         b"Say hi.,,0\nSay hi.,yo,maybe\n", "feedback.csv")
    assert (csv.format, csv.row_count) == ("feedback", 5)
    assert [(p.line, p.field, p.message) for p in csv.problems] == [
        (5, "completion", "must not be empty"),
        (6, "label", "must be true (a desirable answer) or false (an undesirable one), got a string 'maybe'")]

    user = [{"role": "user", "content": "Say hi."}]
    turns = [{"prompt": user, "completion": [{"role": "assistant", "content": "hi"}], "label": True},
             {"prompt": user, "completion": [{"role": "assistant", "content": "bye"}], "label": False},
             {"prompt": user, "completion": [{"role": "user", "content": "bye"}], "label": False}]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(turns), buffer)
    parquet = validate_bytes(buffer.getvalue(), "feedback.parquet")
    assert (parquet.format, parquet.row_count) == ("feedback", 3)
    assert [(p.line, p.unit, p.field) for p in parquet.problems] == [(3, "row", "completion[0].role")]


def test_a_feedback_dataset_of_one_label_is_refused_saying_kto_needs_both() -> None:
    rows = [row for row in feedback_rows(16, seed=1) if row["label"]]
    report = validate_bytes("".join(json.dumps(row) + "\n" for row in rows).encode(), "feedback.jsonl")

    assert report.format == "feedback" and not report.ok
    (problem,) = report.problems
    assert (problem.line, problem.field) == (0, "label")
    assert "every row is labelled true" in problem.message and "labelled false (undesirable) too" in problem.message


def test_a_feedback_row_gives_its_prompt_and_only_a_desirable_answer_as_the_reference() -> None:
    from workers.data.datasets import to_trl_row
    from workers.data.prompts import prompt_row
    from workers.data.splits import eval_rows

    good = prompt_row(to_trl_row("feedback", {"prompt": "Say hi.", "completion": "hi", "label": True}))
    bad = prompt_row(to_trl_row("feedback", {"prompt": "Say hi.", "completion": "bye", "label": False}))
    assert (good.prompt, good.reference) == ("Say hi.", "hi")
    assert (bad.prompt, bad.reference) == ("Say hi.", "")
    rows = feedback_rows(6, seed=2)
    assert [row.reference for row in eval_rows("feedback", [to_trl_row("feedback", r) for r in rows])] == [
        r["completion"] if r["label"] else "" for r in rows]


def test_kto_trains_on_feedback_and_counts_its_kl_and_reference_passes_in_memory() -> None:
    from workers.training.objectives import objective_for

    kto = objective_for("kto")
    assert (kto.name, kto.label, kto.row_formats) == ("kto", "Kahneman-Tversky optimization", ("feedback",))
    assert kto.memory_terms({"weights": 100, "activations": 10, "logits": 4}, SHAPE, TrainParams(), 2) == {"logits": 12}


def test_kto_settings_are_validated_on_their_fields() -> None:
    assert TrainParams(objective="kto").validate() == {}
    errors = TrainParams(objective="kto", desirable_weight=0.0, undesirable_weight=-1.0, batch_size=1).validate()
    assert errors["desirable_weight"] == errors["undesirable_weight"] == "must be positive"
    assert "kto needs at least 2 rows" in errors["batch_size"]
    assert "batch_size" in TrainParams(objective="kto", batch_size=2, num_gpus=2).validate()  # one row a process
    assert "batch_size" not in TrainParams(objective="sft", batch_size=1).validate()


def test_the_kto_objective_builds_trls_kto_trainer_with_the_adapter_off_as_its_reference(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    from workers.data.datasets import to_trl_row
    from workers.training.engine import resolve_plan
    from workers.training.objectives import objective_for
    from workers.training.train import make_trainer

    spec = kto_spec(tiny_model_dir)
    spec.train.beta, spec.train.desirable_weight, spec.train.undesirable_weight = 0.3, 1.5, 0.5
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plan = resolve_plan(spec.train, spec.lora, device="cpu", dtype="float32", num_layers=2)
    args = objective_for("kto").config(spec, plan, tmp_path / "trainer", has_eval=False)
    rows = [to_trl_row("feedback", {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]})
        for r in feedback_rows(8, seed=1)]

    trainer = make_trainer(spec, plan, model, tokenizer, Dataset.from_list(rows), None, [], args)

    assert trainer.ref_model is None and trainer.model.peft_config["default"].r == spec.lora.r
    assert {"prompt_ids", "completion_ids", "KL_completion_ids", "label"} <= set(trainer.train_dataset.column_names)
    assert sorted(trainer.train_dataset["label"]) == sorted(r["label"] for r in rows)
    assert isinstance(args, KTOConfig) and isinstance(trainer, KTOTrainer)
    assert (args.beta, args.desirable_weight, args.undesirable_weight, args.max_length) == (
        0.3, 1.5, 0.5, spec.train.max_seq_length)


def test_feedback_rows_whose_prompt_fills_max_seq_length_are_named_and_the_rest_trains(tiny_model_dir: Path,
                                                                                       tmp_path: Path) -> None:
    from workers.training.train import run_training

    store = ArtifactStore(tmp_path / "store")
    rows = feedback_rows(16, seed=3)
    for row in rows[2:4]:
        row["prompt"] = "add these numbers: " + " + ".join(str(k) for k in range(12)) + "\n"
    write_rows(store.path("store://datasets/feedback.jsonl"), rows)
    spec = kto_spec(tiny_model_dir)
    spec.train.max_seq_length, spec.train.max_steps, spec.train.eval_fraction = 16, 2, 0.0

    reporter = MemoryReporter()
    assert run_training(spec, reporter, store) is not None, reporter.states[-1]
    warning = next(line for line in reporter.logs if "train on nothing" in line)
    assert "2 of 16 training rows" in warning and "line 3 (prompt of " in warning and "line 4" in warning
