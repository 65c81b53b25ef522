"""Grader definitions by type: checked (every problem by its field path), built, described in one line.

A `multi` grader combines named sub-graders (any type, multi included) with a formula over their names;
`python` graders run user code and are refused unless the caller allows them.
"""

from __future__ import annotations

import keyword
from typing import Any, Protocol

from workers.data.bounds import json_type
from workers.grading.base import BaseGrader, Grader, GraderError, unit_score
from workers.grading.checks import Checker
from workers.grading.formula import FUNCTIONS, FormulaError, evaluate, parse_formula
from workers.grading.judge import ScoreModel
from workers.grading.sandbox import PythonGrader
from workers.grading.structured import JsonOutput, Numeric
from workers.grading.text import Length, RegexMatch, StringCheck, TextSimilarity

MAX_NAME = 64
MAX_PARTS = 16


class GraderType(Protocol):
    kind: str

    @staticmethod
    def check(c: Checker) -> None: ...

    @classmethod
    def from_definition(cls, name: str, definition: dict[str, Any]) -> BaseGrader: ...

    @staticmethod
    def describe(definition: dict[str, Any]) -> str: ...


class Multi(BaseGrader):
    """Named sub-graders combined by `calculate_output`, e.g. "0.7 * correct + 0.3 * brief", clipped to [0, 1].
    After each batch, `part_scores` holds every sub-grader's scores (per-grader metrics without scoring twice)."""

    kind = "multi"

    def __init__(self, name: str, graders: dict[str, BaseGrader], formula: str):
        super().__init__(name)
        self.graders, self.formula = graders, formula
        self.tree = parse_formula(formula, set(graders))
        self.part_scores: dict[str, list[float]] = {}

    def parts(self) -> list[Grader]:
        return list(self.graders.values())

    def score_batch(self, completions: list[str], items: list[dict]) -> list[float]:
        self.errors = []
        self.part_scores = {name: g.score_batch(completions, items) for name, g in self.graders.items()}
        for name, grader in self.graders.items():
            for error in grader.errors:
                self.note(f"{name}: {error}")
        return [
            unit_score(evaluate(self.tree, {name: scores[index] for name, scores in self.part_scores.items()}))
            for index in range(len(completions))
        ]


TYPES: dict[str, type[GraderType]] = {
    kind.kind: kind
    for kind in (StringCheck, TextSimilarity, RegexMatch, JsonOutput, Numeric, Length, ScoreModel, PythonGrader)
}
KINDS = (*TYPES, Multi.kind)


def grader_problems(
    definition: dict, fields: set[str] | None = None, allow_python: bool = False, path: str = "grader"
) -> dict[str, str]:
    """Every problem of a grader definition, keyed by field path; `fields` are the dataset rows' fields that
    `{{item.<field>}}` templates may name (None: not checked). Empty when the definition is fine."""
    problems: dict[str, str] = {}
    _check(Checker(definition, path, fields, problems), allow_python, key=None)
    return problems


def _check(c: Checker, allow_python: bool, key: str | None) -> None:
    """A top-level definition must have a name; a multi's sub-grader is named by its key (a name, if given, must
    be the same)."""
    if not isinstance(c.definition, dict):
        c.problems[c.path] = f"must be an object, got {json_type(c.definition)}"
        return
    if key is None or "name" in c.definition:
        name = c.text("name")
        if name is not None and len(name) > MAX_NAME:
            c.error("name", f"must be at most {MAX_NAME} characters")
        elif name is not None and key is not None and name != key:
            c.error("name", f"must be its key in graders ({key!r}) or left out")
    kind = c.definition.get("type")
    if kind not in KINDS:
        c.error("type", f"must be one of {', '.join(KINDS)}")
    elif kind == PythonGrader.kind and not allow_python:
        c.error("type", "python graders run user code, which this server does not allow")
    elif kind == Multi.kind:
        _check_multi(c, allow_python)
    else:
        TYPES[kind].check(c)


def _check_multi(c: Checker, allow_python: bool) -> None:
    c.known("graders", "calculate_output")
    graders = c.definition.get("graders")
    if not isinstance(graders, dict) or not graders:
        c.error("graders", "must be an object of name → grader definition, with at least one grader")
        graders = {}
    elif len(graders) > MAX_PARTS:
        c.error("graders", f"at most {MAX_PARTS} graders")
    for key, definition in graders.items():
        if not key.isidentifier() or keyword.iskeyword(key) or key in FUNCTIONS:
            c.error(f"graders.{key}", "the name must be a word of letters, digits and _ (the formula refers to it)")
            continue
        _check(Checker(definition, c.at(f"graders.{key}"), c.fields, c.problems), allow_python, key=key)
    formula = c.text("calculate_output")
    if formula is not None:
        try:
            parse_formula(formula, set(graders))
        except FormulaError as exc:
            c.error("calculate_output", str(exc))


def build_grader(definition: dict, allow_python: bool = False) -> Grader:
    """A grader ready to score; GraderError with every problem when the definition has any."""
    problems = grader_problems(definition, allow_python=allow_python)
    if problems:
        raise GraderError(problems)
    return _build(definition["name"], definition)


def _build(name: str, definition: dict[str, Any]) -> BaseGrader:
    if definition["type"] == Multi.kind:
        parts = {key: _build(key, part) for key, part in definition["graders"].items()}
        return Multi(name, parts, definition["calculate_output"])
    return TYPES[definition["type"]].from_definition(name, definition)


def describe(definition: dict) -> str:
    """One line that says what a (valid) definition grades, for logs and pages."""
    return f"{definition['type']} {definition['name']}: {_summary(definition)}"


def _summary(definition: dict[str, Any]) -> str:
    if definition["type"] == Multi.kind:
        parts = "; ".join(f"{key} = {part['type']} {_summary(part)}" for key, part in definition["graders"].items())
        return f"{definition['calculate_output']} where {parts}"
    return TYPES[definition["type"]].describe(definition)
