"""Reading a grader definition field by field, every problem kept under its path ("grader.reference")."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from workers.data.bounds import json_type
from workers.grading.templates import COMPLETION, template_problem

COMMON_KEYS = ("type", "name")


@dataclass
class Checker:
    definition: dict[str, Any]
    path: str
    fields: set[str] | None = None
    problems: dict[str, str] = field(default_factory=dict)

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def error(self, key: str, message: str) -> None:
        self.problems.setdefault(self.at(key), message)

    def known(self, *keys: str) -> None:
        """Every key outside COMMON_KEYS and `keys` is a problem (a misspelt field would silently be ignored)."""
        allowed = (*COMMON_KEYS, *keys)
        for key in self.definition:
            if key not in allowed:
                self.error(str(key), f"unknown field (this grader takes {', '.join(allowed)})")

    def text(self, key: str, default: str | None = None) -> str | None:
        """A non-empty string; required when there is no default."""
        value = self.definition.get(key, default)
        if value is None:
            self.error(key, "missing")
        elif not isinstance(value, str):
            self.error(key, f"must be a string, got {json_type(value)}")
        elif not value.strip():
            self.error(key, "must not be empty")
        else:
            return value
        return None

    def template(self, key: str, default: str | None = None) -> str | None:
        value = self.text(key, default)
        if value is not None and (problem := template_problem(value, self.fields)):
            self.error(key, problem)
        return value

    def input(self) -> str | None:
        """The text graded: the completion unless the definition says otherwise."""
        return self.template("input", COMPLETION)

    def choice(self, key: str, allowed: tuple[str, ...], default: str | None = None) -> str | None:
        value = self.definition.get(key, default)
        if value is None:
            self.error(key, f"missing (one of {', '.join(allowed)})")
        elif value not in allowed:
            self.error(key, f"must be one of {', '.join(allowed)}")
        else:
            return str(value)
        return None

    def number(
        self, key: str, default: float | None = None, minimum: float | None = None, maximum: float | None = None
    ) -> float | None:
        """A finite number within [minimum, maximum]; optional when the default is None and the key is absent."""
        value = self.definition.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.error(key, f"must be a number, got {json_type(value)}")
            return None
        if minimum is not None and value < minimum:
            self.error(key, f"must be at least {minimum:g}")
        elif maximum is not None and value > maximum:
            self.error(key, f"must be at most {maximum:g}")
        else:
            return float(value)
        return None

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.definition.get(key, default)
        if not isinstance(value, bool):
            self.error(key, f"must be true or false, got {json_type(value)}")
            return default
        return value
