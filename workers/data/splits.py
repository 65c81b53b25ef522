"""Which rows a job scores: a dataset's prompts with their reference answers, and the rows a training run held out.

The held-out draw is defined once, here: training leaves those rows out and evaluations of its adapter score them.
"""

from __future__ import annotations

import random
from typing import Any

from workers.contract.jobrunner import RunnerError
from workers.contract.jobspecs import PromptRow
from workers.data.prompts import prompt_row


def eval_rows(fmt: str, rows: list[dict[str, Any]], name: str = "dataset") -> list[PromptRow]:
    """Prompt and reference answer of each trl row (workers.data.prompts.prompt_row); a dataset without reference
    answers is refused."""
    if fmt == "text":
        raise RunnerError(
            f"{name}: plain text rows have no reference answers to score; evaluation needs prompt/completion, "
            "instruction/output (alpaca), chat rows (messages, conversations) ending with an assistant turn, "
            "preference pairs (scored against the chosen answer) or feedback rows (against the answers labelled true)"
        )
    try:
        return [prompt_row(row, number) for number, row in enumerate(rows, start=1)]
    except ValueError as exc:
        raise RunnerError(f"{name}: {exc}") from exc


def held_out_indices(count: int, fraction: float, seed: int) -> list[int]:
    """Indices (ascending) of the rows a training run with this eval_fraction and seed held out.

    The draw training makes (workers.training.train): shuffle range(count) with random.Random(seed), take the
    first round(count * fraction) (at least one)."""
    held = max(1, round(count * fraction))
    if held >= count:
        raise RunnerError(f"eval_fraction {fraction} leaves no training rows out of {count}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return sorted(order[:held])
