"""Blind votes on a comparison: the one set of rules the vote page and the REST API both follow.

Who may vote: every signed-in, active teammate (everyone on the team sees every comparison). A vote needs
the comparison's job to have succeeded, a row that exists, and one of the row's outputs or a tie; one vote
per person per row (the database's unique constraint decides a race). A voter sees a row's outputs in an
order shuffled for them and for that row (`Comparison.blind_order`, keyed with the server's secret so that no
one can replay it from the ids), under neutral option letters, and sees the names only once they have voted
on that row: a voted row says nothing about where each column stands on the others.
"""

from __future__ import annotations

import string
from typing import Any

from django.db import IntegrityError, transaction

from webapp.playground.models import Comparison, ComparisonCell, Vote

OPTION_LETTERS = string.ascii_uppercase  # a comparison has at most 9 columns (the base and 8 adapters)


class VoteRefused(Exception):
    """Why a vote was not taken: an HTTP status, a message, and the field it is about (None: the vote as a whole)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def may_vote(user: Any) -> bool:
    return bool(user is not None and user.is_authenticated and user.is_active)


def is_open(comparison: Comparison) -> bool:
    """Voting opens once every output is complete: the comparison's job has succeeded."""
    return comparison.job is not None and comparison.job.state == "succeeded"


def row_count(comparison: Comparison) -> int:
    return len(comparison.prompt_set.rows)


def check_row(comparison: Comparison, row: Any) -> int:
    """The row index (0-based, as a whole number or its digits), or a 400 naming the field `row`."""
    text = str(row) if isinstance(row, int | str) and not isinstance(row, bool) else ""
    count = row_count(comparison)
    if not text.isascii() or not text.isdigit() or int(text) >= count:
        raise VoteRefused(400, f"no row {str(row)[:40]} in this comparison (rows 0 to {count - 1})", "row")
    return int(text)


def options(comparison: Comparison, user_id: int, row: int) -> list[tuple[str, str]]:
    """(letter, column key) of a row's outputs in the voter's blind order."""
    return list(zip(OPTION_LETTERS, comparison.blind_order(user_id, row), strict=False))


def key_of_option(comparison: Comparison, user_id: int, row: int, option: Any) -> str:
    """The column key behind an option letter of the voter's ballot (or `tie`); a 400 naming `option` else."""
    letters = dict(options(comparison, user_id, row))
    text = option.strip() if isinstance(option, str) else ""
    if text.lower() == Vote.TIE:
        return Vote.TIE
    if text.upper() in letters:
        return letters[text.upper()]
    allowed = ", ".join([*letters, Vote.TIE])
    raise VoteRefused(400, f"pick one of {allowed}; got {str(option)[:40]!r}", "option")


def cast(comparison: Comparison, user: Any, row: Any, choice: str, choice_field: str = "choice") -> Vote:
    """Record `user`'s vote on `row` for the column `choice` (a key, or `tie`), or raise VoteRefused."""
    if not may_vote(user):
        raise VoteRefused(403, "only signed-in teammates can vote")
    index = check_row(comparison, row)
    if choice != Vote.TIE and choice not in {key for key, _ in comparison.columns()}:
        raise VoteRefused(400, "pick one of the outputs, or a tie", choice_field)
    if not is_open(comparison):
        state = comparison.job.state if comparison.job else "without a job"
        raise VoteRefused(409, f"the comparison has not finished (it is {state}): vote once every output is complete")
    try:
        with transaction.atomic():
            return Vote.objects.create(comparison=comparison, row=index, user=user, choice=choice)
    except IntegrityError:
        raise VoteRefused(
            409, f"you already voted on row {index} (prompt {index + 1}): one vote per person per row"
        ) from None


def ballot_row(
    comparison: Comparison, user: Any, index: int, cells: dict[tuple[int, str], ComparisonCell], choice: str | None
) -> dict[str, Any]:
    """One row as `user` sees it: the prompt, the outputs in their blind order, the names once they voted.

    Each option carries its column key (the page's form posts it); the API shows it only for voted rows."""
    prompt = comparison.prompt_set.rows[index]
    labels = dict(comparison.columns())
    return {
        "index": index,
        "prompt": prompt.get("prompt", ""),
        "reference": prompt.get("reference", ""),
        "choice": choice,
        "choice_label": "Tie" if choice == Vote.TIE else labels.get(choice or "", ""),
        "options": [
            {
                "n": n,
                "letter": letter,
                "key": key,
                "label": labels[key] if choice else "",
                "cell": cells.get((index, key)),
            }
            for n, (letter, key) in enumerate(options(comparison, user.pk, index), start=1)
        ],
    }


def ballot(comparison: Comparison, user: Any, rows: list[int] | None = None) -> list[dict[str, Any]]:
    """`user`'s ballot: every row (or those listed), each with their own vote where they cast one."""
    indexes = list(range(row_count(comparison))) if rows is None else rows
    cells = {(c.row, c.column): c for c in comparison.cells.filter(row__in=indexes)}
    votes = dict(comparison.votes.filter(user=user, row__in=indexes).values_list("row", "choice"))
    return [ballot_row(comparison, user, i, cells, votes.get(i)) for i in indexes]
