"""The train runner on a tiny random Llama, with the in-memory reporter: no Django, no network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from workers.adapters.evaluate import completion_loss
from workers.contract.reporter import MemoryReporter
from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainSpec, suggest_train_params
from workers.contract.store import ArtifactStore
from workers.training.demo import toy_rows, write_toy_dataset


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

    from workers.training.train import run_training

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
    from workers.training.train import run_training

    reporter = MemoryReporter()
    result = run_training(make_spec(tiny_model_dir, quantization="4bit", quant_type="nf4", double_quant=True), reporter, store)
    assert result is not None, reporter.states[-1]
    assert any("4-bit NF4" in line for line in reporter.logs)
    model, _ = load_adapter(tiny_model_dir, store.path(result["adapter_uri"]))
    lora_weights = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert lora_weights


def test_a_missing_base_model_path_fails_with_a_readable_reason(tmp_path: Path, store: ArtifactStore) -> None:
    from workers.training.train import run_training

    reporter = MemoryReporter()
    assert run_training(make_spec(tmp_path / "no-such-model"), reporter, store) is None
    state, _, error = reporter.states[-1]
    assert state == "failed"
    assert "no-such-model" in error and "does not exist" in error
    assert "Traceback" not in error


def test_an_unknown_target_module_fails_with_the_valid_names(tiny_model_dir: Path, store: ArtifactStore) -> None:
    from workers.training.train import run_training

    reporter = MemoryReporter()
    run_training(make_spec(tiny_model_dir, target_modules=["q_proj", "attn_c"]), reporter, store)
    state, _, error = reporter.states[-1]
    assert state == "failed" and "attn_c" in error and "q_proj, up_proj, v_proj" in error


def test_cancel_stops_training_within_a_few_steps(tiny_model_dir: Path, store: ArtifactStore) -> None:
    from workers.training.train import run_training

    spec = make_spec(tiny_model_dir)
    spec.train.max_steps, spec.train.logging_steps = 2000, 1
    reporter = MemoryReporter(cancel_after_events=12)
    reporter.flush_interval = 0.0  # ask the "server" at every step
    assert run_training(spec, reporter, store) is None
    assert reporter.states[-1][0] == "cancelled"
    steps = [m["step"] for m in reporter.metrics if "loss" in m]
    assert max(steps) < 20


class DyingReporter(MemoryReporter):
    """A worker that dies (raises) when it reports a given step, like a machine lost mid-run."""

    def __init__(self, die_at_step: int) -> None:
        super().__init__()
        self.die_at_step = die_at_step

    def metric(self, **values: object) -> None:
        if values.get("step") == self.die_at_step and "loss" in values:
            raise RuntimeError("worker lost")
        super().metric(**values)


def test_an_interrupted_run_resumes_from_its_checkpoint_exactly(tiny_model_dir: Path, store: ArtifactStore) -> None:
    from workers.training.train import run_training

    def spec(attempt: int, checkpoints: str) -> TrainSpec:
        s = make_spec(tiny_model_dir)
        s.attempt, s.checkpoint_uri = attempt, checkpoints
        s.output_uri = f"{checkpoints}-out/attempt-{attempt}"
        s.train.max_steps, s.train.save_steps, s.train.logging_steps, s.train.keep_checkpoints = 12, 4, 1, 2
        s.train.lr_scheduler, s.train.warmup_ratio = "cosine", 0.2
        return s

    whole = MemoryReporter()
    whole_result = run_training(spec(1, "store://runs/whole/checkpoints"), whole, store)
    assert whole_result is not None and whole_result["resumed_from_step"] is None

    dying = DyingReporter(die_at_step=7)
    assert run_training(spec(1, "store://runs/cut/checkpoints"), dying, store) is None
    assert dying.states[-1][0] == "failed"
    assert [e["data"]["step"] for e in dying.events if e["kind"] == "checkpoint"] == [4]

    resumed = MemoryReporter()
    result = run_training(spec(2, "store://runs/cut/checkpoints"), resumed, store)
    assert result is not None, resumed.states[-1]
    assert result["resumed_from_step"] == 4
    assert any("Resuming from checkpoint checkpoint-4" in line for line in resumed.logs)
    assert result["steps"] == whole_result["steps"] == 12

    def curve(reporter: MemoryReporter) -> dict[int, tuple[float, float]]:
        return {m["step"]: (m["learning_rate"], m["loss"]) for m in reporter.metrics if "loss" in m}

    expected, got = curve(whole), curve(resumed)
    # Steps 1-4 come again from the checkpoint's log (for a lost attempt's unreported steps), 5-12 are trained.
    assert sorted(got) == list(range(1, 13))
    assert [m["step"] for m in resumed.metrics if m.get("restart")] == [4]
    assert all(got[step] == pytest.approx(expected[step], rel=1e-6) for step in range(1, 5))
    for step in got:
        assert got[step][0] == pytest.approx(expected[step][0], rel=1e-6)  # the same LR schedule
    assert got[12][1] == pytest.approx(expected[12][1], abs=0.05)
    assert result["final_loss"] == pytest.approx(whole_result["final_loss"], abs=0.05)
    # The trained tokens count the checkpoint's steps too: the same rows as the whole run's.
    assert result["trained_tokens"] == whole_result["trained_tokens"] > 0
    kept = sorted(p.name for p in store.path("store://runs/cut/checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-12", "checkpoint-8"]  # the last two are kept


def test_a_shutdown_hands_over_at_the_step_reached_even_without_periodic_checkpoints(tiny_model_dir: Path,
                                                                                     store: ArtifactStore) -> None:
    """save_steps 0 (the tiny demo's suggestion) keeps no periodic checkpoints, but a worker that shuts down
    still saves one where the run stands: the next attempt resumes there instead of at step 0."""
    from workers.training.train import run_training

    def spec(attempt: int) -> TrainSpec:
        s = make_spec(tiny_model_dir)
        s.attempt, s.checkpoint_uri = attempt, "store://runs/handover/checkpoints"
        s.output_uri = f"store://runs/handover/attempt-{attempt}"
        s.train.max_steps, s.train.save_steps, s.train.logging_steps = 10, 0, 1
        return s

    leaving, polls = MemoryReporter(), []
    # Polled at every step (and more): the worker starts shutting down at the third poll.
    leaving.stop_check = lambda: "the worker is shutting down" if polls.append(1) or len(polls) >= 3 else ""
    assert run_training(spec(1), leaving, store) is None
    assert leaving.states[-1][0] == "interrupted", leaving.states[-1]
    saved = [e["data"]["step"] for e in leaving.events if e["kind"] == "checkpoint"]
    assert len(saved) == 1 and 1 <= saved[0] < 10, saved

    resumed = MemoryReporter()
    result = run_training(spec(2), resumed, store)
    assert result is not None, resumed.states[-1]
    assert result["resumed_from_step"] == saved[0] and result["steps"] == 10


@pytest.mark.parametrize("can_save", [True, False])
def test_a_handover_never_takes_back_a_save_flagged_at_the_same_step(can_save: bool) -> None:
    """The trainer's own callback flags periodic saves before the handover's runs: a handover that cannot save
    (no checkpoint folder) stops the run but leaves that flag as it is."""
    from transformers import TrainerControl

    from workers.training.train import HandoverCallback

    reporter = MemoryReporter()
    reporter.stop_check = lambda: "the worker is shutting down"
    control = TrainerControl(should_save=True)

    HandoverCallback(reporter, can_save).on_step_end(None, None, control)

    assert control.should_save and control.should_training_stop


def _rows_file(store: ArtifactStore, name: str, rows: list[dict[str, object]]) -> str:
    import json

    uri = f"store://datasets/{name}.jsonl"
    store.path(uri).parent.mkdir(parents=True, exist_ok=True)
    store.path(uri).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return uri


def test_an_eval_dataset_is_what_the_run_evaluates_on_and_tokens_are_counted(tiny_model_dir: Path,
                                                                              store: ArtifactStore) -> None:
    """Two runs alike but for their eval dataset: the same training, other eval losses, each on its own rows."""
    from workers.training.demo import TOY_TASKS
    from workers.training.train import run_training

    evals = {"add": _rows_file(store, "add-test", toy_rows(24, seed=31)),
             "double": _rows_file(store, "double-test", TOY_TASKS["double"](40, 32))}
    outcomes = {}
    for task, uri in evals.items():
        spec = make_spec(tiny_model_dir)
        spec.output_uri = f"store://runs/{task}/adapter"
        spec.eval_dataset = DatasetRef(uri=uri, format="alpaca")
        spec.train.max_steps, spec.train.eval_steps, spec.train.logging_steps = 8, 4, 1
        reporter = MemoryReporter()
        result = run_training(spec, reporter, store)
        assert result is not None, reporter.states[-1]
        outcomes[task] = (result, reporter)

    rows = {"add": 24, "double": 40}
    for task, (result, reporter) in outcomes.items():
        assert any(f"evaluating on {rows[task]} rows of the eval dataset" in line for line in reporter.logs)
        assert [m["step"] for m in reporter.metrics if "eval_loss" in m] == [4, 8]
        assert result["eval_loss"] == [m["eval_loss"] for m in reporter.metrics if "eval_loss" in m][-1]
        # Tokens of real rows, padding excluded: at least one per row trained, at most max_seq_length.
        batch = make_spec(tiny_model_dir).train.batch_size
        assert isinstance(result["trained_tokens"], int)
        assert 8 * batch * 4 < result["trained_tokens"] < 8 * batch * make_spec(tiny_model_dir).train.max_seq_length
    add, double = outcomes["add"], outcomes["double"]
    train_curve = [[m["loss"] for m in r.metrics if "loss" in m] for _, r in (add, double)]
    assert train_curve[0] == pytest.approx(train_curve[1])  # the same training...
    assert add[0]["trained_tokens"] == double[0]["trained_tokens"]
    assert double[0]["eval_loss"] > add[0]["eval_loss"] + 0.1  # ...evaluated on other rows: the unseen task is worse


def test_chat_eval_rows_break_plain_text_training_on_a_base_without_a_chat_template(tiny_model_dir: Path,
                                                                                     store: ArtifactStore,
                                                                                     tmp_path: Path) -> None:
    """Why the run form refuses this one mix (webapp/training/services.py eval_dataset_problem): the runner gives
    chat rows a fallback template only when the training rows are chat, so the eval rows cannot be formatted."""
    import json
    import shutil

    from workers.training.train import run_training

    bare = tmp_path / "tiny-no-template"
    shutil.copytree(tiny_model_dir, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for path in bare.glob("chat_template*"):
        path.unlink()
    text = _rows_file(store, "text", [{"text": f"{r['instruction']} {r['output']}"} for r in toy_rows(32, seed=5)])
    spec = make_spec(bare)
    spec.dataset = DatasetRef(uri=text, format="text")
    spec.eval_dataset = DatasetRef(uri="store://datasets/toy.jsonl", format="alpaca")
    spec.train.max_steps, spec.train.eval_steps = 2, 1
    reporter = MemoryReporter()
    assert run_training(spec, reporter, store) is None
    state, _, error = reporter.states[-1]
    assert state == "failed" and "chat_template is not set" in error


def test_the_log_says_max_steps_sets_the_length_and_checkpoints_say_which_are_kept(tiny_model_dir: Path,
                                                                                  store: ArtifactStore) -> None:
    import re

    from workers.training.train import run_training

    spec = make_spec(tiny_model_dir)
    spec.checkpoint_uri = "store://runs/1/checkpoints"
    spec.train.num_epochs, spec.train.max_steps, spec.train.save_steps, spec.train.keep_checkpoints = 3, 6, 2, 2
    reporter = MemoryReporter()
    assert run_training(spec, reporter, store) is not None, reporter.states[-1]

    plan = [line for line in reporter.logs if line.startswith("Training: ")]
    assert len(plan) == 1 and re.fullmatch(r"Training: 6 steps \(max_steps; about 0\.\d+ epochs\)", plan[0]), plan
    assert "epoch(s)" not in plan[0] and "3 epochs" not in plan[0]
    # Each checkpoint event lists the steps still on disk once the trainer deleted those beyond keep_checkpoints.
    saved = [(e["data"]["step"], e["data"]["kept"]) for e in reporter.events if e["kind"] == "checkpoint"]
    assert saved == [(2, [2]), (4, [2, 4]), (6, [4, 6])]
    on_disk = sorted(p.name for p in store.path(spec.checkpoint_uri).glob("checkpoint-*"))
    assert on_disk == ["checkpoint-4", "checkpoint-6"]


def test_the_schedule_line_names_what_sets_the_length() -> None:
    from workers.training.train import schedule_line

    assert schedule_line(4000, 3.0, 4000, 1714) == "Training: 4,000 steps (max_steps; about 2.33 epochs)"
    assert schedule_line(120, 1.0, 120, 120) == "Training: 120 steps (max_steps; about 1 epoch)"
    assert schedule_line(4000, 3.0, 4000, None) == "Training: 4,000 steps (max_steps)"
    assert schedule_line(1200, 3.0, 0, 400) == "Training: 3 epochs, 1,200 steps"
    assert schedule_line(1, 0.5, 0, 2) == "Training: 0.5 epochs, 1 step"


# --- rows longer than max_seq_length ---------------------------------------------------------------------------


def _long_prompt_rows(count: int) -> list[dict[str, object]]:
    """Rows whose prompt alone is longer than 16 tokens: cut to 16, nothing of the answer is left to train on."""
    return [{"instruction": "add these numbers: " + " + ".join(str(i + k) for k in range(12)), "output": str(i)}
            for i in range(count)]


@pytest.mark.parametrize("batching", ["pad", "pack"])
def test_a_dataset_whose_every_row_is_cut_before_its_answer_fails_with_a_clear_reason(
        tiny_model_dir: Path, store: ArtifactStore, batching: str) -> None:
    from workers.training.train import run_training

    spec = make_spec(tiny_model_dir)
    spec.dataset = DatasetRef(uri=_rows_file(store, "long", _long_prompt_rows(8)), format="alpaca")
    spec.train.max_seq_length, spec.train.max_steps, spec.train.batching = 16, 2, batching
    reporter = MemoryReporter()
    assert run_training(spec, reporter, store) is None
    state, _, error = reporter.states[-1]
    assert state == "failed" and "Traceback" not in error and "num_samples" not in error
    assert "none of the 8 training rows" in error and "max_seq_length 16" in error
    assert re.search(r"\(line \d \(prompt of \d\d tokens\), line \d ", error), error


def test_rows_cut_before_their_answer_are_named_in_the_log_and_the_rest_trains(tiny_model_dir: Path,
                                                                              store: ArtifactStore) -> None:
    from workers.training.train import run_training

    rows = toy_rows(16, seed=3)
    rows[2:4] = _long_prompt_rows(2)
    spec = make_spec(tiny_model_dir)
    spec.dataset = DatasetRef(uri=_rows_file(store, "some-long", rows), format="alpaca")
    spec.train.max_seq_length, spec.train.max_steps, spec.train.batching = 16, 2, "pad"
    reporter = MemoryReporter()
    assert run_training(spec, reporter, store) is not None, reporter.states[-1]
    warning = next(line for line in reporter.logs if "train on nothing" in line)
    assert "2 of 16 training rows" in warning and "line 3 (prompt of " in warning and "line 4" in warning
