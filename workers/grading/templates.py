"""Templates in grader definitions: `{{item.<field>}}` (a field of the dataset row, dotted into nested objects)
and `{{sample.output_text}}` (the completion being graded), as in OpenAI's graders."""

from __future__ import annotations

import json
import re
from typing import Any

PLACEHOLDER = re.compile(r"\{\{\s*(.*?)\s*\}\}")
ITEM_REFERENCE = re.compile(r"item\.([A-Za-z_][\w-]*)((?:\.[\w-]+)*)$")
SAMPLE_TEXT = "sample.output_text"
COMPLETION = "{{" + SAMPLE_TEXT + "}}"


def template_problem(template: str, fields: set[str] | None) -> str | None:
    """Why `template` cannot be rendered against rows with these fields (None: any field), or None when it can."""
    for match in PLACEHOLDER.finditer(template):
        reference = match.group(1)
        if reference == SAMPLE_TEXT:
            continue
        item = ITEM_REFERENCE.match(reference)
        if item is None:
            return f"unknown placeholder {match.group(0)}: use {{{{item.<field>}}}} or {COMPLETION}"
        if fields is not None and item.group(1) not in fields:
            known = ", ".join(sorted(fields)) or "none"
            return f"{match.group(0)} names no field of the rows (fields: {known})"
    return None


def render(template: str, completion: str, item: dict[str, Any]) -> str:
    """The template with its placeholders filled; a field missing from the row renders empty."""
    return PLACEHOLDER.sub(lambda match: _value(match.group(1), completion, item), template)


def _value(reference: str, completion: str, item: dict[str, Any]) -> str:
    if reference == SAMPLE_TEXT:
        return completion
    value: Any = item
    for key in reference.split(".")[1:]:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
