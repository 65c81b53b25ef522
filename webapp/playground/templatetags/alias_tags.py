from __future__ import annotations

from typing import Any

from django import template

from webapp.playground.alias_views import alias_context

register = template.Library()


@register.inclusion_tag("playground/partials/aliases.html", takes_context=True)
def alias_panel(context: Any, adapter: Any) -> dict[str, Any]:
    """The adapter page's Aliases section."""
    return {**alias_context(adapter), "csrf_token": context.get("csrf_token")}
