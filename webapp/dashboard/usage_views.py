"""The overview's usage panel: GPU-hours, tokens trained and runs over the last weeks, per ISO week (with bars
drawn on the server as SVG) and per person. Loaded once with the page, not on each of the overview's polls."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from webapp.training.usage import iso_week, usage

WEEKS = 8
BAR_WIDTH, BAR_GAP, CHART_HEIGHT = 56, 16, 120


@dataclasses.dataclass(frozen=True)
class Bar:
    week: str
    gpu_hours: float
    x: int
    y: float
    height: float

    @property
    def label_x(self) -> int:
        return self.x + BAR_WIDTH // 2


def weeks_back(now: dt.datetime, weeks: int = WEEKS) -> tuple[dt.datetime, list[str]]:
    """The start (Monday 00:00) of the ISO week `weeks - 1` weeks before now's, and the weeks from it to now's."""
    local = timezone.localtime(now)
    monday = (local - dt.timedelta(days=local.weekday(), weeks=weeks - 1)).replace(hour=0, minute=0, second=0,
                                                                                     microsecond=0)
    return monday, [iso_week(monday + dt.timedelta(weeks=i)) for i in range(weeks)]


def bars(per_week: list[dict[str, Any]], weeks: list[str]) -> list[Bar]:
    hours = {row["week"]: row["gpu_hours"] for row in per_week}
    top = max([hours.get(w, 0.0) for w in weeks] + [0.0]) or 1.0
    out = []
    for i, week in enumerate(weeks):
        value = hours.get(week, 0.0)
        height = round(value / top * CHART_HEIGHT, 1)
        out.append(Bar(week, value, i * (BAR_WIDTH + BAR_GAP), round(CHART_HEIGHT - height + 4, 1), height))
    return out


def usage_context(now: dt.datetime | None = None) -> dict[str, Any]:
    since, weeks = weeks_back(now or timezone.now())
    per_week = usage(since, "week", now=now)
    by_week = {row["week"]: row for row in per_week}
    return {
        "since": since,
        "per_week": [by_week.get(w, {"week": w, "gpu_hours": 0.0, "tokens": 0, "runs": 0}) for w in weeks],
        "per_user": usage(since, "user", now=now),
        "bars": bars(per_week, weeks),
        "chart_width": WEEKS * (BAR_WIDTH + BAR_GAP),
        "chart_height": CHART_HEIGHT + 24,
        "bar_width": BAR_WIDTH,
    }


@login_required
def usage_panel(request: HttpRequest) -> HttpResponse:
    template = "dashboard/partials/usage.html" if getattr(request, "htmx", False) else "dashboard/usage.html"
    return render(request, template, usage_context())
