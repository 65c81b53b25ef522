"""Chat sessions: what the pages, the REST API and the worker API do with them, in one place.

A session's model is loaded by a chat job (workers/adapters/chat.py) that holds its GPU while the session is in
use. Sending a message records it with an empty answer per column and makes sure a job is there (a new one
loads the model again after the last one was released or closed). The worker asks for the next message
(`next_turn`, a long poll), streams each column's answer as `output` events, which `fold_events` appends to the
answers (a page opened mid-answer shows what has come), and ends the turn with a `chat` event holding the final
texts. The stop of a turn and the close of the session reach the worker in the replies to its batches
(`worker_reply`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections, transaction
from django.db.models import Max

from webapp.jobs import ledger
from webapp.jobs.live import released
from webapp.jobs.stream import sse
from webapp.playground.kinds import JobKind
from webapp.playground.models import AdapterJob, ChatAnswer, ChatMessage, ChatSession, ChatThumb, JobEvent, PromptSet
from webapp.playground.services import JobError, base_load, common_base, queue_job
from webapp.training.models import Adapter
from workers.contract import jobspecs
from workers.contract.jobspecs import BASE_KEY, MAX_CHAT_COLUMNS
from workers.data.prompts import shown_prompt

MAX_MESSAGE_CHARS = 32_000
MAX_ADAPTERS = MAX_CHAT_COLUMNS - 1
GENERATION_FIELDS = ("max_new_tokens", "temperature", "top_p", "seed")
DEFAULT_GENERATION = {"max_new_tokens": 256, "temperature": 0.7, "top_p": 0.95, "seed": 0}


def idle_timeout() -> int:
    return int(getattr(settings, "TUNEDECK_CHAT_IDLE_S", 600))


# --- settings ----------------------------------------------------------------------------------------------


def _no_nul(errors: dict[str, str], **texts: str | None) -> None:
    """A NUL character cannot be stored (PostgreSQL) nor typed: refused by field, as Django's forms do."""
    for field, text in texts.items():
        if text and "\x00" in text:
            errors[field] = "must not contain NUL characters (\\x00)"


def generation_values(values: dict[str, Any], current: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sampling settings of a session from what was given over `current` (or the defaults), checked:
    JobError naming the field otherwise."""
    merged = {**DEFAULT_GENERATION, **(current or {})}
    errors: dict[str, str] = {}
    for name in GENERATION_FIELDS:
        if values.get(name) in (None, ""):
            continue
        kind = int if name in ("max_new_tokens", "seed") else float
        try:
            merged[name] = kind(values[name])
        except (TypeError, ValueError):
            errors[name] = f"must be a{'n integer' if kind is int else ' number'}, not {str(values[name])[:40]!r}"
    if not errors:
        errors = jobspecs.GenerationParams(**merged).validate()
    if errors:
        raise JobError(errors)
    return merged


def start_session(
    owner: Any,
    adapters: list[Adapter],
    include_base: bool = True,
    system_prompt: str = "",
    generation: dict[str, Any] | None = None,
    base_precision: str = "auto",
    title: str = "",
    base: Any = None,
) -> ChatSession:
    """A new session; its model starts loading at once, so that it is ready by the time the first message is typed.

    `base`: the base model when no adapter is chosen (a chat with the base alone)."""
    if len(adapters) > MAX_ADAPTERS:
        raise JobError({"adapters": f"at most {MAX_ADAPTERS} adapters (and the base) side by side, got {len(adapters)}"})
    if adapters:
        base = common_base(adapters)
    if base is None:
        raise JobError({"adapters": "pick a base model or at least one adapter"})
    if not adapters and not include_base:
        raise JobError({"include_base": "with no adapter, the base itself must answer"})
    if base_precision not in jobspecs.BASE_PRECISIONS:
        raise JobError({"base_precision": f"must be one of {', '.join(jobspecs.BASE_PRECISIONS)}"})
    refused: dict[str, str] = {}
    _no_nul(refused, system_prompt=system_prompt, title=title)
    if refused:
        raise JobError(refused)
    base_load(adapters, base_precision)  # refused here, not at the first message
    values = generation_values(generation or {})
    with transaction.atomic():
        session = ChatSession.objects.create(
            title=title[:200], owner=owner, base_model=base, include_base=include_base, system_prompt=system_prompt,
            generation=values, base_precision=base_precision, idle_timeout_s=idle_timeout(),
            columns_order=[{"key": a.key, "label": str(a)} for a in adapters],
        )
        session.adapters.set(adapters)
        ensure_job(session)
    return session


def update_settings(session: ChatSession, system_prompt: str | None = None,
                    generation: dict[str, Any] | None = None, title: str | None = None) -> ChatSession:
    """New settings apply from the next message on; the answers given stay as they were made."""
    refused: dict[str, str] = {}
    _no_nul(refused, system_prompt=system_prompt, title=title)
    if refused:
        raise JobError(refused)
    if generation:
        session.generation = generation_values(generation, session.generation)
    if system_prompt is not None:
        session.system_prompt = system_prompt
    if title is not None:
        session.title = title[:200]
    session.save(update_fields=["generation", "system_prompt", "title", "updated_at"])
    return session


# --- the job ------------------------------------------------------------------------------------------------


def live_job(session: ChatSession) -> AdapterJob | None:
    job = session.job
    return job if job is not None and not job.is_final else None


def ensure_job(session: ChatSession) -> AdapterJob:
    """The session's job, started anew where none holds its model (never started, released, closed, failed)."""
    job = live_job(session)
    if job is not None:
        return job
    adapters = ordered_adapters(session)
    load, loading = base_load(adapters, session.base_precision)
    spec = jobspecs.ChatSpec(
        job_id=0, attempt=0, base_model=session.base_model.model_ref(), adapters=[a.ref() for a in adapters],
        load=load, include_base=session.include_base, idle_timeout_s=session.idle_timeout_s,
    )
    job = queue_job(JobKind.CHAT, session.owner, session.base_model, spec, adapters, notes=(loading,),
                 extra={"session_id": session.pk, "base_precision": session.base_precision})
    ChatSession.objects.filter(pk=session.pk).update(job=job, closed=False)
    session.job, session.closed = job, False
    return job


def ordered_adapters(session: ChatSession) -> list[Adapter]:
    by_key = {a.key: a for a in session.adapters.all()}
    return [by_key[c["key"]] for c in session.columns_order if c["key"] in by_key]


class Busy(JobError):
    """A message sent while the last one is still being answered."""


def send(session: ChatSession, content: str) -> ChatMessage:
    """Record a message (answered by every column with the session's current settings) and make sure a job holds
    the model."""
    text = content.strip()
    if not text:
        raise JobError({"content": "type a message"})
    if len(content) > MAX_MESSAGE_CHARS:
        raise JobError({"content": f"at most {MAX_MESSAGE_CHARS:,} characters, got {len(content):,}"})
    refused: dict[str, str] = {}
    _no_nul(refused, content=content)
    if refused:
        raise JobError(refused)
    with transaction.atomic():
        locked = ChatSession.objects.select_for_update().get(pk=session.pk)
        pending = ChatAnswer.objects.filter(message__session=locked, done=False)
        if live_job(locked) is None:
            pending.update(done=True, stopped=True)  # its job ended (failed, cancelled) before answering them
        elif pending.exists():
            raise Busy({"content": "the last message is still being answered: wait for it, or stop it"})
        index = (locked.messages.aggregate(last=Max("index"))["last"] or 0) + 1
        message = ChatMessage.objects.create(session=locked, index=index, content=content,
                                             system_prompt=locked.system_prompt, generation=locked.generation)
        ChatAnswer.objects.bulk_create(ChatAnswer(message=message, column=key) for key, _ in locked.columns())
        ensure_job(locked)
        ChatSession.objects.filter(pk=locked.pk).update(updated_at=message.created_at)
    session.refresh_from_db()
    return message


def stop(session: ChatSession) -> int:
    """Stop the answers being written (the worker ends them at its next step); returns how many messages were
    stopped. Answers the worker never started are closed at once: no job may be left to answer them."""
    pending = session.messages.filter(answers__done=False).distinct()
    count = pending.update(stop_requested=True)
    if live_job(session) is None:
        ChatAnswer.objects.filter(message__session=session, done=False).update(done=True, stopped=True)
    return count


def close(session: ChatSession) -> None:
    """Unload the model: the worker ends the job at its next poll (a job not yet started is cancelled); the
    conversation stays, and a new message loads the model again."""
    with transaction.atomic():
        ChatSession.objects.filter(pk=session.pk).update(closed=True)
        session.closed = True
        job = live_job(session)
        if job is not None and job.state in ("queued", "paused", "dispatched"):
            ledger.request_cancel(job)
        stop(session)


# --- the worker's side ---------------------------------------------------------------------------------------


def session_of(job: AdapterJob) -> ChatSession | None:
    return ChatSession.objects.filter(pk=(job.params or {}).get("session_id"), job=job).first()


def next_turn(job: AdapterJob, after: int) -> dict[str, Any]:
    """What the worker answers next: {"turn": ...} for the first message after turn `after` with an answer to
    write, {"close": True} where the session was closed or moved to another job, {} while there is none."""
    session = session_of(job)
    if session is None or session.closed or job.cancel_requested:
        return {"close": True, "cancel": job.cancel_requested}
    message = session.messages.filter(index__gt=after, answers__done=False).order_by("index").first()
    if message is None:
        return {}
    return {"turn": turn_payload(session, message)}


def turn_payload(session: ChatSession, message: ChatMessage) -> dict[str, Any]:
    """Each column's conversation up to `message` (its own earlier answers), and the message's settings."""
    earlier = list(session.messages.filter(index__lt=message.index).prefetch_related("answers"))
    system = [{"role": "system", "content": message.system_prompt}] if message.system_prompt.strip() else []
    conversations: dict[str, list[dict[str, str]]] = {}
    for key, _ in session.columns():
        turns = list(system)
        for m in earlier:
            answer = next((a.text for a in m.answers.all() if a.column == key), "")
            turns += [{"role": "user", "content": m.content}, {"role": "assistant", "content": answer}]
        conversations[key] = [*turns, {"role": "user", "content": message.content}]
    generation = {k: v for k, v in message.generation.items() if k in GENERATION_FIELDS}
    return {"index": message.index, "conversations": conversations, "generation": generation}


# --- what pages and the API show ------------------------------------------------------------------------------


def status(session: ChatSession) -> dict[str, Any]:
    """Where the session's model is: none loaded, waiting for a GPU, loading (since when), ready (loaded in how
    long), released after the idle timeout, closed or failed; with a sentence for people."""
    job = session.job
    out: dict[str, Any] = {"job": job.pk if job else None, "job_state": job.state if job else None}
    if job is None:
        return {**out, "state": "unloaded", "text": "No model loaded: the next message loads it"}
    news = JobEvent.objects.filter(job=job, kind="chat").order_by("-id").values("data", "message", "created_at")
    last = next(iter(news), None)
    said = (last or {}).get("data", {}).get("state")
    load_s = next((e["data"].get("load_s") for e in news if e["data"].get("state") == "ready"), None)
    out["load_s"] = load_s
    if job.state == "queued":
        return {**out, "state": "queued", "text": "Waiting for a GPU worker to load the model"}
    if job.state in ("dispatched", "running") and said in (None, "loading"):
        since = (last or {}).get("created_at") or job.started_at or job.created_at
        return {**out, "state": "loading", "since": since.isoformat() if since else None,
                "text": "Loading the model"}
    if not job.is_final and job.state != "paused":
        return {**out, "state": "ready", "text": f"Ready · loaded in {load_s:.1f} s" if load_s is not None else "Ready"}
    if job.state == "failed":
        return {**out, "state": "failed", "text": f"The session's job failed: {job.error or 'see its log'}"}
    if (job.result or {}).get("closed") == "idle":
        minutes = session.idle_timeout_s / 60
        return {**out, "state": "released",
                "text": f"Released after {minutes:g} min without a message: the next message loads the model again"}
    return {**out, "state": "closed", "text": "Closed: the next message loads the model again"}


def answer_json(answer: ChatAnswer) -> dict[str, Any]:
    return {"column": answer.column, "text": answer.text, "done": answer.done, "stopped": answer.stopped,
            "tokens": answer.tokens, "first_token_s": answer.first_token_s, "seconds": answer.seconds,
            "error": answer.error}


def message_json(message: ChatMessage, thumbs: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    answers = []
    for answer in message.answers.all():
        item = answer_json(answer)
        if thumbs is not None:
            item["thumbs"] = thumbs.get(answer.pk, {"up": 0, "down": 0, "mine": None})
        answers.append(item)
    return {"index": message.index, "content": message.content, "stop_requested": message.stop_requested,
            "generation": message.generation, "system_prompt": message.system_prompt, "answers": answers}


def thumb_tallies(session: ChatSession, user: Any) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for answer_id, up, user_id in ChatThumb.objects.filter(answer__message__session=session).values_list(
            "answer_id", "up", "user_id"):
        tally = out.setdefault(answer_id, {"up": 0, "down": 0, "mine": None})
        tally["up" if up else "down"] += 1
        if user_id == user.pk:
            tally["mine"] = "up" if up else "down"
    return out


def thumb(session: ChatSession, user: Any, index: Any, column: Any, value: Any) -> dict[str, Any]:
    """Set `user`'s thumb on one finished answer (`up`, `down`, or `none` to take it back); its tally."""
    if value not in ("up", "down", "none"):
        raise JobError({"value": f"one of up, down, none; got {str(value)[:40]!r}"})
    answer = ChatAnswer.objects.filter(message__session=session, message__index=_whole(index, "index"),
                                       column=str(column)).first()
    if answer is None:
        raise JobError({"column": f"no answer of column {str(column)[:40]!r} to message {str(index)[:20]}"})
    if not answer.done:
        raise JobError({"index": "the answer is still being written"})
    if value == "none":
        ChatThumb.objects.filter(answer=answer, user=user).delete()
    else:
        ChatThumb.objects.update_or_create(answer=answer, user=user, defaults={"up": value == "up"})
    return thumb_tallies(session, user).get(answer.pk, {"up": 0, "down": 0, "mine": None})


def _whole(value: Any, field: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise JobError({field: f"must be a message number, not {str(value)[:20]!r}"}) from None


def save_prompt_set(session: ChatSession, owner: Any, name: str = "", column: str = "") -> PromptSet:
    """The conversation as a prompt set to compare or evaluate later: a row per message, each holding the
    conversation before it (the system prompt, earlier messages and `column`'s earlier answers: the first
    column's by default) as chat turns, and `column`'s answer as its reference."""
    keys = [key for key, _ in session.columns()]
    column = column or keys[0]
    if column not in keys:
        raise JobError({"column": f"no column {column[:40]!r} in this chat (one of {', '.join(keys)})"})
    messages = list(session.messages.prefetch_related("answers"))
    if not messages:
        raise JobError({"session": "the chat has no message yet"})
    rows = []
    for message in messages:
        turns = turn_payload(session, message)["conversations"][column]
        answer = next((a for a in message.answers.all() if a.column == column), None)
        reference = answer.text if answer is not None and answer.done and not answer.stopped else ""
        rows.append(dataclasses.asdict(jobspecs.PromptRow(prompt=shown_prompt(turns), reference=reference,
                                                          turns=turns)))
    label = dict(session.columns())[column]
    return PromptSet.objects.create(name=(name or f"{session} ({label})")[:200], owner=owner, rows=rows)


def columns_json(session: ChatSession) -> list[dict[str, str]]:
    return [{"key": key, "label": label, "base": key == BASE_KEY} for key, label in session.columns()]


# --- one turn's answers as Server-Sent Events (the REST API) ------------------------------------------------------

TURN_LOOK_S = 0.1
TURN_PING_S = 15.0


def turn_snapshot(session_id: int, index: int) -> dict[str, Any] | None:
    """The answers to message `index` as they stand, and whether they can still come (a live job)."""
    session = ChatSession.objects.select_related("job").filter(pk=session_id).first()
    if session is None:
        return None
    answers = [answer_json(a) for a in ChatAnswer.objects.filter(message__session=session, message__index=index)]
    live = live_job(session) is not None
    # The status (a query of the job's events) only matters once no job can answer: not at every look.
    return {"answers": answers, "live": live, "status": None if live else status(session)}


async def turn_stream(session_id: int, index: int) -> AsyncIterator[str]:
    """`event: delta` ({"column", "text"}: text appended to that column's answer, or {"column", "replace"}: its
    whole text where the final one differs from what streamed), then `event: answer` per column (text, tokens,
    time to first token, stopped) and `event: done`; `event: error` if the session's job ended first. Holds no
    database connection between its looks."""
    await sync_to_async(connections.close_all)()
    yield "retry: 2000\n\n"
    look = sync_to_async(released(turn_snapshot), thread_sensitive=False)
    sent: dict[str, str] = {}
    quiet_since = time.monotonic()
    while True:
        snapshot = await look(session_id, index)
        if snapshot is None:
            yield sse("error", json.dumps({"detail": "the chat was deleted"}))
            return
        for answer in snapshot["answers"]:
            before, text = sent.get(answer["column"], ""), answer["text"]
            if text != before:
                change = {"text": text[len(before):]} if text.startswith(before) else {"replace": text}
                yield sse("delta", json.dumps({"column": answer["column"], **change}, separators=(",", ":")))
                sent[answer["column"]] = text
                quiet_since = time.monotonic()
        if snapshot["answers"] and all(a["done"] for a in snapshot["answers"]):
            for answer in snapshot["answers"]:
                yield sse("answer", json.dumps(answer, separators=(",", ":")))
            yield sse("done", "")
            return
        if not snapshot["live"]:
            yield sse("error", json.dumps({"detail": snapshot["status"]["text"]}))
            return
        if time.monotonic() - quiet_since > TURN_PING_S:
            yield ": ping\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(TURN_LOOK_S)
