"""Dataset files: detect the row format, validate with line numbers, preview, convert for trl.

Pure Python (pyarrow only for Parquet), so the control plane can validate uploads without
the ML stack. Files are read as streams within bounds (workers/data/datafiles.py). Every problem
names the line (JSONL, JSON, CSV) or row (Parquet) and the field.

Formats: plain `text`; `prompt`/`completion`; alpaca (`instruction`, optional `input`,
`output`); ShareGPT (`conversations` of `from`/`value`); chat `messages` of `role`/`content`;
preference pairs (`prompt`, `chosen`, `rejected`: three strings, or, as trl's conversational
form, the prompt's turns and the chosen and rejected assistant turns; or OpenAI's DPO rows,
`input.messages`, `preferred_output`, `non_preferred_output`, read as conversational pairs);
feedback (`prompt`, `completion`, `label`: one answer, plain or as turns, labelled desirable
true or false; a file needs both labels).
A .json file is an array of objects or JSON Lines; a CSV cell of `messages` or
`conversations` holds the turns as JSON.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, BinaryIO

from workers.data.bounds import STORED, Limits, Problem, json_type
from workers.data.datafiles import read_records, suffix_of, unit_of

__all__ = ["DatasetError", "DatasetReport", "Limits", "Problem", "suffix_of", "unit_of", "validate_stream"]

MAX_PROBLEMS = 50
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# A preview shows the first rows with long texts clipped: it is stored with the dataset and shown on its page.
PREVIEW_ROWS = 5
PREVIEW_CELL_CHARS = 2000
PREVIEW_ITEMS = 20  # turns of a conversation, fields of a row
PREVIEW_ROW_CHARS = 4 * PREVIEW_CELL_CHARS  # what one row of the preview holds, in all


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


def detect_format(record: dict[str, Any]) -> str | None:
    if ("chosen" in record and "rejected" in record) or _is_openai_pair(record):
        return "preference"
    if "prompt" in record and "completion" in record and "label" in record:
        return "feedback"
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
        return f"must be a string, got {json_type(value)}"
    if not value.strip():
        return what or "must not be empty"
    return None


def check_record(fmt: str, record: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (field, message) problems for one record of a known format."""
    if fmt in ("messages", "sharegpt"):
        key = "messages" if fmt == "messages" else "conversations"
        return _check_turns(key, record.get(key), fmt)
    if fmt == "preference":
        return _check_openai_pair(record) if _is_openai_pair(record) else _check_pair(record)
    if fmt == "feedback":
        return _check_feedback(record)
    required = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "output")}
    problems = [(key, why) for key in required[fmt] if (why := _text_problem(record, key))]
    if fmt == "alpaca" and record.get("input") is not None and not isinstance(record["input"], str):
        problems.append(("input", f"must be a string, got {json_type(record['input'])}"))
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


PAIR_FIELDS = ("prompt", "chosen", "rejected")


def _check_pair(record: dict[str, Any]) -> list[tuple[str, str]]:
    """A preference pair: three texts, or (conversational) the prompt's turns and each answer's assistant turns."""
    if isinstance(record.get("prompt"), list):
        problems = _check_prompt_turns(record["prompt"])
        for key in ("chosen", "rejected"):
            problems += _check_answer_turns(key, record.get(key))
    else:
        problems = [(key, why) for key in PAIR_FIELDS if (why := _text_problem(record, key))]
    if not problems and record["chosen"] == record["rejected"]:
        problems.append(("rejected", "is the same as chosen: the pair teaches no preference"))
    return problems


def _check_prompt_turns(turns: list[Any], key: str = "prompt",
                        answered_by: str = "the chosen and rejected answers") -> list[tuple[str, str]]:
    """The prompt of a conversational row: [system] user (assistant user)*, ending on the user turn answered."""
    if not turns:
        return [(key, "must be a non-empty list of turns")]
    problems = _check_turn_list(key, turns)
    if problems:
        return problems
    roles = [turn["role"] for turn in turns]
    chat = [(i, role) for i, role in enumerate(roles) if role != "system"]
    problems = [(f"{key}[{i}].role", "a system turn may only come first") for i, role in enumerate(roles) if i and role == "system"]
    if not chat or chat[-1][1] != "user":
        where = f"{key}[{chat[-1][0]}].role" if chat else key
        problems.append((where, f"the prompt must end with the user turn that {answered_by} answer"))
    for (_, before), (i, role) in pairwise(chat):
        if role == before:
            problems.append((f"{key}[{i}].role", f"two {role} turns in a row: user and assistant must alternate"))
    return problems


def _is_openai_pair(record: dict[str, Any]) -> bool:
    """A row of OpenAI's preference files (its DPO fine-tuning format)."""
    return "preferred_output" in record and "non_preferred_output" in record


def _check_openai_pair(record: dict[str, Any]) -> list[tuple[str, str]]:
    """OpenAI's pair: `input.messages`, the turns before the answers, and each answer as a list of assistant turns."""
    source = record.get("input")
    if not isinstance(source, dict) or not isinstance(source.get("messages"), list):
        problems = [("input.messages", "must be a list of turns: OpenAI's preference rows hold the conversation "
                                       "before the answers in input.messages")]
    else:
        problems = _check_prompt_turns(source["messages"], "input.messages",
                                       "the preferred and non-preferred outputs")
    for key in ("preferred_output", "non_preferred_output"):
        problems += _check_answer_turns(key, record.get(key))
    if not problems and _turns_only(record["preferred_output"]) == _turns_only(record["non_preferred_output"]):
        problems.append(("non_preferred_output", "is the same as preferred_output: the pair teaches no preference"))
    return problems


def _check_feedback(record: dict[str, Any]) -> list[tuple[str, str]]:
    """A feedback row: a prompt and one answer (two texts, or the prompt's turns and the answer's assistant turns),
    and whether that answer is desirable (label true or false)."""
    if isinstance(record.get("prompt"), list):
        problems = _check_prompt_turns(record["prompt"], answered_by="the completion")
        problems += _check_answer_turns("completion", record.get("completion"))
    else:
        problems = [(key, why) for key in ("prompt", "completion") if (why := _text_problem(record, key))]
    label = record.get("label")
    if not isinstance(label, bool):
        shown = f" {label!r}" if isinstance(label, str) else ""
        problems.append(("label", f"must be true (a desirable answer) or false (an undesirable one), got "
                                  f"{json_type(label)}{shown}"))
    return problems


def _label_problem(labels: set[bool]) -> str | None:
    """Why a feedback file's labels cannot train KTO, or None: it needs both desirable and undesirable answers."""
    if len(labels) != 1:
        return None
    (label,) = labels
    missing = "false (undesirable)" if label else "true (desirable)"
    return (f"every row is labelled {str(label).lower()}: KTO learns from both desirable and undesirable answers, so "
            f"the file needs rows labelled {missing} too")


def _check_answer_turns(key: str, turns: Any) -> list[tuple[str, str]]:
    if not isinstance(turns, list) or not turns:
        return [(key, "must be a non-empty list of assistant turns, as the prompt is a list of turns")]
    problems = _check_turn_list(key, turns)
    return problems or [(f"{key}[{i}].role", "must be assistant: an answer holds assistant turns only")
                        for i, turn in enumerate(turns) if turn["role"] != "assistant"]


def _check_turn_list(key: str, turns: list[Any]) -> list[tuple[str, str]]:
    problems = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            problems.append((where, "must be an object with 'role' and 'content'"))
        elif turn.get("role") not in ROLES:
            problems.append((f"{where}.role", f"must be one of {', '.join(ROLES)}, got {turn.get('role')!r}"))
        elif why := _text_problem(turn, "content", "empty turn"):
            problems.append((f"{where}.content", why))
    return problems


def _role(turn: dict[str, Any], fmt: str) -> str:
    return str(turn["role"]) if fmt == "messages" else SHAREGPT_ROLES[turn["from"]]


KNOWN_FIELDS = ("text, prompt/completion, instruction/output, messages, conversations, prompt/chosen/rejected, "
                "input/preferred_output/non_preferred_output, prompt/completion/label")
HEADER_EXAMPLES = ("text; prompt,completion; instruction,input,output; messages; conversations; prompt,chosen,rejected; "
                   "or prompt,completion,label")


def validate_stream(source: BinaryIO, name: str, limits: Limits | None = None,
                    preview_rows: int = PREVIEW_ROWS, rows: list[dict[str, Any]] | None = None) -> DatasetReport:
    """Validate a whole file, read from the start of `source` within `limits` (the defaults when None); the report
    carries every problem (up to MAX_PROBLEMS) and a preview of the first rows, long texts clipped.

    `rows`, when given, receives each row as a trl row (to_trl_row) in the same pass, until a problem is found: it
    holds every row when the report is ok, so that a file to train on is read once."""
    report = DatasetReport()
    unit = unit_of(name)
    labels: set[bool] = set()  # of feedback rows
    for number, record in read_records(source, name, report, limits or Limits(), csv_header=_csv_header_problem):
        fmt = detect_format(record)
        if fmt is None:
            report.add(Problem(number, f"no known fields ({KNOWN_FIELDS}); found {', '.join(map(str, record)) or 'none'}",
                               unit=unit))
            continue
        if not report.format:
            report.format = fmt
        elif fmt != report.format:
            report.add(Problem(number, f"row is {fmt} but earlier rows are {report.format}", unit=unit))
            continue
        for field_name, message in check_record(fmt, record):
            report.add(Problem(number, message, field_name, unit))
        if fmt == "feedback" and isinstance(record.get("label"), bool):
            labels.add(record["label"])
        if rows is not None and not report.problems:  # fmt is the file's format here; a row with problems
            rows.append(to_trl_row(fmt, record))  # may not convert, and once one is found none are kept
        report.row_count += 1
        if len(report.preview) < preview_rows:
            report.preview.append(preview_of(record))
    if report.row_count == 0 and not report.problems:
        report.add(Problem(0, "the file has no rows", unit=unit))
    if report.format == "feedback" and (why := _label_problem(labels)):
        report.add(Problem(0, why, "label", unit))
    return report


def validate_bytes(data: bytes, name: str, preview_rows: int = PREVIEW_ROWS, limits: Limits | None = None) -> DatasetReport:
    return validate_stream(io.BytesIO(data), name, limits, preview_rows)


def validate_file(path: Path, limits: Limits | None = None) -> DatasetReport:
    with Path(path).open("rb") as source:
        return validate_stream(source, Path(path).name, limits)


def _csv_header_problem(header: list[str]) -> str | None:
    """A CSV whose first row names no known field has no header: its first row of data was read as one."""
    if detect_format(dict.fromkeys(header)) is not None:
        return None
    return (f"the first row is read as the header ({', '.join(header)}), and it names none of the known fields "
            f"({KNOWN_FIELDS}): start the file with a header row, e.g. {HEADER_EXAMPLES}")


def preview_of(record: dict[str, Any]) -> dict[str, Any]:
    """The record as a preview keeps it: each text clipped, long lists and wide rows cut, a few KB in all."""
    budget = [PREVIEW_ROW_CHARS]
    clipped = _clip(record, budget)
    return clipped if isinstance(clipped, dict) else {}


def _clip(value: Any, budget: list[int]) -> Any:
    if isinstance(value, str):
        keep = max(0, min(len(value), PREVIEW_CELL_CHARS, budget[0]))
        budget[0] -= keep + 1
        return value if keep == len(value) else f"{value[:keep]}… [{len(value) - keep:,} more characters]"
    if isinstance(value, dict):
        items = list(itertools.islice(value.items(), PREVIEW_ITEMS))
        out = {str(k): _clip(v, budget) for k, v in items if _spend(budget)}
        if len(out) < len(value):
            out["…"] = f"{len(value) - len(out):,} more fields"
        return out
    if isinstance(value, list):
        kept = [_clip(v, budget) for v in itertools.islice(value, PREVIEW_ITEMS) if _spend(budget)]
        return [*kept, f"… {len(value) - len(kept):,} more items"] if len(kept) < len(value) else kept
    return value


def _spend(budget: list[int]) -> bool:
    """Whether the row's budget allows one more value (each costs at least a character)."""
    budget[0] -= 1
    return budget[0] > 0


def to_trl_row(fmt: str, record: dict[str, Any]) -> dict[str, Any]:
    """Convert one record to a row trl's SFTTrainer understands (text, or conversational prompt/completion), or, for
    a preference pair, one its DPOTrainer does (prompt, chosen, rejected: texts or lists of turns; OpenAI's pairs as
    turns), or, for feedback, one its KTOTrainer does (prompt, completion, label)."""
    if fmt == "preference" and _is_openai_pair(record):
        return {"prompt": _turns_only(record["input"]["messages"]), "chosen": _turns_only(record["preferred_output"]),
                "rejected": _turns_only(record["non_preferred_output"])}
    if fmt == "preference":
        return {key: _turns_only(record[key]) for key in PAIR_FIELDS}
    if fmt == "feedback":
        return {"prompt": _turns_only(record["prompt"]), "completion": _turns_only(record["completion"]),
                "label": record["label"]}
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


def _turns_only(value: Any) -> Any:
    """A text as it is; a list of turns with their role and content alone (trl's chat templates read no more)."""
    if isinstance(value, list):
        return [{"role": turn["role"], "content": turn["content"]} for turn in value]
    return value


def load_trl_rows(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """Read, validate and convert a stored dataset file; raise DatasetError naming the first problems."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    with path.open("rb") as source:
        report = validate_stream(source, path.name, STORED, preview_rows=0, rows=rows)
    if not report.ok:
        raise DatasetError(report, path.name)
    return report.format, rows


def numbered_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, record) of a stored, valid dataset file, read as a stream."""
    path = Path(path)
    with path.open("rb") as source:
        yield from read_records(source, path.name, DatasetReport(), STORED)
