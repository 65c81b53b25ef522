"""Which charts a run has, and their series: the source of the interactive charts' specs (static/tunedeck/charts.js
draws them from `chart_specs` and the points), and of the latest values each chart's caption shows without script."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from webapp.training.metrics import AXES
from workers.formatting import figure


@dataclass
class Series:
    name: str
    css: str  # a class from training.css: the colour of the line and of its legend swatch
    last: float | None
    count: int

    @property
    def last_label(self) -> str:
        return figure(self.last)


@dataclass
class Chart:
    """A chart's caption without script: its title, unit and each series' latest value and number of points."""

    title: str
    unit: str = ""
    series: list[Series] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(s.count for s in self.series)


def multi_chart(title: str, named: list[tuple[str, str, list[tuple[int, float]]]], unit: str = "") -> Chart:
    """Several series (name, css class, points) of one chart; series without points are left out."""
    return Chart(title, unit, [Series(name, css, points[-1][1], len(points)) for name, css, points in named if points])


def _number(value: Any) -> float | None:
    """A finite float, or None: metric data comes from workers and is not trusted to be numeric."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def metric_series(points: Iterable[dict[str, Any]], keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """Per metric key, (step, value) sorted by step; a resumed attempt repeats steps, and the latest point wins."""
    keys = list(keys)
    by_key: dict[str, dict[int, float]] = {key: {} for key in keys}
    for data in points:
        if not isinstance(data, dict):
            continue
        step = _number(data.get("step"))
        if step is None:
            continue
        for key in keys:
            value = _number(data.get(key))
            if value is not None:
                by_key[key][int(step)] = value
    return {key: sorted(values.items()) for key, values in by_key.items()}


@dataclass(frozen=True)
class ChartKind:
    """One chart of known metrics: (metric key, legend name, css class) per series."""

    title: str
    series: tuple[tuple[str, str, str], ...]
    unit: str = ""
    always: bool = False  # drawn (empty) before the run reports it: every objective logs it


LOSS = ChartKind("Loss", (("loss", "train", "series"), ("eval_loss", "eval", "series eval")), always=True)
# What trl's objectives log beside the loss: DPO, KTO and ORPO the pairs' rewards (the log-ratio to the reference,
# times beta), their margin and the share of pairs preferred; GRPO the graders' reward and the KL to the reference.
OBJECTIVE_CHARTS = (
    ChartKind("Rewards", (("rewards/chosen", "chosen", "series chosen"), ("rewards/rejected", "rejected", "series rejected"))),
    ChartKind("Reward margin", (("rewards/margins", "chosen - rejected", "series"),)),
    ChartKind("Preference accuracy", (("rewards/accuracies", "pairs preferred", "series"),), unit="share"),
    ChartKind("Reward", (("reward", "mean", "series"), ("reward_std", "std", "series c2"))),
    ChartKind("KL", (("kl", "KL to the reference", "series"),)),
    ChartKind("Completion length", (("completions/mean_length", "mean", "series"),
                                    ("completions/min_length", "min", "series c2"),
                                    ("completions/max_length", "max", "series c3")), unit="tokens"),
)
MECHANICS_CHARTS = (
    ChartKind("Learning rate", (("learning_rate", "learning rate", "series lr"),), always=True),
    ChartKind("Grad norm", (("grad_norm", "grad norm", "series grad"),), always=True),
    ChartKind("Throughput", (("tokens_per_s", "tokens/s", "series tput"),), unit="tokens/s", always=True),
)
KNOWN_CHARTS = (LOSS, *OBJECTIVE_CHARTS, *MECHANICS_CHARTS)
EVAL = "eval_"
PALETTE = ("series", "series c2", "series c3", "series c4")


def metric_keys(points: Iterable[dict[str, Any]]) -> set[str]:
    """Every metric some point of the curve has (the step, tokens seen and time aside: they are axes)."""
    return {key for data in points if isinstance(data, dict) for key in data if key != "step" and key not in AXES}


def other_charts(keys: set[str]) -> list[ChartKind]:
    """A chart for each family of metrics no known chart draws, by title: "<family>/<name>" metrics share the
    family's chart (GRPO's rewards/<grader>/mean and /std one chart per grader, DPO's logps/chosen and
    logps/rejected one), any other metric has its own. A metric's eval_ twin joins its chart, dashed."""
    known = {key for kind in KNOWN_CHARTS for key, _, _ in kind.series}
    families: dict[str, list[str]] = {}
    for key in sorted(keys):
        base = key.removeprefix(EVAL)
        if key in known or base in known or (key != base and base in keys):
            continue  # drawn by a known chart, or an eval twin drawn beside its training metric
        family = base.rpartition("/")[0]
        families.setdefault(family or base, []).append(key)
    return [
        ChartKind(title, tuple((key, key.removeprefix(title + "/") if key != title else title, PALETTE[i % len(PALETTE)])
                               for i, key in enumerate(members)))
        for title, members in families.items()
    ]


def with_eval_twins(kind: ChartKind, keys: set[str]) -> list[tuple[str, str, str]]:
    """The chart's series, each followed by its eval_ twin where the run evaluated it (dashed, its colour)."""
    series = []
    for key, name, css in kind.series:
        series.append((key, name, css))
        twin = EVAL + key
        if twin in keys and not any(k == twin for k, _, _ in kind.series):
            series.append((twin, f"eval {name}", f"{css} twin"))
    return series


def chart_kinds(keys: set[str]) -> list[tuple[ChartKind, list[tuple[str, str, str]]]]:
    """The charts of a run that reported `keys`, each with its series: the loss, the objective's own curves
    (whichever metrics the run reports), then the learning rate, gradient norm and throughput."""
    kinds = [kind for kind in (LOSS, *OBJECTIVE_CHARTS) if kind.always or any(k in keys for k, _, _ in kind.series)]
    kinds += other_charts(keys) + list(MECHANICS_CHARTS)
    return [(kind, with_eval_twins(kind, keys)) for kind in kinds]


def run_charts(points: Iterable[dict[str, Any]]) -> list[Chart]:
    """The run page's charts, from its metric events' data, oldest first (see chart_kinds)."""
    points = list(points)
    charts = chart_kinds(metric_keys(points))
    s = metric_series(points, {key for _, series in charts for key, _, _ in series})
    return [multi_chart(kind.title, [(name, css, s[key]) for key, name, css in series], unit=kind.unit)
            for kind, series in charts]


def chart_specs(keys: set[str]) -> list[dict[str, Any]]:
    """The charts of these metrics as the browser draws them: title, unit and, per series, the metric key, its
    legend name, its colour (a css class of training.css) and whether it is dashed (an eval twin, or eval loss)."""
    return [
        {"title": kind.title, "unit": kind.unit,
         "series": [{"key": key, "name": name, "css": css, "dashed": key.startswith(EVAL)} for key, name, css in series]}
        for kind, series in chart_kinds(keys)
    ]


def metrics_after(points: list[dict[str, Any]], after: int | None) -> list[dict[str, Any]]:
    """The curve's points past step `after` (all of them for None): what a live chart has not drawn yet."""
    if after is None:
        return points
    return [p for p in points if isinstance(p, dict) and isinstance(p.get("step"), int) and p["step"] > after]


JSON_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
PLAIN_STRING = re.compile(r'"([^"]*)"')


def metric_keys_of_json(text: str) -> set[str]:
    """`metric_keys` of a curve kept as JSON text, read without decoding it: a point holds only numbers
    (metrics.curve_values), so every string in the text is a key."""
    if "\\" not in text:  # no escapes: every key is the text between two quotes (5x faster to find)
        return set(PLAIN_STRING.findall(text)) - {"step", *AXES}
    return {json.loads(f'"{key}"') for key in set(JSON_STRING.findall(text))} - {"step", *AXES}

