"""CSV files as numbered records, within bounds; cells of chat columns hold a JSON list of turns, and a feedback
row's `label` cell true/false or 1/0."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from typing import Any

from workers.data.bounds import (
    MB,
    HeaderCheck,
    Limits,
    Problem,
    ProblemSink,
    TooDeep,
    loads,
    text_lines,
    too_deep,
    too_long,
    utf8_size,
)

JSON_CELLS = ("messages", "conversations")  # CSV cells holding a JSON list of turns
BOOLEAN_CELLS = ("label",)  # CSV cells holding a boolean: true/false or 1/0, any case; others are left as text
BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
CSV_FIELD_LIMIT = 64 * MB  # the csv module's default (128 KiB) is below one long training text; records are bounded


class _RecordTooLong(Exception):
    pass


class _RecordLines:
    """The lines csv.reader reads, each record bounded: a quoted cell may go on over any number of lines."""

    def __init__(self, lines: Iterator[tuple[int, str | None]], limits: Limits) -> None:
        self.lines, self.limits, self.size = lines, limits, 0

    def __iter__(self) -> _RecordLines:
        return self

    def __next__(self) -> str:
        _, text = next(self.lines)
        if text is None:
            raise _RecordTooLong
        self.size += utf8_size(text)
        if self.size > self.limits.max_row_bytes:
            raise _RecordTooLong
        return text

    def record_read(self) -> None:
        self.size = 0


def csv_records(pieces: Iterable[str], report: ProblemSink, limits: Limits,
                 header_check: HeaderCheck | None) -> Iterator[tuple[int, dict[str, Any]]]:
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    lines = _RecordLines(text_lines(pieces, limits, csv_breaks=True), limits)
    reader = csv.reader(lines)
    header: list[str] | None = None
    start = 1  # a quoted cell may span lines: a record is named by the line it starts on
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            lines.record_read()
            if not cells or (len(cells) > 1 and not any(cell.strip() for cell in cells)):
                continue  # a blank line, or a spreadsheet's empty row of commas
            if header is None:
                header = [cell.strip() for cell in cells]
                wrong = header_check(header) if header_check else None
                if wrong:
                    report.add(Problem(line, wrong))
                    return
                continue
            if len(cells) != len(header):
                report.add(Problem(line, f"has {len(cells)} fields but the header has {len(header)}"))
                continue
            record: dict[str, Any] = dict(zip(header, cells, strict=True))
            _decode_boolean_cells(record)
            if _decode_json_cells(line, record, report, limits):
                yield line, record
    except csv.Error as exc:
        report.add(Problem(start, f"unreadable CSV: {exc}"))
    except _RecordTooLong:
        report.add(Problem(start, too_long(limits, "the record starting here is")))


def _decode_json_cells(line: int, record: dict[str, Any], report: ProblemSink, limits: Limits) -> bool:
    for key in JSON_CELLS:
        if isinstance(record.get(key), str):
            try:
                record[key] = loads(record[key], limits)
            except json.JSONDecodeError as exc:
                report.add(Problem(line, f"must hold a JSON list of turns: {exc.msg} (column {exc.colno})", key))
                return False
            except TooDeep:
                report.add(Problem(line, f"must hold a JSON list of turns: {too_deep(limits)}", key))
                return False
    return True


def _decode_boolean_cells(record: dict[str, Any]) -> None:
    """A boolean cell as a boolean (a text that is none stays one, for the row's check to name)."""
    for key in BOOLEAN_CELLS:
        if isinstance(record.get(key), str):
            record[key] = BOOLEANS.get(record[key].strip().lower(), record[key])
