"""GRPO through the train runner on a tiny random Llama: graders' rewards teach it what no row shows.

The toy task (workers.training.demo.prompt_rows, graded by SEVENS_GRADER): to "What is a + b?", answer "7777",
scored by how close the answer comes to it (difflib's ratio). A random base's sampled answers rarely hold a 7; after
GRPO the adapter's answers to held-out prompts it never trained on score far higher.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from workers.contract.reporter import MemoryReporter
from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainParams, TrainSpec, suggest_train_params
from workers.contract.store import ArtifactStore
from workers.training.demo import SEVENS_GRADER, prompt_rows

MAX_COMPLETION = 6


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def grpo_spec(model_dir: Path, graders: dict[str, Any] | None = None) -> TrainSpec:
    train = suggest_train_params(100_000)
    train.objective, train.graders = "grpo", graders or SEVENS_GRADER
    train.batch_size, train.num_generations, train.max_completion_length = 32, 8, MAX_COMPLETION
    train.learning_rate, train.max_steps, train.warmup_ratio, train.logging_steps = 2e-2, 30, 0.0, 5
    return TrainSpec(
        run_id=1, attempt=1, base_model=ModelRef(source=str(model_dir)),
        dataset=DatasetRef(uri="store://datasets/prompts.jsonl", format="prompt_only"),
        lora=LoraParams(dropout=0.0), train=train, output_uri="store://runs/1/attempt-1/adapter",
    )


def mean_reward(model: Any, tokenizer: Any, rows: list[dict[str, str]], samples: int = 4) -> float:
    """The grader's mean score of `samples` answers sampled (temperature 1) to each prompt."""
    import torch

    from workers.grading import build_grader

    grader = build_grader(SEVENS_GRADER)
    model.eval()
    torch.manual_seed(0)
    scores = []
    for row in rows:
        ids = tokenizer(row["prompt"], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, do_sample=True, max_new_tokens=MAX_COMPLETION, num_return_sequences=samples,
                                 pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(out[:, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        scores += grader.score_batch(answers, [row] * samples)
    return sum(scores) / len(scores)


def test_grpo_raises_the_graders_reward_on_held_out_prompts(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.training.train import run_training

    store = ArtifactStore(tmp_path / "store")
    write_rows(store.path("store://datasets/prompts.jsonl"), prompt_rows(256, seed=0))
    held_out = prompt_rows(32, seed=999)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = mean_reward(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, held_out)

    reporter = MemoryReporter()
    result = run_training(grpo_spec(tiny_model_dir), reporter, store)

    assert result is not None, reporter.states[-1]
    assert any("format prompt_only" in line for line in reporter.logs)
    points = [m for m in reporter.metrics if "loss" in m]
    assert [p["step"] for p in points] == [5, 10, 15, 20, 25, 30]
    assert all({"reward", "reward_std", "rewards/sevens/mean", "rewards/sevens/std", "completions/mean_length"}
               <= set(p) for p in points)
    assert any(" reward 0." in line and "answers " in line for line in reporter.logs)
    samples = [e for e in reporter.events if e["kind"] == "samples"]
    assert [e["data"]["step"] for e in samples] == [5, 10, 15, 20, 25, 30]
    row = samples[-1]["data"]["rows"][0]
    assert set(row) == {"prompt", "completion", "rewards", "total"} and row["prompt"].startswith("What is ")
    assert set(row["rewards"]) == {"sevens"} and 0.0 <= row["total"] <= 1.0
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      store.path(result["adapter_uri"]))
    after = mean_reward(tuned, tokenizer, held_out)
    rewards = [p["reward"] for p in points]
    print(f"held-out mean reward: {before:.3f} before, {after:.3f} after; training reward by step {rewards}")
    assert before < 0.1, before  # the random base rarely writes a 7
    assert after > before + 0.25, (before, after)


def test_a_grpo_run_lost_mid_way_resumes_from_its_checkpoint_on_the_same_schedule(tiny_model_dir: Path,
                                                                                 tmp_path: Path) -> None:
    from tests.workers.test_train_runner import DyingReporter
    from workers.training.train import run_training

    store = ArtifactStore(tmp_path / "store")
    write_rows(store.path("store://datasets/prompts.jsonl"), prompt_rows(64, seed=5))

    def spec(attempt: int, checkpoints: str) -> TrainSpec:
        s = grpo_spec(tiny_model_dir)
        s.attempt, s.checkpoint_uri, s.output_uri = attempt, checkpoints, f"{checkpoints}-out/attempt-{attempt}"
        s.train.batch_size, s.train.max_completion_length, s.train.lr_scheduler = 16, 4, "cosine"
        s.train.max_steps, s.train.save_steps, s.train.logging_steps, s.train.warmup_ratio = 6, 3, 1, 0.2
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
    expected = {m["step"]: m for m in whole.metrics if "loss" in m}
    got = {m["step"]: m for m in resumed.metrics if "loss" in m}
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step]["learning_rate"] == pytest.approx(expected[step]["learning_rate"], rel=1e-6)
    # Steps 1-3 come back from the checkpoint's log; from step 4 the resumed attempt samples and scores anew.
    assert all("reward" in got[step] for step in range(1, 7))
    assert [e["data"]["step"] for e in resumed.events if e["kind"] == "samples"] == [4, 5, 6]


def test_a_multi_grader_with_a_weighted_sum_is_one_reward_function_per_grader(tiny_model_dir: Path,
                                                                              tmp_path: Path) -> None:
    from trl import GRPOConfig, GRPOTrainer

    from workers.training.objectives.grpo import linear_weights

    formula = {"type": "multi", "name": "both", "calculate_output": "0.75 * sevens + short / 4", "graders": {
        "sevens": {**SEVENS_GRADER, "name": "sevens"},
        "short": {"type": "string_check", "name": "short", "input": "{{sample.output_text}}",
                  "reference": "7", "operation": "like"}}}
    assert linear_weights(formula) == [0.75, 0.25]
    assert linear_weights({**formula, "calculate_output": "sevens * short"}) is None
    assert linear_weights({**formula, "calculate_output": "sevens + 1"}) is None
    assert linear_weights({**formula, "calculate_output": "sevens + short"}) is None  # clipped to 1 at 2
    assert linear_weights({**formula, "calculate_output": "(sevens + short) / 2 - 0 * short"}) == [0.5, 0.5]

    trainer, args = built_trainer(tiny_model_dir, tmp_path, formula)

    assert isinstance(trainer, GRPOTrainer) and isinstance(args, GRPOConfig)
    assert trainer.reward_func_names == ["sevens", "short"] and trainer.reward_weights.tolist() == [0.75, 0.25]
    assert trainer.ref_model is None  # the reference is the policy with its adapter off
    assert (args.num_generations, args.max_completion_length, args.beta) == (8, MAX_COMPLETION, 0.04)
    policy: Any = trainer.model
    assert policy.peft_config["default"].r == 16


def built_trainer(model_dir: Path, tmp_path: Path, graders: dict[str, Any]) -> tuple[Any, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.data.datasets import to_trl_row
    from workers.training.engine import resolve_plan
    from workers.training.objectives import objective_for
    from workers.training.train import make_trainer

    spec = grpo_spec(model_dir, graders)
    spec.train.kl_coef = 0.04
    plan = resolve_plan(spec.train, spec.lora, device="cpu", dtype="float32", num_layers=2)
    args = objective_for("grpo").config(spec, plan, tmp_path / "trainer", has_eval=False)
    rows = Dataset.from_list([to_trl_row("prompt_only", r) for r in prompt_rows(16, seed=1)])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return make_trainer(spec, plan, model, AutoTokenizer.from_pretrained(model_dir), rows, None, [], args), args


def test_the_worker_refuses_a_grader_naming_a_field_the_rows_lack(tiny_model_dir: Path, tmp_path: Path) -> None:
    from workers.training.train import run_training

    store = ArtifactStore(tmp_path / "store")
    write_rows(store.path("store://datasets/prompts.jsonl"), prompt_rows(16, seed=2))
    spec = grpo_spec(tiny_model_dir, {**SEVENS_GRADER, "reference": "{{item.solution}}"})

    reporter = MemoryReporter()
    assert run_training(spec, reporter, store) is None
    state, _, error = reporter.states[-1]
    assert state == "failed" and "graders.reference" in error and "{{item.solution}}" in error


def test_the_worker_refuses_python_graders_unless_its_environment_allows_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.contract.jobrunner import RunnerError
    from workers.training.objectives.grpo import ALLOW_PYTHON_ENV, run_grader

    python = {"type": "python", "name": "code", "source": "def grade(sample, item):\n    return 1.0\n"}
    monkeypatch.delenv(ALLOW_PYTHON_ENV, raising=False)
    with pytest.raises(RunnerError, match=f"graders.type.*{ALLOW_PYTHON_ENV}=1"):
        run_grader(python)
    monkeypatch.setenv(ALLOW_PYTHON_ENV, "1")
    assert run_grader(python).name == "code"


def test_grpo_settings_are_validated_on_their_fields() -> None:
    assert TrainParams(objective="grpo", graders=SEVENS_GRADER).validate() == {}
    errors = TrainParams(objective="grpo", batch_size=6, num_generations=4, temperature=0.0,
                         max_completion_length=0, kl_coef=-1.0).validate()
    assert set(errors) == {"graders", "num_generations", "temperature", "max_completion_length", "kl_coef"}
    assert "batch_size 6 x grad_accum 1 = 6" in errors["num_generations"]
    assert "multiple of it" in errors["num_generations"]
    assert "give one" in errors["graders"]
    assert TrainParams(graders=SEVENS_GRADER).validate()["graders"] == "applies to GRPO only: leave it empty"
    assert "between 2 and" in TrainParams(objective="grpo", graders=SEVENS_GRADER, num_generations=1).validate()[
        "num_generations"]


def test_grpo_memory_counts_the_generation_cache_and_the_answers_tokens() -> None:
    from tests.workers.test_objectives import SHAPE
    from workers.training.objectives import objective_for

    train = TrainParams(objective="grpo", batch_size=8, grad_accum=2, max_seq_length=100, max_completion_length=300)
    terms = objective_for("grpo").memory_terms({"activations": 1000, "logits": 100}, SHAPE, train, 2)
    # 16 answers of 400 tokens, each token 2 (K, V) x 2 layers x 2 heads x 16 dims x 2 bytes
    assert terms == {"temporary": 16 * 400 * 256, "activations": 3000, "logits": 200}
    train.kl_coef = 0.1
    assert objective_for("grpo").memory_terms({"activations": 1000, "logits": 100}, SHAPE, train, 2)["logits"] == 500
    assert math.isclose(terms["temporary"] / 2**20, 1.5625)


def test_prompt_only_rows_from_jsonl_csv_and_parquet_each_problem_named_by_row_and_field(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workers.data.datasets import to_trl_row, validate_bytes, validate_file
    from workers.data.prompts import prompt_row

    user = {"role": "user", "content": "What is 2 + 2?"}
    rows: list[dict[str, Any]] = [
        {"messages": [{"role": "system", "content": "Be brief."}, user], "answer": 4, "tags": ["math"]},
        {"messages": [user, {"role": "assistant", "content": "4"}]},  # an example, not a prompt to answer
        {"messages": [{"role": "robot", "content": "x"}, user]},
    ]
    report = validate_bytes("".join(json.dumps(r) + "\n" for r in rows).encode(), "rl.jsonl")
    assert report.format == "prompt_only" and report.row_count == 3
    assert [(p.line, p.field) for p in report.problems] == [(2, "messages[1].role"), (3, "messages[0].role")]
    assert "must end with the user turn that the sampled answers answer" in report.problems[0].message
    row = to_trl_row("prompt_only", rows[0])
    assert row["prompt"][-1] == user and json.loads(row["item"]) == rows[0]
    assert (prompt_row(row).prompt, prompt_row(row).reference) == ("system: Be brief.\nuser: What is 2 + 2?", "4")

    report = validate_bytes(b"prompt,answer\nWhat is 1 + 1?,2\n,3\n", "rl.csv")
    assert report.format == "prompt_only" and [(p.line, p.field, p.message) for p in report.problems] == [
        (3, "prompt", "must not be empty")]

    path = tmp_path / "rl.parquet"
    pq.write_table(pa.table({"prompt": ["What is 5 + 5?", None], "reference": ["10", "11"]}), path)
    report = validate_file(path)
    assert report.format == "prompt_only"
    assert [(p.line, p.unit, p.field, p.message) for p in report.problems] == [(2, "row", "prompt", "missing")]
    assert prompt_row(to_trl_row("prompt_only", {"prompt": "p", "reference": "10"})).reference == "10"
    assert prompt_row(to_trl_row("prompt_only", {"prompt": "p"})).reference == ""


def test_placement_counts_the_generation_cache_of_a_grpo_run() -> None:
    """The run service places a run by estimate_for_spec (webapp/fleet/needs.py): a GRPO run's estimate holds its
    KV cache and its answers' activations."""
    from transformers import LlamaConfig

    from workers.training.modelshape import ModelShape
    from workers.training.specestimate import estimate_for_spec

    shape = ModelShape.from_config(LlamaConfig(  # Llama-3.1-8B's shape
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256))
    lora = LoraParams(quantization="4bit")
    sft = TrainParams(batch_size=8, max_seq_length=512, batching="pad")
    grpo = TrainParams(objective="grpo", graders=SEVENS_GRADER, batch_size=8, max_seq_length=512,
                       max_completion_length=1024)

    plain, reinforced = estimate_for_spec(shape, lora, sft).estimate, estimate_for_spec(shape, lora, grpo).estimate

    cache = 8 * (512 + 1024) * 2 * 32 * 8 * 128 * 2  # answers x tokens x (K, V) x layers x heads x dims x bf16
    assert reinforced.temporary - plain.temporary == cache == 3 * 2**30 // 2
    assert reinforced.activations == 3 * plain.activations  # the answer's 1,024 tokens after the prompt's 512
    print(f"8B QLoRA, 8 x 512 tokens: sft {plain.device_total / 2**30:.1f} GiB, grpo with 1,024-token answers "
          f"{reinforced.device_total / 2**30:.1f} GiB")


def test_grpo_samples_through_the_generation_engine_as_trl_would(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The policy's completions from the decode loop are trl's own generate() samples, token for token in float32
    on the CPU, for the same seed: the same temperature and top-p, the same draws, cut after the first EOS."""
    import torch
    from trl import GRPOTrainer

    from workers.generation.engine import plan_decoding
    from workers.training.objectives.grpo import engine_refusal

    trainer, _ = built_trainer(tiny_model_dir, tmp_path, SEVENS_GRADER)
    trainer.temperature, trainer.top_p = 1.2, 0.9
    trainer.generation_config.temperature, trainer.generation_config.top_p = 1.2, 0.9
    trainer.generation_kwargs.update(temperature=1.2, top_p=0.9)
    assert engine_refusal(trainer, None, {}) == ""
    assert plan_decoding(trainer.model, [], batched=False).loop
    tokenizer = trainer.processing_class
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in ("What is 3 + 4?", "Double 12, please", "Say seven")]  # fmt: skip
    groups = [ids for ids in prompts for _ in range(4)]  # as trl's sampler repeats each prompt num_generations times
    torch.manual_seed(11)
    ours, logprobs = trainer._generate_single_turn(groups, None, {}, 4)
    torch.manual_seed(11)
    theirs, _ = GRPOTrainer._generate_single_turn(trainer, groups, None, {}, 4)
    assert logprobs is None and ours == theirs
    assert len({tuple(c) for c in ours}) > 3  # sampled: a group's answers differ
    torch.manual_seed(12)
    assert trainer._generate_single_turn(groups, None, {}, 4)[0] != ours
