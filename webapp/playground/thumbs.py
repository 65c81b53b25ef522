"""Thumbs up or down on single outputs of a comparison: the one set of rules the grid and the REST API follow.

Who may give them: every signed-in, active teammate (as for votes). An output takes thumbs once the comparison's
job has succeeded (its text is final); one thumb per person per output, which they may turn over or take back.
Thumbs are not blind: they are given on the grid, where the columns are named. They become unpaired feedback rows
(playground.votedata), the data KTO trains on.
"""

from __future__ import annotations

from typing import Any

from webapp.playground import votes
from webapp.playground.models import Comparison, Thumb

UP, DOWN, NONE = "up", "down", "none"
VALUES = (UP, DOWN, NONE)


def check_column(comparison: Comparison, column: Any) -> str:
    keys = [key for key, _ in comparison.columns()]
    if column not in keys:
        raise votes.VoteRefused(400, f"no column {str(column)[:40]!r} in this comparison (one of {', '.join(keys)})",
                                "column")
    return str(column)


def give(comparison: Comparison, user: Any, row: Any, column: Any, value: Any) -> Thumb | None:
    """Set `user`'s thumb on one output: `up`, `down`, or `none` to take it back (None is returned then);
    votes.VoteRefused naming the field otherwise."""
    if not votes.may_vote(user):
        raise votes.VoteRefused(403, "only signed-in teammates can give thumbs")
    index = votes.check_row(comparison, row)
    key = check_column(comparison, column)
    if value not in VALUES:
        raise votes.VoteRefused(400, f"one of {', '.join(VALUES)}; got {str(value)[:40]!r}", "value")
    if not votes.is_open(comparison):
        state = comparison.job.state if comparison.job else "without a job"
        raise votes.VoteRefused(409, f"the comparison has not finished (it is {state}): its outputs are not final")
    if value == NONE:
        Thumb.objects.filter(comparison=comparison, row=index, column=key, user=user).delete()
        return None
    thumb, _ = Thumb.objects.update_or_create(comparison=comparison, row=index, column=key, user=user,
                                              defaults={"up": value == UP})
    return thumb


def tallies(comparison: Comparison, user: Any) -> dict[tuple[int, str], dict[str, Any]]:
    """Per output (row, column): thumbs up, thumbs down, and the user's own (`up`, `down` or None)."""
    out: dict[tuple[int, str], dict[str, Any]] = {}
    for row, column, up, user_id in comparison.thumbs.values_list("row", "column", "up", "user_id"):
        tally = out.setdefault((row, column), {"up": 0, "down": 0, "mine": None})
        tally[UP if up else DOWN] += 1
        if user_id == user.pk:
            tally["mine"] = UP if up else DOWN
    return out


def tally(comparison: Comparison, user: Any, row: int, column: str) -> dict[str, Any]:
    return tallies(comparison, user).get((row, column), {"up": 0, "down": 0, "mine": None})
