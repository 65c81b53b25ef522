"""What training used: GPU-hours, tokens trained and runs, per run, per person and per ISO week.

- GPU-hours: over a run's attempts, the wall time each ran (from the worker's `running` report to the end it
  reported or was given) times the GPUs it held. Each finished attempt's start and GPUs are in the run's
  `attempt_log`; the attempt running now counts up to now. An attempt on a CPU-only worker holds no GPU.
- Tokens trained: what a succeeded run's trainer counted (padding excluded), from its adapter's figures.
- Runs: counted in the week they were created. GPU-hours fall in the week each attempt ended, tokens in the week
  the run finished.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict
from typing import Any

from django.db.models import Q
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from webapp.jobs.models import RunState
from webapp.training.models import Adapter, TrainingRun

GROUPS = ("user", "week")


@dataclasses.dataclass(frozen=True)
class Span:
    """One attempt's running time and the GPUs it held."""

    start: dt.datetime
    end: dt.datetime
    gpus: int

    @property
    def gpu_hours(self) -> float:
        return max(0.0, (self.end - self.start).total_seconds()) / 3600 * self.gpus


@dataclasses.dataclass
class Totals:
    gpu_hours: float = 0.0
    tokens: int = 0
    runs: int = 0


def _when(value: Any) -> dt.datetime | None:
    moment = parse_datetime(value) if isinstance(value, str) else None
    if moment is not None and timezone.is_naive(moment):
        moment = timezone.make_aware(moment, dt.UTC)
    return moment


def attempt_spans(run: TrainingRun, now: dt.datetime | None = None) -> list[Span]:
    """The running time of each of the run's attempts, finished ones from its attempt_log, the current one from
    its row (running: up to now; finished before attempt_log kept starts: its start to its end)."""
    now = now or timezone.now()
    spans, logged = [], set()
    for entry in run.attempt_log or []:
        start, end = _when(entry.get("started")), _when(entry.get("at"))
        if start and end:
            spans.append(Span(start, end, int(entry.get("gpus") or 0)))
            logged.add(entry.get("attempt"))
    started = run.started_at
    if started and run.attempt not in logged and (not run.dispatched_at or started >= run.dispatched_at):
        if run.state == RunState.RUNNING:
            spans.append(Span(started, now, len(run.gpu_indices or [])))
        elif run.is_final and run.finished_at:
            spans.append(Span(started, run.finished_at, run.needs_gpus))
    return spans


def trained_tokens(adapter_metrics: Any) -> int:
    value = adapter_metrics.get("trained_tokens") if isinstance(adapter_metrics, dict) else None
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) and value > 0 else 0


def run_usage(run: TrainingRun) -> dict[str, Any]:
    """The run's page: its GPU-hours over every attempt, and the tokens it trained (once it has succeeded)."""
    metrics = Adapter.objects.filter(run=run).values_list("metrics", flat=True).first()
    spans = attempt_spans(run)
    return {"gpu_hours": sum(s.gpu_hours for s in spans), "attempts": len(spans), "tokens": trained_tokens(metrics)}


def iso_week(moment: dt.datetime) -> str:
    year, week, _ = timezone.localtime(moment).isocalendar()
    return f"{year}-W{week:02d}"


def usage(since: dt.datetime | None = None, group: str = "user", now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Totals per person (`group="user"`, most GPU-hours first) or per ISO week (`"week"`, oldest first), of what
    happened from `since` on (every run when None)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {', '.join(GROUPS)}")
    now = now or timezone.now()
    runs = TrainingRun.objects.select_related("owner").only(
        "id", "owner__username", "state", "attempt", "attempt_log", "started_at", "dispatched_at", "finished_at",
        "created_at", "gpu_indices", "needs_gpus")
    if since is not None:
        runs = runs.filter(Q(created_at__gte=since) | Q(finished_at__gte=since) | Q(state=RunState.RUNNING)
                           | Q(started_at__gte=since))
    tokens = dict(Adapter.objects.filter(run__in=runs.values("id")).values_list("run_id", "metrics"))
    totals: dict[str, Totals] = defaultdict(Totals)

    def key(run: TrainingRun, moment: dt.datetime) -> str:
        return run.owner.username if group == "user" else iso_week(moment)

    for run in runs.iterator(chunk_size=500):
        if since is None or run.created_at >= since:
            totals[key(run, run.created_at)].runs += 1
        for span in attempt_spans(run, now):
            if since is not None and span.end < since:
                continue
            clipped = Span(max(span.start, since), span.end, span.gpus) if since else span
            totals[key(run, span.end)].gpu_hours += clipped.gpu_hours
        count = trained_tokens(tokens.get(run.pk))
        if count and run.finished_at and (since is None or run.finished_at >= since):
            totals[key(run, run.finished_at)].tokens += count
    rows = [{group: name, "gpu_hours": round(t.gpu_hours, 4), "tokens": t.tokens, "runs": t.runs}
            for name, t in totals.items()]
    if group == "week":
        return sorted(rows, key=lambda r: r["week"])
    return sorted(rows, key=lambda r: (-r["gpu_hours"], -r["runs"], r["user"]))
