"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status the
official `openai` package turns into its typed exceptions (400 BadRequestError, 401 AuthenticationError,
403 PermissionDeniedError, 404 NotFoundError, 409 ConflictError, 422 UnprocessableEntityError, 429
RateLimitError, 5xx InternalServerError)."""

from __future__ import annotations

import logging
from typing import Any

from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler
from rest_framework.views import set_rollback

from webapp.health import database_unavailable

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class OpenAIError(Exception):
    """Raised by the /v1/ views for a request they refuse; the handler below answers it."""

    def __init__(self, status_code: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status_code, self.message, self.param, self.code = status_code, message, param, code


def error_body(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status_code, "server_error" if status_code >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status_code: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status_code, message, param, code), status=status_code, headers=headers)


def _message_of(detail: Any) -> tuple[str, str | None]:
    """One readable line (and the first field named) from DRF's error detail: a string, a list or a dict."""
    if isinstance(detail, dict):
        parts, first = [], None
        for name, value in detail.items():
            text, _ = _message_of(value)
            parts.append(f"{name}: {text}")
            first = first or str(name)
        return "; ".join(parts), first
    if isinstance(detail, list):
        return "; ".join(_message_of(item)[0] for item in detail), None
    return str(detail), None


CODES = {401: "invalid_api_key", 403: "insufficient_scope", 404: "not_found", 405: "method_not_allowed",
         429: "rate_limit_exceeded"}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's exception handler for the /v1/ views (the rest of the API answers RFC 9457 problems)."""
    if isinstance(exc, OpenAIError):
        return error_response(exc.status_code, exc.message, exc.param, exc.code)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or "not found")
    response = drf_exception_handler(exc, context)  # sets WWW-Authenticate, Retry-After, Allow
    if response is None and database_unavailable(exc):
        return None  # raised on to webapp.errors: a 503 with Retry-After, in this shape
    if response is None:
        log.exception("unexpected error in %s", context.get("view").__class__.__name__)
        set_rollback()
        return error_response(status.HTTP_500_INTERNAL_SERVER_ERROR, "internal server error", code="server_error")
    detail = exc.detail if isinstance(exc, exceptions.APIException) else response.data
    message, param = _message_of(detail)
    if isinstance(exc, exceptions.NotAuthenticated):
        message = "no API key given: send the header Authorization: Bearer <your API key (tdk_…)>"
    code = getattr(exc, "default_code", None) if response.status_code not in CODES else CODES[response.status_code]
    response.data = error_body(response.status_code, message, param, code)
    return response
