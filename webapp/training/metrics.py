"""A run's metric curve, kept compact in its row (`TrainingRun.metric_points`) for the charts."""

from __future__ import annotations

import bisect
from typing import Any

METRIC_KEYS = ("step", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s")
MAX_METRIC_POINTS = 2000


def merge_points(points: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold metric events into a run's compact curve: one point per step, in step order (a train point and an
    eval point at the same step merge). An attempt opens with a `restart` point at the step it starts from
    (0, or its checkpoint's): the curve after that step is dropped, being the lost attempt's, and the steps
    the checkpoint logged come again (replayed from its trainer state), filling what the lost attempt never
    reported. Past MAX_METRIC_POINTS every other point goes, eval points kept."""
    points = list(points)
    for data in metrics:
        if data.get("step") is None:
            continue
        point = {k: data[k] for k in METRIC_KEYS if isinstance(data.get(k), (int, float))}
        step = int(data["step"])
        if data.get("restart"):
            points = [p for p in points if p["step"] <= step]
        at = bisect.bisect_left([p["step"] for p in points], step)
        if at < len(points) and points[at]["step"] == step:
            points[at].update(point)
        else:
            points.insert(at, point)
    while len(points) > MAX_METRIC_POINTS:
        last = len(points) - 1
        thinned = [p for i, p in enumerate(points) if i % 2 == 0 or i == last or "eval_loss" in p]
        if len(thinned) == len(points):
            break
        points = thinned
    return points
