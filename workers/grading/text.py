"""Graders of text against text: string_check (equality or containment), text_similarity (fuzzy match, BLEU,
ROUGE-L), regex (a pattern matches) and length (the completion's length within bounds)."""

from __future__ import annotations

import re
from typing import Any

from workers.grading.base import BaseGrader
from workers.grading.checks import Checker
from workers.grading.similarity import METRICS
from workers.grading.templates import COMPLETION, render

STRING_OPERATIONS = ("eq", "ne", "like", "ilike")
REGEX_MATCHES = ("partial", "full")
LENGTH_UNITS = ("characters", "words")


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


class TextSimilarity(BaseGrader):
    """The similarity of input and reference by `evaluation_metric`; with `pass_threshold`, a pass (1) or fail (0)."""

    kind = "text_similarity"

    def __init__(self, name: str, input: str, reference: str, metric: str, pass_threshold: float | None):
        super().__init__(name)
        self.input, self.reference = input, reference
        self.metric, self.pass_threshold = METRICS[metric], pass_threshold

    @staticmethod
    def check(c: Checker) -> None:
        c.known("input", "reference", "evaluation_metric", "pass_threshold")
        c.input()
        c.template("reference")
        c.choice("evaluation_metric", tuple(METRICS))
        c.number("pass_threshold", minimum=0, maximum=1)

    @classmethod
    def from_definition(cls, name: str, definition: dict[str, Any]) -> TextSimilarity:
        return cls(
            name,
            definition.get("input", COMPLETION),
            definition["reference"],
            definition["evaluation_metric"],
            definition.get("pass_threshold"),
        )

    @staticmethod
    def describe(definition: dict[str, Any]) -> str:
        threshold = definition.get("pass_threshold")
        passing = f", passes at {threshold:g}" if threshold is not None else ""
        return (
            f"{definition['evaluation_metric']} of {definition.get('input', COMPLETION)} "
            f"against {definition['reference']}{passing}"
        )

    def score_one(self, completion: str, item: dict) -> float:
        similarity = self.metric(render(self.input, completion, item), render(self.reference, completion, item))
        if self.pass_threshold is None:
            return similarity
        return float(similarity >= self.pass_threshold)


class RegexMatch(BaseGrader):
    """1 when `pattern` matches the input (anywhere, or the whole of it with `match: full`); else 0."""

    kind = "regex"

    def __init__(self, name: str, input: str, pattern: re.Pattern[str], full: bool):
        super().__init__(name)
        self.input, self.pattern, self.full = input, pattern, full

    @staticmethod
    def check(c: Checker) -> None:
        c.known("input", "pattern", "match", "ignore_case")
        c.input()
        c.choice("match", REGEX_MATCHES, "partial")
        c.flag("ignore_case")
        pattern = c.text("pattern")
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                c.error("pattern", f"not a valid regular expression: {exc}")

    @classmethod
    def from_definition(cls, name: str, definition: dict[str, Any]) -> RegexMatch:
        flags = re.IGNORECASE if definition.get("ignore_case", False) else 0
        return cls(
            name,
            definition.get("input", COMPLETION),
            re.compile(definition["pattern"], flags),
            definition.get("match", "partial") == "full",
        )

    @staticmethod
    def describe(definition: dict[str, Any]) -> str:
        how = "matches all of" if definition.get("match") == "full" else "found in"
        return f"/{definition['pattern']}/ {how} {definition.get('input', COMPLETION)}"

    def score_one(self, completion: str, item: dict) -> float:
        text = render(self.input, completion, item)
        found = self.pattern.fullmatch(text) if self.full else self.pattern.search(text)
        return float(found is not None)


class Length(BaseGrader):
    """1 when the input's length (characters or words) is within [min, max]; outside, 0, or with `falloff`
    a linear decay that reaches 0 `falloff` units beyond the bound (a soft pull towards the range)."""

    kind = "length"

    def __init__(self, name: str, input: str, unit: str, bounds: tuple[float, float], falloff: float):
        super().__init__(name)
        self.input, self.words, self.falloff = input, unit == "words", falloff
        self.min, self.max = bounds

    @staticmethod
    def check(c: Checker) -> None:
        c.known("input", "unit", "min", "max", "falloff")
        c.input()
        c.choice("unit", LENGTH_UNITS, "characters")
        low, high = c.number("min", minimum=0), c.number("max", minimum=0)
        if "min" not in c.definition and "max" not in c.definition:
            c.error("max", "set min, max or both")
        elif low is not None and high is not None and low > high:
            c.error("max", f"must be at least min ({low:g})")
        c.number("falloff", minimum=0)

    @classmethod
    def from_definition(cls, name: str, definition: dict[str, Any]) -> Length:
        bounds = (float(definition.get("min", 0)), float(definition.get("max", float("inf"))))
        unit = definition.get("unit", "characters")
        return cls(name, definition.get("input", COMPLETION), unit, bounds, float(definition.get("falloff", 0)))

    @staticmethod
    def describe(definition: dict[str, Any]) -> str:
        low, high = definition.get("min", 0), definition.get("max", "∞")
        falloff = f", falling off over {definition['falloff']:g}" if definition.get("falloff") else ""
        return f"{low}–{high} {definition.get('unit', 'characters')} of {definition.get('input', COMPLETION)}{falloff}"

    def score_one(self, completion: str, item: dict) -> float:
        text = render(self.input, completion, item)
        size = len(text.split()) if self.words else len(text)
        distance = max(self.min - size, size - self.max, 0)
        if distance == 0:
            return 1.0
        if not self.falloff:
            return 0.0
        return max(0.0, 1 - distance / self.falloff)
