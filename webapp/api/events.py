"""A job's events over the API: JSON pages after a cursor, and the same as a Server-Sent Events stream.

Both kinds of job (runs and adapter jobs) keep append-only events whose id is the cursor: a client that
resumes after the last id it saw (`?after=`, or `Last-Event-ID` on a reconnecting stream) misses nothing
and sees nothing twice.
"""

from __future__ import annotations

import json
from typing import Any

from django.http import StreamingHttpResponse
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.utils.encoders import JSONEncoder

from webapp.ids import MAX_ID, whole
from webapp.jobs.models import FINAL_STATES
from webapp.jobs.stream import (
    BadCursor,
    NextBatch,
    batch_reader,
    event_stream,
    sse,
    sse_response,
    stream_cursor,
)

DEFAULT_LIMIT = 200
MAX_LIMIT = 1000


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


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name, "")
    if raw == "":
        return default
    found = whole(raw, high)
    if found is None or found < low:
        raise ValidationError({name: [f"must be a whole number from {low} to {high}; got {raw[:50]!r}"]})
    return found


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


def json_batch(job_model: Any) -> NextBatch:
    """The stream's poll for one kind of job: each event as `event: event` with its JSON, `event: state`
    when the state changes, and the stream ends (`event: done`) once the job has finished and all is sent."""
    return batch_reader(job_model, lambda event: sse("event", _json(EventSerializer(event).data), event.pk))


def stream_response(request: Request, next_batch: Any, job_model: Any, job_id: int) -> StreamingHttpResponse:
    """The job's stream after its cursor; a cursor that is not an event id is refused (400, naming it)."""
    try:
        after = stream_cursor(request)
    except BadCursor as bad:
        raise ValidationError({bad.source: [str(bad)]}) from None
    return sse_response(event_stream(next_batch, job_model, job_id, after))


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
