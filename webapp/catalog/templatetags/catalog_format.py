"""Number formats of the catalog pages."""

from __future__ import annotations

from django import template

register = template.Library()


@register.filter
def count(value: int | None) -> str:
    """1234567 -> 1.23M (parameter and token counts)."""
    if value is None:
        return "—"
    for divisor, unit in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if abs(value) >= divisor:
            return f"{value / divisor:.3g}{unit}"
    return str(value)


@register.filter
def gib(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**30:.1f} GiB"


@register.filter
def percent(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.1f}%"
