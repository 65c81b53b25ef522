"""What the trainer will see: token lengths, truncation and the trained/masked tokens of rows.

Rows are tokenized and labelled by trl's own SFTTrainer preparation (`_prepare_dataset`:
ChatML conversion, EOS, chat template, completion mask, labels = -100 on masked tokens),
so the preview cannot drift from training. This module adds only what depends on the run:
truncation to `max_length` and the batching, which decides whether a row left without
trained tokens is dropped and whether the collator masks a row's first token.

Needs a tokenizer only (no model weights, no GPU). Tokenizing takes about a millisecond a
row on one CPU core, so preview a sample (a few thousand rows) of a large dataset.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields
from types import SimpleNamespace
from typing import Any

from workers.data.bounds import utf8_size
from workers.data.datasets import detect_format, to_trl_row
from workers.data.prompts import FALLBACK_CHAT_TEMPLATE

# "pad": padded micro-batches; "pack": trl's BFD packing (padding-free rows of max_length);
# "padding_free": a micro-batch concatenated into one row. TrainParams.batching "auto" is "pack" on GPUs.
BATCHINGS = ("pad", "pack", "padding_free")


@dataclass
class Example:
    """One row as trl's SFTTrainer prepares it, before truncation."""

    input_ids: list[int]
    labels: list[int]  # -100 where the loss ignores the token


@dataclass
class Token:
    id: int
    text: str  # the decoded piece; "" for a token that only starts a multi-byte character
    trained: bool  # its label is not -100: the loss includes predicting it


@dataclass
class RenderedRow:
    """One row as the model sees it: `tokens`, then the `cut` tokens that truncation removes.

    The model predicts token i from the tokens before it (the loss shifts the labels), so the
    first token is never predicted even where its label is kept.
    """

    tokens: list[Token]
    cut: list[Token] = field(default_factory=list)
    dropped: bool = False  # the trainer skips the row: truncation left it nothing to train on
    max_length: int | None = None

    @property
    def trained_tokens(self) -> int:
        return 0 if self.dropped else sum(t.trained for t in self.tokens)

    @property
    def trained_tokens_cut(self) -> int:
        return sum(t.trained for t in self.cut)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": [asdict(t) for t in self.tokens],
            "cut": [asdict(t) for t in self.cut],
            "dropped": self.dropped,
            "max_length": self.max_length,
            "trained_tokens": self.trained_tokens,
            "trained_tokens_cut": self.trained_tokens_cut,
        }


@dataclass
class LengthStats:
    """Token lengths (after the chat template, before truncation) and what a max_length costs."""

    count: int
    min: int
    max: int
    mean: float
    median: float
    p90: int  # 90% of rows are at most this long
    p99: int
    histogram: list[tuple[int, int, int]]  # (lower, upper, rows): lower <= length < upper
    max_length: int | None
    truncated_rows: int  # longer than max_length
    truncated_share: float
    dropped_rows: int  # left without trained tokens: the trainer skips them
    total_tokens: int
    trained_tokens: int  # before truncation
    trained_tokens_lost: int  # cut off, or in dropped rows

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "histogram": [list(b) for b in self.histogram]}


def prepare_examples(tokenizer: Any, rows: Sequence[dict[str, Any]], completion_only_loss: bool) -> list[Example]:
    """Tokenize and label rows exactly as SFTTrainer does, without truncating them.

    Rows may be records of any format workers.data.datasets reads, or rows from load_trl_rows.
    """
    if not rows:
        return []
    from datasets import Dataset
    from trl.trainer.sft_trainer import SFTTrainer

    trl_rows = [as_trl_row(row) for row in rows]
    use_training_chat_template(tokenizer, trl_rows)
    # _prepare_dataset reads these three attributes of the trainer, which SFTTrainer.__init__
    # sets from the tokenizer and config; the model plays no part in preparing data.
    trainer = SimpleNamespace(_tokenizer=tokenizer, completion_only_loss=completion_only_loss, chat_template=None)
    with _quiet_progress():
        prepared = SFTTrainer._prepare_dataset(
            trainer, Dataset.from_list(trl_rows), tokenizer, _preparation_args(), False, None, "preview"  # type: ignore[arg-type]
        )
    return [Example(ids, labels) for ids, labels in zip(prepared["input_ids"], prepared["labels"], strict=True)]


def as_trl_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row train.py hands to SFTTrainer (converting is idempotent on rows already converted); a preference
    pair as the prompt and its chosen answer, a feedback row as its prompt and answer."""
    fmt = detect_format(row)
    if fmt is None:
        raise ValueError(f"not a dataset row: no known fields in {sorted(row)}")
    if fmt == "preference":  # previewed as its prompt and chosen answer: a prompt that fills max_length cuts both
        pair = to_trl_row(fmt, row)
        return {"prompt": pair["prompt"], "completion": pair["chosen"]}
    if fmt == "feedback":  # previewed as its prompt and answer, whatever its label
        answer = to_trl_row(fmt, row)
        return {"prompt": answer["prompt"], "completion": answer["completion"]}
    return to_trl_row(fmt, row)


def use_training_chat_template(tokenizer: Any, trl_rows: Sequence[dict[str, Any]]) -> None:
    """Give a template-less tokenizer the fallback template the train runner gives it for chat rows."""
    from trl.data_utils import is_conversational

    if trl_rows and is_conversational(trl_rows[0]) and not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def _preparation_args() -> SimpleNamespace:
    """SFTConfig's defaults without building one (a TrainingArguments probes devices); no truncation."""
    from trl import SFTConfig

    defaults = {}
    for f in fields(SFTConfig):
        if f.default is not MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not MISSING:
            defaults[f.name] = f.default_factory()
    defaults.update(max_length=None, packing=False, shuffle_dataset=False, dataset_num_proc=None)
    return SimpleNamespace(**defaults)


@contextmanager
def _quiet_progress() -> Iterator[None]:
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def truncate(example: Example, max_length: int | None, batching: str = "pad") -> tuple[list[bool], int, bool]:
    """Per-token trained flags as the collator leaves them, the kept length, and whether the row is dropped.

    Like SFTTrainer: the start is kept (truncation_mode "keep_start"; BFD packing truncates the
    same way); without packing, rows left with no trained token are dropped; padding-free
    collation masks the first token of each row.
    """
    if batching not in BATCHINGS:
        raise ValueError(f"batching must be one of {', '.join(BATCHINGS)}, got {batching!r}")
    trained = [label != -100 for label in example.labels]
    if batching != "pad" and trained:
        trained[0] = False
    kept = len(trained) if max_length is None else min(len(trained), max_length)
    dropped = batching != "pack" and not any(label != -100 for label in example.labels[:kept])
    return trained, kept, dropped


def render_row(
    tokenizer: Any,
    row: dict[str, Any],
    completion_only_loss: bool,
    max_length: int | None,
    batching: str = "pad",
) -> RenderedRow:
    """The token sequence the model sees for one row, each token trained or masked, and the cut."""
    (rendered,) = render_rows(tokenizer, [row], completion_only_loss, max_length, batching)
    return rendered


def render_rows(
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    completion_only_loss: bool,
    max_length: int | None,
    batching: str = "pad",
) -> list[RenderedRow]:
    """render_row for several rows, tokenized in one pass (each pass has a fixed cost of ~0.1 s)."""
    rendered = []
    for example in prepare_examples(tokenizer, rows, completion_only_loss):
        trained, kept, dropped = truncate(example, max_length, batching)
        texts = token_texts(tokenizer, example.input_ids)
        tokens = [Token(i, text, flag) for i, text, flag in zip(example.input_ids, texts, trained, strict=True)]
        rendered.append(RenderedRow(tokens=tokens[:kept], cut=tokens[kept:], dropped=dropped, max_length=max_length))
    return rendered


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds, decoded in context so that spaces and multi-byte characters come out right.

    Decoding a token alone loses SentencePiece's leading space and splits UTF-8 characters
    spread over byte-level tokens; the pieces joined equal the decoded sequence.
    """
    texts: list[str] = []
    start = read = 0  # decode from `start`; text up to `read` is already handed out
    before = ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[start:end], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            texts.append(text[len(before) :])
            start, read = read, end
            before = tokenizer.decode(ids[start:read], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        else:
            texts.append("")
    return texts


def length_stats(
    examples: Sequence[Example], max_length: int | None = None, batching: str = "pad", bins: int = 20
) -> LengthStats:
    """Statistics over prepared examples; cheap, so it can be asked for several max lengths."""
    if not examples:
        raise ValueError("no rows to measure")
    lengths = sorted(len(e.input_ids) for e in examples)
    truncated = dropped = trained_total = trained_lost = 0
    for example in examples:
        trained, kept, is_dropped = truncate(example, max_length, batching)
        total = sum(trained)
        kept_trained = 0 if is_dropped else sum(trained[:kept])
        trained_total += total
        trained_lost += total - kept_trained
        truncated += kept < len(trained)
        dropped += is_dropped
    return LengthStats(
        count=len(lengths),
        min=lengths[0],
        max=lengths[-1],
        mean=round(statistics.fmean(lengths), 2),
        median=statistics.median(lengths),
        p90=_nearest_rank(lengths, 90),
        p99=_nearest_rank(lengths, 99),
        histogram=histogram(lengths, bins),
        max_length=max_length,
        truncated_rows=truncated,
        truncated_share=round(truncated / len(lengths), 4),
        dropped_rows=dropped,
        total_tokens=sum(lengths),
        trained_tokens=trained_total,
        trained_tokens_lost=trained_lost,
    )


def dataset_stats(
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    completion_only_loss: bool = True,
    max_length: int | None = None,
    batching: str = "pad",
    bins: int = 20,
) -> LengthStats:
    """prepare_examples then length_stats, for one max length."""
    return length_stats(prepare_examples(tokenizer, rows, completion_only_loss), max_length, batching, bins)


def _nearest_rank(ordered: Sequence[int], percent: float) -> int:
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


def histogram(values: Sequence[int], bins: int = 20) -> list[tuple[int, int, int]]:
    """About `bins` bins of a round width (1, 2 or 5 times a power of ten) covering the values."""
    if not values:
        return []
    low, high = min(values), max(values)
    width = _round_width((high - low + 1) / max(1, bins))
    first = low // width * width
    counts = [0] * ((high - first) // width + 1)
    for value in values:
        counts[(value - first) // width] += 1
    return [(first + i * width, first + (i + 1) * width, count) for i, count in enumerate(counts)]


def _round_width(raw: float) -> int:
    magnitude = 10 ** math.floor(math.log10(max(raw, 1)))
    return next(step * magnitude for step in (1, 2, 5, 10) if step * magnitude >= raw)


# --- rows that truncation leaves with nothing to train on ----------------------------------------------------------

LENGTH_CHECK_ROWS = 128  # the rows with the longest prompts that a length check tokenizes
# A prompt is clipped to this many characters a token of max_length before tokenizing: past that, it fills
# max_length in any tokenizer whose tokens average fewer characters (all of them, on text).
CLIP_CHARS_PER_TOKEN = 16
COMPLETION_CHARS = 64  # enough of the answer for one trained token


@dataclass(frozen=True)
class UntrainedRow:
    """A row whose every trained token lies past max_length: SFTTrainer drops it (pad, padding_free) or packs
    it to train on nothing (pack). When that is every row, training fails (no rows) or learns nothing."""

    number: int  # its line or row in the file
    prompt_tokens: int  # tokens before its first trained one (at least this many where `clipped`)
    clipped: bool = False
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.unit} {self.number} (prompt of {self.prompt_tokens:,}{'+' if self.clipped else ''} tokens)"


def rows_cut_before_training(tokenizer: Any, records: Iterable[tuple[int, dict[str, Any]]], max_length: int,
                             completion_only_loss: bool = True, count: int = LENGTH_CHECK_ROWS,
                             unit: str = "line") -> list[UntrainedRow]:
    """Among the `count` rows with the longest prompts (in UTF-8 bytes), those that truncation to max_length
    leaves with no trained token, longest prompt first.

    Only the prompt is masked (completion_only_loss), so only a prompt can fill max_length; ranking by bytes
    finds the rows at risk without tokenizing every row (about a millisecond a row). Each candidate's prompt is
    clipped past what could fit, so memory and time stay bounded by `count` and max_length."""
    if not completion_only_loss:
        return []  # every token is trained: truncation keeps the first
    candidates = _longest_prompts(records, count, max_length * CLIP_CHARS_PER_TOKEN)
    if not candidates:
        return []
    examples = prepare_examples(tokenizer, [row for _, row, _ in candidates], completion_only_loss)
    cut = []
    for (number, _, clipped), example in zip(candidates, examples, strict=True):
        first = next((i for i, label in enumerate(example.labels) if label != -100), len(example.labels))
        if first >= max_length:
            cut.append(UntrainedRow(number, first, clipped, unit))
    return sorted(cut, key=lambda row: (-row.prompt_tokens, row.number))


def _longest_prompts(records: Iterable[tuple[int, dict[str, Any]]], count: int,
                     clip_chars: int) -> list[tuple[int, dict[str, Any], bool]]:
    """(number, trl row with its prompt clipped, whether it was) of the `count` records with the longest prompts."""
    heap: list[tuple[int, int, dict[str, Any], bool]] = []
    for number, record in records:
        row = as_trl_row(record)
        size = _text_size(row.get("prompt"))
        if not size or (len(heap) == count and size <= heap[0][0]):
            continue
        budget = [clip_chars]
        clipped_row = {"prompt": _clip_text(row["prompt"], budget),
                       "completion": _clip_text(row["completion"], [COMPLETION_CHARS])}
        entry = (size, -number, clipped_row, budget[0] < 0)
        if len(heap) < count:
            heapq.heappush(heap, entry)
        else:
            heapq.heapreplace(heap, entry)
    return [(-negative, row, clipped) for _, negative, row, clipped in sorted(heap, reverse=True)]


def _text_size(value: Any) -> int:
    if isinstance(value, str):
        return utf8_size(value)
    if isinstance(value, list):  # turns
        return sum(_text_size(turn.get("content")) for turn in value if isinstance(turn, dict))
    return 0


def _clip_text(value: Any, budget: list[int]) -> Any:
    """`value` (a string, or turns) with at most budget[0] characters of text; the budget goes negative if cut."""
    if isinstance(value, str):
        kept = value[: max(0, budget[0])]
        budget[0] -= len(value)
        return kept
    return [{**turn, "content": _clip_text(turn.get("content", ""), budget)} for turn in value]
