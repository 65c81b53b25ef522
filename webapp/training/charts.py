"""Server-drawn SVG line charts: no JavaScript needed, escaped by construction (numbers only)."""

from __future__ import annotations

from dataclasses import dataclass

WIDTH, HEIGHT, PAD = 600, 200, 36


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

    @property
    def x_end(self) -> int:
        return self.width - self.pad

    @property
    def y_end(self) -> int:
        return self.height - self.pad


def line_chart(series: list[tuple[int, float]], max_points: int = 400) -> Chart:
    if len(series) > max_points:  # keep the shape, not every point
        stride = len(series) / max_points
        series = [series[int(i * stride)] for i in range(max_points)] + [series[-1]]
    if not series:
        return Chart("", 0, 0.0, 0.0, None, 0)
    xs, ys = [x for x, _ in series], [y for _, y in series]
    x_max, y_min, y_max = max(max(xs), 1), min(ys), max(ys)
    span = (y_max - y_min) or 1.0
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    coords = " ".join(
        f"{PAD + inner_w * x / x_max:.1f},{PAD + inner_h * (1 - (y - y_min) / span):.1f}" for x, y in series
    )
    return Chart(coords, x_max, y_min, y_max, ys[-1], len(series))
