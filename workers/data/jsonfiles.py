"""JSON Lines and .json files (one array of objects, read item by item) as numbered records, within bounds."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from workers.data.bounds import (
    Limits,
    Problem,
    ProblemSink,
    TooDeep,
    check_depth,
    could_nest_past,
    json_type,
    loads,
    text_lines,
    too_deep,
    too_long,
)


def json_lines(pieces: Iterable[str], report: ProblemSink, limits: Limits,
                one_object_hint: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, text in text_lines(pieces, limits):
        if text is None:
            report.add(Problem(number, too_long(limits)))
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
            report.add(Problem(number, too_deep(limits)))
            continue
        if not isinstance(record, dict):
            report.add(Problem(number, f"expected a JSON object, got {json_type(record)}"))
            continue
        yield number, record


def json_records(pieces: Iterator[str], report: ProblemSink, limits: Limits) -> Iterator[tuple[int, dict[str, Any]]]:
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
        yield from json_lines(rest, report, limits, one_object_hint=True)  # JSON Lines saved as .json, as hub exports


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
            self._fail(too_long(self.limits, "the item starting here is"))
            return _FAILED
        except RecursionError:  # the item's end is unknown: the array cannot be read on
            self._fail(too_deep(self.limits))
            return _FAILED
        if end - self.pos > self.limits.max_row_bytes:
            self._fail(too_long(self.limits, "the item starting here is"))
            return _FAILED
        if could_nest_past(self.buf, self.limits, self.pos, end) and _is_too_deep(value, self.limits):
            self._fail(too_deep(self.limits))
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
