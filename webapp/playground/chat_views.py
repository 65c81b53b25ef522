"""The chat playground's pages: the list of sessions with the form of a new one, and a session's page (columns
side by side, streamed answers over SSE, stop, close, settings, thumbs, save as a prompt set)."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from webapp.catalog.models import BaseModel
from webapp.ids import whole
from webapp.jobs import views as job_views
from webapp.jobs.live import Mark
from webapp.jobs.models import FINAL_STATES
from webapp.jobs.stream import Batch, sse
from webapp.playground import chat, votedata
from webapp.playground.models import AdapterJob, ChatSession, JobEvent
from webapp.playground.services import JobError
from webapp.training.models import Adapter
from workers.contract import jobspecs


def _session(request: HttpRequest, pk: int, act: bool = False) -> ChatSession:
    session = get_object_or_404(ChatSession.objects.select_related("owner", "base_model", "job"), pk=pk)
    if act and not (request.user.is_staff or session.owner_id == request.user.pk):  # type: ignore[union-attr]
        raise PermissionDenied("only the chat's owner or an admin can do this")
    return session


def _refused(error: JobError, status: int = 400) -> JsonResponse:
    return JsonResponse({"errors": error.errors}, status=409 if isinstance(error, chat.Busy) else status)


@login_required
def chat_list(request: HttpRequest) -> HttpResponse:
    sessions = ChatSession.objects.filter(owner=request.user).select_related("base_model", "job")[:100]
    adapters = Adapter.objects.select_related("base_model").order_by("base_model__name", "-id")[:500]
    errors: dict[str, str] = {}
    if request.method == "POST":
        try:
            session = _create(request)
        except JobError as exc:
            errors = exc.errors
        else:
            return redirect(session)
    context = {
        "sessions": sessions, "adapters": adapters, "base_models": BaseModel.objects.order_by("name"),
        "errors": errors, "defaults": chat.DEFAULT_GENERATION, "precisions": jobspecs.BASE_PRECISIONS,
        "max_adapters": chat.MAX_ADAPTERS, "posted": request.POST, "selected": _selected(request),
        "idle_minutes": chat.idle_timeout() / 60,
    }
    return render(request, "playground/chat_list.html", context)


def _selected(request: HttpRequest) -> list[int]:
    values = request.POST.getlist("adapters") if request.method == "POST" else request.GET.getlist("adapters")
    return [pk for pk in (whole(v) for v in values) if pk is not None]


def _create(request: HttpRequest) -> ChatSession:
    ids = _selected(request)
    adapters = list(Adapter.objects.filter(pk__in=ids).select_related("base_model"))
    by_id = {a.pk: a for a in adapters}
    ordered = [by_id[pk] for pk in dict.fromkeys(ids) if pk in by_id]
    base_id = whole(request.POST.get("base_model", ""))
    base = BaseModel.objects.filter(pk=base_id).first() if base_id is not None else None
    if base is not None and any(a.base_model_id != base.pk for a in ordered):
        raise JobError({"adapters": f"every adapter must be of the chosen base, {base}"})
    return chat.start_session(
        request.user, ordered, include_base=request.POST.get("include_base") == "on" or not ordered,
        system_prompt=request.POST.get("system_prompt", ""), base=base,
        generation={k: request.POST.get(k) for k in chat.GENERATION_FIELDS},
        base_precision=request.POST.get("base_precision", "auto"), title=request.POST.get("title", ""),
    )


@login_required
def chat_detail(request: HttpRequest, pk: int) -> HttpResponse:
    session = _session(request, pk)
    job = session.job
    last = JobEvent.objects.filter(job=job).order_by("-id").values_list("id", flat=True).first() if job else None
    context = {
        "session": session,
        "state": state_json(session, request.user),
        "cursor": last or 0,
        "can_act": request.user.is_staff or session.owner_id == request.user.pk,  # type: ignore[union-attr]
        "defaults": session.generation,
    }
    return render(request, "playground/chat_detail.html", context)


def state_json(session: ChatSession, user: Any) -> dict[str, Any]:
    """Everything the page draws: columns, messages with their answers and thumbs, the model's status, settings."""
    tallies = chat.thumb_tallies(session, user)
    return {
        "id": session.pk,
        "columns": chat.columns_json(session),
        "messages": [chat.message_json(m, tallies) for m in session.messages.prefetch_related("answers")],
        "status": chat.status(session),
        "system_prompt": session.system_prompt,
        "generation": session.generation,
        "closed": session.closed,
    }


@login_required
def chat_state(request: HttpRequest, pk: int) -> JsonResponse:
    session = _session(request, pk)
    return JsonResponse(state_json(session, request.user))


@login_required
@require_POST
def chat_send(request: HttpRequest, pk: int) -> JsonResponse:
    session = _session(request, pk, act=True)
    try:
        message = chat.send(session, request.POST.get("content", ""))
    except JobError as exc:
        return _refused(exc)
    return JsonResponse({"message": chat.message_json(message, {}), "status": chat.status(session),
                         "job": session.job_id}, status=201)


@login_required
@require_POST
def chat_stop(request: HttpRequest, pk: int) -> JsonResponse:
    session = _session(request, pk, act=True)
    return JsonResponse({"stopped": chat.stop(session)})


@login_required
@require_POST
def chat_close(request: HttpRequest, pk: int) -> HttpResponse:
    session = _session(request, pk, act=True)
    chat.close(session)
    session.refresh_from_db()
    if request.headers.get("Accept", "").startswith("application/json"):
        return JsonResponse({"status": chat.status(session)})
    messages.info(request, "The chat was closed: its model is unloaded. A new message loads it again.")
    return redirect(session)


@login_required
@require_POST
def chat_settings(request: HttpRequest, pk: int) -> JsonResponse:
    session = _session(request, pk, act=True)
    try:
        chat.update_settings(session, system_prompt=request.POST.get("system_prompt"),
                             generation={k: request.POST.get(k) for k in chat.GENERATION_FIELDS},
                             title=request.POST.get("title"))
    except JobError as exc:
        return _refused(exc)
    return JsonResponse({"system_prompt": session.system_prompt, "generation": session.generation,
                         "title": str(session)})


@login_required
@require_POST
def chat_thumb(request: HttpRequest, pk: int) -> JsonResponse:
    session = _session(request, pk)
    try:
        tally = chat.thumb(session, request.user, request.POST.get("index"), request.POST.get("column"),
                           request.POST.get("value"))
    except JobError as exc:
        return _refused(exc)
    return JsonResponse(tally)


@login_required
@require_POST
def chat_save(request: HttpRequest, pk: int) -> HttpResponse:
    session = _session(request, pk)
    try:
        prompts = chat.save_prompt_set(session, request.user, request.POST.get("name", ""),
                                       request.POST.get("column", ""))
    except JobError as exc:
        messages.error(request, "; ".join(exc.errors.values()))
        return redirect(session)
    messages.success(request, f"Saved as the prompt set “{prompts}” ({len(prompts.rows)} rows): compare adapters on it "
                              "or evaluate them with it.")
    keys = [c["key"] for c in session.columns_order]
    ids = [str(a.pk) for a in chat.ordered_adapters(session) if a.key in keys]
    query = "&".join([f"prompt_set={prompts.pk}", *(f"adapters={pk}" for pk in ids)])
    return redirect(f"{reverse('compare-new')}?{query}")


@login_required
@require_POST
def chat_to_dataset(request: HttpRequest, pk: int) -> HttpResponse:
    """A feedback dataset (for KTO) of the chat's thumbs, made as a comparison's thumbs make one."""
    session = _session(request, pk)
    try:
        source = votedata.make_chat_dataset(session, request.user, request.POST.get("name", ""))
    except votedata.DatasetRefused as refused:
        messages.error(request, f"No dataset made: {refused.field + ': ' if refused.field else ''}{refused.message}")
        return redirect(session)
    messages.success(request, f"Made {source.dataset}: {source.summary}.")
    return redirect("dataset-detail", pk=source.dataset_id)


# --- the live stream ---------------------------------------------------------------------------------------


def stream_batch(job_id: int, after: int, known: Mark | None = None) -> Batch:
    """The answers of the messages the job's new events touched (whole texts: a page that reconnects, or opened
    mid-answer, is right at once), and the session's status whenever something changed. The job is read before
    its events, as stream.batch_reader does (a final state read first means every event is there)."""
    job = AdapterJob.objects.filter(pk=job_id).first()
    if job is None:
        return [], after, ("deleted", ""), True
    events = list(JobEvent.objects.filter(job_id=job_id, id__gt=after).order_by("id")[:500])
    if events:
        after = events[-1].id
    session = ChatSession.objects.filter(pk=(job.params or {}).get("session_id")).first()
    if session is None:
        return [], after, ("deleted", ""), True
    touched = {int(e.data.get("row", e.data.get("turn", 0)) or 0) for e in events if e.kind in ("output", "chat")}
    out = []
    if touched:
        rows = session.messages.filter(index__in=touched).prefetch_related("answers")
        out.append(sse("answers", json.dumps([chat.message_json(m) for m in rows], separators=(",", ":"))))
    final = job.state in FINAL_STATES and len(events) < 500
    mark: Mark = (job.state, job.wait_reason or "")
    if events or mark != known or final:
        out.append(sse("status", json.dumps(chat.status(session), separators=(",", ":"))))
    return out, after, mark, final


async def chat_stream(request: HttpRequest, pk: int) -> HttpResponseBase:
    """The live stream of the session's current job (`?job=` names it; the page reconnects to a new one)."""
    job_id = whole(request.GET.get("job", ""))
    if job_id is None or not await AdapterJob.objects.filter(pk=job_id, kind="chat", params__session_id=pk).aexists():
        raise Http404("no such chat job")
    return await job_views.stream(request, AdapterJob, job_id, stream_batch)
