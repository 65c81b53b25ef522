"""Request rates per user (API key or session) and per address for anonymous calls; failed password logins
per user name and per address.

The rates are read from settings at each request (DRF's own throttles read them once, at import), so that
TUNEDECK_API_RATE / TUNEDECK_API_ANON_RATE / TUNEDECK_LOGIN_FAILURE_RATE and a test's override_settings take
effect. A refused request gets 429 with Retry-After (set by webapp.api.problems).
"""

from __future__ import annotations

import hashlib
from typing import Any

from django.conf import settings
from rest_framework.throttling import AnonRateThrottle, SimpleRateThrottle, UserRateThrottle


class UserRate(UserRateThrottle):
    def get_rate(self) -> str:
        return settings.TUNEDECK_API_RATE


class AnonRate(AnonRateThrottle):
    def get_rate(self) -> str:
        return settings.TUNEDECK_API_ANON_RATE


class FailureRate(SimpleRateThrottle):
    """Counts failures only: the view calls `failed` after one. Once they reach TUNEDECK_LOGIN_FAILURE_RATE,
    every attempt is refused until the oldest ages out, a right password included (else the guessing would go
    on, with only its answers hidden)."""

    def get_rate(self) -> str:
        return settings.TUNEDECK_LOGIN_FAILURE_RATE

    def allow_request(self, request: Any, view: Any) -> bool:
        self.key = self.get_cache_key(request, view)
        if self.key is None:
            return True
        self.now = self.timer()
        self.history = [t for t in self.cache.get(self.key, []) if t > self.now - self.duration]
        return len(self.history) < self.num_requests

    def failed(self, request: Any, view: Any) -> None:
        self.allow_request(request, view)  # reads the recent failures
        if self.key is not None:
            self.cache.set(self.key, [self.now, *self.history], self.duration)


class LoginFailuresByAddress(FailureRate):
    scope = "login-address"

    def get_cache_key(self, request: Any, view: Any) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}


class LoginFailuresByName(FailureRate):
    """Per user name, whichever address the guesses come from."""

    scope = "login-name"

    def get_cache_key(self, request: Any, view: Any) -> str | None:
        name = request.data.get("username") if isinstance(request.data, dict) else None
        if not isinstance(name, str) or not name:
            return None
        digest = hashlib.sha256(name.strip().lower().encode()).hexdigest()  # any text: a safe cache key
        return self.cache_format % {"scope": self.scope, "ident": digest}
