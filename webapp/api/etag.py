"""Weak ETags on API reads (/api/v1/ and /v1/): If-None-Match with the current tag gets 304 and no body."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from django.http import HttpRequest, HttpResponseBase
from django.utils.cache import get_conditional_response, patch_cache_control, patch_vary_headers

API_PREFIXES = ("/api/v1/", "/v1/")


class ApiETagMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        if (request.method not in ("GET", "HEAD") or not request.path.startswith(API_PREFIXES)
                or response.status_code != 200 or response.streaming):
            return response
        if not response.has_header("ETag"):
            # Weak: the same JSON may be rendered with other whitespace or key order by another version.
            response["ETag"] = f'W/"{hashlib.sha256(response.content).hexdigest()[:32]}"'  # type: ignore[attr-defined]
        # Answers depend on who asks: caches may keep them for that caller only, and must revalidate.
        patch_vary_headers(response, ("Authorization", "Cookie"))
        if not response.has_header("Cache-Control"):
            patch_cache_control(response, private=True, no_cache=True)
        return get_conditional_response(request, etag=response["ETag"], response=response)
