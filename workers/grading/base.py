"""What every grader is: a named reward function of a completion and its dataset row, in [0, 1].

A grader never raises on what a model wrote: output it cannot read scores 0, and the reason goes to `errors`
(the last batch's problems, for the job log). Definitions are checked before a grader is built, so a
`GraderError` names every problem of a definition by its field path.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

MAX_ERRORS = 20  # problems kept per batch: enough to see a pattern in the job log without flooding it


class GraderError(ValueError):
    """A grader definition with problems, keyed by field path (e.g. "grader.graders.accuracy.operation")."""

    def __init__(self, problems: dict[str, str]):
        self.problems = problems
        first = "; ".join(f"{path}: {message}" for path, message in list(problems.items())[:3])
        more = len(problems) - 3
        super().__init__(first + (f" (and {more} more)" if more > 0 else ""))


@runtime_checkable
class Grader(Protocol):
    name: str
    errors: list[str]

    def score(self, completion: str, item: dict) -> float: ...

    def score_batch(self, completions: list[str], items: list[dict]) -> list[float]: ...

    def parts(self) -> list[Grader]: ...


class BaseGrader:
    """Scores one completion at a time; graders that gain from batching override `score_batch`."""

    kind = ""

    def __init__(self, name: str):
        self.name = name
        self.errors: list[str] = []

    def score(self, completion: str, item: dict) -> float:
        return self.score_batch([completion], [item])[0]

    def score_batch(self, completions: list[str], items: list[dict]) -> list[float]:
        self.errors = []
        return [self.score_one(completion, item) for completion, item in zip(completions, items, strict=True)]

    def score_one(self, completion: str, item: dict) -> float:
        raise NotImplementedError

    def parts(self) -> list[Grader]:
        return [self]

    def note(self, message: str) -> None:
        """Keep a problem of this batch for the job log."""
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)


def unit_score(value: float) -> float:
    """A reward clipped into [0, 1]; NaN (an undefined score) is 0."""
    if math.isnan(value):
        return 0.0
    return min(1.0, max(0.0, float(value)))
