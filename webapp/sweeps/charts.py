"""The sweep page's parallel-coordinates plot, drawn on the server as SVG: one vertical axis per searched setting
and one for the metric, one line per trial. Every text is escaped by format_html."""

from __future__ import annotations

import math
from typing import Any

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from webapp.sweeps.models import Sweep, Trial, TrialState

WIDTH, HEIGHT, TOP, BOTTOM, SIDE = 720, 300, 28, 36, 60
COLOURS = {TrialState.COMPLETE: "#2563eb", TrialState.PRUNED: "#d97706", TrialState.FAILED: "#9ca3af",
           TrialState.ACTIVE: "#10b981"}


def label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def axis_scale(values: list[Any], log: bool, choices: list[Any] | None = None) -> tuple[Any, list[Any]]:
    """A function from a value to 0..1 and the ticks to label (every choice of a categorical setting)."""
    if choices:
        names = [label(c) for c in choices]
        return (lambda v: (names.index(label(v)) + 0.5) / len(names) if label(v) in names else 0.5), names
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(numbers) != len(values) or not numbers:
        choices = list(dict.fromkeys(label(v) for v in values))
        return (lambda v: (choices.index(label(v)) + 0.5) / len(choices)), choices
    low, high = min(numbers), max(numbers)
    if log and low > 0:
        low, high, tf = math.log10(low), math.log10(high), math.log10
    else:
        tf = float
    span = (high - low) or 1.0
    return (lambda v: (tf(v) - low) / span if high != low else 0.5), [min(numbers), max(numbers)]


def parallel_coordinates(sweep: Sweep, trials: list[Trial]) -> SafeString:
    names = list(sweep.space)
    shown = [t for t in trials if all(n in t.params for n in names)]
    axes = [*names, sweep.metric]
    count = len(axes)
    gap = (WIDTH - 2 * SIDE) / max(count - 1, 1)
    xs = [SIDE + i * gap for i in range(count)]
    plot_h = HEIGHT - TOP - BOTTOM
    scales = []
    for name in names:
        entry = sweep.space[name]
        scales.append(axis_scale([t.params[name] for t in shown], bool(entry.get("log")),
                                 entry.get("choices") if entry.get("type") == "categorical" else None))
    metric_values = [t.value for t in shown if t.value is not None]
    scales.append(axis_scale(metric_values, False))
    parts = []
    for i, name in enumerate(axes):
        ticks = scales[i][1]
        parts.append(format_html('<line class="pc-axis" x1="{x}" y1="{t}" x2="{x}" y2="{b}"/>'
                                 '<text class="pc-name" x="{x}" y="{ty}" text-anchor="middle">{n}</text>',
                                 x=f"{xs[i]:.1f}", t=TOP, b=HEIGHT - BOTTOM, ty=HEIGHT - 12, n=name))
        categorical = i < len(names) and sweep.space[name].get("type") == "categorical"
        if categorical:
            for k, text in enumerate(ticks):
                y = HEIGHT - BOTTOM - (k + 0.5) / len(ticks) * plot_h
                parts.append(format_html('<text class="pc-tick" x="{x}" y="{y}">{v}</text>',
                                         x=f"{xs[i] + 6:.1f}", y=f"{y + 4:.1f}", v=text))
        elif ticks:
            parts.append(format_html('<text class="pc-tick" x="{x}" y="{y}" text-anchor="middle">{v}</text>',
                                     x=f"{xs[i]:.1f}", y=HEIGHT - BOTTOM + 14, v=label(ticks[0])))
            parts.append(format_html('<text class="pc-tick" x="{x}" y="{y}" text-anchor="middle">{v}</text>',
                                     x=f"{xs[i]:.1f}", y=TOP - 8, v=label(ticks[-1])))
    lines = []
    for trial in shown:
        points = []
        for i, name in enumerate(names):
            points.append((xs[i], HEIGHT - BOTTOM - scales[i][0](trial.params[name]) * plot_h))
        if trial.value is not None and metric_values:
            points.append((xs[-1], HEIGHT - BOTTOM - scales[-1][0](trial.value) * plot_h))
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        tip = ", ".join(f"{n}={label(trial.params[n])}" for n in names)
        lines.append((path, COLOURS.get(TrialState(trial.state), "#6b7280"), trial.number, tip,
                      label(trial.value) if trial.value is not None else "–"))
    body = format_html_join(
        "", '<polyline class="pc-line" points="{}" stroke="{}"><title>#{}: {} → {}</title></polyline>', lines)
    return format_html(
        '<svg class="parallel" viewBox="0 0 {w} {h}" role="img" aria-label="Parallel coordinates: settings to {m}">'
        '{axes}{body}</svg>', w=WIDTH, h=HEIGHT, m=sweep.metric, axes=SafeString("".join(parts)), body=body)
