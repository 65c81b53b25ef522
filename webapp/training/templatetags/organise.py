"""Tags, notes and usage on the pages that others own too: each a tag, so their templates need one line."""

from __future__ import annotations

from typing import Any

from django import template

from webapp.training.label_views import labels_context
from webapp.training.usage import run_usage

register = template.Library()


@register.inclusion_tag("training/partials/labels.html", takes_context=True)
def labels_editor(context: Any, obj: Any) -> dict[str, Any]:
    """A run's or an adapter's tags and note, with the inline editor for its owner or staff."""
    return {**labels_context(obj, context["request"].user), "csrf_token": context.get("csrf_token")}


@register.inclusion_tag("training/partials/tag_chips.html")
def tag_chips(obj: Any, list_url: str) -> dict[str, Any]:
    """The row's tags as chips, each a link to the list filtered by it (needs the rows' `tags` prefetched)."""
    return {"tags": sorted(tag.name for tag in obj.tags.all()), "list_url": list_url}


@register.inclusion_tag("training/partials/run_usage.html")
def usage_of_run(run: Any) -> dict[str, Any]:
    return {"usage": run_usage(run), "run": run}


@register.filter
def without(items: Any, item: Any) -> list[Any]:
    """The list but `item` (the tag filter once one of its chips is removed)."""
    return [x for x in items or [] if x != item]
