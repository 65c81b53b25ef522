"""Server-drawn SVG line charts: no JavaScript needed, escaped by construction (numbers only)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from workers.formatting import figure

WIDTH, HEIGHT, PAD = 600, 200, 36


@dataclass
class Series:
    name: str
    css: str  # a class from training.css: the colour of the line and of its legend swatch
    points: str
    last: float | None
    count: int

    @property
    def last_label(self) -> str:
        return figure(self.last)


@dataclass
class Chart:
    points: str
    x_max: int
    y_min: float
    y_max: float
    last: float | None
    count: int
    width: int = WIDTH
    height: int = HEIGHT
    pad: int = PAD
    title: str = ""
    unit: str = ""
    series: list[Series] = field(default_factory=list)

    @property
    def x_end(self) -> int:
        return self.width - self.pad

    @property
    def y_end(self) -> int:
        return self.height - self.pad

    @property
    def y_min_label(self) -> str:
        return figure(self.y_min)

    @property
    def y_max_label(self) -> str:
        return figure(self.y_max)


def _thin(series: list[tuple[int, float]], max_points: int) -> list[tuple[int, float]]:
    if len(series) <= max_points:
        return series
    stride = len(series) / max_points  # keep the shape, not every point
    return [series[int(i * stride)] for i in range(max_points)] + [series[-1]]


def _coords(series: list[tuple[int, float]], x_max: int, y_min: float, span: float) -> str:
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    return " ".join(
        f"{PAD + inner_w * x / x_max:.1f},{PAD + inner_h * (1 - (y - y_min) / span):.1f}" for x, y in series
    )


def line_chart(series: list[tuple[int, float]], max_points: int = 400) -> Chart:
    series = _thin(series, max_points)
    if not series:
        return Chart("", 0, 0.0, 0.0, None, 0)
    xs, ys = [x for x, _ in series], [y for _, y in series]
    x_max, y_min, y_max = max(max(xs), 1), min(ys), max(ys)
    return Chart(_coords(series, x_max, y_min, (y_max - y_min) or 1.0), x_max, y_min, y_max, ys[-1], len(series))


def multi_chart(title: str, named: list[tuple[str, str, list[tuple[int, float]]]], unit: str = "",
                max_points: int = 400) -> Chart:
    """Several series (name, css class, points) on shared axes; series without points are left out."""
    named = [(name, css, _thin(points, max_points)) for name, css, points in named if points]
    if not named:
        return Chart("", 0, 0.0, 0.0, None, 0, title=title, unit=unit)
    xs = [x for _, _, pts in named for x, _ in pts]
    ys = [y for _, _, pts in named for _, y in pts]
    x_max, y_min, y_max = max(max(xs), 1), min(ys), max(ys)
    span = (y_max - y_min) or 1.0
    lines = [Series(name, css, _coords(pts, x_max, y_min, span), pts[-1][1], len(pts)) for name, css, pts in named]
    first = lines[0]
    return Chart(first.points, x_max, y_min, y_max, first.last, sum(s.count for s in lines),
                 title=title, unit=unit, series=lines)


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


def run_charts(points: Iterable[dict[str, Any]]) -> list[Chart]:
    """The run page's charts, from its metric events' data, oldest first."""
    s = metric_series(points, ["loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s"])
    return [
        multi_chart("Loss", [("train", "series", s["loss"]), ("eval", "series eval", s["eval_loss"])]),
        multi_chart("Learning rate", [("learning rate", "series lr", s["learning_rate"])]),
        multi_chart("Grad norm", [("grad norm", "series grad", s["grad_norm"])]),
        multi_chart("Throughput", [("tokens/s", "series tput", s["tokens_per_s"])], unit="tokens/s"),
    ]
