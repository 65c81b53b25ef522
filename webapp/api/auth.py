"""REST API authentication: per-user API keys as bearer tokens (scoped, expiring, revocable), or the session.

A worker token (tdw_…) is refused here with a message that says so: it reaches only the worker API.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from webapp.api.models import KEY_PREFIX, ApiKey, hash_key

LAST_USED_RESOLUTION = timedelta(minutes=1)  # last_used_at is written at most once a minute per key


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Any) -> tuple[Any, ApiKey] | None:
        header = request.headers.get("Authorization", "")
        scheme, _, raw = header.partition(" ")
        if scheme.lower() != "bearer" or not raw.strip():
            return None
        raw = raw.strip()
        if raw.startswith("tdw_"):
            raise exceptions.AuthenticationFailed("this is a worker token: it reaches only /api/worker/; use an API key")
        if not raw.startswith(KEY_PREFIX):
            raise exceptions.AuthenticationFailed("invalid API key")
        key = ApiKey.objects.select_related("user").filter(key_hash=hash_key(raw)).first()
        if key is None:
            raise exceptions.AuthenticationFailed("invalid API key")
        if key.revoked_at is not None:
            raise exceptions.AuthenticationFailed("this API key was revoked")
        if key.expires_at is not None and key.expires_at <= timezone.now():
            raise exceptions.AuthenticationFailed(f"this API key expired at {key.expires_at.isoformat()}")
        if not key.user.is_active:
            raise exceptions.AuthenticationFailed("the key's user is inactive")
        now = timezone.now()
        if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        return key.user, key

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="api"'  # makes DRF answer 401 (not 403) to an unauthenticated request


def scope_of(request: Any, admin: bool = False) -> str:
    """The scope a request needs: read for safe methods, write otherwise, admin where the view says so."""
    if admin:
        return "admin"
    return "read" if request.method in permissions.SAFE_METHODS else "write"


class ScopePermission(permissions.BasePermission):
    """Authenticated, and an API key must carry the scope the request needs (views set `admin_scope = True`
    for admin endpoints, which also need a staff user). Session users have every scope their account has."""

    def has_permission(self, request: Any, view: Any) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        admin = bool(getattr(view, "admin_scope", False))
        if admin and not user.is_staff:
            self.message = "this endpoint is for staff"
            return False
        key = request.auth if isinstance(request.auth, ApiKey) else None
        if key is not None:
            needed = scope_of(request, admin)
            if not key.allows(needed):
                self.message = f"this API key lacks the {needed!r} scope (it has: {', '.join(key.scopes)})"
                return False
        return True
