"""Errors in the shape of the part of the site that answers them, whoever raised them.

`/api/` (the REST API and the worker API) answers RFC 9457 problems (application/problem+json), `/v1/`
OpenAI's `{"error": {...}}`, pages HTML. DRF's exception handlers shape the errors of DRF views; this
middleware shapes the rest: Django's own error pages (an unknown path, a refused method or host, a 500),
exceptions of plain and async views (the worker API, the SSE streams), and a database that cannot be
reached, which is a 503 with Retry-After everywhere instead of a 500.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.views import defaults

from webapp.api.openai.errors import error_body
from webapp.health import RETRY_AFTER_S, database_unavailable
from webapp.problem_details import PROBLEM_CONTENT_TYPE, problem_response, status_title

log = logging.getLogger("django.request")

PROBLEM_PREFIX, OPENAI_PREFIX = "/api/", "/v1/"
UNAVAILABLE = "the database cannot be reached right now; try again shortly"


def api_family(path: str) -> str | None:
    if path.startswith(OPENAI_PREFIX):
        return "openai"
    if path.startswith(PROBLEM_PREFIX):
        return "problem"
    return None


def error_response(request: HttpRequest, status: int, detail: str, headers: dict[str, str] | None = None
                   ) -> HttpResponse:
    """`detail` as the path's API error, or as a short plain-text page."""
    family = api_family(request.path)
    if family == "openai":
        kind = "service_unavailable" if status == 503 else None
        return JsonResponse(error_body(status, detail, code=kind), status=status, headers=headers)
    if family == "problem":
        return problem_response(status, detail, instance=request.path, headers=headers)
    return HttpResponse(f"{status} {status_title(status)}: {detail}\n", status=status, headers=headers,
                        content_type="text/plain; charset=utf-8")


def unavailable_response(request: HttpRequest) -> HttpResponse:
    return error_response(request, 503, UNAVAILABLE, headers={"Retry-After": str(RETRY_AFTER_S)})


def server_error(request: HttpRequest) -> HttpResponse:
    """handler500. Django calls it inside its `except` (on the sync path; the async path hands nothing on), so
    the exception is at hand: a database that cannot serve is a 503 here too."""
    exc = sys.exc_info()[1]
    if isinstance(exc, DatabaseError) and database_unavailable(exc):
        return unavailable_response(request)
    if api_family(request.path):
        return error_response(request, 500, "internal server error; the server's log has the details")
    return defaults.server_error(request)


class ErrorShapesMiddleware:
    """First in MIDDLEWARE, so that it sees every response, including Django's own error pages."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        in_shape = _is_json(response) or _rendered_by_drf(response)
        if response.status_code >= 400 and api_family(request.path) and not in_shape:
            return _reshaped(request, response)
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """A view's exception: a database that cannot serve is a 503 for everyone; anything else under an API
        is a 500 in its shape (pages keep Django's 500 page)."""
        if isinstance(exception, DatabaseError) and database_unavailable(exception):
            log.warning("Service Unavailable: %s: %s", request.path, exception)
            return unavailable_response(request)
        if api_family(request.path) is None:
            return None
        log.error("Internal Server Error: %s", request.path, exc_info=exception)
        return error_response(request, 500, "internal server error; the server's log has the details")


def _is_json(response: HttpResponseBase) -> bool:
    content_type = response.get("Content-Type", "").split(";")[0].strip()
    return content_type in ("application/json", PROBLEM_CONTENT_TYPE)


def _rendered_by_drf(response: HttpResponseBase) -> bool:
    """A DRF view's own error, already in its shape: a problem, or (for a browser that asked for text/html) the
    browsable API's page showing that problem, whose detail and fields a reshaping would lose."""
    return getattr(response, "accepted_renderer", None) is not None


def _reshaped(request: HttpRequest, response: HttpResponseBase) -> HttpResponse:
    """Django's HTML (or empty) error page under an API, as that API's error; its headers (Allow,
    Retry-After, WWW-Authenticate) kept."""
    status = response.status_code
    detail = {
        404: f"nothing at {request.path}",
        405: f"{request.method} is not allowed here (allowed: {response.get('Allow', 'none')})",
    }.get(status, status_title(status))
    kept = {name: response[name] for name in ("Allow", "Retry-After", "WWW-Authenticate") if response.has_header(name)}
    shaped = error_response(request, status, detail, headers=kept)
    shaped.cookies = response.cookies
    return shaped
