"""The one set of rules for figures, counts, percentages, sizes, durations and times (workers/formatting.py)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest

from workers import formatting as f


@pytest.mark.parametrize(("value", "text"), [
    (0.000019550323486328125, "1.96e-5"),  # a merge check's logit difference
    (2e-4, "2e-4"),  # a learning rate
    (0.00099, "9.9e-4"),
    (0.001, "0.001"),
    (0.6931, "0.693"),
    (2.3456, "2.35"),
    (0.25, "0.25"),
    (1.0, "1"),
    (0, "0"),
    (-0.5, "-0.5"),
    (12.5, "12.5"),
    (999.96, "1,000"),
    (19660.4, "19,660"),  # tokens/s: never 1.966e+04
    (123456.7, "123,457"),
    (1e6, "1e6"),
    (12_345_000, "1.23e7"),
    ("0.25", "0.25"),  # figures in job results are JSON
    (float("nan"), "NaN"),
    (float("inf"), "∞"),
    (None, "—"),
    ("n/a", "n/a"),
])
def test_a_figure_has_three_significant_digits_and_scientific_only_at_the_extremes(value, text) -> None:  # type: ignore[no-untyped-def]
    assert f.figure(value) == text


def test_counts_are_exact_with_separators_and_compact_counts_carry_a_unit() -> None:
    assert [f.count(v) for v in (0, 7, 4000, 1_234_567, 12.6, None)] == ["0", "7", "4,000", "1,234,567", "13", "—"]
    assert [f.compact(v) for v in (950, 1234, 113_000, 999_999, 1_240_000_000, 7e12)] == [
        "950", "1.23K", "113K", "1M", "1.24B", "7T"]


def test_a_percent_has_one_decimal_and_a_small_share_never_reads_as_zero() -> None:
    assert [f.percent(v) for v in (0.29, 0.22466, 1, 0, 0.001)] == ["29.0%", "22.5%", "100.0%", "0.0%", "0.1%"]
    assert f.percent(0.00024) == "0.024%" and f.percent(1e-7) == "0.00001%"
    assert f.percent(None) == "—"


def test_sizes_are_in_binary_units_with_one_decimal() -> None:
    assert [f.size(v) for v in (0, 512, 1023, 1024, 1536, 301_000, 4.9 * 2**30, 2**20 - 1, 3 * 2**50)] == [
        "0 B", "512 B", "1023 B", "1.0 KiB", "1.5 KiB", "293.9 KiB", "4.9 GiB", "1.0 MiB", "3.0 PiB"]


def test_durations_read_from_seconds_to_days() -> None:
    assert [f.duration(v) for v in (0, 4.23, 3.0, 9.98, 45, 725, 3 * 3600 + 5 * 60, 2 * 86400 + 4 * 3600, -3)] == [
        "0 s", "4.2 s", "3 s", "10 s", "45 s", "12 min", "3 h 05 min", "2 d 4 h", "0 s"]
    assert f.duration(timedelta(minutes=90)) == "1 h 30 min"


def test_times_are_utc_to_the_minute_with_the_full_value_for_machines() -> None:
    moment = datetime(2026, 12, 5, 7, 10, 54, 3000, tzinfo=UTC)
    paris = moment.astimezone(timezone(timedelta(hours=1)))
    for value in (moment, paris, moment.replace(tzinfo=None), "2026-12-05T07:10:54.003Z", "2026-12-05T08:10:54+01:00"):
        assert f.timestamp(value) == "2026-12-05 07:10 UTC"
        assert f.iso(value) == "2026-12-05T07:10:54Z"
    assert f.timestamp(None) == "—" and f.timestamp("soon") == "soon" and f.iso("soon") == ""
    assert f.elapsed(moment, moment + timedelta(minutes=12, seconds=5)) == "12 min"
    assert f.elapsed(moment, moment + timedelta(seconds=1.4)) == "1 s"


def test_plural_follows_the_written_amount() -> None:
    assert f.plural("1", "epoch") == "1 epoch"
    assert f.plural("2.33", "epoch") == "2.33 epochs" and f.plural("4,000", "step") == "4,000 steps"
    # A count as an integer (a log's "1 files" and a chat's "1 adapters" before).
    assert f.plural(1, "file") == "1 file" and f.plural(1200, "file") == "1,200 files" and f.plural(0, "file") == "0 files"


def test_the_module_imports_neither_django_nor_the_ml_stack() -> None:
    """The CLI and the data plane import it."""
    code = ("import sys, workers.formatting; "
            "print(sorted(m for m in ('django', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
