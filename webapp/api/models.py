"""API keys (per user, hashed, scoped, expiring) and the stored outcome of POSTs made with an Idempotency-Key."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone

KEY_PREFIX = "tdk_"  # worker tokens start with "tdw_": the two kinds never reach each other's endpoints
SCOPES = ("read", "write", "admin")


def hash_key(raw: str) -> str:
    # Keys are 256-bit random strings: a plain sha256 is enough (no dictionary to guard against).
    return hashlib.sha256(raw.encode()).hexdigest()


def invalid_scopes(scopes: list[str]) -> str | None:
    """Why `scopes` are not a key's scopes, or None: an unknown scope, or none at all."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        return f"scopes must be some of {', '.join(SCOPES)}; got {', '.join(unknown) or 'none'}"
    return None


def refused_scopes(user: Any, scopes: list[str]) -> str | None:
    """Why `user` may not be given a new key with `scopes`, or None: an unknown scope, none at all, or admin for
    a user who is not staff (as the keys page offers it)."""
    invalid = invalid_scopes(scopes)
    if invalid:
        return invalid
    if "admin" in scopes and not user.is_staff:
        return f"the admin scope is for staff, and {user.get_username()} is not staff"
    return None


class ApiKey(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    # The first characters of the key, shown in lists so that a user can tell keys apart; never enough to use.
    prefix = models.CharField(max_length=16)
    key_hash = models.CharField(max_length=64, unique=True)
    scopes = models.JSONField(default=list)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    def issue(cls, user: Any, name: str, scopes: list[str], expires_at: datetime | None = None) -> tuple[ApiKey, str]:
        """Create a key and return it with its secret: the only time the secret is ever visible."""
        invalid = invalid_scopes(scopes)
        if invalid:
            raise ValueError(invalid)
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(user=user, name=name, prefix=raw[:12], key_hash=hash_key(raw),
                                 scopes=[s for s in SCOPES if s in scopes], expires_at=expires_at)
        return key, raw

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > timezone.now())

    def allows(self, scope: str) -> bool:
        """admin implies write, write implies read."""
        rank = {s: i for i, s in enumerate(SCOPES)}
        return any(rank[s] >= rank[scope] for s in self.scopes if s in rank)


class IdempotencyRecord(models.Model):
    """The first response to a POST with an Idempotency-Key, replayed for a retry with the same key."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    method = models.CharField(max_length=8)
    path = models.CharField(max_length=500)
    request_hash = models.CharField(max_length=64)  # the same key with another body is refused (422)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)  # None while the first is in flight
    response_body = models.BinaryField(default=b"")
    content_type = models.CharField(max_length=100, blank=True)
    headers = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "key"], name="idempotency_user_key")]

    def __str__(self) -> str:
        return f"{self.method} {self.path} [{self.key}]"
