"""Evaluation runner on the tiny random Llama and its two toy adapters; scores of workers.adapters.scoring by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from workers.adapters.evaluate import completion_loss, encode, reference_nll, run_evaluate
from workers.adapters.scoring import exact_match, lcs_length, normalise, rouge_l, tokens
from workers.contract.jobrunner import RunnerError
from workers.contract.jobspecs import BASE_KEY, AdapterRef, EvaluateSpec, GenerationParams
from workers.contract.reporter import MemoryReporter
from workers.contract.spec import DatasetRef, ModelRef
from workers.contract.store import ArtifactStore
from workers.data.datasets import load_trl_rows, to_trl_row
from workers.data.splits import eval_rows, held_out_indices

# --- scoring -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # LCS the cat on the mat: P = R = 5/6
        ("a b c d", "a c", 2 / 3),  # LCS 2: P = 2/4, R = 2/2, F1 = 2 * 0.5 * 1 / 1.5
        ("b a", "a b", 0.5),  # order counts: LCS 1 of 2 and 2
        ("Hello, World!", "hello world", 1.0),  # case and punctuation do not
        ("64", "64", 1.0),
        ("65", "64", 0.0),
        ("", "64", 0.0),
        ("...", "!", 1.0),  # neither has a word token
        ("the answer is 64", "64", 0.4),  # LCS 1: P = 1/4, R = 1, F1 = 0.5 / 1.25
    ],
)
def test_rouge_l_f1_of_hand_computed_cases(prediction: str, reference: str, expected: float) -> None:
    assert rouge_l(prediction, reference) == pytest.approx(expected)


def test_lcs_and_tokens() -> None:
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # BCBA, the textbook case
    assert lcs_length(list("BDCABA"), list("ABCBDAB")) == 4
    assert lcs_length([], ["a"]) == 0
    assert tokens("It's 3:45 p.m., snake_case") == ["it", "s", "3", "45", "p", "m", "snake", "case"]
    assert tokens("Größe ÄRGER") == ["grösse", "ärger"]  # case folding, not just lower case: ß is ss


def test_exact_match_normalises_case_and_whitespace_only() -> None:
    assert normalise("  The\tAnswer\n\nIS  ") == "the answer is"
    assert exact_match("  The  answer\n", "the answer") == 1.0
    assert exact_match("64.", "64") == 0.0  # punctuation counts
    assert exact_match("6 4", "64") == 0.0
    assert exact_match("", "") == 1.0


# --- rows and splits ---------------------------------------------------------------------------------------


def test_chat_rows_score_the_last_assistant_turn_given_every_turn_before_it() -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "4"},
            ]
        }
    ]
    (row,) = eval_rows("messages", [to_trl_row("messages", r) for r in rows])
    assert row.reference == "4" and row.conversational
    assert [t["content"] for t in row.turns] == ["Be brief.", "Hi", "Hello", "2 + 2?"]
    assert row.prompt.splitlines() == ["system: Be brief.", "user: Hi", "assistant: Hello", "user: 2 + 2?"]
    (plain,) = eval_rows("prompt_completion", [{"prompt": "2 + 2 =", "completion": " 4"}])
    assert (plain.prompt, plain.reference, plain.conversational) == ("2 + 2 =", " 4", False)


@pytest.mark.parametrize(("count", "fraction", "seed"), [(512, 0.1, 42), (512, 0.25, 7), (10, 0.3, 1), (3, 0.1, 0)])
def test_held_out_indices_are_the_rows_training_held_out(count: int, fraction: float, seed: int) -> None:
    from workers.contract.spec import LoraParams, TrainParams, TrainSpec
    from workers.training.train import _split_eval

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(count)]
    spec = TrainSpec(
        run_id=1, attempt=1, base_model=ModelRef(source="x"), dataset=DatasetRef(uri="store://d.jsonl"),
        lora=LoraParams(), train=TrainParams(eval_fraction=fraction, seed=seed), output_uri="store://o",
    )  # fmt: skip
    train_rows, held = _split_eval(spec, ArtifactStore("/nonexistent"), rows)
    indices = held_out_indices(count, fraction, seed)
    assert [rows[i] for i in indices] == held
    assert len(indices) + len(train_rows) == count and indices == sorted(indices)


def test_a_fraction_that_holds_out_everything_is_refused() -> None:
    with pytest.raises(RunnerError, match="leaves no training rows"):
        held_out_indices(2, 0.9, 0)


# --- loss --------------------------------------------------------------------------------------------------


def test_batched_loss_equals_the_loss_of_each_row_alone(tiny_model_dir: Path, task_adapters: Any) -> None:
    """Right padding in a batch must not change any row's loss: compare with one unpadded forward per row."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.contract.jobspecs import PromptRow
    from workers.training.demo import toy_rows

    store, uris = task_adapters
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), store.path(uris["add"]))
    model.eval()
    rows = [
        PromptRow(r["instruction"], r["output"], turns=[{"role": "user", "content": r["instruction"]}])
        for r in toy_rows(40, seed=5)
    ]
    rows.append(PromptRow("Plain text prompt: 3 + 4 =", " 7"))
    encoded = [encode(tokenizer, r) for r in rows]
    assert len({len(e.ids) for e in encoded}) > 2  # rows of several lengths share batches

    total, count = reference_nll(model, encoded, tokenizer.pad_token_id)

    expected_total, expected_count = 0.0, 0
    with torch.no_grad():
        for e in encoded:
            ids = torch.tensor([e.ids])
            labels = ids.clone()
            labels[0, : e.start] = -100
            n = len(e.ids) - e.start
            expected_total += float(model(input_ids=ids, labels=labels).loss) * n
            expected_count += n
    assert count == expected_count
    assert total == pytest.approx(expected_total, rel=1e-4)
    assert encoded[-1].ids[-1] == tokenizer.eos_token_id  # plain rows end with EOS, as trl trains them


def test_rows_longer_than_the_context_are_cut_to_fit() -> None:
    from workers.adapters.evaluate import Encoded, fit_context

    short = Encoded(ids=list(range(10)), start=6, prompt_ids=list(range(6)))
    long_answer = Encoded(ids=list(range(30)), start=5, prompt_ids=list(range(5)))
    long_prompt = Encoded(ids=list(range(40)), start=25, prompt_ids=list(range(25)))
    assert fit_context([short, long_answer, long_prompt], limit=20, max_new_tokens=8) == 2
    assert (short.ids, short.start, short.prompt_ids) == (list(range(10)), 6, list(range(6)))
    assert (long_answer.ids, long_answer.start, long_answer.prompt_ids) == (list(range(20)), 5, list(range(5)))
    assert long_prompt.ids == list(range(20)) and long_prompt.start == 20  # nothing of its answer fits
    assert long_prompt.prompt_ids == list(range(13, 25))  # the latest 12 tokens, room for 8 new ones
    assert fit_context([Encoded(list(range(50)), 3, [0, 1, 2])], limit=None, max_new_tokens=8) == 0


def test_completion_loss_still_scores_instruction_output_rows(tiny_model_dir: Path, task_adapters: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.training.demo import double_rows, toy_rows

    store, uris = task_adapters
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    add = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), store.path(uris["add"]))
    add_rows, double = toy_rows(32, seed=77), double_rows(32, seed=77)
    assert completion_loss(add, tokenizer, add_rows) < 0.6 * completion_loss(base, tokenizer, add_rows)
    assert completion_loss(add, tokenizer, add_rows) < completion_loss(add, tokenizer, double)


# --- the runner --------------------------------------------------------------------------------------------


def make_spec(model_dir: Path, uris: dict[str, str], **fields: Any) -> EvaluateSpec:
    values: dict[str, Any] = {
        "job_id": 1,
        "attempt": 1,
        "base_model": ModelRef(source=str(model_dir)),
        "adapters": [
            AdapterRef(key="add", label="Addition", uri=uris["add"], r=8),
            AdapterRef(key="double", label="Doubling", uri=uris["double"], r=8),
        ],
        "dataset": DatasetRef(uri="store://datasets/add.jsonl", format="alpaca"),
        "max_rows": 20,
        "generation": GenerationParams(max_new_tokens=6),
        **fields,
    }
    return EvaluateSpec(**values)


def test_the_add_adapter_scores_best_on_the_add_task(tiny_model_dir: Path, task_adapters: Any) -> None:
    store, uris = task_adapters
    reporter = MemoryReporter()
    result = run_evaluate(make_spec(tiny_model_dir, uris), reporter, store)

    assert result is not None, reporter.states[-1]
    assert [s for s, _, _ in reporter.states] == ["running", "succeeded"]
    assert result["columns"] == [BASE_KEY, "add", "double"]
    assert result["labels"] == {BASE_KEY: "base model", "add": "Addition", "double": "Doubling"}
    scores = result["scores"]
    for column in result["columns"]:
        assert set(scores[column]) >= {"loss", "perplexity", "exact_match", "rouge_l", "rows", "mean_output_tokens"}
        assert scores[column]["rows"] == 20
        assert scores[column]["perplexity"] == pytest.approx(math.exp(scores[column]["loss"]))
    losses = {column: scores[column]["loss"] for column in result["columns"]}
    assert min(losses, key=losses.__getitem__) == "add", losses
    assert losses["add"] < 0.6 * losses[BASE_KEY], losses
    # The toy adapters learn the answer's form (a short number, then EOS), not the arithmetic; the random base
    # rambles to the token limit.
    assert scores["add"]["mean_output_tokens"] < scores[BASE_KEY]["mean_output_tokens"] == 6, scores

    # Every row is a sample here: the table's generation scores must be those of the shown outputs.
    rows = [json.loads(line) for line in store.path("store://datasets/add.jsonl").read_text().splitlines()[:20]]
    assert [s["prompt"] for s in result["samples"]] == [r["instruction"] for r in rows]
    assert [s["reference"] for s in result["samples"]] == [r["output"] for r in rows]
    for column in result["columns"]:
        outputs = [s["outputs"][column] for s in result["samples"]]
        assert scores[column]["exact_match"] == pytest.approx(
            sum(exact_match(o, r["output"]) for o, r in zip(outputs, rows, strict=True)) / 20
        )
        assert scores[column]["rouge_l"] == pytest.approx(
            sum(rouge_l(o, r["output"]) for o, r in zip(outputs, rows, strict=True)) / 20
        )
        assert 0 < scores[column]["mean_output_tokens"] <= 6

    steps = [m["step"] for m in reporter.metrics]
    assert steps == sorted(steps) and steps[-1] == reporter.metrics[-1]["total_steps"] == 2 * 3 * 20
    assert reporter.metrics[0] == {"step": 0, "total_steps": 2 * 3 * 20}
    assert {m.get("phase") for m in reporter.metrics[1:]} == {"loss", "generate"}
    assert any("Addition: loss" in line for line in reporter.logs)


def test_references_equal_to_an_adapters_own_answers_score_full_marks_for_it(
    tiny_model_dir: Path, task_adapters: Any
) -> None:
    store, uris = task_adapters
    first = run_evaluate(make_spec(tiny_model_dir, uris), MemoryReporter(), store)
    assert first is not None
    echo = [
        {"instruction": s["prompt"], "output": s["outputs"]["add"]}
        for s in first["samples"]
        if s["outputs"]["add"].strip()
    ]
    assert len(echo) >= 10
    store.write_bytes("store://datasets/echo.jsonl", "".join(json.dumps(r) + "\n" for r in echo).encode())

    reporter = MemoryReporter()
    result = run_evaluate(
        make_spec(tiny_model_dir, uris, dataset=DatasetRef(uri="store://datasets/echo.jsonl")), reporter, store
    )
    assert result is not None, reporter.states[-1]
    assert result["rows"] == len(echo)
    assert result["scores"]["add"]["exact_match"] == 1.0 and result["scores"]["add"]["rouge_l"] == 1.0
    assert result["scores"][BASE_KEY]["exact_match"] == 0.0


def test_the_held_out_split_scores_exactly_the_rows_training_held_out(tiny_model_dir: Path, task_adapters: Any) -> None:
    from workers.contract.spec import LoraParams, TrainParams, TrainSpec
    from workers.training.train import _split_eval

    store, uris = task_adapters
    spec = make_spec(
        tiny_model_dir, uris, adapters=[], split="held_out", eval_fraction=0.05, seed=3, max_rows=0,
        generation=GenerationParams(max_new_tokens=2),
    )  # fmt: skip
    reporter = MemoryReporter()
    result = run_evaluate(spec, reporter, store)
    assert result is not None, reporter.states[-1]

    _, rows = load_trl_rows(store.path("store://datasets/add.jsonl"))
    train_spec = TrainSpec(
        run_id=1, attempt=1, base_model=ModelRef(source=str(tiny_model_dir)), dataset=spec.dataset,
        lora=LoraParams(), train=TrainParams(eval_fraction=0.05, seed=3), output_uri="store://x",
    )  # fmt: skip
    _, held = _split_eval(train_spec, store, rows)
    assert result["split"] == "held_out" and result["rows"] == len(held) == 26
    assert [s["prompt"] for s in result["samples"]] == [r["prompt"][0]["content"] for r in held[:20]]
    assert [s["reference"] for s in result["samples"]] == [r["completion"][0]["content"] for r in held[:20]]


def test_a_text_only_dataset_is_refused_clearly(tiny_model_dir: Path, task_adapters: Any) -> None:
    store, uris = task_adapters
    store.write_bytes("store://datasets/plain.jsonl", b'{"text": "just some text"}\n{"text": "more text"}\n')
    reporter = MemoryReporter()
    result = run_evaluate(
        make_spec(tiny_model_dir, uris, dataset=DatasetRef(uri="store://datasets/plain.jsonl")), reporter, store
    )
    assert result is None
    state, _, error = reporter.states[-1]
    assert state == "failed"
    assert error.startswith("plain.jsonl: plain text rows have no reference answers")
    assert "Traceback" not in "\n".join(reporter.logs)


def test_a_missing_dataset_or_adapter_fails_with_its_name(tiny_model_dir: Path, task_adapters: Any) -> None:
    store, uris = task_adapters
    reporter = MemoryReporter()
    run_evaluate(
        make_spec(tiny_model_dir, uris, dataset=DatasetRef(uri="store://datasets/gone.jsonl")), reporter, store
    )
    assert reporter.states[-1] == (
        "failed",
        {},
        "dataset store://datasets/gone.jsonl: the file does not exist in the artifact store",
    )

    reporter = MemoryReporter()
    missing = AdapterRef(key="lost", label="Lost", uri="store://runs/99/adapter", r=8)
    run_evaluate(make_spec(tiny_model_dir, uris, adapters=[missing]), reporter, store)
    state, _, error = reporter.states[-1]
    assert state == "failed" and "Lost" in error and "does not exist" in error

    reporter = MemoryReporter()
    run_evaluate(make_spec(tiny_model_dir, uris, adapters=[], include_base=False, split="held_out"), reporter, store)
    state, _, error = reporter.states[-1]
    assert state == "failed" and "adapters: pick at least one" in error and "eval_fraction" in error


class CancelWhen(MemoryReporter):
    """Asks to cancel once an event matches, `later` flushes after the one that carried it; flushes at every chance."""

    flush_interval = 0.0

    def __init__(self, matches: Any, later: int = 0) -> None:
        super().__init__()
        self.matches, self.later = matches, later
        self.flushes_since_match: int | None = None

    def _send_events(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        super()._send_events(batch)
        if self.flushes_since_match is not None:
            self.flushes_since_match += 1
        elif any(self.matches(e) for e in batch):
            self.flushes_since_match = 0
        return {"cancel": self.flushes_since_match is not None and self.flushes_since_match >= self.later}


def test_cancel_while_scoring_losses_stops_before_the_next_batch(tiny_model_dir: Path, task_adapters: Any) -> None:
    store, uris = task_adapters
    reporter = CancelWhen(lambda e: e["kind"] == "metric" and e["data"].get("phase") == "loss")
    assert run_evaluate(make_spec(tiny_model_dir, uris), reporter, store) is None
    assert reporter.states[-1][0] == "cancelled"
    assert len([m for m in reporter.metrics if m.get("phase") == "loss"]) == 1
    assert not any(m.get("phase") == "generate" for m in reporter.metrics)


def test_cancel_while_generating_stops_within_a_few_decode_steps(tiny_model_dir: Path, task_adapters: Any) -> None:
    store, uris = task_adapters
    reporter = CancelWhen(lambda e: "Generating answers" in e["message"], later=3)
    spec = make_spec(tiny_model_dir, uris, generation=GenerationParams(max_new_tokens=400))
    assert run_evaluate(spec, reporter, store) is None
    assert reporter.states[-1][0] == "cancelled"
    assert any("Addition: loss" in line for line in reporter.logs)
    assert not any(m.get("phase") == "generate" for m in reporter.metrics)  # the first chunk never finished
    assert reporter.flushes_since_match is not None and reporter.flushes_since_match < 10


def test_an_answer_followed_by_the_end_of_turn_token_scores_full_marks(chatml_adapter: Any) -> None:
    """The references are the chat adapter's own answers (each followed, in its generation, by <|im_end|>, not EOS):
    its answers must stop there and match them exactly, not run on into new turns up to max_new_tokens."""
    from transformers import AutoTokenizer

    from tests.workers.test_compare import greedy_until
    from workers.training.demo import double_rows

    model_dir, store, uri = chatml_adapter
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = double_rows(12, seed=4048)
    answers = greedy_until(model_dir, store, uri, [r["instruction"] for r in rows], [end], 12)
    assert all(ids[-1] == end and len(ids) > 1 for ids in answers), "the adapter answers, then ends its turn"
    references = [tokenizer.decode(ids[:-1]) for ids in answers]
    lines = [json.dumps({"instruction": r["instruction"], "output": ref}) + "\n" for r, ref in zip(rows, references, strict=True)]
    store.write_bytes("store://datasets/own-answers.jsonl", "".join(lines).encode())
    spec = EvaluateSpec(
        job_id=1, attempt=1, base_model=ModelRef(source=str(model_dir)),
        adapters=[AdapterRef(key="double", label="Doubling", uri=uri, r=8)],
        dataset=DatasetRef(uri="store://datasets/own-answers.jsonl", format="alpaca"), include_base=False,
        generation=GenerationParams(max_new_tokens=12),
    )  # fmt: skip
    reporter = MemoryReporter()

    result = run_evaluate(spec, reporter, store)

    assert result is not None, reporter.states[-1]
    assert [s["outputs"]["double"] for s in result["samples"]] == references
    scores = result["scores"]["double"]
    assert scores["exact_match"] == 1.0 and scores["rouge_l"] == 1.0
    assert scores["mean_output_tokens"] == pytest.approx(sum(len(ids) - 1 for ids in answers) / len(answers))
    assert [s["text"] for s in result["stop_tokens"]] == ["<|im_end|>", "</s>"]
    assert any(line.startswith("Answers stop at '<|im_end|>'") for line in reporter.logs)
