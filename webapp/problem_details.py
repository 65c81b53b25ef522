"""RFC 9457 problem details (application/problem+json) from plain Django code: the worker API, the middleware.
The REST API's DRF views answer the same shape through api/problems.py."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from django.http import JsonResponse

PROBLEM_CONTENT_TYPE = "application/problem+json"


def status_title(status: int) -> str:
    """The status's reason phrase (404: "Not Found"), or "Error" for a code HTTP does not name."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_body(status: int, detail: str, errors: dict[str, list[str]] | None = None, title: str | None = None,
                 code: str | None = None, instance: str | None = None, extra: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "about:blank", "title": title or status_title(status), "status": status,
                            "detail": detail}
    if instance is not None:
        body["instance"] = instance
    if code:
        body["code"] = code
    if errors:
        body["errors"] = errors
    body.update(extra or {})
    return body


def problem_response(status: int, detail: str, instance: str | None = None, code: str | None = None,
                     headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> JsonResponse:
    """A problem as a plain Django response, outside DRF's rendering."""
    return JsonResponse(problem_body(status, detail, code=code, instance=instance, extra=extra), status=status,
                        headers=headers, content_type=PROBLEM_CONTENT_TYPE)
