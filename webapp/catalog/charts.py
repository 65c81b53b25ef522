"""Server-drawn SVG bar chart of token lengths: numbers only, so nothing in it needs escaping."""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.formatting import count

WIDTH, HEIGHT, PAD_X, PAD_Y = 600, 220, 44, 28


@dataclass
class Bar:
    x: float
    y: float
    width: float
    height: float
    lower: int
    upper: int
    rows: int
    over: bool  # every length in the bin is above max_length: those rows are truncated


@dataclass
class BarChart:
    bars: list[Bar]
    y_max: int
    x_min: int
    x_max: int
    marker_x: float | None = None  # where max_length falls, when it is inside the range
    ticks: list[tuple[float, str]] = field(default_factory=list)  # x and its label
    width: int = WIDTH
    height: int = HEIGHT
    pad_x: int = PAD_X
    pad_y: int = PAD_Y

    @property
    def x_end(self) -> int:
        return self.width - self.pad_x

    @property
    def y_end(self) -> int:
        return self.height - self.pad_y

    @property
    def y_max_label(self) -> str:
        return count(self.y_max)


def histogram_chart(histogram: list[tuple[int, int, int]], max_length: int | None = None) -> BarChart:
    """Bars for (lower, upper, rows) bins; a marker at max_length."""
    if not histogram:
        return BarChart([], 0, 0, 0)
    x_min, x_max = histogram[0][0], histogram[-1][1]
    y_max = max(rows for _, _, rows in histogram) or 1
    inner_w, inner_h = WIDTH - 2 * PAD_X, HEIGHT - 2 * PAD_Y
    span = (x_max - x_min) or 1

    def x_of(value: float) -> float:
        return round(PAD_X + inner_w * (value - x_min) / span, 1)

    bars = []
    for lower, upper, rows in histogram:
        height = round(inner_h * rows / y_max, 1)
        bars.append(Bar(x_of(lower), round(HEIGHT - PAD_Y - height, 1), max(round(x_of(upper) - x_of(lower) - 1, 1), 1),
                        height, lower, upper, rows, max_length is not None and lower >= max_length))
    marker = x_of(max_length) if max_length is not None and x_min <= max_length <= x_max else None
    step = max(1, len(histogram) // 5)
    ticks = [(x_of(lower), count(lower)) for lower, _, _ in histogram[::step]] + [(x_of(x_max), count(x_max))]
    return BarChart(bars, y_max, x_min, x_max, marker, ticks)
