"""What reading a dataset file is bounded by (`Limits`), the problems it reports, and its text in bounded pieces.

JSON values are decoded within a nesting depth, text is decoded a piece at a time and split into lines no longer
than a row may be; every refusal names its line and the setting that raises the bound.
"""

from __future__ import annotations

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


def too_long(limits: Limits, what: str = "is") -> str:
    return f"{what} longer than {human_size(limits.max_row_bytes)}, the most a row may hold (TUNEDECK_DATASET_MAX_ROW_KB)"


def too_deep(limits: Limits) -> str:
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


def text_fits(source: BinaryIO, report: ProblemSink, limits: Limits) -> bool:
    size = source.seek(0, 2)
    source.seek(0)
    if size <= limits.max_decoded_bytes:
        return True
    report.add(Problem(0, f"the file is {human_size(size)} of text: at most {human_size(limits.max_decoded_bytes)} "
                          "are read (TUNEDECK_DATASET_MAX_DECODED_MB)"))
    return False


def text_pieces(source: BinaryIO, report: ProblemSink, piece_bytes: int) -> Iterator[str]:
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


def text_lines(pieces: Iterable[str], limits: Limits, csv_breaks: bool = False) -> Iterator[tuple[int, str | None]]:
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
