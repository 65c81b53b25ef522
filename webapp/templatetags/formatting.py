"""Template filters for the rules of workers/formatting.py, available in every template (TEMPLATES' builtins).

{{ loss|figure }} 0.693 · {{ rows|count }} 4,000 · {{ params|compact }} 1.24B · {{ share|percent }} 29.0% ·
{{ step|percent_of:total }} 45.0% · {{ bytes|size }} 4.9 GiB · {{ seconds|duration }} 3 h 05 min ·
{{ moment|timestamp }} 2026-12-05 07:10 UTC · {{ moment|when }}, {{ moment|ago }} and {{ moment|since }}:
a <time> element whose datetime attribute holds the full ISO 8601 value.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django import template
from django.utils.html import format_html
from django.utils.safestring import SafeString

from workers import formatting

register = template.Library()

register.filter("figure", formatting.figure)
register.filter("count", formatting.count)
register.filter("compact", formatting.compact)
register.filter("percent", formatting.percent)
register.filter("size", formatting.size)
register.filter("duration", formatting.duration)
register.filter("timestamp", formatting.timestamp)


@register.filter
def percent_of(part: Any, whole: Any) -> str:
    """part/whole as a percentage; "—" without a whole."""
    p, w = formatting.number(part), formatting.number(whole)
    return formatting.percent(p / w) if p is not None and w else formatting.MISSING


def _time(value: Any, text: str, title: str = "") -> SafeString | str:
    if formatting.as_datetime(value) is None:
        return formatting.MISSING if value in (None, "") else str(value)
    if title:
        return format_html('<time datetime="{}" title="{}">{}</time>', formatting.iso(value), title, text)
    return format_html('<time datetime="{}">{}</time>', formatting.iso(value), text)


@register.filter
def when(value: Any) -> SafeString | str:
    """<time datetime="2026-12-05T07:10:54Z">2026-12-05 07:10 UTC</time>"""
    return _time(value, formatting.timestamp(value))


@register.filter
def since(value: Any, now: datetime | None = None) -> SafeString | str:
    """How long since then, "12 min", with the timestamp as its title."""
    return _time(value, formatting.elapsed(value, now), formatting.timestamp(value))


@register.filter
def ago(value: Any, now: datetime | None = None) -> SafeString | str:
    """ "12 min ago", with the timestamp as its title."""
    return _time(value, f"{formatting.elapsed(value, now)} ago", formatting.timestamp(value))
