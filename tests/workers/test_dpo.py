"""DPO through the train runner on a tiny random Llama: it learns a preference the base does not have.

The toy preference (workers.training.demo.preference_rows): to "What is a + b?", the chosen answer is a number
written with even digits only, the rejected one with odd digits only. The random base prefers either about as often;
after DPO the adapter prefers the chosen answer on held-out pairs it never trained on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from workers.contract.reporter import MemoryReporter
from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainSpec, suggest_train_params
from workers.contract.store import ArtifactStore
from workers.data.datasets import DatasetError, load_trl_rows
from workers.training.demo import preference_rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def preference_spec(model_dir: Path, objective: str = "dpo", fmt: str = "preference", epochs: int = 2,
                    uri: str = "store://datasets/pairs.jsonl") -> TrainSpec:
    """A run of `objective` on the toy rows at `uri`, an eighth held out for evaluation."""
    train = suggest_train_params(100_000)
    train.objective, train.num_epochs, train.batch_size, train.eval_fraction = objective, epochs, 8, 0.125
    return TrainSpec(
        run_id=1, attempt=1, base_model=ModelRef(source=str(model_dir)),
        dataset=DatasetRef(uri=uri, format=fmt),
        lora=LoraParams(dropout=0.0), train=train, output_uri="store://runs/1/attempt-1/adapter",
    )


def dpo_spec(model_dir: Path) -> TrainSpec:
    return preference_spec(model_dir)


def learned_preference(model_dir: Path, tmp_path: Path, spec: TrainSpec,
                       rows: list[dict[str, Any]]) -> tuple[MemoryReporter, dict[str, Any]]:
    """Train `spec` on `rows` and check that the adapter learned the toy preference (even digits over odd) on
    held-out pairs the run never saw: preferred on about half before (the base has no such preference), on at
    least 80% after. Returns the run's reporter and result, for the objective's own checks."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.training.train import run_training

    store = ArtifactStore(tmp_path / "store")
    write_rows(store.path(spec.dataset.uri), rows)
    held_out = preference_rows(64, seed=999)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    before = margins(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, held_out)

    reporter = MemoryReporter()
    result = run_training(spec, reporter, store)

    assert result is not None, reporter.states[-1]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), store.path(result["adapter_uri"]))
    after = margins(tuned, tokenizer, held_out)
    preferred_before = sum(m > 0 for m in before) / len(before)
    preferred_after = sum(m > 0 for m in after) / len(after)
    print(f"{spec.train.objective}: held-out pairs preferred: {preferred_before:.0%} before, {preferred_after:.0%} "
          f"after; mean margin {sum(before) / len(before):.2f} before, {sum(after) / len(after):.2f} after")
    assert 0.2 <= preferred_before <= 0.8, before
    assert preferred_after >= 0.8, after
    return reporter, result


def margins(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> list[float]:
    """log p(chosen | prompt) - log p(rejected | prompt), each summed over the answer's tokens (and its EOS)."""
    import torch

    def answer_logp(prompt: str, answer: str) -> float:
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + answer + tokenizer.eos_token)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        targets = torch.tensor(ids[1:])
        per_token = logits.gather(1, targets[:, None])[:, 0]
        return float(per_token[len(prompt_ids) - 1:].sum())

    model.eval()
    return [answer_logp(r["prompt"], r["chosen"]) - answer_logp(r["prompt"], r["rejected"]) for r in rows]


def test_dpo_makes_the_adapter_prefer_the_chosen_answers_of_held_out_pairs(tiny_model_dir: Path, tmp_path: Path) -> None:
    reporter, result = learned_preference(tiny_model_dir, tmp_path, dpo_spec(tiny_model_dir),
                                          preference_rows(128, seed=0))

    assert any("format preference" in line for line in reporter.logs)
    assert [m["loss"] for m in reporter.metrics if "loss" in m]
    assert any(re.search(r"reward margin -?\d+\.\d{3} pairs preferred \d+%", line) for line in reporter.logs)
    assert result["eval_loss"] is not None and any("16 held out for evaluation" in line for line in reporter.logs)


def test_a_preference_dataset_with_a_malformed_row_is_refused_with_its_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    rows: list[dict[str, Any]] = preference_rows(3, seed=0)
    rows[1]["rejected"] = ""
    rows[2]["chosen"] = ["not", "a", "text"]
    write_rows(path, rows)

    with pytest.raises(DatasetError) as refused:
        load_trl_rows(path)

    problems = {(p.line, p.field): p.message for p in refused.value.report.problems}
    assert problems == {(2, "rejected"): "must not be empty", (3, "chosen"): "must be a string, got an array"}


def test_conversational_pairs_are_read_as_trl_takes_them_and_their_turns_checked() -> None:
    from workers.data.datasets import validate_bytes

    user = {"role": "user", "content": "What is 2 + 2?"}
    good = {"prompt": [{"role": "system", "content": "Be brief."}, user],
            "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
    bad = {"prompt": [user, {"role": "assistant", "content": "4"}],
           "chosen": [{"role": "user", "content": "4"}], "rejected": "5"}
    same = {"prompt": "Say hi.", "chosen": "hi", "rejected": "hi"}
    report = validate_bytes("".join(json.dumps(r) + "\n" for r in (good, bad, same)).encode(), "pairs.jsonl")

    assert report.format == "preference" and report.row_count == 3
    assert [(p.line, p.field) for p in report.problems] == [
        (2, "prompt[1].role"), (2, "chosen[0].role"), (2, "rejected"), (3, "rejected")]
    assert "must end with the user turn" in report.problems[0].message
    assert "the pair teaches no preference" in report.problems[3].message


def test_the_dpo_objective_builds_trls_dpo_trainer_with_the_adapter_off_as_its_reference(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from workers.data.datasets import to_trl_row
    from workers.training.engine import resolve_plan
    from workers.training.objectives import objective_for
    from workers.training.train import make_trainer

    spec = dpo_spec(tiny_model_dir)
    spec.train.beta, spec.train.dpo_loss = 0.3, "ipo"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plan = resolve_plan(spec.train, spec.lora, device="cpu", dtype="float32", num_layers=2)
    args = objective_for("dpo").config(spec, plan, tmp_path / "trainer", has_eval=False)
    turns = [to_trl_row("preference", {
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}]}) for r in preference_rows(8, seed=1)]

    trainer = make_trainer(spec, plan, model, tokenizer, Dataset.from_list(turns), None, [], args)

    assert trainer.ref_model is None and trainer.model.peft_config["default"].r == spec.lora.r
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(trainer.train_dataset.column_names)
    assert isinstance(args, DPOConfig) and isinstance(trainer, DPOTrainer)
    assert (args.beta, args.loss_type, args.max_length) == (0.3, ["ipo"], spec.train.max_seq_length)


def test_pairs_whose_prompt_fills_max_seq_length_are_named_and_a_run_of_only_such_pairs_fails(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    from workers.training.train import run_training

    store = ArtifactStore(tmp_path / "store")
    rows = preference_rows(16, seed=3)
    long_prompt = "add these numbers: " + " + ".join(str(k) for k in range(12)) + "\n"
    for row in rows[2:4]:
        row["prompt"] = long_prompt
    write_rows(store.path("store://datasets/pairs.jsonl"), rows)
    spec = dpo_spec(tiny_model_dir)
    spec.train.max_seq_length, spec.train.max_steps, spec.train.eval_fraction = 16, 2, 0.0

    reporter = MemoryReporter()
    assert run_training(spec, reporter, store) is not None, reporter.states[-1]
    warning = next(line for line in reporter.logs if "train on nothing" in line)
    assert "2 of 16 training rows" in warning and "line 3 (prompt of " in warning and "line 4" in warning

    write_rows(store.path("store://datasets/pairs.jsonl"), [{**row, "prompt": long_prompt} for row in rows[:8]])
    reporter = MemoryReporter()
    assert run_training(spec, reporter, store) is None
    state, _, error = reporter.states[-1]
    assert state == "failed" and "none of the 8 training rows" in error and "max_seq_length 16" in error


def test_a_qlora_dpo_run_succeeds_on_the_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    from workers.training.train import run_training

    store = ArtifactStore(tmp_path / "store")
    write_rows(store.path("store://datasets/pairs.jsonl"), preference_rows(16, seed=4))
    spec = dpo_spec(tiny_model_dir)
    spec.lora = LoraParams(dropout=0.0, quantization="4bit")
    spec.train.max_steps, spec.train.eval_fraction = 2, 0.0

    reporter = MemoryReporter()
    result = run_training(spec, reporter, store)

    assert result is not None, reporter.states[-1]
    assert result["steps"] == 2 and any("4-bit NF4" in line for line in reporter.logs)
    assert (store.path(result["adapter_uri"]) / "adapter_model.safetensors").exists()


def test_a_dpo_run_lost_mid_way_resumes_from_its_checkpoint_on_the_same_schedule(tiny_model_dir: Path,
                                                                                tmp_path: Path) -> None:
    from tests.workers.test_train_runner import DyingReporter
    from workers.training.train import run_training

    store = ArtifactStore(tmp_path / "store")
    write_rows(store.path("store://datasets/pairs.jsonl"), preference_rows(64, seed=5))

    def spec(attempt: int, checkpoints: str) -> TrainSpec:
        s = dpo_spec(tiny_model_dir)
        s.attempt, s.checkpoint_uri, s.output_uri = attempt, checkpoints, f"{checkpoints}-out/attempt-{attempt}"
        s.train.max_steps, s.train.save_steps, s.train.logging_steps, s.train.eval_fraction = 6, 3, 1, 0.0
        return s

    whole = MemoryReporter()
    whole_result = run_training(spec(1, "store://runs/whole/checkpoints"), whole, store)
    assert whole_result is not None, whole.states[-1]
    dying = DyingReporter(die_at_step=5)
    assert run_training(spec(1, "store://runs/cut/checkpoints"), dying, store) is None

    resumed = MemoryReporter()
    result = run_training(spec(2, "store://runs/cut/checkpoints"), resumed, store)

    assert result is not None, resumed.states[-1]
    assert result["resumed_from_step"] == 3 and result["steps"] == whole_result["steps"] == 6
    expected = {m["step"]: (m["learning_rate"], m["loss"]) for m in whole.metrics if "loss" in m}
    got = {m["step"]: (m["learning_rate"], m["loss"]) for m in resumed.metrics if "loss" in m}
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step][0] == pytest.approx(expected[step][0], rel=1e-6)  # the same learning-rate schedule
        assert got[step][1] == pytest.approx(expected[step][1], abs=0.05)


def test_two_process_ddp_dpo_trains_the_same_adapter_as_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """DDP on the CPU (torchrun, gloo): the same global batch, seed and pairs give the same adapter."""
    from safetensors.torch import load_file

    from tests.workers.test_distributed import launch

    store = ArtifactStore(tmp_path / "store")
    write_rows(store.path("store://datasets/pairs.jsonl"), preference_rows(64, seed=6))

    def run(name: str, num_gpus: int) -> tuple[dict[str, Any], MemoryReporter]:
        s = dpo_spec(tiny_model_dir)
        s.output_uri = f"store://runs/{name}/adapter"
        s.train.max_steps, s.train.grad_accum, s.train.num_gpus, s.train.eval_fraction = 3, 2, num_gpus, 0.0
        s.train.logging_steps, s.train.warmup_ratio = 1, 0.0
        reporter = MemoryReporter()
        result = launch(s, reporter, store)
        assert result is not None, (reporter.states[-1], reporter.logs[-10:])
        return result, reporter

    one, single = run("one", 1)
    two, group = run("two", 2)

    assert two["num_processes"] == 2 and two["steps"] == one["steps"] == 3
    a = load_file(store.path(one["adapter_uri"]) / "adapter_model.safetensors")
    b = load_file(store.path(two["adapter_uri"]) / "adapter_model.safetensors")
    assert set(a) == set(b) and any("lora_B" in k for k in a)
    for name in a:
        assert float((a[name] - b[name]).abs().max()) <= 1e-5 * float(a[name].abs().max()), name
    losses = [[m["loss"] for m in r.metrics if "loss" in m] for r in (single, group)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_pairs_are_read_from_csv_and_parquet_too_with_the_row_of_each_problem() -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.data.datasets import validate_bytes

    csv = validate_bytes(b"prompt,chosen,rejected\nSay hi.,hi,bye\nSay hi.,,bye\n", "pairs.csv")
    assert (csv.format, csv.row_count) == ("preference", 2)
    assert [(p.line, p.field, p.message) for p in csv.problems] == [(3, "chosen", "must not be empty")]

    turns = [{"prompt": [{"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "hi"}],
              "rejected": [{"role": role, "content": "bye"}]} for role in ("assistant", "user")]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(turns), buffer)
    parquet = validate_bytes(buffer.getvalue(), "pairs.parquet")
    assert (parquet.format, parquet.row_count) == ("preference", 2)
    assert [(p.line, p.unit, p.field) for p in parquet.problems] == [(2, "row", "rejected[0].role")]


def test_a_pair_gives_its_prompt_and_its_chosen_answer_as_the_reference_to_evaluations_and_comparisons() -> None:
    from workers.data.datasets import to_trl_row
    from workers.data.prompts import prompt_row

    plain = prompt_row(to_trl_row("preference", {"prompt": "Say hi.", "chosen": "hi", "rejected": "bye"}))
    assert (plain.prompt, plain.reference) == ("Say hi.", "hi")
    turns = prompt_row(to_trl_row("preference", {
        "prompt": [{"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "hi"}],
        "rejected": [{"role": "assistant", "content": "bye"}]}))
    assert (turns.prompt, turns.reference, turns.turns) == ("Say hi.", "hi", [{"role": "user", "content": "Say hi."}])

    from workers.data.splits import eval_rows

    assert [row.reference for row in eval_rows("preference", [to_trl_row("preference", r)
                                                              for r in preference_rows(3, seed=2)])] == [
        r["chosen"] for r in preference_rows(3, seed=2)]
