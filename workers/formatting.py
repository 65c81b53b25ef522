"""How Tunedeck writes figures for people: the pages, the CLI and the workers' log lines use these rules,
so the same value reads the same everywhere. (The REST API keeps raw numbers and ISO 8601 times.)

- A **figure** (a measurement: loss, logit difference, learning rate, tokens/s) has 3 significant digits,
  trailing zeros dropped: 0.693, 2.35, 12.5. From 1,000 up it is a whole number with thousands separators
  (19,660); below 0.001 and from 1e6 up it is scientific with a plain exponent (1.96e-5, 2e-4, 1.5e7).
- A **count** is exact, with thousands separators: 4,000. A **compact** count (parameters, tokens) has
  3 significant digits and K, M, B or T: 113K, 1.24B.
- A **percent** takes a fraction and has one decimal: 0.29 → 29.0%. A share under 0.1% keeps two
  significant digits instead (0.024%), so that it never reads as 0.0%.
- A **size** is in binary units with one decimal: 512 B, 1.5 KiB, 4.9 GiB.
- A **duration**: 4.2 s (whole seconds without a decimal: 3 s), 45 s, 12 min, 3 h 05 min, 2 d 4 h; how
  long ago something happened counts whole seconds.
- A **timestamp** is UTC to the minute: 2026-12-05 07:10 UTC; pages put the full value, `iso()`, in
  the datetime attribute of a <time> element.

Nothing here imports Django or the ML stack: the CLI and the data plane use it as the pages do.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

MISSING = "—"
SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")
COMPACT_UNITS = ((1e3, "K"), (1e6, "M"), (1e9, "B"), (1e12, "T"))


def number(value: Any) -> float | None:
    """A float from a number or a numeric string (figures in job results are JSON); None for anything else."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _not_a_number(value: Any) -> str:
    return MISSING if value is None or value == "" else str(value)


def _non_finite(value: float) -> str:
    return "NaN" if math.isnan(value) else ("∞" if value > 0 else "-∞")


def _scientific(value: float) -> str:
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _plain(value: float, digits: int) -> str:
    """`digits` significant digits without an exponent (Python's g format would use one below 1e-4)."""
    return format(Decimal(f"{value:.{digits}g}").normalize(), "f")


def figure(value: Any) -> str:
    """A measurement: 0.693, 2.35, 19,660, 1.96e-5 (see the module's rules)."""
    x = number(value)
    if x is None:
        return _not_a_number(value)
    if not math.isfinite(x):
        return _non_finite(x)
    if x == 0:
        return "0"
    rounded = float(f"{x:.3g}")
    if abs(x) < 1e-3 or abs(rounded) >= 1e6:
        return _scientific(x)
    if abs(rounded) >= 1000:
        return f"{round(x):,}"
    return _plain(rounded, 3)


def count(value: Any) -> str:
    """An exact count: 4,000."""
    x = number(value)
    if x is None:
        return _not_a_number(value)
    return f"{round(x):,}" if math.isfinite(x) else _non_finite(x)


def compact(value: Any) -> str:
    """A large count, 3 significant digits: 950, 1.23K, 113K, 7.24B."""
    x = number(value)
    if x is None or not math.isfinite(x) or abs(x) < 1000:
        return count(value)
    for divisor, unit in COMPACT_UNITS:
        text = _plain(x / divisor, 3)
        if abs(float(text)) < 1000 or unit == COMPACT_UNITS[-1][1]:
            return f"{text}{unit}"
    raise AssertionError("unreachable")


def percent(value: Any) -> str:
    """A fraction as a percentage: 0.29 → 29.0%, 0.00024 → 0.024%."""
    x = number(value)
    if x is None:
        return _not_a_number(value)
    if not math.isfinite(x):
        return _non_finite(x)
    share = 100 * x
    if share == 0 or abs(share) >= 0.1:
        return f"{share:.1f}%"
    return f"{_plain(share, 2)}%"


def size(value: Any) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 4.9 GiB."""
    x = number(value)
    if x is None:
        return _not_a_number(value)
    if abs(x) < 1024:
        return f"{round(x)} B"
    for unit in SIZE_UNITS:
        x /= 1024
        if abs(round(x, 1)) < 1024 or unit == SIZE_UNITS[-1]:
            return f"{x:.1f} {unit}"
    raise AssertionError("unreachable")


def duration(value: Any) -> str:
    """Seconds (or a timedelta) for people: 4.2 s, 45 s, 12 min, 3 h 05 min, 2 d 4 h."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else number(value)
    if seconds is None:
        return _not_a_number(value)
    seconds = max(0.0, seconds) if math.isfinite(seconds) else 0.0
    if seconds < 10:
        return f"{seconds:.1f} s" if round(seconds, 1) % 1 else f"{round(seconds)} s"
    if seconds < 60:
        return f"{int(seconds)} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def as_datetime(value: Any) -> datetime | None:
    """An aware UTC datetime from a datetime (naive ones are UTC) or an ISO 8601 string; None otherwise."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def timestamp(value: Any) -> str:
    """2026-12-05 07:10 UTC."""
    moment = as_datetime(value)
    return _not_a_number(value) if moment is None else moment.strftime("%Y-%m-%d %H:%M UTC")


def iso(value: Any) -> str:
    """The full value for machines and <time datetime>: 2026-12-05T07:10:54Z."""
    moment = as_datetime(value)
    return "" if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def elapsed(value: Any, now: datetime | None = None) -> str:
    """How long ago a moment was, as a duration: 12 min."""
    moment = as_datetime(value)
    if moment is None:
        return _not_a_number(value)
    return duration(round(((now or datetime.now(UTC)) - moment).total_seconds()))


def plural(amount: str | int, noun: str) -> str:
    """An amount and its noun: plural("1", "epoch") is "1 epoch", plural("2.5", "epoch") "2.5 epochs", plural(1200,
    "file") "1,200 files" (an integer is formatted here)."""
    text = f"{amount:,}" if isinstance(amount, int) and not isinstance(amount, bool) else str(amount)
    return f"{text} {noun}" if text == "1" else f"{text} {noun}s"
