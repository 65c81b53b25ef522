"""Graders that read structure from the completion: json (it parses, fits a schema, has the expected fields) and
numeric (its answer number is within tolerance of the reference)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from workers.data.bounds import json_type
from workers.grading.base import BaseGrader
from workers.grading.checks import Checker
from workers.grading.templates import COMPLETION, render, template_problem

# A number as people write it: sign, thousands separators, decimals, exponent ("-1,234.5", "3e-4", ".5").
NUMBER = re.compile(r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in `text` (where answers usually end up), or None."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def as_text(value: Any) -> str:
    """A JSON value as a template renders it: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _validator_class(schema: Any) -> Any:
    """jsonschema's validator for the schema's draft (imported only by graders that check a schema)."""
    from jsonschema.validators import validator_for

    return validator_for(schema)


class JsonOutput(BaseGrader):
    """0 unless the input parses as JSON and fits `schema` (when given); then 1, or with `fields` (a dotted path
    into the output → the expected value's template) the share of those fields that hold their expected value."""

    kind = "json"

    def __init__(self, name: str, input: str, schema: dict[str, Any] | None, fields: dict[str, str]):
        super().__init__(name)
        self.input, self.fields = input, fields
        self.validator = _validator_class(schema)(schema) if schema is not None else None

    @staticmethod
    def check(c: Checker) -> None:
        c.known("input", "schema", "fields")
        c.input()
        schema = c.definition.get("schema")
        if schema is not None:
            from jsonschema import SchemaError

            try:
                _validator_class(schema).check_schema(schema)
            except SchemaError as exc:
                where = "/".join(str(part) for part in exc.path)
                c.error("schema", f"not a valid JSON Schema{' at ' + where if where else ''}: {exc.message}")
        fields = c.definition.get("fields", {})
        if not isinstance(fields, dict):
            c.error("fields", f"must be an object of output field → expected value, got {json_type(fields)}")
            return
        for key, expected in fields.items():
            if not isinstance(expected, str):
                c.error(f"fields.{key}", f"must be a string template, got {json_type(expected)}")
            elif problem := template_problem(expected, c.fields):
                c.error(f"fields.{key}", problem)

    @classmethod
    def from_definition(cls, name: str, definition: dict[str, Any]) -> JsonOutput:
        return cls(name, definition.get("input", COMPLETION), definition.get("schema"), definition.get("fields", {}))

    @staticmethod
    def describe(definition: dict[str, Any]) -> str:
        what = f"{definition.get('input', COMPLETION)} parses as JSON"
        if "schema" in definition:
            what += " fitting its schema"
        if definition.get("fields"):
            what += f", fields {', '.join(definition['fields'])} as expected"
        return what

    def score_one(self, completion: str, item: dict) -> float:
        try:
            value = json.loads(render(self.input, completion, item))
        except ValueError:
            return 0.0
        if self.validator is not None and not self.validator.is_valid(value):
            return 0.0
        if not self.fields:
            return 1.0
        hits = sum(_holds(value, path, render(expected, completion, item)) for path, expected in self.fields.items())
        return hits / len(self.fields)


def _holds(value: Any, path: str, expected: str) -> bool:
    """Whether the output has `expected` at the dotted `path`."""
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value is not None and as_text(value) == expected


class Numeric(BaseGrader):
    """1 when the input's answer number is within `tolerance` (absolute) or `relative_tolerance` (a share of the
    reference) of the reference's number; else 0. The answer is the last number in the input, or in the last
    match of `pattern` (its first group when it has one)."""

    kind = "numeric"

    def __init__(
        self, name: str, input: str, reference: str, pattern: re.Pattern[str] | None, absolute: float, relative: float
    ):
        super().__init__(name)
        self.input, self.reference, self.pattern = input, reference, pattern
        self.absolute, self.relative = absolute, relative

    @staticmethod
    def check(c: Checker) -> None:
        c.known("input", "reference", "pattern", "tolerance", "relative_tolerance")
        c.input()
        c.template("reference")
        c.number("tolerance", minimum=0)
        c.number("relative_tolerance", minimum=0)
        if "pattern" in c.definition and (pattern := c.text("pattern")) is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                c.error("pattern", f"not a valid regular expression: {exc}")

    @classmethod
    def from_definition(cls, name: str, definition: dict[str, Any]) -> Numeric:
        pattern = re.compile(definition["pattern"]) if "pattern" in definition else None
        return cls(
            name,
            definition.get("input", COMPLETION),
            definition["reference"],
            pattern,
            float(definition.get("tolerance", 0)),
            float(definition.get("relative_tolerance", 0)),
        )

    @staticmethod
    def describe(definition: dict[str, Any]) -> str:
        within = [f"±{definition['tolerance']:g}"] if definition.get("tolerance") else []
        if definition.get("relative_tolerance"):
            within.append(f"±{definition['relative_tolerance']:g}×")
        return f"number in {definition.get('input', COMPLETION)} = {definition['reference']}" + (
            f" within {' or '.join(within)}" if within else ""
        )

    def answer(self, text: str) -> float | None:
        if self.pattern is None:
            return last_number(text)
        matches = list(self.pattern.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        return last_number(last.group(1) if self.pattern.groups else last.group(0))

    def score_one(self, completion: str, item: dict) -> float:
        reference = last_number(render(self.reference, completion, item))
        if reference is None:
            self.note(f"reference {render(self.reference, completion, item)[:80]!r} holds no number")
            return 0.0
        answer = self.answer(render(self.input, completion, item))
        if answer is None:
            return 0.0
        return float(math.isclose(answer, reference, rel_tol=self.relative, abs_tol=self.absolute))
