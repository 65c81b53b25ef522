"""Grader definitions by type: checked (every problem by its field path), built, described in one line.

A `multi` grader combines named sub-graders (any type, multi included) with a formula over their names;
`python` graders run user code and are refused unless the caller allows them.
"""

from __future__ import annotations

from typing import Any, Protocol

from workers.data.bounds import json_type
from workers.grading.base import BaseGrader, Grader, GraderError
from workers.grading.checks import Checker
from workers.grading.text import StringCheck

MAX_NAME = 64


class GraderType(Protocol):
    kind: str

    @staticmethod
    def check(c: Checker) -> None: ...

    @classmethod
    def from_definition(cls, name: str, definition: dict[str, Any]) -> BaseGrader: ...

    @staticmethod
    def describe(definition: dict[str, Any]) -> str: ...


TYPES: dict[str, type[GraderType]] = {kind.kind: kind for kind in (StringCheck,)}


def grader_problems(
    definition: dict, fields: set[str] | None = None, allow_python: bool = False, path: str = "grader"
) -> dict[str, str]:
    """Every problem of a grader definition, keyed by field path; `fields` are the dataset rows' fields that
    `{{item.<field>}}` templates may name (None: not checked). Empty when the definition is fine."""
    problems: dict[str, str] = {}
    _check(definition, Checker(definition, path, fields, problems), allow_python)
    return problems


def _check(definition: Any, c: Checker, allow_python: bool) -> None:
    if not isinstance(definition, dict):
        c.problems[c.path] = f"must be an object, got {json_type(definition)}"
        return
    name = c.text("name")
    if name is not None and len(name) > MAX_NAME:
        c.error("name", f"must be at most {MAX_NAME} characters")
    kind = definition.get("type")
    if kind not in TYPES:
        c.error("type", f"must be one of {', '.join(TYPES)}")
        return
    TYPES[kind].check(c)


def build_grader(definition: dict, allow_python: bool = False) -> Grader:
    """A grader ready to score; GraderError with every problem when the definition has any."""
    problems = grader_problems(definition, allow_python=allow_python)
    if problems:
        raise GraderError(problems)
    return _build(definition["name"], definition)


def _build(name: str, definition: dict[str, Any]) -> BaseGrader:
    return TYPES[definition["type"]].from_definition(name, definition)


def describe(definition: dict) -> str:
    """One line that says what a (valid) definition grades, for logs and pages."""
    return f"{definition['type']} {definition['name']}: {TYPES[definition['type']].describe(definition)}"
