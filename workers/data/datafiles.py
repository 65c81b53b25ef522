"""Dataset files read as streams of numbered records, within bounds.

A file is read in pieces (JSONL, JSON, CSV) or in small batches within its row groups (Parquet), never whole,
and what it decodes to is bounded, not only its size on disk: a 10 KB Parquet file can hold a 300 MB cell, a
one-line JSON file can nest arrays two hundred thousand deep. `Limits` holds the bounds; every refusal names the
line (JSONL, JSON, CSV) or row (Parquet), the field where there is one, and the setting that raises the bound.

Pure Python and pyarrow: the control plane reads uploads with it, the workers read stored files.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from workers.config import env_int

KB, MB, GB = 2**10, 2**20, 2**30
PIECE_BYTES = 1 * MB  # text is decoded this much at a time
# Nesting is bounded below Python's recursion limit (1000): json.dumps(indent=...) takes ~3 frames a level.
MAX_DEPTH_CEILING = 100
PARQUET_BATCH_BYTES = 8 * MB  # a Parquet batch is sized to decode to about this much
PARQUET_BATCH_ROWS = 1024
JSON_CELLS = ("messages", "conversations")  # CSV cells holding a JSON list of turns
CSV_FIELD_LIMIT = 64 * MB  # the csv module's default (128 KiB) is below one long training text; records are bounded


@dataclass
class Problem:
    line: int  # 1-based line (JSONL, JSON, CSV) or row (Parquet); 0 for the file as a whole
    message: str
    field: str = ""
    unit: str = "line"

    def __str__(self) -> str:
        where = [f"{self.unit} {self.line}"] if self.line else []
        where += [f"field '{self.field}'"] if self.field else []
        return ", ".join(where) + ": " + self.message if where else self.message


class ProblemSink(Protocol):
    def add(self, problem: Problem) -> None: ...


@dataclass(frozen=True)
class Limits:
    """What one file may hold and decode to; README's configuration table lists the settings."""

    max_rows: int = 1_000_000
    max_decoded_bytes: int = 1 * GB  # the text, or the Parquet values as decoded
    max_row_bytes: int = 1 * MB  # a JSONL line, a JSON array item, a CSV record or a Parquet row
    max_row_group_bytes: int = 64 * MB  # a Parquet row group, uncompressed
    max_depth: int = 32  # arrays and objects inside one another, the record included

    @classmethod
    def from_env(cls) -> Limits:
        default = cls()
        return cls(
            max_rows=env_int("TUNEDECK_DATASET_MAX_ROWS", default.max_rows, minimum=1),
            max_decoded_bytes=env_int("TUNEDECK_DATASET_MAX_DECODED_MB", default.max_decoded_bytes // MB, minimum=1) * MB,
            max_row_bytes=env_int("TUNEDECK_DATASET_MAX_ROW_KB", default.max_row_bytes // KB, minimum=1) * KB,
            max_row_group_bytes=env_int("TUNEDECK_DATASET_MAX_ROW_GROUP_MB", default.max_row_group_bytes // MB,
                                        minimum=1) * MB,
            max_depth=env_int("TUNEDECK_DATASET_MAX_DEPTH", default.max_depth, minimum=2, maximum=MAX_DEPTH_CEILING),
        )


# A stored file passed the bounds of its upload; reading it again bounds only the nesting, which recursion needs.
STORED = Limits(max_rows=sys.maxsize, max_decoded_bytes=sys.maxsize, max_row_bytes=sys.maxsize,
                max_row_group_bytes=sys.maxsize, max_depth=MAX_DEPTH_CEILING)

HeaderCheck = Callable[[list[str]], "str | None"]


def human_size(size: float) -> str:
    for unit, scale in (("GB", GB), ("MB", MB), ("KB", KB)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} bytes"


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
        records = _parquet_records(source, report, limits)
    elif not _text_fits(source, report, limits):
        return
    else:
        pieces = _pieces(source, report, min(PIECE_BYTES, limits.max_row_bytes))
        if ext == ".csv":
            records = _csv_records(pieces, report, limits, csv_header)
        elif ext == ".json":
            records = _json_records(pieces, report, limits)
        else:
            records = _json_lines(pieces, report, limits)
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


def _too_long(limits: Limits, what: str = "is") -> str:
    return f"{what} longer than {human_size(limits.max_row_bytes)}, the most a row may hold (TUNEDECK_DATASET_MAX_ROW_KB)"


def _too_deep(limits: Limits) -> str:
    return f"JSON nested deeper than {limits.max_depth} levels (TUNEDECK_DATASET_MAX_DEPTH)"


def json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


# --- JSON values of bounded nesting -------------------------------------------------------------------------------


class TooDeep(ValueError):
    pass


def loads(text: str, limits: Limits) -> Any:
    """json.loads, refusing values nested deeper than the bound (TooDeep) before anything recurses on them."""
    try:
        value = json.loads(text)
    except RecursionError:  # the C decoder guards its own recursion: the value is far deeper than any bound
        raise TooDeep from None
    if could_nest_past(text, limits):
        check_depth(value, limits)
    return value


def could_nest_past(text: str, limits: Limits, start: int = 0, end: int | None = None) -> bool:
    """Whether JSON text has more brackets than the depth bound (counting them is far cheaper than walking)."""
    end = len(text) if end is None else end
    return text.count("[", start, end) + text.count("{", start, end) > limits.max_depth


def check_depth(value: Any, limits: Limits) -> None:
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:  # by hand: the point is to know the depth before anything recursive (json.dumps) meets it
        item, depth = stack.pop()
        if depth > limits.max_depth:
            raise TooDeep
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


# --- text: pieces, lines ------------------------------------------------------------------------------------------


class NotUtf8(ValueError):
    pass


def _text_fits(source: BinaryIO, report: ProblemSink, limits: Limits) -> bool:
    size = source.seek(0, 2)
    source.seek(0)
    if size <= limits.max_decoded_bytes:
        return True
    report.add(Problem(0, f"the file is {human_size(size)} of text: at most {human_size(limits.max_decoded_bytes)} "
                          "are read (TUNEDECK_DATASET_MAX_DECODED_MB)"))
    return False


def _pieces(source: BinaryIO, report: ProblemSink, piece_bytes: int) -> Iterator[str]:
    """The file as UTF-8 text, in pieces that end at a line break (a longer line comes in several pieces).

    At the first line that is not UTF-8, every such line of the file is named and NotUtf8 is raised: the
    readers stop there, with nothing to say about the text cut short."""
    head = source.read(3)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        report.add(Problem(1, "the file is UTF-16 encoded: save it as UTF-8"))
        return
    carry = b"" if head == b"\xef\xbb\xbf" else head
    line, column, failed, named = 1, 0, False, 0  # where the next piece starts; the last line named as not UTF-8
    while True:
        block = source.read(piece_bytes)
        data = carry + block
        if not data:
            break
        cut = len(data) if not block else (data.rfind(b"\n") + 1 or _char_boundary(data))
        piece, carry = data[:cut], data[cut:]
        if not failed:
            try:
                text = piece.decode("utf-8")
            except UnicodeDecodeError:
                failed = True
            else:
                if text:
                    yield text
        if failed:
            named = _name_lines_not_utf8(piece, line, column, named, report)
        newlines = piece.count(b"\n")
        column = len(piece) - piece.rfind(b"\n") - 1 if newlines else column + len(piece)
        line += newlines
    if failed:
        raise NotUtf8


def _char_boundary(data: bytes) -> int:
    """Where to cut `data` without splitting a UTF-8 character."""
    start = len(data) - 1
    while start > max(0, len(data) - 4) and data[start] & 0xC0 == 0x80:
        start -= 1
    lead = data[start]
    width = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    if lead >= 0xC0 and start + width > len(data):
        return start
    return len(data) - 1 if data.endswith(b"\r") and len(data) > 1 else len(data)  # keep "\r\n" together


def _name_lines_not_utf8(piece: bytes, line: int, column: int, named: int, report: ProblemSink) -> int:
    for offset, raw in enumerate(piece.split(b"\n")):
        number = line + offset
        if number == named:
            continue  # a long line comes in several pieces: name it once
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            at = exc.start + 1 + (column if offset == 0 else 0)
            report.add(Problem(number, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {at})"))
            named = number
    return named


CSV_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")  # what a file opened with newline="" reads as lines


def _lines(pieces: Iterable[str], limits: Limits, csv_breaks: bool = False) -> Iterator[tuple[int, str | None]]:
    """(number, text) of each line, None for a line past the row bound (never held whole). JSON Lines break at
    "\n" only (a JSON string may hold U+2028 raw) and lose it; CSV lines break as a file opened with newline=""
    does and keep their breaks, which csv.reader needs."""
    number, pending_bytes = 1, 0
    pending: list[str] = []  # a line that goes on in the next piece
    for piece in pieces:
        if csv_breaks:
            complete = CSV_LINE.findall(piece)
            last = complete.pop() if complete and complete[-1][-1] not in "\r\n" else ""
        else:
            complete = piece.split("\n")
            last = complete.pop()
        within = utf8_size(piece) <= limits.max_row_bytes  # then so is every line that ends in it
        for text in complete:
            if pending_bytes:
                pending_bytes += utf8_size(text)
                joined = "".join([*pending, text]) if pending and pending_bytes <= limits.max_row_bytes else None
                yield number, joined
                pending, pending_bytes = [], 0
            else:
                yield number, (text if within or utf8_size(text) <= limits.max_row_bytes else None)
            number += 1
        if last:
            pending_bytes += utf8_size(last)
            if pending_bytes <= limits.max_row_bytes:
                pending.append(last)
            else:
                pending.clear()  # past the bound: counted on to the line's end, no longer kept
    if pending_bytes:
        yield number, "".join(pending) if pending else None


def utf8_size(text: str) -> int:
    """Bytes of `text` in UTF-8, without encoding it when it is ASCII."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


# --- JSON Lines and .json --------------------------------------------------------------------------------------------


def _json_lines(pieces: Iterable[str], report: ProblemSink, limits: Limits,
                one_object_hint: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, text in _lines(pieces, limits):
        if text is None:
            report.add(Problem(number, _too_long(limits)))
            continue
        if not text.strip():
            continue
        first, one_object_hint = one_object_hint, False
        try:
            record = loads(text, limits)
        except json.JSONDecodeError as exc:
            if first and exc.pos >= len(text.rstrip()):
                # The first line stops short: one object spread over lines, not an array or JSON Lines.
                report.add(Problem(number, "a .json dataset must be an array of objects (or one object per line)"))
                return
            report.add(Problem(number, f"invalid JSON: {exc.msg} (column {exc.colno})"))
            continue
        except TooDeep:
            report.add(Problem(number, _too_deep(limits)))
            continue
        if not isinstance(record, dict):
            report.add(Problem(number, f"expected a JSON object, got {json_type(record)}"))
            continue
        yield number, record


def _json_records(pieces: Iterator[str], report: ProblemSink, limits: Limits) -> Iterator[tuple[int, dict[str, Any]]]:
    """A .json file: an array of objects (each named by the line it starts on), or JSON Lines."""
    newlines = 0
    for piece in pieces:
        if piece.strip():
            rest = itertools.chain(["\n" * newlines, piece], pieces)  # white space before is kept as its lines
            break
        newlines += piece.count("\n")
    else:
        return
    if piece.lstrip().startswith("["):
        yield from _JsonArray(rest, report, limits).records()
    else:
        yield from _json_lines(rest, report, limits, one_object_hint=True)  # JSON Lines saved as .json, as hub exports


class _ItemTooLong(Exception):
    pass


_FAILED = object()  # the array cannot be read on
_SKIPPED = object()  # this item is refused; the next one can be read
SPACE = re.compile(r"[ \t\r\n]*")


class _JsonArray:
    """A JSON array of records decoded item by item from pieces of text: one item (and a piece) in memory at a time,
    however the array is laid out (one item a line, or the whole array minified on one line)."""

    def __init__(self, pieces: Iterator[str], report: ProblemSink, limits: Limits) -> None:
        self.pieces, self.report, self.limits = pieces, report, limits
        self.buf, self.pos, self.eof = "", 0, False
        self.line, self.column = 1, 0  # where buf[0] is in the file
        self.counted, self.counted_line = 0, 1  # the line of buf[counted], kept to count newlines once
        self.decoder = json.JSONDecoder()

    def records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        self._skip_space()
        self.pos += 1  # the "[" the caller saw
        closed = self._skip_space()
        while closed and self.buf[self.pos] != "]":
            line = self._line_at(self.pos)
            value = self._item()
            if value is _FAILED:
                return
            if isinstance(value, dict):
                yield line, value
            elif value is not _SKIPPED:
                self.report.add(Problem(line, f"expected a JSON object in the array, got {json_type(value)}"))
            if not self._skip_space() or self.buf[self.pos] not in ",]":
                self._fail("invalid JSON: expected ',' or ']' after an array item")
                return
            if self.buf[self.pos] == ",":
                self.pos += 1
                closed = self._skip_space()
                if closed and self.buf[self.pos] == "]":  # a trailing comma: JSON wants one more value
                    self._fail(f"invalid JSON: Expecting value (column {self._column_at(self.pos)})")
                    return
        if not closed:
            self._fail("invalid JSON: the array is not closed")
            return
        self.pos += 1
        if self._skip_space():
            self._fail("invalid JSON: expected ',' or ']' after an array item")

    def _item(self) -> Any:
        """The next item, _SKIPPED (refused, the array goes on) or _FAILED (the array cannot be read on)."""
        try:
            while True:
                try:
                    value, end = self.decoder.raw_decode(self.buf, self.pos)
                except json.JSONDecodeError as exc:
                    if self._may_go_on(exc) and self._more_of_item():
                        continue
                    self._fail(f"invalid JSON: {exc.msg} (column {self._column_at(exc.pos)})", exc.pos)
                    return _FAILED
                if end < len(self.buf) or not self._more_of_item():  # a number at the end may go on
                    break
        except _ItemTooLong:
            self._fail(_too_long(self.limits, "the item starting here is"))
            return _FAILED
        except RecursionError:  # the item's end is unknown: the array cannot be read on
            self._fail(_too_deep(self.limits))
            return _FAILED
        if end - self.pos > self.limits.max_row_bytes:
            self._fail(_too_long(self.limits, "the item starting here is"))
            return _FAILED
        if could_nest_past(self.buf, self.limits, self.pos, end) and _is_too_deep(value, self.limits):
            self._fail(_too_deep(self.limits))
            value = _SKIPPED
        self.pos = end
        return value

    def _may_go_on(self, exc: json.JSONDecodeError) -> bool:
        """Whether the error may only be the end of what has been read so far."""
        return not self.eof and (exc.pos >= len(self.buf) - 8 or exc.msg.startswith("Unterminated string"))

    def _more_of_item(self) -> bool:
        if len(self.buf) - self.pos > self.limits.max_row_bytes:
            raise _ItemTooLong
        return self._more()

    def _more(self) -> bool:
        """Append the next piece (dropping what is read); False at the end of the file."""
        piece = next(self.pieces, None)
        if piece is None:
            self.eof = True
            return False
        drop = self.pos
        newlines = self.buf.count("\n", 0, drop)
        self.column = drop - self.buf.rfind("\n", 0, drop) - 1 if newlines else self.column + drop
        self.line += newlines
        self.buf, self.pos = self.buf[drop:] + piece, 0
        self.counted, self.counted_line = 0, self.line
        return True

    def _skip_space(self) -> bool:
        """Move past white space; False at the end of the file."""
        while True:
            self.pos = SPACE.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf):
                return True
            if not self._more():
                return False

    def _line_at(self, pos: int) -> int:
        if pos >= self.counted:
            self.counted_line += self.buf.count("\n", self.counted, pos)
            self.counted = pos
            return self.counted_line
        return self.line + self.buf.count("\n", 0, pos)

    def _column_at(self, pos: int) -> int:
        newline = self.buf.rfind("\n", 0, pos)
        return pos - newline if newline >= 0 else self.column + pos + 1

    def _fail(self, message: str, pos: int | None = None) -> None:
        self.report.add(Problem(self._line_at(self.pos if pos is None else pos), message))


def _is_too_deep(value: Any, limits: Limits) -> bool:
    try:
        check_depth(value, limits)
    except TooDeep:
        return True
    return False


# --- CSV ---------------------------------------------------------------------------------------------------------


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


def _csv_records(pieces: Iterable[str], report: ProblemSink, limits: Limits,
                 header_check: HeaderCheck | None) -> Iterator[tuple[int, dict[str, Any]]]:
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    lines = _RecordLines(_lines(pieces, limits, csv_breaks=True), limits)
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
            if _decode_json_cells(line, record, report, limits):
                yield line, record
    except csv.Error as exc:
        report.add(Problem(start, f"unreadable CSV: {exc}"))
    except _RecordTooLong:
        report.add(Problem(start, _too_long(limits, "the record starting here is")))


def _decode_json_cells(line: int, record: dict[str, Any], report: ProblemSink, limits: Limits) -> bool:
    for key in JSON_CELLS:
        if isinstance(record.get(key), str):
            try:
                record[key] = loads(record[key], limits)
            except json.JSONDecodeError as exc:
                report.add(Problem(line, f"must hold a JSON list of turns: {exc.msg} (column {exc.colno})", key))
                return False
            except TooDeep:
                report.add(Problem(line, f"must hold a JSON list of turns: {_too_deep(limits)}", key))
                return False
    return True


# --- Parquet -----------------------------------------------------------------------------------------------------


def _parquet_records(source: BinaryIO, report: ProblemSink, limits: Limits) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows batch by batch, after the footer's figures (rows, sizes, nesting) are checked against the bounds."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source, pre_buffer=False, buffer_size=PIECE_BYTES)
        schema = parquet.schema_arrow
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        report.add(Problem(0, f"not a readable Parquet file: {exc}", unit="row"))
        return
    problems = _footer_problems(parquet.metadata, schema, limits)
    for problem in problems:
        report.add(problem)
    if problems:
        return
    number, decoded = 0, 0
    for group in range(parquet.metadata.num_row_groups):
        try:
            batches = parquet.iter_batches(batch_size=_batch_rows(parquet, source, group), row_groups=[group],
                                           use_threads=False)
            for batch in batches:
                decoded += batch.nbytes  # dictionary-encoded values decode past what the footer says
                if decoded > limits.max_decoded_bytes:
                    report.add(Problem(number + 1, f"the file decodes to more than "
                                       f"{human_size(limits.max_decoded_bytes)}, the most that is read "
                                       "(TUNEDECK_DATASET_MAX_DECODED_MB)", unit="row"))
                    return
                yield from _batch_records(batch, number, report, limits)
                number += batch.num_rows
        except Exception as exc:  # a corrupt page
            report.add(Problem(number + 1, f"unreadable Parquet data: {exc}", unit="row"))
            return


def _footer_problems(meta: Any, schema: Any, limits: Limits) -> list[Problem]:
    problems = [Problem(0, _too_deep(limits), field.name, "row")
                for field in schema if _type_depth(field.type, limits.max_depth) + 1 > limits.max_depth]
    if meta.num_rows > limits.max_rows:
        problems.append(Problem(0, f"the file holds {meta.num_rows:,} rows: at most {limits.max_rows:,} are read "
                                   "(TUNEDECK_DATASET_MAX_ROWS)", unit="row"))
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    total = sum(group.total_byte_size for group in groups)
    if total > limits.max_decoded_bytes:
        problems.append(Problem(0, f"the file decodes to {human_size(total)}: at most "
                                   f"{human_size(limits.max_decoded_bytes)} are read (TUNEDECK_DATASET_MAX_DECODED_MB)",
                                unit="row"))
    first = 1
    for index, group in enumerate(groups):
        problems += _row_group_problems(index, group, first, limits)
        first += group.num_rows
    return problems


def _row_group_problems(index: int, group: Any, first: int, limits: Limits) -> list[Problem]:
    sizes: dict[str, int] = {}
    for i in range(group.num_columns):
        chunk = group.column(i)
        field = chunk.path_in_schema.split(".")[0]
        sizes[field] = sizes.get(field, 0) + chunk.total_uncompressed_size
    if group.num_rows == 1:
        bound = human_size(limits.max_row_bytes)
        return [Problem(first, f"decodes to {human_size(size)}: a row may hold at most {bound} "
                               "(TUNEDECK_DATASET_MAX_ROW_KB)", field, "row")
                for field, size in sizes.items() if size > limits.max_row_bytes]
    if group.total_byte_size <= limits.max_row_group_bytes:
        return []
    largest = max(sizes, key=sizes.__getitem__)
    fitting = max(1, group.num_rows * limits.max_row_group_bytes // group.total_byte_size // 2)
    last = first + group.num_rows - 1
    return [Problem(first, f"rows {first:,} to {last:,} (row group {index + 1}) decode to "
                           f"{human_size(group.total_byte_size)}, {human_size(sizes[largest])} of it in this field: a "
                           f"row group may decode to at most {human_size(limits.max_row_group_bytes)} "
                           "(TUNEDECK_DATASET_MAX_ROW_GROUP_MB); write the file with smaller row groups, e.g. "
                           f"pyarrow.parquet.write_table(table, path, row_group_size={fitting:,})", largest, "row")]


def _type_depth(arrow_type: Any, limit: int) -> int:
    """How deeply lists, structs and maps nest in a column's type (stops counting past `limit`)."""
    import pyarrow as pa

    if limit < 0:
        return 1
    if pa.types.is_dictionary(arrow_type):
        return _type_depth(arrow_type.value_type, limit)
    if pa.types.is_struct(arrow_type):
        return 1 + max((_type_depth(f.type, limit - 1) for f in arrow_type), default=0)
    if pa.types.is_map(arrow_type):
        return 1 + max(_type_depth(arrow_type.key_type, limit - 1), _type_depth(arrow_type.item_type, limit - 1))
    if hasattr(arrow_type, "value_type"):  # list, large list, fixed-size list, list view
        return 1 + _type_depth(arrow_type.value_type, limit - 1)
    return 0


def _batch_rows(parquet: Any, source: BinaryIO, group: int) -> int:
    """Rows per batch so that a batch decodes to about PARQUET_BATCH_BYTES.

    A dictionary-encoded column decodes each row to a dictionary value, whatever the footer's sizes: a row group
    of 500 rows that share one 64 KB value says 64 KB and decodes to 32 MB. Its largest dictionary value is read
    (one page) to size the batches."""
    meta = parquet.metadata.row_group(group)
    rows = max(1, meta.num_rows)
    per_row = meta.total_byte_size / rows
    for i in range(meta.num_columns):
        chunk = meta.column(i)
        if chunk.has_dictionary_page and chunk.physical_type == "BYTE_ARRAY":
            values_per_row = max(1.0, chunk.num_values / rows)
            per_row += _largest_dictionary_value(parquet, source, group, chunk.path_in_schema) * values_per_row
    return int(min(PARQUET_BATCH_ROWS, max(1, PARQUET_BATCH_BYTES // max(1.0, per_row))))


def _largest_dictionary_value(parquet: Any, source: BinaryIO, group: int, path: str) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    probe = pq.ParquetFile(source, metadata=parquet.metadata, read_dictionary=[path], pre_buffer=False,
                           buffer_size=PIECE_BYTES)
    column = path.split(".")[0]
    batch = next(probe.iter_batches(batch_size=1, row_groups=[group], columns=[column], use_threads=False), None)
    dictionary = _dictionary_in(batch.column(0)) if batch is not None else None
    if dictionary is None or len(dictionary) == 0:
        return 0
    return int(pc.max(pc.binary_length(dictionary)).as_py() or 0)


def _dictionary_in(array: Any) -> Any:
    """The dictionary of the (first) dictionary-encoded array inside `array`, or None."""
    import pyarrow as pa

    if pa.types.is_dictionary(array.type):
        return array.dictionary
    if pa.types.is_struct(array.type):
        for i in range(array.type.num_fields):
            found = _dictionary_in(array.field(i))
            if found is not None:
                return found
        return None
    if hasattr(array, "values"):
        return _dictionary_in(array.values)
    return None


def _batch_records(batch: Any, before: int, report: ProblemSink, limits: Limits) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        records: list[dict[str, Any] | None] = batch.to_pylist()
    except Exception:  # a string column holding bytes that are not UTF-8: find the rows and columns
        records = [_parquet_row(batch, offset, before + offset + 1, report) for offset in range(batch.num_rows)]
    check_sizes = batch.nbytes > limits.max_row_bytes  # else no row of the batch can be past the bound
    for offset, record in enumerate(records):
        number = before + offset + 1
        if record is None:
            continue
        if check_sizes:
            sizes = {name: _value_size(value) for name, value in record.items()}
            if sum(sizes.values()) > limits.max_row_bytes:
                largest = max(sizes, key=sizes.__getitem__)
                report.add(Problem(number, f"decodes to {human_size(sum(sizes.values()))}, "
                                           f"{human_size(sizes[largest])} of it in this field: a row may hold at most "
                                           f"{human_size(limits.max_row_bytes)} (TUNEDECK_DATASET_MAX_ROW_KB)",
                                   largest, "row"))
                continue
        yield number, record


def _value_size(value: Any) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, dict):
        return sum(_value_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_value_size(v) for v in value)
    return 8


def _parquet_row(batch: Any, offset: int, number: int, report: ProblemSink) -> dict[str, Any] | None:
    record = {}
    for name in batch.schema.names:
        try:
            (record[name],) = batch.column(name).slice(offset, 1).to_pylist()
        except UnicodeDecodeError as exc:
            report.add(Problem(number, f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x})", name, "row"))
            return None
        except Exception as exc:
            report.add(Problem(number, f"unreadable value: {exc}", name, "row"))
            return None
    return record
