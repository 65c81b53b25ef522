"""A run's metric curve, kept compact in its row (`TrainingRun.metric_points`) for the charts."""

from __future__ import annotations

import bisect
import math
from typing import Any

# A point keeps every number a worker reports (the loss, and each objective's own: rewards, margins, KL…) but these,
# which are progress rather than curves; and a bounded number of keys, each a bounded name.
NOT_CURVES = ("total_steps", "epoch")
# What a point is plotted against besides its step: the tokens trained on so far (trl's running count) and the
# worker's clock when it reported the point (seconds since the epoch). They are axes, not curves of their own.
TOKENS, TIME = "num_tokens", "time"
AXES = (TOKENS, TIME)
MAX_KEYS, MAX_KEY_LENGTH = 64, 100
MAX_METRIC_POINTS = 2000


def curve_values(data: dict[str, Any]) -> dict[str, float | int]:
    """The finite numbers of one metric event that the curve keeps."""
    kept = {
        key: value for key, value in data.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        and key not in NOT_CURVES and len(key) <= MAX_KEY_LENGTH
    }
    return dict(list(kept.items())[:MAX_KEYS])


def merge_points(points: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold metric events into a run's compact curve: one point per step, in step order (a train point and an
    eval point at the same step merge). An attempt opens with a `restart` point at the step it starts from
    (0, or its checkpoint's): the curve after that step is dropped, being the lost attempt's, and the steps
    the checkpoint logged come again (replayed from its trainer state), filling what the lost attempt never
    reported. Past MAX_METRIC_POINTS every other point goes, eval points kept."""
    points = list(points)
    steps = [p["step"] for p in points]  # kept beside the points: a report's next step is found in O(log n)
    for data in metrics:
        if data.get("step") is None:
            continue
        step = int(data["step"])
        point = {**curve_values(data), "step": step}
        if data.get("restart"):
            kept = bisect.bisect_right(steps, step)
            del points[kept:], steps[kept:]
        at = bisect.bisect_left(steps, step)
        if at < len(points) and steps[at] == step:
            points[at].update(point)
        else:
            points.insert(at, point)
            steps.insert(at, step)
    while len(points) > MAX_METRIC_POINTS:
        last = len(points) - 1
        thinned = [p for i, p in enumerate(points) if i % 2 == 0 or i == last or any(k.startswith("eval_") for k in p)]
        if len(thinned) == len(points):
            break
        points = thinned
    return points
