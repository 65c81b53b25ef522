from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

TOKEN_PREFIX = "tdw_"


def hash_token(token: str) -> str:
    # Tokens are 256-bit random strings, so a plain sha256 is enough (no dictionary to guard against).
    return hashlib.sha256(token.encode()).hexdigest()


class WorkerState(models.TextChoices):
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"
    # An admin drained it: it finishes its jobs and takes no new ones until resumed (heartbeats keep it so).


class Worker(models.Model):
    name = models.SlugField(max_length=100, unique=True)
    # Only hashes are stored. A revoked worker has no token; after a rotation the previous token stays
    # valid until previous_token_expires (the overlap window), then is refused.
    token_hash = models.CharField(max_length=64, unique=True, null=True, blank=True)
    previous_token_hash = models.CharField(max_length=64, unique=True, null=True, blank=True)
    previous_token_expires = models.DateTimeField(null=True, blank=True)
    token_issued_at = models.DateTimeField(null=True, blank=True)
    labels = models.JSONField(default=list, blank=True)
    # Optional limits set by an admin: at most this much GPU memory per job (bytes), at most this many jobs at once.
    max_gpu_bytes = models.BigIntegerField(null=True, blank=True)
    max_jobs = models.PositiveSmallIntegerField(null=True, blank=True)
    state = models.CharField(max_length=16, choices=WorkerState.choices, default=WorkerState.OFFLINE)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    inventory = models.JSONField(default=dict, blank=True)
    # Recent telemetry samples from heartbeats, oldest first: [{"t": epoch_s, "gpus": [{"memory_used", "utilization"}]}].
    telemetry = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def set_new_token(self) -> str:
        """Give the worker a fresh token and return it: the only time it is ever visible."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.token_hash = hash_token(token)
        self.token_issued_at = timezone.now()
        return token

    def rotate_token(self, overlap_seconds: int) -> str:
        """A new token; the current one stays valid for overlap_seconds so the machine can be switched over."""
        if self.token_hash:
            self.previous_token_hash = self.token_hash
            self.previous_token_expires = timezone.now() + timedelta(seconds=overlap_seconds)
        return self.set_new_token()

    def revoke_token(self) -> None:
        """Refuse the current and the previous token from now on; rotating gives the worker a new one."""
        self.token_hash = self.previous_token_hash = self.previous_token_expires = None

    @property
    def revoked(self) -> bool:
        return not self.token_hash

    def previous_token_valid_until(self) -> datetime | None:
        """When the token replaced by the last rotation stops working (None: no such token, or already refused)."""
        expires = self.previous_token_expires
        return expires if self.previous_token_hash and expires and expires > timezone.now() else None
