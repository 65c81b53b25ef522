"""What the pages of every kind of job share: who may act on a job, its log, cancel, pause, resume, retry,
reorder and its live stream. Each kind's views load the job and name their own page; these do the rest."""

from __future__ import annotations

import html
from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.safestring import mark_safe

from webapp.jobs import ledger, queue
from webapp.jobs.models import LedgerEvent, LedgerJob
from webapp.jobs.stream import NextBatch, event_stream, page_cursor, sse, sse_response

LOG_TAIL = 500  # log lines a job's page opens with
QUIET_KINDS = ("metric", "output")  # events that are no log line


def can_act(request: HttpRequest, job: Any) -> bool:
    """Jobs are visible to the whole team; only the owner or staff may act on one."""
    return bool(request.user.is_staff or job.owner_id == request.user.pk)  # type: ignore[union-attr]


def check_can_act(request: HttpRequest, job: Any) -> None:
    if not can_act(request, job):
        raise PermissionDenied(f"only the {job.NOUN}'s owner or an admin can do this")


def log_line(event: LedgerEvent) -> str:
    """One log line's HTML, the message escaped. Built in Python, not a template include: a job's page
    renders hundreds of them and the stream one per event."""
    when = timezone.localtime(event.created_at)
    kind, level, message = (html.escape(str(v)) for v in (event.kind, event.level, event.message))
    return mark_safe(  # every value from the event is escaped on the line above; the id is an int
        f'<div class="line kind-{kind} {level}" id="ev-{int(event.pk)}"><time datetime="{when.isoformat()}">'
        f'{when.strftime("%H:%M:%S")}</time> {message}</div>'
    )


def log_message(event: LedgerEvent) -> str:
    """A stream's message for a log line; a metric point only advances the client's cursor (`tick`)."""
    if event.kind == "metric":
        return sse("tick", "", event.pk)
    return sse("log", log_line(event), event.pk)


def latest_first(model: type[LedgerJob], job_id: int) -> QuerySet[Any]:
    """A job's events, newest first, read backwards along the (job, id) index.

    The job is matched as a range, not with =: for an equality PostgreSQL drops the job from the
    ordering and may walk the whole primary key backwards instead (330 ms on a 1M-event table for a
    run whose events are old; 0.3 ms this way)."""
    event_model, fk = ledger.events_of(model)
    return event_model.objects.filter(**{f"{fk}_id__gte": job_id, f"{fk}_id__lte": job_id}).order_by(f"-{fk}_id", "-id")


def log_tail(job: LedgerJob) -> dict[str, Any]:
    """A job page's log: its last LOG_TAIL lines, oldest first, and the id of its newest event (the cursor its
    stream resumes after)."""
    events = latest_first(type(job), job.pk)
    tail = list(events.exclude(kind__in=QUIET_KINDS)[:LOG_TAIL])[::-1]
    return {"log_lines": [log_line(e) for e in tail], "last_event_id": events.values_list("id", flat=True).first() or 0}


def safe_next(request: HttpRequest) -> str | None:
    """The page to go back to (?next= in the form), if it is one of this site's."""
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()},
                                                  require_https=request.is_secure()):
        return target
    return None


def cancel(request: HttpRequest, job: LedgerJob, page: str) -> HttpResponse:
    """Cancel the job for its owner (or staff), then back to `page` (a URL name taking the job's pk)."""
    check_can_act(request, job)
    outcome = ledger.request_cancel(job)
    if not outcome:
        messages.warning(request, f"The {job.NOUN} is already {job.state}.")
    elif outcome == "cancelled":
        messages.info(request, "Cancelled before it started.")
    # A running job's pending cancel is said by its status panel, which the live stream replaces when the
    # job stops: a flash message would stay on the page after the job is cancelled.
    return redirect(safe_next(request) or reverse(page, args=[job.pk]))


def pause(request: HttpRequest, job: LedgerJob, page: str) -> HttpResponse:
    """Pause the job for its owner (or staff): a queued one is held at once, a running one checkpoints at its
    next step (its status panel says the pause is pending, as for a cancel)."""
    check_can_act(request, job)
    outcome = ledger.request_pause(job, request.user)
    if not outcome:
        messages.warning(request, f"Only a queued or running {job.NOUN} can be paused; {job} is {job.state}.")
    elif outcome == "paused":
        messages.info(request, "Paused: it keeps its place in the queue until resumed.")
    return redirect(safe_next(request) or reverse(page, args=[job.pk]))


def resume(request: HttpRequest, job: LedgerJob, page: str) -> HttpResponse:
    check_can_act(request, job)
    if ledger.resume(job, request.user):
        messages.info(request, "Resumed: it continues from its latest checkpoint.")
    else:
        messages.warning(request, f"Only a paused {job.NOUN} can be resumed; {job} is {job.state}.")
    return redirect(safe_next(request) or reverse(page, args=[job.pk]))


def retry(request: HttpRequest, job: LedgerJob, page: str) -> HttpResponse:
    check_can_act(request, job)
    if ledger.retry(job, request.user):
        said = "" if job.RETRY_NOTE == LedgerJob.RETRY_NOTE else f": {job.RETRY_NOTE}"
        messages.info(request, f"Queued again{said}.")
    else:
        messages.warning(request, f"Only a failed or cancelled {job.NOUN} can be retried; {job} is {job.state}.")
    return redirect(page, pk=job.pk)


def reorder(request: HttpRequest, job: Any, page: str) -> HttpResponse:
    """Move a queued job in its owner's queue (queue.move), then back to ?next= or `page`."""
    user = request.user
    if not (user.is_staff or job.owner_id == user.pk):  # type: ignore[union-attr]
        raise PermissionDenied(f"only the {job.NOUN}'s owner or an admin can reorder it")
    where = request.POST.get("where", "")
    if where not in queue.MOVES:
        messages.error(request, f"Unknown move “{where}”: use one of {', '.join(queue.MOVES)}.")
    elif queue.move(job, where):
        place = f"to the {where} of its owner's queue" if where in ("top", "bottom") else f"{where} one place"
        messages.info(request, f"Moved {job} {place}.")
    else:
        messages.warning(request, f"Only a queued {job.NOUN} can be moved; {job} is already {job.state}.")
    return redirect(safe_next(request) or reverse(page, args=[job.pk]))


async def stream(request: HttpRequest, model: type[LedgerJob], pk: int, next_batch: NextBatch) -> HttpResponseBase:
    """A job page's live stream (see stream.event_stream)."""
    user = await request.auser()
    if not user.is_authenticated:
        return HttpResponse("login required", status=401)
    if not await model.objects.filter(pk=pk).aexists():
        raise Http404(f"no such {model.NOUN}")
    return sse_response(event_stream(next_batch, model, pk, page_cursor(request)))
