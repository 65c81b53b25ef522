"""Live streams of jobs without a database connection each: one feed per process watches every open stream's
job, and a stream reads its job only when the feed saw it change.

A stream used to poll its job every 0.2 s and keep the connection it had opened for its request: each open
page held one of PostgreSQL's connections (about 90 open pages took the server down) and 500 open pages
made 5,000 queries a second. Now the feed asks, five times a second, one query for all watched jobs of a
kind: their state, their wait reason and their newest event id. A stream whose job is ahead of what it has read is woken and
reads what is new
(`next_batch`) on a pooled connection it gives back at once; an idle stream costs nothing but its share of
that one query. Writers need no hook: whatever changes a job (the worker API, the scheduler in its own
process, a cancel) changes its state or its wait reason (the scheduler's, for a queued job) or adds an event,
which the feed sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any
from weakref import WeakKeyDictionary

from asgiref.sync import sync_to_async
from django.db import DatabaseError, connections
from django.db.models import OuterRef, Subquery

log = logging.getLogger(__name__)

FEED_POLL_S = 0.2
Mark = tuple[str, str]  # a job's state and its wait reason, as a stream last read them
Signature = tuple[Mark, int | None] | None  # (state and wait reason, newest event id); None: the job is gone


def released(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` giving back the database connection it used (to the pool) before its thread moves on: a thread of
    the shared pool runs many streams' reads and would otherwise keep one connection for good."""

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        try:
            return fn(*args)
        finally:
            connections.close_all()

    return run


def signatures(model: Any, ids: list[int]) -> dict[int, Signature]:
    """Each job's state and newest event id, in one query. The newest event is read as views.latest_first reads
    it (the job matched as a range, so PostgreSQL walks the (job, id) index, not the whole primary key)."""
    related = model.events
    event_model, fk = related.rel.related_model, related.field.name
    newest = (event_model.objects.filter(**{f"{fk}_id__gte": OuterRef("pk"), f"{fk}_id__lte": OuterRef("pk")})
              .order_by(f"-{fk}_id", "-id").values("id")[:1])
    rows = (model.objects.filter(pk__in=ids).annotate(newest=Subquery(newest))
            .values_list("pk", "state", "wait_reason", "newest"))
    found: dict[int, Signature] = {pk: ((state, reason or ""), last) for pk, state, reason, last in rows}
    return {pk: found.get(pk) for pk in ids}


class Watch:
    """One stream's view of its job: what it has read (the state, the newest event id), and an event the feed
    sets while the job is ahead of that."""

    def __init__(self, after: int) -> None:
        self.changed = asyncio.Event()
        self.mark: Mark | None = None
        self.after = after

    def read(self, mark: Mark, after: int) -> None:
        self.mark, self.after = mark, after

    def behind(self, signature: Signature) -> bool:
        if signature is None:  # the job is gone: the stream reads that and ends
            return True
        mark, newest = signature
        return mark != self.mark or (newest or 0) > self.after


class _Watchers:
    """The streams of one event loop watching one kind of job, and the task that polls for them."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.streams: dict[int, set[Watch]] = {}
        self.task: asyncio.Task[None] | None = None
        self.probe = sync_to_async(released(signatures), thread_sensitive=False)

    def add(self, job_id: int, watch: Watch) -> None:
        self.streams.setdefault(job_id, set()).add(watch)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self.poll())

    def discard(self, job_id: int, watch: Watch) -> None:
        waiting = self.streams.get(job_id, set())
        waiting.discard(watch)
        if not waiting:
            self.streams.pop(job_id, None)

    async def poll(self) -> None:
        """Until no stream watches: wake each stream whose job is ahead of what it has read. Compared with what
        each stream read, not with the previous poll, so a change between a stream's read and this poll is
        never lost, and a stream that just opened is not woken for nothing."""
        while self.streams:
            try:
                current = await self.probe(self.model, list(self.streams))
            except DatabaseError as exc:  # the streams wait, and resume once the database is back
                log.warning("live feed of %s: %s", self.model.__name__, exc)
                current = {}
            for job_id, signature in current.items():
                for watch in self.streams.get(job_id, ()):
                    if watch.behind(signature):
                        watch.changed.set()
            await asyncio.sleep(FEED_POLL_S)


class JobFeed:
    """The changes of one kind of job (runs, adapter jobs), watched for every stream of this process."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._loops: WeakKeyDictionary[asyncio.AbstractEventLoop, _Watchers] = WeakKeyDictionary()

    @contextlib.asynccontextmanager
    async def watch(self, job_id: int, after: int) -> AsyncIterator[Watch]:
        """The stream's Watch of the job while the block runs; `after`: the event id it resumes after."""
        loop = asyncio.get_running_loop()
        watchers = self._loops.get(loop)
        if watchers is None:
            watchers = self._loops[loop] = _Watchers(self.model)
        watch = Watch(after)
        watchers.add(job_id, watch)
        try:
            yield watch
        finally:
            watchers.discard(job_id, watch)


_feeds: dict[Any, JobFeed] = {}


def feed_for(model: Any) -> JobFeed:
    """The process's one feed for a kind of job."""
    return _feeds.setdefault(model, JobFeed(model))
