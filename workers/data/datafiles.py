"""Dataset files read as streams of numbered records, within bounds.

A file is read in pieces (JSONL, JSON, CSV) or in small batches within its row groups (Parquet), never whole,
and what it decodes to is bounded, not only its size on disk: a 10 KB Parquet file can hold a 300 MB cell, a
one-line JSON file can nest arrays two hundred thousand deep. `Limits` holds the bounds; every refusal names the
line (JSONL, JSON, CSV) or row (Parquet), the field where there is one, and the setting that raises the bound.

Pure Python and pyarrow: the control plane reads uploads with it, the workers read stored files.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO

from workers.data.bounds import PIECE_BYTES, HeaderCheck, Limits, NotUtf8, Problem, ProblemSink, text_fits, text_pieces
from workers.data.csvfiles import csv_records
from workers.data.jsonfiles import json_lines, json_records
from workers.data.parquetfiles import parquet_records


def suffix_of(name: str) -> str:
    lowered = name.lower()
    for ext in (".jsonl", ".json", ".csv", ".parquet"):
        if lowered.endswith(ext):
            return ext
    raise ValueError(f"{name}: unsupported file type (use .jsonl, .json, .csv or .parquet)")


def unit_of(name: str) -> str:
    """What a problem's number counts in this kind of file."""
    return "row" if suffix_of(name) == ".parquet" else "line"


def read_records(source: BinaryIO, name: str, report: ProblemSink, limits: Limits,
                 csv_header: HeaderCheck | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line or row number, record) from the start of `source`; problems go into the report.

    `csv_header` says what is wrong with a CSV header (None when nothing is): the file is read no further."""
    source.seek(0)
    ext = suffix_of(name)
    pieces: Iterator[str] = iter(())
    if ext == ".parquet":
        records = parquet_records(source, report, limits)
    elif not text_fits(source, report, limits):
        return
    else:
        pieces = text_pieces(source, report, min(PIECE_BYTES, limits.max_row_bytes))
        if ext == ".csv":
            records = csv_records(pieces, report, limits, csv_header)
        elif ext == ".json":
            records = json_records(pieces, report, limits)
        else:
            records = json_lines(pieces, report, limits)
    try:
        for count, (number, record) in enumerate(records, start=1):
            if count > limits.max_rows:
                message = f"the file holds more than {limits.max_rows:,} rows (TUNEDECK_DATASET_MAX_ROWS)"
                report.add(Problem(number, message, unit=unit_of(name)))
                break
            yield number, record
        for _ in pieces:  # a reader that stopped early: the rest is still checked for UTF-8
            pass
    except NotUtf8:
        return  # every line that is not UTF-8 is named
