from __future__ import annotations

import hashlib
import secrets

from django.db import models

TOKEN_PREFIX = "tdw_"


def hash_token(token: str) -> str:
    # Tokens are 256-bit random strings, so a plain sha256 is enough (no dictionary to guard against).
    return hashlib.sha256(token.encode()).hexdigest()


class WorkerState(models.TextChoices):
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"


class Worker(models.Model):
    name = models.SlugField(max_length=100, unique=True)
    token_hash = models.CharField(max_length=64, unique=True)
    labels = models.JSONField(default=list, blank=True)
    state = models.CharField(max_length=16, choices=WorkerState.choices, default=WorkerState.OFFLINE)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    inventory = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def set_new_token(self) -> str:
        """Give the worker a fresh token and return it: the only time it is ever visible."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.token_hash = hash_token(token)
        return token
