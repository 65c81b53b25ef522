"""Every API error as an RFC 9457 problem (application/problem+json).

    {"type": "about:blank", "title": "Bad Request", "status": 400, "detail": "name: This field is required.",
     "instance": "/api/v1/datasets/", "code": "invalid", "errors": {"name": ["This field is required."]}}

`errors` maps a field (dotted for nested fields: "params.r", "rows.3.messages") to its messages; errors that
belong to no field are under "non_field_errors".
"""

from __future__ import annotations

import math
from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import Http404
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.settings import api_settings

from webapp.problem_details import PROBLEM_CONTENT_TYPE, problem_body


class ProblemResponse(Response):
    """A Response rendered as application/problem+json when the client asked for JSON (the browsable API
    still gets its HTML page)."""

    @property
    def rendered_content(self) -> Any:
        renderer = getattr(self, "accepted_renderer", None)
        if self.content_type is None and getattr(renderer, "format", "json") == "json":  # type: ignore[has-type]
            self.content_type = PROBLEM_CONTENT_TYPE
        return Response.rendered_content.fget(self)  # type: ignore[attr-defined]


def problem(status: int, detail: str, errors: dict[str, list[str]] | None = None, title: str | None = None,
            code: str | None = None, headers: dict[str, str] | None = None, instance: str | None = None,
            extra: dict[str, Any] | None = None) -> Response:
    """A problem response for a DRF view to return directly (`extra`: more members, e.g. a validation report)."""
    return ProblemResponse(problem_body(status, detail, errors, title, code, instance, extra), status=status,
                           headers=headers)


def flatten_errors(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    """Serializer errors (nested dicts and lists) as {"dotted.field": [messages]}."""
    out: dict[str, list[str]] = {}
    if isinstance(detail, dict):
        for key, value in detail.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            for field, messages in flatten_errors(value, name).items():
                out.setdefault(field, []).extend(messages)
    elif isinstance(detail, list):
        if all(not isinstance(item, (dict, list)) for item in detail):
            if detail:
                out[prefix or api_settings.NON_FIELD_ERRORS_KEY] = [str(item) for item in detail]
        else:  # a list of nested serializers: one entry per item, empty ones skipped
            for index, item in enumerate(detail):
                name = f"{prefix}.{index}" if prefix else str(index)
                for field, messages in flatten_errors(item, name).items():
                    out.setdefault(field, []).extend(messages)
    elif detail is not None and str(detail):
        out[prefix or api_settings.NON_FIELD_ERRORS_KEY] = [str(detail)]
    return out


def summary(errors: dict[str, list[str]]) -> str:
    """One line naming each field and its first message."""
    parts = [msg if field == api_settings.NON_FIELD_ERRORS_KEY else f"{field}: {msg}"
             for field, messages in errors.items() for msg in messages[:1]]
    text = "; ".join(parts[:5])
    if len(parts) > 5:
        text += f"; and {len(parts) - 5} more"
    return text or "invalid input"


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's EXCEPTION_HANDLER: APIExceptions, Http404 and PermissionDenied become problems; anything else
    is left to Django (a 500, logged)."""
    if isinstance(exc, Http404):
        exc = exceptions.NotFound(str(exc) or None)
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied(str(exc) or None)
    if not isinstance(exc, exceptions.APIException):
        return None

    headers: dict[str, str] = {}
    auth_header = getattr(exc, "auth_header", None)
    if auth_header:
        headers["WWW-Authenticate"] = auth_header
    wait = getattr(exc, "wait", None)
    if wait is not None:
        headers["Retry-After"] = str(max(1, math.ceil(wait)))

    request = context.get("request")
    instance = getattr(request, "path", None)
    codes = exc.get_codes()
    if isinstance(exc, exceptions.ValidationError):
        errors = flatten_errors(exc.detail)
        return problem(exc.status_code, summary(errors), errors=errors, code="invalid", headers=headers,
                       instance=instance)
    detail = exc.detail
    if isinstance(detail, (dict, list)):  # an APIException raised with structured detail
        errors = flatten_errors(detail)
        return problem(exc.status_code, summary(errors), errors=errors, headers=headers, instance=instance)
    return problem(exc.status_code, str(detail), code=codes if isinstance(codes, str) else None, headers=headers,
                   instance=instance)
