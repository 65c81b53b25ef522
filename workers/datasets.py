"""Dataset files: read, detect the row format, validate with line numbers, convert for trl.

Pure Python (pyarrow only for Parquet), so the control plane can validate uploads without
the ML stack. Every problem names the line (JSONL, JSON, CSV) or row (Parquet) and the field.

Formats: plain `text`; `prompt`/`completion`; alpaca (`instruction`, optional `input`,
`output`); ShareGPT (`conversations` of `from`/`value`); chat `messages` of `role`/`content`.
A .json file is an array of objects or JSON Lines; a CSV cell of `messages` or
`conversations` holds the turns as JSON.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

MAX_PROBLEMS = 50
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


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


@dataclass
class DatasetReport:
    format: str = ""
    row_count: int = 0
    problems: list[Problem] = field(default_factory=list)
    truncated: bool = False
    preview: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.row_count > 0

    def add(self, problem: Problem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.truncated = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "row_count": self.row_count,
            "problems": [
                {"line": p.line, "unit": p.unit, "field": p.field, "message": p.message} for p in self.problems
            ],
            "truncated": self.truncated,
        }


class DatasetError(ValueError):
    def __init__(self, report: DatasetReport, name: str = "dataset"):
        self.report = report
        first = "; ".join(str(p) for p in report.problems[:3]) or "no rows"
        more = len(report.problems) - 3
        super().__init__(f"{name}: {first}" + (f" (and {more} more)" if more > 0 else ""))


def suffix_of(name: str) -> str:
    lowered = name.lower()
    for ext in (".jsonl", ".json", ".csv", ".parquet"):
        if lowered.endswith(ext):
            return ext
    raise ValueError(f"{name}: unsupported file type (use .jsonl, .json, .csv or .parquet)")


def unit_of(name: str) -> str:
    """What a problem's number counts in this kind of file."""
    return "row" if suffix_of(name) == ".parquet" else "line"


def iter_records(data: bytes, name: str, report: DatasetReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line or row number, record); problems with the file itself go into the report."""
    ext = suffix_of(name)
    if ext == ".parquet":
        yield from _parquet_records(data, report)
        return
    text = _decode(data, report)
    if text is None:
        return
    if ext == ".csv":
        yield from _csv_records(text, report)
    elif ext == ".json":
        yield from _json_records(text, report)
    else:
        yield from _json_lines(text, report)


def _decode(data: bytes, report: DatasetReport) -> str | None:
    """The text of a UTF-8 file, or None after naming every line that is not UTF-8."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        report.add(Problem(1, "the file is UTF-16 encoded: save it as UTF-8"))
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            report.add(Problem(number, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"))
    return None


def _json_lines(text: str, report: DatasetReport, first_line: int = 1) -> Iterator[tuple[int, dict[str, Any]]]:
    # Split on "\n" only: str.splitlines() also splits on U+2028, U+0085 and others that JSON strings may hold raw.
    for number, raw in enumerate(text.split("\n"), start=first_line):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            report.add(Problem(number, f"invalid JSON: {exc.msg} (column {exc.colno})"))
            continue
        if not isinstance(record, dict):
            report.add(Problem(number, f"expected a JSON object, got {_json_type(record)}"))
            continue
        yield number, record


def _json_records(text: str, report: DatasetReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """A .json file: an array of objects (each named by the line it starts on), or JSON Lines."""
    start = _skip_whitespace(text, 0)
    if text.startswith("[", start):
        yield from _json_array(text, start, report)
    elif _is_one_object_over_lines(text):
        report.add(Problem(1, "a .json dataset must be an array of objects (or one object per line)"))
    else:
        yield from _json_lines(text, report)  # JSON Lines saved as .json, as many hub exports are


def _is_one_object_over_lines(text: str) -> bool:
    if sum(1 for line in text.split("\n") if line.strip()) < 2:
        return False
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _json_array(text: str, pos: int, report: DatasetReport) -> Iterator[tuple[int, dict[str, Any]]]:
    decoder = json.JSONDecoder()
    line, counted = 1, 0
    pos = _skip_whitespace(text, pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            report.add(Problem(exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})"))
            return
        if isinstance(record, dict):
            yield line, record
        else:
            report.add(Problem(line, f"expected a JSON object in the array, got {_json_type(record)}"))
        pos = _skip_whitespace(text, pos)
        if text.startswith(",", pos):
            pos = _skip_whitespace(text, pos + 1)
            continue
        if text.startswith("]", pos) and _skip_whitespace(text, pos + 1) == len(text):
            return
        line += text.count("\n", counted, pos)
        report.add(Problem(line, "invalid JSON: expected ',' or ']' after an array item"))
        return


def _skip_whitespace(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


JSON_CELLS = ("messages", "conversations")  # CSV cells holding a JSON list of turns
CSV_FIELD_LIMIT = 64 * 2**20  # the csv module's default (128 KiB) is below one long training text


def _csv_records(text: str, report: DatasetReport) -> Iterator[tuple[int, dict[str, Any]]]:
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    start = 1  # a quoted cell may span lines: a record is named by the line it starts on
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells or (len(cells) > 1 and not any(cell.strip() for cell in cells)):
                continue  # a blank line, or a spreadsheet's empty row of commas
            if header is None:
                header = [cell.strip() for cell in cells]
                continue
            if len(cells) != len(header):
                report.add(Problem(line, f"has {len(cells)} fields but the header has {len(header)}"))
                continue
            record: dict[str, Any] = dict(zip(header, cells, strict=True))
            if _decode_json_cells(line, record, report):
                yield line, record
    except csv.Error as exc:
        report.add(Problem(start, f"unreadable CSV: {exc}"))


def _decode_json_cells(line: int, record: dict[str, Any], report: DatasetReport) -> bool:
    for key in JSON_CELLS:
        if isinstance(record.get(key), str):
            try:
                record[key] = json.loads(record[key])
            except json.JSONDecodeError as exc:
                report.add(Problem(line, f"must hold a JSON list of turns: {exc.msg} (column {exc.colno})", key))
                return False
    return True


def _parquet_records(data: bytes, report: DatasetReport) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        report.add(Problem(0, f"not a readable Parquet file: {exc}", unit="row"))
        return
    number = 0
    for batch in table.to_batches(max_chunksize=1024):
        try:
            records = batch.to_pylist()
        except Exception:  # a string column holding bytes that are not UTF-8: find the rows and columns
            records = [_parquet_row(batch, offset, number + offset + 1, report) for offset in range(batch.num_rows)]
        for record in records:
            number += 1
            if record is not None:
                yield number, record


def _parquet_row(batch: Any, offset: int, number: int, report: DatasetReport) -> dict[str, Any] | None:
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


def detect_format(record: dict[str, Any]) -> str | None:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def _text_problem(record: dict[str, Any], key: str, what: str = "") -> str | None:
    """Why record[key] is not usable text, or None when it is."""
    if key not in record or record[key] is None:
        return "missing"
    value = record[key]
    if not isinstance(value, str):
        return f"must be a string, got {_json_type(value)}"
    if not value.strip():
        return what or "must not be empty"
    return None


def check_record(fmt: str, record: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (field, message) problems for one record of a known format."""
    if fmt in ("messages", "sharegpt"):
        key = "messages" if fmt == "messages" else "conversations"
        return _check_turns(key, record.get(key), fmt)
    required = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "output")}
    problems = [(key, why) for key in required[fmt] if (why := _text_problem(record, key))]
    if fmt == "alpaca" and record.get("input") is not None and not isinstance(record["input"], str):
        problems.append(("input", f"must be a string, got {_json_type(record['input'])}"))
    return problems


def _check_turns(key: str, turns: Any, fmt: str) -> list[tuple[str, str]]:
    if not isinstance(turns, list) or not turns:
        return [(key, "must be a non-empty list of turns")]
    role_key, text_key = ("role", "content") if fmt == "messages" else ("from", "value")
    allowed = ROLES if fmt == "messages" else tuple(SHAREGPT_ROLES)
    problems = []
    roles: list[tuple[int, str]] = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            problems.append((where, f"must be an object with {role_key!r} and {text_key!r}"))
        elif turn.get(role_key) not in allowed:
            problems.append((f"{where}.{role_key}", f"must be one of {', '.join(allowed)}, got {turn.get(role_key)!r}"))
        elif why := _text_problem(turn, text_key, "empty turn"):
            problems.append((f"{where}.{text_key}", why))
        else:
            roles.append((i, _role(turn, fmt)))
    return problems or _check_order(key, role_key, roles)


def _check_order(key: str, role_key: str, roles: list[tuple[int, str]]) -> list[tuple[str, str]]:
    """A conversation trl can learn from: [system] user assistant (user assistant)*."""
    if not any(role == "assistant" for _, role in roles):
        return [(key, "has no assistant turn to learn from")]
    problems = [(f"{key}[{i}].{role_key}", "a system turn may only come first") for i, role in roles[1:] if role == "system"]
    chat = [(i, role) for i, role in roles if role != "system"]
    if chat[0][1] != "user":
        problems.append((f"{key}[{chat[0][0]}].{role_key}", "the conversation must open with a user turn"))
    for (_, before), (i, role) in pairwise(chat):
        if role == before:
            problems.append((f"{key}[{i}].{role_key}", f"two {role} turns in a row: user and assistant must alternate"))
    if chat[-1][1] != "assistant":
        problems.append((f"{key}[{chat[-1][0]}].{role_key}", "the conversation must end with an assistant turn"))
    return problems


def _role(turn: dict[str, Any], fmt: str) -> str:
    return str(turn["role"]) if fmt == "messages" else SHAREGPT_ROLES[turn["from"]]


def validate_bytes(data: bytes, name: str, preview_rows: int = 5) -> DatasetReport:
    """Validate a whole file; the report carries every problem (up to MAX_PROBLEMS)."""
    report = DatasetReport()
    unit = unit_of(name)
    for number, record in iter_records(data, name, report):
        fmt = detect_format(record)
        if fmt is None:
            known = "text, prompt/completion, instruction/output, messages, conversations"
            report.add(Problem(number, f"no known fields ({known}); found {', '.join(map(str, record)) or 'none'}", unit=unit))
            continue
        if not report.format:
            report.format = fmt
        elif fmt != report.format:
            report.add(Problem(number, f"row is {fmt} but earlier rows are {report.format}", unit=unit))
            continue
        for field_name, message in check_record(fmt, record):
            report.add(Problem(number, message, field_name, unit))
        report.row_count += 1
        if len(report.preview) < preview_rows:
            report.preview.append(record)
    if report.row_count == 0 and not report.problems:
        report.add(Problem(0, "the file has no rows", unit=unit))
    return report


def validate_file(path: Path) -> DatasetReport:
    return validate_bytes(Path(path).read_bytes(), Path(path).name)


def to_trl_row(fmt: str, record: dict[str, Any]) -> dict[str, Any]:
    """Convert one record to a row trl's SFTTrainer understands (text, or conversational prompt/completion)."""
    if fmt == "text":
        return {"text": record["text"]}
    if fmt == "prompt_completion":
        return {"prompt": record["prompt"], "completion": record["completion"]}
    if fmt == "alpaca":
        instruction = record["instruction"]
        if record.get("input"):
            instruction = f"{instruction}\n\n{record['input']}"
        return {
            "prompt": [{"role": "user", "content": instruction}],
            "completion": [{"role": "assistant", "content": record["output"]}],
        }
    key = "messages" if fmt == "messages" else "conversations"
    turns = [{"role": _role(t, fmt), "content": t["content" if fmt == "messages" else "value"]} for t in record[key]]
    last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
    return {"prompt": turns[:last], "completion": turns[last:]} if last > 0 else {"messages": turns}


def load_trl_rows(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """Read, validate and convert a dataset file; raise DatasetError naming the first problems."""
    path = Path(path)
    data = path.read_bytes()
    report = validate_bytes(data, path.name, preview_rows=0)
    if not report.ok:
        raise DatasetError(report, path.name)
    rows = [to_trl_row(report.format, record) for _, record in iter_records(data, path.name, DatasetReport())]
    return report.format, rows
