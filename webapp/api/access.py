"""Who may see and who may change what through the API: the one place that decides it.

Today everyone on the team sees every run, adapter and job (as in the browser); only a job's owner or
staff change it. A tighter rule (teams, projects) changes `visible` alone, and every list and lookup follows.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet


def visible(user: Any, queryset: QuerySet[Any]) -> QuerySet[Any]:
    """The rows of `queryset` that `user` may see: every list and every lookup by id goes through here."""
    if not (user and user.is_authenticated):
        return queryset.none()
    return queryset


def can_change(user: Any, owner_id: int | None) -> bool:
    return bool(user and user.is_authenticated and (user.is_staff or owner_id == user.pk))


def check_can_change(user: Any, owner_id: int | None, noun: str) -> None:
    """403 unless the user owns the thing or is staff."""
    if not can_change(user, owner_id):
        raise PermissionDenied(f"only the {noun}'s owner or an admin can do this")
