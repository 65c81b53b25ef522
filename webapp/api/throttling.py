"""Request rates per user (API key or session) and per address for anonymous calls.

The rates are read from settings at each request (DRF's own throttles read them once, at import), so that
TUNEDECK_API_RATE / TUNEDECK_API_ANON_RATE and a test's override_settings take effect. A refused request
gets 429 with Retry-After (set by webapp.api.problems).
"""

from __future__ import annotations

from django.conf import settings
from rest_framework.throttling import AnonRateThrottle, UserRateThrottle


class UserRate(UserRateThrottle):
    def get_rate(self) -> str:
        return settings.TUNEDECK_API_RATE


class AnonRate(AnonRateThrottle):
    def get_rate(self) -> str:
        return settings.TUNEDECK_API_ANON_RATE
