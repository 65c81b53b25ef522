"""A job's live stream: Server-Sent Events framing, the cursor a client resumes after, and the loop that sends
what is new as the job changes (the pages' streams and the API's alike; what each sends is its `next_batch`).

A job's events are append-only and their id is the cursor: a client that resumes after the last id it saw
(`?after=`, or `Last-Event-ID` on a reconnecting stream) misses nothing and sees nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from asgiref.sync import sync_to_async
from django.db import DatabaseError, connections
from django.http import HttpRequest, StreamingHttpResponse

from webapp.health import database_unavailable
from webapp.ids import whole
from webapp.jobs.ledger import events_of
from webapp.jobs.live import Mark, feed_for, released
from webapp.jobs.models import FINAL_STATES, LedgerEvent, LedgerJob

log = logging.getLogger(__name__)

STREAM_PING_S = 15.0
STREAM_BATCH = 500  # events read per poll

# (messages, cursor, mark, final) after the cursor: what a stream sends next; the mark is the job's state and
# wait reason as read (live.Mark), handed back at the next poll.
Batch = tuple[list[str], int, Mark, bool]
NextBatch = Callable[[int, int, Mark | None], Batch]


def sse(event: str, data: str, event_id: int | None = None) -> str:
    """One Server-Sent Events message."""
    lines = [f"event: {event}"] + ([f"id: {event_id}"] if event_id is not None else [])
    # split("\n"), not splitlines(): a trailing newline of streamed text must survive ("6\n" -> "data: 6", "data: ")
    lines += [f"data: {line}" for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(lines) + "\n\n"


class BadCursor(ValueError):
    """A cursor value that is not an event id; `source` names where it came from (`Last-Event-ID`, `after`)."""

    def __init__(self, source: str, raw: str) -> None:
        super().__init__(f"must be an event id (a whole number); got {raw[:50]!r}")
        self.source = source


def cursor_values(request: HttpRequest) -> list[tuple[str, str]]:
    """The cursor's sources, Last-Event-ID (a native reconnect) and ?after= (a new connection), as given."""
    return [("Last-Event-ID", request.headers.get("Last-Event-ID", "").strip()),
            ("after", request.GET.get("after", "").strip())]


def event_id(source: str, raw: str) -> int:
    """An event id: ASCII digits only (str.isdigit() also accepts "²", which int() refuses), within a bigint."""
    found = whole(raw)
    if found is None:
        raise BadCursor(source, raw)
    return found


def stream_cursor(request: HttpRequest) -> int:
    """Resume after Last-Event-ID or ?after=, whichever is further; a value that is not an event id is refused
    (BadCursor)."""
    return max((event_id(source, raw) for source, raw in cursor_values(request) if raw), default=0)


def page_cursor(request: HttpRequest) -> int:
    """The cursor of a page's own stream (the page wrote it): a value that is not an event id is left out."""
    ids = []
    for source, raw in cursor_values(request):
        try:
            ids.append(event_id(source, raw))
        except BadCursor:
            continue
    return max(ids, default=0)


async def event_stream(next_batch: NextBatch, model: type[LedgerJob], job_id: int, after: int) -> AsyncIterator[str]:
    """The SSE loop of a job: `next_batch(job_id, after, mark)` returns (messages, cursor, mark, final).

    An open stream holds no database connection: it gives back its request's before the first message, and
    reads only when the process's feed saw the job change (live.py), each read on a pooled connection given
    back at once, in the shared thread pool. A ping keeps proxies from closing a quiet stream; "done" ends it.
    A database that went away ends it too: the client reconnects, and is answered 503 until the database is
    back."""
    await sync_to_async(connections.close_all)()  # the request's own: its session, key and job lookups
    yield "retry: 2000\n\n"
    poll = sync_to_async(released(next_batch), thread_sensitive=False)
    mark: Mark | None = None
    async with feed_for(model).watch(job_id, after) as watch:
        while True:
            watch.changed.clear()
            try:
                messages, after, mark, final = await poll(job_id, after, mark)
            except DatabaseError as exc:
                if not database_unavailable(exc):
                    raise
                log.warning("stream of %s %s ended: %s", model.__name__, job_id, exc)
                return
            watch.read(mark, after)
            for message in messages:
                yield message
            if final:
                yield sse("done", "")
                return
            try:
                await asyncio.wait_for(watch.changed.wait(), STREAM_PING_S)
            except TimeoutError:
                yield ": ping\n\n"


def sse_response(stream: AsyncIterator[str]) -> StreamingHttpResponse:
    response = StreamingHttpResponse(stream, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


def batch_reader(
    model: type[LedgerJob],
    message: Callable[[LedgerEvent], str],
    status: Callable[[LedgerJob], str] | None = None,
    related: tuple[str, ...] = (),
) -> NextBatch:
    """The poll of a kind of job's stream: each event after the cursor as `message(event)`; then, with `status`,
    the job's status message whenever metrics came, the state or the wait reason changed (a queued job's page says
    why it waits, live) or the job is done (a burst of log lines costs one indexed query per poll, not a panel per
    line), else a `state` message when the state changed.
    The stream is final once the job has finished and every event has been sent.

    The state is read before the events: a worker's events are refused once its job has ended, so every event is
    stored before the final state, and a final state read first means the events read next are all there are.
    (Read the other way round, the last lines and the final state could both land between the two reads: the
    stream would end without them.)"""
    event_model, fk = events_of(model)

    def next_batch(job_id: int, after: int, known: Mark | None = None) -> Batch:
        row = model.objects.filter(pk=job_id).values_list("state", "wait_reason").first()
        events = list(event_model.objects.filter(**{f"{fk}_id": job_id}, id__gt=after).order_by("id")[:STREAM_BATCH])
        out = [message(event) for event in events]
        if events:
            after = events[-1].id
        if row is None:  # deleted while streaming
            return out, after, ("deleted", ""), True
        mark: Mark = (row[0], row[1] or "")
        state = mark[0]
        final = state in FINAL_STATES and len(events) < STREAM_BATCH
        if status is None:
            if known is None or state != known[0]:
                out.append(sse("state", json.dumps({"state": state}, separators=(",", ":"))))
        elif final or mark != known or any(event.kind == "metric" for event in events):
            job = model.objects.select_related(*related).filter(pk=job_id).first()
            if job is None:
                return out, after, ("deleted", ""), True
            out.append(sse("status", status(job)))
        return out, after, mark, final

    return next_batch
