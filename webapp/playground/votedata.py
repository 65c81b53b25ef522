"""Datasets made from what the team said about a comparison's outputs: blind votes become preference pairs (for
DPO), thumbs up and down become unpaired feedback (for KTO).

Pairs: on each row, every column that won votes (the winner) against every column with fewer votes (the loser)
gives a pair: the row's prompt, the winner's text chosen, the loser's rejected, and `weight` = the winner's votes
minus the loser's (objectives that weigh rows use it). Ties count for nobody; a row with no votes (unvoted), or
whose votes decide nothing (ties only, or every column level), gives no pair; nor does a pair of identical texts
or one with an empty output (a pair that teaches no preference). Feedback: each output with thumbs gives a row
labelled by the majority; an output with as many thumbs up as down is left out. What was left out is counted and
shown, so that nobody mistakes a thin dataset for the team's whole judgement.

The rows are conversational when the prompt set is chat-shaped (some row holds its conversation's turns): the
prompt is its turns, the answers assistant turns; otherwise the prompt and answers are plain text. The file is
registered like an upload (catalog.services.register_dataset validates every row), and a VoteDataset records
where it came from.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from typing import Any

from django.db import transaction
from django.db.models import Count

from webapp.catalog.models import Dataset
from webapp.catalog.services import register_dataset
from webapp.playground.models import ChatAnswer, ChatSession, ChatThumb, Comparison, Vote, VoteDataset
from workers.contract.jobspecs import BASE_KEY
from workers.data.datasets import DatasetError, validate_bytes

KINDS = (VoteDataset.PREFERENCE, VoteDataset.FEEDBACK)


class DatasetRefused(ValueError):
    """Why no dataset was made: a message, and the field it is about (None: the comparison as a whole)."""

    def __init__(self, message: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.field, self.status = message, field, status


@dataclasses.dataclass
class Figures:
    """What a comparison's judgements gave: rows made, and what was left out and why."""

    kind: str
    judgements: int = 0  # votes (ties included) or thumbs counted
    examples: int = 0  # pairs, or feedback rows
    rows: int = 0  # prompts that gave at least one example
    tied_rows: int = 0  # preference: rows whose votes decide nothing
    unvoted_rows: int = 0  # preference: rows nobody voted on
    identical_pairs: int = 0  # preference: winner and loser wrote the same text
    empty_outputs: int = 0  # outputs with no text (the model stopped before any token)
    desirable: int = 0  # feedback: rows labelled true
    undesirable: int = 0  # feedback: rows labelled false
    split_outputs: int = 0  # feedback: as many thumbs up as down

    def summary(self) -> str:
        """One line for pages and the CLI, e.g. "12 pairs from 9 rows; 3 rows tied, 5 rows unvoted left out"."""
        if self.kind == VoteDataset.PREFERENCE:
            made = f"{_n(self.examples, 'pair')} from {_n(self.rows, 'row')}"
            left = [f"{_n(self.tied_rows, 'row')} tied", f"{_n(self.unvoted_rows, 'row')} unvoted",
                    f"{_n(self.identical_pairs, 'pair')} of identical texts"]
        else:
            made = (f"{_n(self.examples, 'feedback row')} ({self.desirable} up, {self.undesirable} down) "
                    f"from {_n(self.rows, 'prompt')}")
            left = [f"{_n(self.split_outputs, 'output')} with split thumbs"]
        left.append(f"{_n(self.empty_outputs, 'empty output')}")
        shown = [part for part in left if not part.startswith("0 ")]
        return made + (f"; {', '.join(shown)} left out" if shown else "")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def is_chat_shaped(comparison: Comparison) -> bool:
    return any(row.get("turns") for row in comparison.prompt_set.rows)


def _prompt(row: dict[str, Any], chat: bool) -> Any:
    if not chat:
        return row.get("prompt", "")
    return row.get("turns") or [{"role": "user", "content": row.get("prompt", "")}]


def _answer(text: str, chat: bool) -> Any:
    return [{"role": "assistant", "content": text}] if chat else text


def _texts(comparison: Comparison) -> dict[tuple[int, str], str]:
    return {(row, column): text for row, column, text in comparison.cells.values_list("row", "column", "text")}


def preference_rows(comparison: Comparison) -> tuple[list[dict[str, Any]], Figures]:
    """The comparison's vote pairs, in row order and, within a row, strongest preference first."""
    figures = Figures(kind=VoteDataset.PREFERENCE)
    tallies: dict[int, Counter[str]] = defaultdict(Counter)
    voted: set[int] = set()
    for row, choice in comparison.votes.values_list("row", "choice"):
        figures.judgements += 1
        voted.add(row)
        if choice != Vote.TIE:
            tallies[row][choice] += 1
    texts, chat, keys = _texts(comparison), is_chat_shaped(comparison), [key for key, _ in comparison.columns()]
    pairs: list[dict[str, Any]] = []
    for index, prompt in enumerate(comparison.prompt_set.rows):
        if index not in voted:
            figures.unvoted_rows += 1
            continue
        row_pairs = []
        for winner in keys:
            for loser in keys:
                margin = tallies[index][winner] - tallies[index][loser]
                if margin <= 0:
                    continue
                chosen, rejected = texts.get((index, winner), ""), texts.get((index, loser), "")
                if not chosen.strip() or not rejected.strip():
                    figures.empty_outputs += 1
                elif chosen == rejected:
                    figures.identical_pairs += 1
                else:
                    row_pairs.append({"prompt": _prompt(prompt, chat), "chosen": _answer(chosen, chat),
                                      "rejected": _answer(rejected, chat), "weight": margin})
        if not any(tallies[index][key] != tallies[index][keys[0]] for key in keys):
            figures.tied_rows += 1
        figures.rows += bool(row_pairs)
        pairs += sorted(row_pairs, key=lambda pair: -pair["weight"])
    figures.examples = len(pairs)
    return pairs, figures


def feedback_rows(comparison: Comparison) -> tuple[list[dict[str, Any]], Figures]:
    """The comparison's thumbed outputs as unpaired feedback: label true where more thumbs went up than down."""
    figures = Figures(kind=VoteDataset.FEEDBACK)
    counts: dict[tuple[int, str], Counter[bool]] = defaultdict(Counter)
    for row, column, up in comparison.thumbs.values_list("row", "column", "up"):
        figures.judgements += 1
        counts[(row, column)][up] += 1
    texts, chat, prompts = _texts(comparison), is_chat_shaped(comparison), comparison.prompt_set.rows
    rows: list[dict[str, Any]] = []
    prompts_used: set[int] = set()
    for (index, column), count in sorted(counts.items()):
        text = texts.get((index, column), "")
        if count[True] == count[False]:
            figures.split_outputs += 1
        elif not text.strip():
            figures.empty_outputs += 1
        elif index < len(prompts):
            label = count[True] > count[False]
            rows.append({"prompt": _prompt(prompts[index], chat), "completion": _answer(text, chat), "label": label})
            prompts_used.add(index)
            figures.desirable += label
            figures.undesirable += not label
    figures.examples, figures.rows = len(rows), len(prompts_used)
    return rows, figures


def winning_adapter_id(comparison: Comparison) -> int | None:
    """The adapter whose column won the most votes: the adapter a DPO run on these votes starts from. None when
    no adapter won a vote, or the base won more than any adapter; level counts go to the column shown first."""
    wins = dict(comparison.votes.exclude(choice=Vote.TIE).values_list("choice").annotate(n=Count("id")))
    best = max((key for key, _ in comparison.columns()), key=lambda key: wins.get(key, 0), default=None)
    if best is None or best == BASE_KEY or not wins.get(best):
        return None
    adapters = {adapter.key: adapter.pk for adapter in comparison.job.adapters.all()} if comparison.job else {}
    return adapters.get(best)


def default_name(comparison: Comparison, kind: str) -> str:
    """`votes of <comparison>` (or `thumbs of …`), numbered when taken."""
    return unique_name(f"{'votes' if kind == VoteDataset.PREFERENCE else 'thumbs'} of {comparison}")


def make_dataset(comparison: Comparison, user: Any, kind: str, name: str = "") -> VoteDataset:
    """Build the rows, register them as a JSONL dataset (validated like an upload) and record its provenance;
    DatasetRefused, naming the field, when there is nothing to make or the name is taken."""
    if kind not in KINDS:
        raise DatasetRefused(f"kind must be one of {', '.join(KINDS)}; got {str(kind)[:40]!r}", "kind")
    if comparison.job is None or comparison.job.state != "succeeded":
        raise DatasetRefused("the comparison has not finished: its outputs are not complete", status=409)
    name = checked_name(name, default_name(comparison, kind))
    rows, figures = (preference_rows if kind == VoteDataset.PREFERENCE else feedback_rows)(comparison)
    return register_rows(kind, rows, figures, name, user, comparison=comparison, comparison_name=str(comparison)[:200],
                         winner_id=winning_adapter_id(comparison))


def register_rows(kind: str, rows: list[dict[str, Any]], figures: Figures, name: str, user: Any,
                  **provenance: Any) -> VoteDataset:
    """Register judged rows as a JSONL dataset (validated like an upload) with its provenance record."""
    if not rows:
        what = "votes" if kind == VoteDataset.PREFERENCE else "thumbs"
        raise DatasetRefused(f"the {what} give no rows: {figures.summary()}", status=409)
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    detected = validate_bytes(data, f"{kind}.jsonl", preview_rows=0).format
    if detected != kind:  # a format this server's validator does not know reads as another one
        raise DatasetRefused(f"this server cannot store {kind} datasets (the rows read as {detected or 'nothing'})",
                             "kind", status=422)
    try:
        with transaction.atomic():
            dataset = register_dataset(name, f"{kind}.jsonl", data, user=user)
            return VoteDataset.objects.create(
                dataset=dataset, kind=kind, judgements=figures.judgements, figures=dataclasses.asdict(figures),
                summary=figures.summary(), created_by=user, **provenance)
    except DatasetError as exc:  # a row the validator refuses
        raise DatasetRefused(str(exc), status=422) from exc


def checked_name(name: str, default: str) -> str:
    """The dataset's name (`default` when blank, numbered when taken); DatasetRefused naming `name` otherwise."""
    name = name.strip() or unique_name(default)
    if len(name) > 200:
        raise DatasetRefused("at most 200 characters", "name")
    if Dataset.objects.filter(name=name).exists():
        raise DatasetRefused(f"a dataset named {name!r} exists already: choose another name", "name")
    return name


def unique_name(stem: str) -> str:
    stem, name, n = stem[:180], stem[:180], 1
    while Dataset.objects.filter(name=name).exists():
        n += 1
        name = f"{stem} ({n})"
    return name


def chat_feedback_rows(session: ChatSession) -> tuple[list[dict[str, Any]], Figures]:
    """A chat's thumbed answers as unpaired feedback, as a comparison's thumbs give (`feedback_rows`): each with
    the conversation its column was answering (its own earlier answers), labelled by the majority."""
    from webapp.playground.chat import turn_payload

    figures = Figures(kind=VoteDataset.FEEDBACK)
    counts: dict[int, Counter[bool]] = defaultdict(Counter)
    for answer_id, up in ChatThumb.objects.filter(answer__message__session=session).values_list("answer_id", "up"):
        figures.judgements += 1
        counts[answer_id][up] += 1
    answers = ChatAnswer.objects.filter(pk__in=counts).select_related("message").order_by("message__index", "id")
    rows: list[dict[str, Any]] = []
    messages_used: set[int] = set()
    for answer in answers:
        count = counts[answer.pk]
        if count[True] == count[False]:
            figures.split_outputs += 1
        elif not answer.text.strip():
            figures.empty_outputs += 1
        else:
            label = count[True] > count[False]
            prompt = turn_payload(session, answer.message)["conversations"][answer.column]
            rows.append({"prompt": prompt, "completion": _answer(answer.text, True), "label": label})
            messages_used.add(answer.message.index)
            figures.desirable += label
            figures.undesirable += not label
    figures.examples, figures.rows = len(rows), len(messages_used)
    return rows, figures


def make_chat_dataset(session: ChatSession, user: Any, name: str = "") -> VoteDataset:
    """A feedback dataset (for KTO) of a chat's thumbs up and down; DatasetRefused when nothing is left or the
    name is taken."""
    name = checked_name(name, f"thumbs of {session}")
    rows, figures = chat_feedback_rows(session)
    return register_rows(VoteDataset.FEEDBACK, rows, figures, name, user, chat=session,
                         comparison_name=f"chat: {session}"[:200])
