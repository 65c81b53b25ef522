"""The preview against trl's SFTTrainer itself, built on the tiny model with the same rows."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from workers.data.datasets import load_trl_rows, to_trl_row
from workers.training.preview import (
    Example,
    dataset_stats,
    histogram,
    length_stats,
    prepare_examples,
    render_row,
    render_rows,
    token_texts,
    truncate,
)


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


ROWS: dict[str, list[dict[str, Any]]] = {
    "text": [{"text": "What is 12 + 30? 42"}, {"text": "the sum of 7 and 5 is 12"}],
    "prompt_completion": [
        {"prompt": "What is 12 + 30?", "completion": " 42"},
        {"prompt": "Reverse the text: abc.", "completion": " cba"},
    ],
    "alpaca": [
        {"instruction": "What is 12 + 30?", "input": "", "output": "42"},
        {"instruction": "Add the numbers.", "input": "7 and 5", "output": "12"},
    ],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "What is 1 + 2?"}, {"from": "gpt", "value": "3"}]},
        {
            "conversations": [
                {"from": "system", "value": "Answer with a number."},
                {"from": "human", "value": "What is 4 + 4?"},
                {"from": "gpt", "value": "8"},
            ]
        },
    ],
    "messages": [
        {"messages": chat(("system", "You add numbers."), ("user", "What is 2 + 2?"), ("assistant", "4"))},
        {
            "messages": chat(
                ("system", "You add numbers."),
                ("user", "What is 1 + 1?"),
                ("assistant", "2"),
                ("user", "and 2 + 3?"),
                ("assistant", "5"),
            )
        },
    ],
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def train_rows(tmp_path: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows train.py hands to SFTTrainer: read back from a dataset file."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_trl_rows(path)[1]


def what_the_trainer_feeds(
    model: Any, tokenizer: Any, rows: list[dict[str, Any]], out: Path, *,
    completion_only_loss: bool, max_length: int | None, batching: str = "pad",
) -> list[tuple[list[int], list[bool]]]:
    """Per example: the input ids and labels != -100 of SFTTrainer's collated batches.

    The collator leaves labels unshifted (the model's loss shifts them), so label i is token i's.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    args = SFTConfig(
        output_dir=str(out), max_length=max_length, completion_only_loss=completion_only_loss,
        packing=batching == "pack", padding_free=batching == "pack", per_device_train_batch_size=2,
        use_cpu=True, report_to="none",
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    collator = trainer.data_collator
    if batching == "padding_free":  # as the train runner does: pad-style preparation, one flat row per batch
        collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    prepared: Any = trainer.train_dataset
    fed = []
    for example in prepared:
        batch = collator([example])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        start = 0
        for length in example.get("seq_lengths") or [len(ids)]:  # a packed row holds several examples
            fed.append((ids[start : start + length], [label != -100 for label in labels[start : start + length]]))
            start += length
    return fed


def rendered(tokenizer: Any, records: list[dict[str, Any]], **kwargs: Any) -> list[tuple[list[int], list[bool]]]:
    rows = render_rows(tokenizer, records, **kwargs)
    return [([t.id for t in r.tokens], [t.trained for t in r.tokens]) for r in rows if not r.dropped]


def text_of(tokens: list[Any]) -> str:
    return "".join(t.text for t in tokens)


@pytest.mark.parametrize("completion_only_loss", [True, False])
@pytest.mark.parametrize("fmt", list(ROWS))
def test_the_render_is_what_sft_trainer_feeds_the_model(
    fmt: str, completion_only_loss: bool, model: Any, tokenizer: Any, tmp_path: Path
) -> None:
    records = ROWS[fmt]
    fed = what_the_trainer_feeds(
        model, tokenizer, train_rows(tmp_path, records), tmp_path / "out",
        completion_only_loss=completion_only_loss, max_length=256,
    )
    assert rendered(tokenizer, records, completion_only_loss=completion_only_loss, max_length=256) == fed
    assert len(fed) == len(records)


@pytest.mark.parametrize("fmt", list(ROWS))
def test_completion_only_loss_masks_exactly_the_prompt(fmt: str, tokenizer: Any) -> None:
    for record, row in zip(ROWS[fmt], render_rows(tokenizer, ROWS[fmt], completion_only_loss=True, max_length=None), strict=True):
        masked = [t for t in row.tokens if not t.trained]
        trained = [t for t in row.tokens if t.trained]
        assert row.tokens == masked + trained  # one masked prefix, then the trained answer
        trl_row = to_trl_row(fmt, record)
        if fmt == "text":
            assert masked == [] and text_of(trained) == record["text"] + "</s>"
        elif fmt == "prompt_completion":
            assert (text_of(masked), text_of(trained)) == (record["prompt"], record["completion"] + "</s>")
        else:
            prompt = tokenizer.apply_chat_template(trl_row["prompt"], add_generation_prompt=True, tokenize=False)
            answer = trl_row["completion"][0]["content"]
            assert (text_of(masked), text_of(trained)) == (prompt, f"{answer}</s>\n")
            assert text_of(masked).startswith("<|system|>") == (trl_row["prompt"][0]["role"] == "system")


@pytest.mark.parametrize("fmt", list(ROWS))
def test_without_completion_only_loss_nothing_is_masked(fmt: str, tokenizer: Any) -> None:
    for row in render_rows(tokenizer, ROWS[fmt], completion_only_loss=False, max_length=None):
        assert all(t.trained for t in row.tokens) and row.cut == [] and not row.dropped


def test_earlier_assistant_turns_of_a_conversation_are_context(tokenizer: Any) -> None:
    row = render_row(tokenizer, ROWS["messages"][1], completion_only_loss=True, max_length=None)
    masked = text_of([t for t in row.tokens if not t.trained])
    assert "<|assistant|>\n2</s>" in masked and text_of([t for t in row.tokens if t.trained]) == "5</s>\n"


TRUNCATION_ROWS = [
    {"messages": chat(("user", "What is 2 + 2?"), ("assistant", "4"))},  # short: untouched
    {"messages": chat(("system", "Answer with the sum. " * 3), ("user", "What is 3 + 3?"), ("assistant", "6"))},
    {"messages": chat(("user", "What is 9 + 9?"), ("assistant", "18, since 9 + 9 = 18. " * 2))},  # cut in the answer
]


@pytest.mark.parametrize("batching", ["pad", "padding_free", "pack"])
def test_truncation_matches_sft_trainer_for_each_batching(
    batching: str, model: Any, tokenizer: Any, tmp_path: Path
) -> None:
    max_length = 24
    rows = render_rows(tokenizer, TRUNCATION_ROWS, completion_only_loss=True, max_length=max_length, batching=batching)
    assert [len(r.cut) > 0 for r in rows] == [False, True, True]
    assert [r.dropped for r in rows] == [False, batching != "pack", False]  # its prompt alone fills max_length
    assert all(len(r.tokens) <= max_length for r in rows)

    fed = what_the_trainer_feeds(
        model, tokenizer, train_rows(tmp_path, TRUNCATION_ROWS), tmp_path / "out",
        completion_only_loss=True, max_length=max_length, batching=batching,
    )
    mine = rendered(tokenizer, TRUNCATION_ROWS, completion_only_loss=True, max_length=max_length, batching=batching)
    if batching == "pack":  # packing reorders the examples
        assert sorted(mine) == sorted(fed)
    else:
        assert mine == fed


@pytest.mark.parametrize("batching", ["pad", "padding_free", "pack"])
def test_padding_free_collation_masks_the_first_token_of_each_row(
    batching: str, model: Any, tokenizer: Any, tmp_path: Path
) -> None:
    records = ROWS["text"]
    fed = what_the_trainer_feeds(
        model, tokenizer, train_rows(tmp_path, records), tmp_path / "out",
        completion_only_loss=False, max_length=256, batching=batching,
    )
    mine = rendered(tokenizer, records, completion_only_loss=False, max_length=256, batching=batching)
    assert sorted(mine) == sorted(fed)
    assert [flags.count(False) for _, flags in mine] == [0 if batching == "pad" else 1] * len(records)
    assert all(flags[0] == (batching == "pad") for _, flags in mine)


def test_the_cut_continues_where_the_model_input_stops(tokenizer: Any) -> None:
    record = TRUNCATION_ROWS[2]
    whole = render_row(tokenizer, record, completion_only_loss=True, max_length=None)
    cut = render_row(tokenizer, record, completion_only_loss=True, max_length=20)
    assert cut.tokens == whole.tokens[:20] and cut.cut == whole.tokens[20:]
    assert cut.trained_tokens + cut.trained_tokens_cut == whole.trained_tokens > cut.trained_tokens > 0
    assert cut.as_dict()["tokens"][0] == {"id": whole.tokens[0].id, "text": "<|user|>", "trained": False}


def test_raw_records_and_converted_rows_render_alike(tokenizer: Any) -> None:
    for fmt, records in ROWS.items():
        converted = [to_trl_row(fmt, record) for record in records]
        assert render_rows(tokenizer, records, True, 64) == render_rows(tokenizer, converted, True, 64)
    assert render_rows(tokenizer, records, True, 64)[1] == render_row(tokenizer, records[1], True, 64)


def test_token_texts_join_to_the_decoded_text_even_across_multibyte_characters(tokenizer: Any) -> None:
    text = "café ☕ 日本 — naïve 12 + 30"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split())  # the tiny tokenizer spells these out byte by byte
    pieces = token_texts(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "☕" in pieces or " ☕" in pieces


def test_a_tokenizer_without_chat_template_gets_the_train_runners_fallback(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from workers.data.prompts import FALLBACK_CHAT_TEMPLATE

    bare = AutoTokenizer.from_pretrained(tiny_model_dir)
    bare.chat_template = None
    row = render_row(bare, ROWS["messages"][0], completion_only_loss=True, max_length=None)
    assert bare.chat_template == FALLBACK_CHAT_TEMPLATE
    assert text_of(row.tokens).startswith("<|im_start|>system\nYou add numbers.<|im_end|>")


# --- statistics ------------------------------------------------------------------------------------------------


def example(length: int, prompt: int) -> Example:
    return Example(input_ids=list(range(length)), labels=[-100] * prompt + list(range(prompt, length)))


def test_truncation_counts_for_a_known_max_length() -> None:
    examples = [example(5, 2), example(10, 4), example(15, 12), example(20, 3)]
    stats = length_stats(examples, max_length=12)
    assert (stats.truncated_rows, stats.truncated_share, stats.dropped_rows) == (2, 0.5, 1)
    assert stats.trained_tokens == 3 + 6 + 3 + 17
    assert stats.trained_tokens_lost == 3 + 8  # the row of 12 prompt tokens, and 8 cut off the last
    assert (stats.min, stats.max, stats.total_tokens) == (5, 20, 50)

    packed = length_stats(examples, max_length=12, batching="pack")  # kept, and each first token masked
    assert (packed.dropped_rows, packed.trained_tokens, packed.trained_tokens_lost) == (0, 29, 3 + 8)
    assert length_stats(examples).truncated_rows == 0 and length_stats(examples).trained_tokens_lost == 0


def test_percentiles_use_the_nearest_rank() -> None:
    stats = length_stats([example(n, 0) for n in range(100, 0, -1)])
    assert (stats.count, stats.min, stats.max, stats.mean, stats.median, stats.p90, stats.p99) == (100, 1, 100, 50.5, 50.5, 90, 99)


@pytest.mark.parametrize("values", [[7], [3, 3, 3], list(range(1, 1000, 7)), [10, 4000, 4001, 12345]])
def test_histogram_bins_are_round_contiguous_and_count_every_row(values: list[int]) -> None:
    bins = histogram(values, bins=20)
    assert sum(count for _, _, count in bins) == len(values)
    assert all(upper == lower for (_, upper, _), (lower, _, _) in pairwise(bins))
    width = bins[0][1] - bins[0][0]
    assert all(upper - lower == width for lower, upper, _ in bins) and str(width).strip("0") in ("1", "2", "5")
    assert bins[0][0] <= min(values) and max(values) < bins[-1][1] and len(bins) <= 21
    for lower, upper, count in bins:
        assert count == sum(lower <= v < upper for v in values)


def test_dataset_stats_agree_with_the_rendered_rows(tokenizer: Any) -> None:
    records = ROWS["alpaca"] + TRUNCATION_ROWS
    stats = dataset_stats(tokenizer, records, completion_only_loss=True, max_length=28)
    rows = render_rows(tokenizer, records, completion_only_loss=True, max_length=28)
    assert stats.count == len(records) == sum(count for _, _, count in stats.histogram)
    assert stats.truncated_rows == sum(bool(r.cut) for r in rows) == 3
    assert stats.dropped_rows == sum(r.dropped for r in rows) == 1
    assert stats.trained_tokens_lost == sum(r.trained_tokens_cut + (r.trained_tokens if r.dropped else 0) for r in rows)
    assert stats.trained_tokens == sum(sum(t.trained for t in r.tokens + r.cut) for r in rows)
    assert stats.max == max(len(r.tokens) + len(r.cut) for r in rows)
    assert json.loads(json.dumps(stats.as_dict()))["histogram"][0][2] >= 0


def test_prepare_examples_tokenizes_a_batch_of_rows_once(tokenizer: Any) -> None:
    rows = [{"instruction": f"What is {i} + {i}?", "output": str(2 * i)} for i in range(300)]
    examples = prepare_examples(tokenizer, rows, completion_only_loss=True)
    assert len(examples) == 300 and all(len(e.input_ids) == len(e.labels) for e in examples)
    assert examples[7] == prepare_examples(tokenizer, [rows[7]], completion_only_loss=True)[0]
    assert prepare_examples(tokenizer, [], completion_only_loss=True) == []


def test_bad_arguments_are_refused(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="batching must be one of"):
        truncate(example(3, 1), 2, "sideways")
    with pytest.raises(ValueError, match="no known fields"):
        render_row(tokenizer, {"question": "?"}, True, None)
    with pytest.raises(ValueError, match="no rows"):
        length_stats([])


# --- rows that truncation leaves with nothing to train on ------------------------------------------------------


def test_rows_whose_prompt_fills_max_length_are_named_longest_first(tokenizer: Any) -> None:
    from workers.training.preview import UntrainedRow, rows_cut_before_training

    rows = [{"prompt": "1 + 1 =", "completion": " 2"},
            {"prompt": "add " + " + ".join(map(str, range(30))), "completion": " 435"},
            {"prompt": "x " * 5000, "completion": " y"},  # clipped before tokenizing: at least max_length tokens
            {"prompt": "3 + 4 =", "completion": " 7"}]
    numbered = list(enumerate(rows, start=1))
    cut = rows_cut_before_training(tokenizer, numbered, max_length=24)
    assert [(row.number, row.clipped) for row in cut] == [(3, True), (2, False)]
    example = prepare_examples(tokenizer, [rows[1]], True)[0]
    assert cut[1].prompt_tokens == example.labels.index(next(i for i in example.labels if i != -100)) > 24
    assert str(cut[0]).startswith("line 3 (prompt of ") and str(cut[0]).endswith("+ tokens)")
    assert rows_cut_before_training(tokenizer, numbered, max_length=24, count=1) == cut[:1]
    assert rows_cut_before_training(tokenizer, numbered, max_length=24, completion_only_loss=False) == []
    assert rows_cut_before_training(tokenizer, numbered, max_length=12_000) == []
    assert isinstance(cut[0], UntrainedRow)
