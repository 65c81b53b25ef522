"""The kinds of adapter job, and what each does at the ledger's hooks, declared in one place (`HOOKS`).

A kind's worker side (its spec, runner and resource needs) is declared in the data plane's contract; its
page is a form and a view of its own. Here: what the control plane hands the worker at claim time (`at_claim`), and records
as the job runs (`on_start`, `fold_events`) and once it has succeeded (`record`), inside the ledger's
transactions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import ObjectDoesNotExist
from django.db import models
from django.db.models import F, Max, Value
from django.db.models.functions import Concat

from webapp.training.models import Adapter, AdapterOrigin, AdapterParent

if TYPE_CHECKING:
    from webapp.playground.models import AdapterJob


class JobKind(models.TextChoices):
    COMPARE = "compare"
    CHAT = "chat"
    MERGE = "merge"
    EXPORT = "export"
    COMBINE = "combine"
    EVALUATE = "evaluate"
    PUSH = "push"


def restart_comparison(job: AdapterJob) -> None:
    """An attempt starts: a comparison generates every cell again."""
    try:
        comparison = job.comparison
    except ObjectDoesNotExist:
        return
    comparison.cells.all().delete()


def streamed_deltas(events: list[dict[str, Any]]) -> dict[tuple[int, str], str]:
    """The text the `output` events of a batch add to each (row, column), joined in order."""
    deltas: dict[tuple[int, str], str] = {}
    for event in events:
        data = event.get("data") or {}
        if event.get("kind") == "output" and "row" in data and "column" in data:
            key = (int(data["row"]), str(data["column"])[:64])
            deltas[key] = deltas.get(key, "") + str(data.get("text", ""))
    return deltas


def fold_streamed_text(job: AdapterJob, events: list[dict[str, Any]]) -> None:
    """Append streamed text to the comparison's cells, so a page opened mid-run shows it at once."""
    deltas = streamed_deltas(events)
    if not deltas:
        return
    cells = job.comparison.cells
    existing = {(c.row, c.column): c for c in cells.filter(done=False)}
    for (row, column), text in deltas.items():
        cell = existing.get((row, column))
        if cell is None:
            cells.get_or_create(row=row, column=column, defaults={"text": text})
        else:
            cells.filter(pk=cell.pk).update(text=Concat(F("text"), Value(text)))


def record_outputs(job: AdapterJob, result: dict[str, Any]) -> None:
    job.comparison.store_outputs(result.get("outputs", []))


def record_merged_model(job: AdapterJob, result: dict[str, Any]) -> None:
    adapter = job.adapters.get()
    adapter.merged_models.update_or_create(
        job=job,
        defaults={
            "uri": result["merged_uri"],
            "dtype": str(result.get("dtype", "")),
            "size_bytes": int(result["size_bytes"]),
            "sha256": str(result["sha256"]),
            "verified": bool(result.get("verified")),
            "figures": result.get("check") or {},
        },
    )


def record_export(job: AdapterJob, result: dict[str, Any]) -> None:
    """An export's folder is listed with the merged models, by its target and form (an adapter-form export holds
    the adapter beside a Modelfile: no merge, no check)."""
    adapter = job.adapters.get()
    adapter.merged_models.update_or_create(
        job=job,
        defaults={
            "uri": result["output_uri"],
            "dtype": str(result.get("dtype", "")),
            "size_bytes": int(result["size_bytes"]),
            "sha256": str(result["sha256"]),
            "verified": bool(result.get("verified")),
            "figures": result.get("check") or {},
            "target": str(result["target"]),
            "form": str(result["form"]),
            "name": str(result.get("name", "")),
        },
    )


def record_combination(job: AdapterJob, result: dict[str, Any]) -> None:
    parents = list(job.adapters.all())
    weights = job.params.get("weights", [])
    by_key = {p.key: p for p in parents}
    ordered = [by_key[a["key"]] for a in job.params.get("adapters", []) if a["key"] in by_key]
    adapter = Adapter.objects.create(
        name=job.params.get("name") or f"{job.params.get('combination_type')} of " + " + ".join(map(str, ordered)),
        owner_id=job.owner_id,
        base_model_id=job.base_model_id,
        origin=AdapterOrigin.COMBINED,
        method="lora",
        rank=int(result.get("r") or 0),
        quantization="none",
        uri=result["adapter_uri"],
        size_bytes=int(result["size_bytes"]),
        sha256=str(result["sha256"]),
        trainable_params=int(result.get("trainable_params") or 0),
        total_params=int(result.get("total_params") or 0),
        metrics={**result, "job_id": job.pk},
    )
    AdapterParent.objects.bulk_create(
        AdapterParent(child=adapter, parent=p, parent_name=str(p), weight=float(w))
        for p, w in zip(ordered, weights, strict=False)
    )
    type(job).objects.filter(pk=job.pk).update(result={**result, "adapter_id": adapter.pk})


def _chat_model(job: AdapterJob, name: str) -> Any:
    """A chat model class, by name (playground.chat and the models import this module)."""
    return type(job)._meta.apps.get_model("playground", name)


def fold_chat(job: AdapterJob, events: list[dict[str, Any]]) -> None:
    """A chat's streamed text appended to its answers; a turn's final texts and figures stored when it ends
    (see playground.chat)."""
    session_id = (job.params or {}).get("session_id")
    deltas = streamed_deltas(events)
    answers = _chat_model(job, "ChatAnswer").objects.filter(message__session_id=session_id)
    for (index, column), text in deltas.items():
        answers.filter(message__index=index, column=column, done=False).update(text=Concat(F("text"), Value(text)))
    for event in events:
        data = event.get("data") or {}
        if event.get("kind") != "chat" or data.get("state") != "answered":
            continue
        for column, answer in (data.get("answers") or {}).items():
            answers.filter(message__index=int(data["turn"]), column=str(column)[:64]).update(
                text=str(answer.get("text", "")), tokens=max(0, int(answer.get("tokens") or 0)),
                first_token_s=_seconds(answer.get("first_token_s")), seconds=_seconds(answer.get("seconds")),
                stopped=bool(answer.get("stopped")), error=str(answer.get("error") or "")[:2000], done=True,
            )


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def chat_reply(job: AdapterJob) -> dict[str, Any]:
    """What a chat job is told with each batch: the newest turn to stop, and whether the session was closed (or
    moved on to another job)."""
    session = _chat_model(job, "ChatSession").objects.filter(pk=(job.params or {}).get("session_id")).first()
    if session is None:
        return {"close": True}
    stopped = session.messages.filter(stop_requested=True).aggregate(last=Max("index"))["last"] or 0
    return {"stop_turn": stopped, "close": session.closed or session.job_id != job.pk}


def hub_token(job: AdapterJob) -> dict[str, Any]:
    return {"token": settings.HF_TOKEN}


@dataclasses.dataclass(frozen=True)
class Kind:
    """What the control plane does for one kind of job, beyond the ledger every job shares (the job's `result`
    is always stored)."""

    record: Callable[[AdapterJob, dict[str, Any]], None] | None = None  # what a succeeded job produced
    on_start: Callable[[AdapterJob], None] | None = None  # an attempt starts running
    fold_events: Callable[[AdapterJob, list[dict[str, Any]]], None] | None = None  # newly stored events
    # What the worker's spec carries beyond the stored params, handed over at claim time only, never stored.
    at_claim: Callable[[AdapterJob], dict[str, Any]] | None = None
    # What the worker is told with each reply to its batches, beyond the ledger's flags (a chat's stop).
    reply: Callable[[AdapterJob], dict[str, Any]] | None = None


HOOKS: dict[str, Kind] = {
    JobKind.COMPARE: Kind(record=record_outputs, on_start=restart_comparison, fold_events=fold_streamed_text),
    JobKind.CHAT: Kind(fold_events=fold_chat, reply=chat_reply),
    JobKind.MERGE: Kind(record=record_merged_model),
    JobKind.EXPORT: Kind(record=record_export),
    JobKind.COMBINE: Kind(record=record_combination),
    JobKind.EVALUATE: Kind(),  # the scores are its result
    JobKind.PUSH: Kind(at_claim=hub_token),  # the repository is its result
}
