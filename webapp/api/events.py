"""A job's events over the API: JSON pages after a cursor, and the same as a Server-Sent Events stream.

Both kinds of job (runs and adapter jobs) keep append-only events whose id is the cursor: a client that
resumes after the last id it saw (`?after=`, or `Last-Event-ID` on a reconnecting stream) misses nothing
and sees nothing twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from django.http import StreamingHttpResponse
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.utils.encoders import JSONEncoder

from webapp.training.models import FINAL_STATES
from webapp.training.views import _sse, event_stream, sse_response

DEFAULT_LIMIT = 200
MAX_LIMIT = 1000
STREAM_BATCH = 500


class EventSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    attempt = serializers.IntegerField()
    seq = serializers.IntegerField(allow_null=True, help_text="The worker's sequence number (null for control-plane lines).")
    kind = serializers.CharField(help_text="log, metric, status, checkpoint (runs) or output (comparisons).")
    level = serializers.CharField()
    message = serializers.CharField(allow_blank=True)
    data = serializers.JSONField()
    created_at = serializers.DateTimeField()


class EventPageSerializer(serializers.Serializer):
    results = EventSerializer(many=True)
    next_after = serializers.IntegerField(help_text="Pass as ?after= to get the events that follow.")
    has_more = serializers.BooleanField(help_text="More events follow right now (the page was full).")
    state = serializers.CharField(help_text="The job's state when the page was read.")
    final = serializers.BooleanField(help_text="The job has finished and every event has been read.")


MAX_ID = 2**63 - 1
DIGITS = re.compile(r"[0-9]{1,19}")


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name, "")
    if raw == "":
        return default
    if not DIGITS.fullmatch(raw) or not low <= int(raw) <= high:
        raise ValidationError({name: [f"must be a whole number from {low} to {high}; got {raw[:50]!r}"]})
    return int(raw)


def events_page(request: Request, events: Any, state: str) -> dict[str, Any]:
    """A page of `events` (the job's event queryset) after ?after=, at most ?limit= of them, ?kind= filtering."""
    after = _int_param(request, "after", 0, 0, MAX_ID)
    limit = _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    kind = request.query_params.get("kind", "").replace("\x00", "")
    rows = events.filter(id__gt=after)
    if kind:
        rows = rows.filter(kind=kind)
    page = list(rows.order_by("id")[:limit])
    has_more = len(page) == limit
    return {
        "results": EventSerializer(page, many=True).data,
        "next_after": page[-1].id if page else after,
        "has_more": has_more,
        "state": state,
        "final": state in FINAL_STATES and not has_more,
    }


def _json(value: Any) -> str:
    return json.dumps(value, cls=JSONEncoder, separators=(",", ":"))


def json_batch(job_model: Any, event_model: Any, fk: str) -> Callable[[int, int, str | None], tuple[list[str], int, str, bool]]:
    """The stream's poll for one kind of job: each event as `event: event` with its JSON, `event: state`
    when the state changes, and the stream ends (`event: done`) once the job has finished and all is sent."""

    def next_batch(job_id: int, after: int, known_state: str | None) -> tuple[list[str], int, str, bool]:
        events = list(event_model.objects.filter(**{f"{fk}_id": job_id}, id__gt=after).order_by("id")[:STREAM_BATCH])
        out = [_sse("event", _json(EventSerializer(event).data), event.id) for event in events]
        if events:
            after = events[-1].id
        state = job_model.objects.filter(pk=job_id).values_list("state", flat=True).first()
        if state is None:  # deleted while streaming
            return out, after, "deleted", True
        if state != known_state:
            out.append(_sse("state", _json({"state": state})))
        return out, after, state, state in FINAL_STATES and len(events) < STREAM_BATCH

    return next_batch


def stream_cursor(request: Request) -> int:
    """Resume after Last-Event-ID (a reconnect) or ?after= (a new connection), whichever is further; a value
    that is not an event id is refused, naming where it came from."""
    values = []
    for name, raw in (("Last-Event-ID", request.headers.get("Last-Event-ID", "")), ("after", request.query_params.get("after", ""))):
        raw = raw.strip()
        if raw == "":
            continue
        if not DIGITS.fullmatch(raw) or int(raw) > MAX_ID:
            raise ValidationError({name: [f"must be an event id (a whole number); got {raw[:50]!r}"]})
        values.append(int(raw))
    return max(values, default=0)


def stream_response(request: Request, next_batch: Any, job_model: Any, job_id: int) -> StreamingHttpResponse:
    return sse_response(event_stream(next_batch, job_model, job_id, stream_cursor(request)))


class EventStreamRenderer(BaseRenderer):
    """Names text/event-stream in the schema; the stream itself is a streaming response, never rendered."""

    media_type = "text/event-stream"
    format = "sse"
    charset = "utf-8"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        return _json(data).encode()


class ZipRenderer(EventStreamRenderer):
    media_type = "application/zip"
    format = "zip"
    charset = None
