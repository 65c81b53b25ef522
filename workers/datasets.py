"""Dataset files: read, detect the row format, validate with line numbers, convert for trl.

Pure Python (pyarrow only for Parquet), so the control plane can validate uploads without
the ML stack. Every problem names the line (JSONL/CSV) or row (Parquet) and the field.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_PROBLEMS = 50
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Problem:
    line: int
    message: str
    field: str = ""

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.message}"


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
            "problems": [{"line": p.line, "field": p.field, "message": p.message} for p in self.problems],
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


def iter_records(data: bytes, name: str, report: DatasetReport) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line or row number, record); problems with the file itself go into the report."""
    ext = suffix_of(name)
    if ext == ".parquet":
        yield from _parquet_records(data, report)
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        report.add(Problem(line, f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"))
        return
    if ext == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for record in reader:
            yield reader.line_num, {k: v for k, v in record.items() if k is not None}
    elif ext == ".json":
        yield from _json_array_records(text, report)
    else:
        for number, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                report.add(Problem(number, f"invalid JSON: {exc.msg} (column {exc.colno})"))
                continue
            if not isinstance(record, dict):
                report.add(Problem(number, f"expected a JSON object, got {type(record).__name__}"))
                continue
            yield number, record


def _json_array_records(text: str, report: DatasetReport) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        report.add(Problem(exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})"))
        return
    if not isinstance(records, list):
        report.add(Problem(1, "a .json dataset must be an array of objects"))
        return
    for index, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            report.add(Problem(index, f"item {index}: expected an object"))
            continue
        yield index, record


def _parquet_records(data: bytes, report: DatasetReport) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        report.add(Problem(1, f"not a readable Parquet file: {exc}"))
        return
    yield from enumerate(table.to_pylist(), start=1)


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


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def check_record(fmt: str, record: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (field, message) problems for one record of a known format."""
    if fmt == "text":
        return [] if _nonempty_str(record.get("text")) else [("text", "must be a non-empty string")]
    if fmt == "prompt_completion":
        return [(k, "must be a non-empty string") for k in ("prompt", "completion") if not _nonempty_str(record.get(k))]
    if fmt == "alpaca":
        problems = [(k, "must be a non-empty string") for k in ("instruction", "output") if not _nonempty_str(record.get(k))]
        if record.get("input") not in (None, "") and not isinstance(record.get("input"), str):
            problems.append(("input", "must be a string"))
        return problems
    key = "messages" if fmt == "messages" else "conversations"
    return _check_turns(key, record.get(key), fmt)


def _check_turns(key: str, turns: Any, fmt: str) -> list[tuple[str, str]]:
    if not isinstance(turns, list) or not turns:
        return [(key, "must be a non-empty list of turns")]
    role_key, text_key = ("role", "content") if fmt == "messages" else ("from", "value")
    roles = ROLES if fmt == "messages" else tuple(SHAREGPT_ROLES)
    problems = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            problems.append((where, "must be an object"))
        elif turn.get(role_key) not in roles:
            problems.append((f"{where}.{role_key}", f"must be one of {', '.join(roles)}, got {turn.get(role_key)!r}"))
        elif not _nonempty_str(turn.get(text_key)):
            problems.append((f"{where}.{text_key}", "empty turn"))
    if not problems and not any(_role(t, fmt) == "assistant" for t in turns):
        problems.append((key, "has no assistant turn to learn from"))
    return problems


def _role(turn: dict[str, Any], fmt: str) -> str:
    return str(turn["role"]) if fmt == "messages" else SHAREGPT_ROLES[turn["from"]]


def validate_bytes(data: bytes, name: str, preview_rows: int = 5) -> DatasetReport:
    """Validate a whole file; the report carries every problem (up to MAX_PROBLEMS)."""
    report = DatasetReport()
    for number, record in iter_records(data, name, report):
        fmt = detect_format(record)
        if fmt is None:
            report.add(Problem(number, "no known fields (text, prompt/completion, instruction/output, messages, conversations)"))
            continue
        if not report.format:
            report.format = fmt
        elif fmt != report.format:
            report.add(Problem(number, f"row is {fmt} but earlier rows are {report.format}"))
            continue
        for field_name, message in check_record(fmt, record):
            report.add(Problem(number, message, field_name))
        report.row_count += 1
        if len(report.preview) < preview_rows:
            report.preview.append(record)
    if report.row_count == 0 and not report.problems:
        report.add(Problem(1, "the file has no rows"))
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
