"""Graders of text against text: string_check (equality or containment), text_similarity (fuzzy match, BLEU,
ROUGE-L), regex (a pattern matches) and length (the completion's length within bounds)."""

from __future__ import annotations

from typing import Any

from workers.grading.base import BaseGrader
from workers.grading.checks import Checker
from workers.grading.templates import COMPLETION, render

STRING_OPERATIONS = ("eq", "ne", "like", "ilike")


class StringCheck(BaseGrader):
    """1 when the rendered input and reference compare as `operation` says: eq, ne, like (the input contains the
    reference), ilike (contains, ignoring case); else 0."""

    kind = "string_check"

    def __init__(self, name: str, input: str, reference: str, operation: str):
        super().__init__(name)
        self.input, self.reference, self.operation = input, reference, operation

    @staticmethod
    def check(c: Checker) -> None:
        c.known("input", "reference", "operation")
        c.input()
        c.template("reference")
        c.choice("operation", STRING_OPERATIONS)

    @classmethod
    def from_definition(cls, name: str, definition: dict[str, Any]) -> StringCheck:
        return cls(name, definition.get("input", COMPLETION), definition["reference"], definition["operation"])

    @staticmethod
    def describe(definition: dict[str, Any]) -> str:
        return f"{definition.get('input', COMPLETION)} {definition['operation']} {definition['reference']}"

    def score_one(self, completion: str, item: dict) -> float:
        got, want = render(self.input, completion, item), render(self.reference, completion, item)
        if self.operation == "eq":
            return float(got == want)
        if self.operation == "ne":
            return float(got != want)
        if self.operation == "like":
            return float(want in got)
        return float(want.casefold() in got.casefold())
