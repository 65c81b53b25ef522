from __future__ import annotations

from typing import Any

from django import template

from webapp.playground.views import cell_event

register = template.Library()


@register.filter
def get_item(mapping: Any, key: Any) -> Any:
    """mapping[key] in a template (dict lookups by a variable); empty when absent."""
    return mapping.get(key, "") if isinstance(mapping, dict) else ""


@register.simple_tag
def cell_event_name(row: int, column: str) -> str:
    return cell_event(row, column)
