from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.config import ConfigError
from workers.data.bounds import Limits
from workers.data.datasets import (
    MAX_PROBLEMS,
    PREVIEW_CELL_CHARS,
    PREVIEW_ROWS,
    DatasetError,
    load_trl_rows,
    to_trl_row,
    validate_bytes,
)


def jsonl(*rows: object) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def json_array(*rows: dict[str, Any]) -> bytes:
    """One item per line after the opening bracket: item k starts on line k + 1."""
    return ("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n").encode()


def csv_file(*rows: dict[str, Any]) -> bytes:
    """Header on line 1, row k on line k + 1; lists of turns are written as JSON cells."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return out.getvalue().encode()


def parquet(*rows: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(list(rows)), buffer)
    return buffer.getvalue()


# name suffix, writer, and the number a problem in row k carries
FILE_TYPES: dict[str, tuple[Callable[..., bytes], Callable[[int], int]]] = {
    ".jsonl": (jsonl, lambda k: k),
    ".json": (json_array, lambda k: k + 1),
    ".csv": (csv_file, lambda k: k + 1),
    ".parquet": (parquet, lambda k: k),
}


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def sharegpt(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"from": who, "value": value} for who, value in turns]


# format: (three good rows, a broken second row, the field it names, words of the message)
FORMATS: dict[str, tuple[list[dict[str, Any]], dict[str, Any], str, str]] = {
    "text": (
        [{"text": "The sum of 1 and 2 is 3."}, {"text": "Reverse: abc -> cba"}, {"text": "plain text"}],
        {"text": "  "},
        "text",
        "must not be empty",
    ),
    "prompt_completion": (
        [{"prompt": "1 + 1 =", "completion": " 2"}, {"prompt": "2 + 2 =", "completion": " 4"}, {"prompt": "x", "completion": "y"}],
        {"prompt": "3 + 3 =", "completion": ""},
        "completion",
        "must not be empty",
    ),
    "alpaca": (
        [
            {"instruction": "What is 1 + 1?", "input": "", "output": "2"},
            {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
        ],
        {"instruction": "", "input": "", "output": "5"},
        "instruction",
        "must not be empty",
    ),
    "sharegpt": (
        [
            {"conversations": sharegpt(("human", "What is 1 + 1?"), ("gpt", "2"))},
            {"conversations": sharegpt(("system", "Be terse."), ("human", "2 + 2?"), ("gpt", "4"))},
            {"conversations": sharegpt(("human", "hi"), ("gpt", "hello"), ("human", "bye"), ("gpt", "bye!"))},
        ],
        {"conversations": sharegpt(("human", "3 + 3?"), ("bot", "6"))},
        "conversations[1].from",
        "must be one of",
    ),
    "messages": (
        [
            {"messages": chat(("system", "You add numbers."), ("user", "1 + 1?"), ("assistant", "2"))},
            {"messages": chat(("user", "2 + 2?"), ("assistant", "4"))},
            {"messages": chat(("user", "hi"), ("assistant", "hello"), ("user", "3 + 4?"), ("assistant", "7"))},
        ],
        {"messages": chat(("system", "You add numbers."), ("user", ""), ("assistant", "6"))},
        "messages[1].content",
        "empty turn",
    ),
}

CASES = [(fmt, ext) for fmt in FORMATS for ext in FILE_TYPES]


@pytest.mark.parametrize(("fmt", "ext"), CASES)
def test_a_good_file_of_each_format_and_type_validates(fmt: str, ext: str) -> None:
    good, *_ = FORMATS[fmt]
    write, _ = FILE_TYPES[ext]
    report = validate_bytes(write(*good), f"data{ext}")
    assert report.problems == []
    assert report.ok and report.format == fmt and report.row_count == 3


@pytest.mark.parametrize(("fmt", "ext"), CASES)
def test_a_broken_row_is_named_by_its_line_or_row_and_field(fmt: str, ext: str) -> None:
    good, broken, field, words = FORMATS[fmt]
    write, number_of = FILE_TYPES[ext]
    report = validate_bytes(write(good[0], broken, good[2]), f"data{ext}")
    assert not report.ok
    assert [(p.line, p.field) for p in report.problems] == [(number_of(2), field)]
    assert words in report.problems[0].message
    unit = "row" if ext == ".parquet" else "line"
    assert str(report.problems[0]).startswith(f"{unit} {number_of(2)}, field '{field}': ")


@pytest.mark.parametrize("ext", list(FILE_TYPES))
def test_every_file_type_converts_to_the_same_trl_rows(ext: str, tmp_path: Path) -> None:
    for fmt, (good, *_) in FORMATS.items():
        write, _ = FILE_TYPES[ext]
        path = tmp_path / f"{fmt}{ext}"
        path.write_bytes(write(*good))
        assert load_trl_rows(path) == (fmt, [to_trl_row(fmt, row) for row in good]), fmt


# --- bad JSON ---------------------------------------------------------------------------------------------------


def test_it_names_the_line_and_problem_of_a_malformed_row() -> None:
    data = jsonl({"text": "fine"}, '{"text": "broken', {"text": "fine too"}, "[1, 2]")
    report = validate_bytes(data, "train.jsonl")
    assert not report.ok
    assert [(p.line, p.message.split(":")[0]) for p in report.problems] == [(2, "invalid JSON"), (4, "expected a JSON object, got an array")]
    assert str(report.problems[0]).startswith("line 2: invalid JSON")


def test_a_json_array_names_the_line_each_item_starts_on() -> None:
    rows = [{"text": "a"}, {"text": ""}, {"text": "c"}, "not an object"]
    data = json.dumps(rows, indent=2).encode()  # each object spans three lines
    report = validate_bytes(data, "data.json")
    assert [(p.line, p.field) for p in report.problems] == [(5, "text"), (11, "")]
    assert "expected a JSON object in the array, got a string" in report.problems[1].message


def test_a_json_array_with_a_syntax_error_names_its_line() -> None:
    data = b'[\n  {"text": "a"},\n  {"text": "b",,\n  {"text": "c"}\n]\n'
    report = validate_bytes(data, "data.json")
    assert [(p.line, p.message.split(":")[0]) for p in report.problems] == [(3, "invalid JSON")]
    assert not validate_bytes(b'[{"text": "a"} {"text": "b"}]', "data.json").ok


def test_a_json_array_with_a_trailing_comma_is_refused_where_the_value_is_missing() -> None:
    one_line = validate_bytes(b'[{"text": "a"},]', "data.json")
    assert [str(p) for p in one_line.problems] == ["line 1: invalid JSON: Expecting value (column 16)"]
    spread = validate_bytes(b'[\n  {"text": "a"},\n  {"text": "b"},\n]\n', "data.json")
    assert [str(p) for p in spread.problems] == ["line 4: invalid JSON: Expecting value (column 1)"]


def test_json_lines_saved_as_json_are_read_line_by_line() -> None:
    report = validate_bytes(jsonl({"text": "a"}, "{oops", {"text": "c"}), "export.json")
    assert [(p.line, p.message.split(":")[0]) for p in report.problems] == [(2, "invalid JSON")]
    assert validate_bytes(jsonl({"text": "a"}), "one.json").ok


def test_a_json_object_that_is_not_an_array_is_refused() -> None:
    report = validate_bytes(json.dumps({"data": [{"text": "a"}]}, indent=2).encode(), "squad.json")
    assert [str(p) for p in report.problems] == ["line 1: a .json dataset must be an array of objects (or one object per line)"]


def test_a_csv_cell_of_turns_must_hold_json() -> None:
    data = b'messages\n"[{""role"": ""user"", ""content"": ""hi""}, {""role"": ""assistant"", ""content"": ""yo""}]"\n[{"oops\n'
    report = validate_bytes(data, "chat.csv")
    assert report.row_count == 1
    assert [(p.line, p.field, p.message.split(":")[0]) for p in report.problems] == [
        (3, "messages", "must hold a JSON list of turns")
    ]


def test_an_unreadable_parquet_file_is_reported_without_a_traceback() -> None:
    report = validate_bytes(b"PAR1 this is not parquet", "data.parquet")
    assert not report.ok and report.problems[0].line == 0
    assert str(report.problems[0]).startswith("not a readable Parquet file")


# --- missing fields ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", list(FILE_TYPES))
def test_missing_and_null_fields_are_named(ext: str) -> None:
    write, number_of = FILE_TYPES[ext]
    rows: list[dict[str, Any]] = [
        {"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}, {"prompt": None, "completion": "c"}
    ]
    if ext == ".csv":  # a CSV cell cannot be null, only empty
        rows = [{k: v or "" for k, v in row.items()} for row in rows]
    report = validate_bytes(write(*rows), f"data{ext}")
    assert [(p.line, p.field) for p in report.problems] == [(number_of(2), "completion"), (number_of(3), "prompt")]
    expected = "must not be empty" if ext == ".csv" else "missing"
    assert {p.message for p in report.problems} == {expected}


def test_rows_without_known_fields_or_of_another_format_are_named() -> None:
    data = jsonl({"instruction": "i", "output": "o"}, {"question": "q", "answer": "a"}, {"text": "t"})
    report = validate_bytes(data, "mixed.jsonl")
    assert [(p.line, p.message.split(" (")[0].split(" but")[0]) for p in report.problems] == [
        (2, "no known fields"),
        (3, "row is text"),
    ]
    assert "found question, answer" in report.problems[0].message


def test_a_non_string_field_is_named_with_its_type() -> None:
    report = validate_bytes(jsonl({"instruction": "i", "input": 3, "output": ["o"]}), "d.jsonl")
    assert {(p.field, p.message) for p in report.problems} == {
        ("output", "must be a string, got an array"),
        ("input", "must be a string, got a number"),
    }


def test_a_csv_row_with_the_wrong_number_of_fields_is_named() -> None:
    data = b"prompt,completion\n1 + 1 =,2\n2 + 2 =,4,extra\n3 + 3 =\n"
    report = validate_bytes(data, "d.csv")
    assert [(p.line, p.message) for p in report.problems] == [
        (3, "has 3 fields but the header has 2"),
        (4, "has 1 fields but the header has 2"),
    ]


def test_a_csv_record_is_named_by_the_line_it_starts_on() -> None:
    data = b'text\n"a cell\nover three\nlines"\n""\nlast\n'
    report = validate_bytes(data, "d.csv")
    assert report.row_count == 3
    assert [(p.line, p.field) for p in report.problems] == [(5, "text")]


def test_a_csv_cell_longer_than_the_csv_modules_default_limit_is_read() -> None:
    long_text = "x" * 200_000
    report = validate_bytes(f"text\n{long_text}\n".encode(), "long.csv")
    assert report.ok, report.problems


@pytest.mark.parametrize("ext", list(FILE_TYPES))
def test_a_file_without_rows_is_refused(ext: str) -> None:
    data = parquet_empty() if ext == ".parquet" else {".jsonl": b"\n\n", ".json": b"[]", ".csv": b"text\n"}[ext]
    report = validate_bytes(data, f"empty{ext}")
    assert not report.ok and [str(p) for p in report.problems] == ["the file has no rows"]


def parquet_empty() -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), buffer)
    return buffer.getvalue()


# --- turns: empty, wrong roles, out of order ----------------------------------------------------------------------


def test_it_reports_missing_fields_empty_turns_and_wrong_roles_with_lines() -> None:
    data = jsonl(
        {"messages": chat(("user", "hi"), ("assistant", "hello"))},
        {"messages": chat(("user", ""), ("assistant", "x"))},
        {"messages": [{"role": "robot", "content": "beep"}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": "hi"}, "assistant: hello"]},
        {"messages": chat(("user", "hi"), ("assistant", "   "))},
    )
    report = validate_bytes(data, "chat.jsonl")
    found = {(p.line, p.field, p.message.split(",")[0]) for p in report.problems}
    assert found == {
        (2, "messages[0].content", "empty turn"),
        (3, "messages[0].role", "must be one of system"),
        (4, "messages", "must be a non-empty list of turns"),
        (5, "messages[1]", "must be an object with 'role' and 'content'"),
        (6, "messages[1].content", "empty turn"),
    }


ORDER_CASES = [
    ([("user", "q")], "", "has no assistant turn to learn from"),
    ([("system", "s"), ("user", "q")], "", "has no assistant turn to learn from"),
    ([("user", "q"), ("system", "s"), ("assistant", "a")], "[1]", "a system turn may only come first"),
    ([("assistant", "hello"), ("user", "q"), ("assistant", "a")], "[0]", "the conversation must open with a user turn"),
    ([("user", "q"), ("user", "again"), ("assistant", "a")], "[1]", "two user turns in a row"),
    ([("user", "q"), ("assistant", "a"), ("assistant", "more")], "[2]", "two assistant turns in a row"),
    ([("user", "q"), ("assistant", "a"), ("user", "thanks")], "[2]", "the conversation must end with an assistant turn"),
]


@pytest.mark.parametrize(("turns", "where", "message"), ORDER_CASES)
def test_roles_out_of_order_are_named_in_chat_messages(turns: list[tuple[str, str]], where: str, message: str) -> None:
    report = validate_bytes(jsonl({"messages": chat(("user", "ok"), ("assistant", "fine"))}, {"messages": chat(*turns)}), "c.jsonl")
    assert [(p.line, p.field) for p in report.problems] == [(2, f"messages{where}.role" if where else "messages")]
    assert report.problems[0].message.startswith(message)


@pytest.mark.parametrize(("turns", "where", "message"), ORDER_CASES)
def test_roles_out_of_order_are_named_in_sharegpt(turns: list[tuple[str, str]], where: str, message: str) -> None:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    conversations = sharegpt(*[(names[role], text) for role, text in turns])
    report = validate_bytes(jsonl({"conversations": conversations}), "s.jsonl")
    assert [(p.line, p.field) for p in report.problems] == [(1, f"conversations{where}.from" if where else "conversations")]
    assert report.problems[0].message.startswith(message)


# --- encodings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv"])
def test_it_names_every_line_that_is_not_utf8(ext: str) -> None:
    good = {".jsonl": b'{"text": "ok"}', ".json": b'[{"text": "ok"},', ".csv": b"text\nok"}[ext]
    data = good + b'\n{"text": "caf\xe9"}\n{"text": "fine"}\n{"text": "na\xefve"}\n'
    report = validate_bytes(data, f"latin{ext}")
    lines = [2, 4] if ext != ".csv" else [3, 5]
    assert [p.line for p in report.problems] == lines
    assert all("not valid UTF-8" in p.message for p in report.problems)
    assert "byte 0xe9" in report.problems[0].message


def test_a_parquet_string_that_is_not_utf8_names_its_row_and_column() -> None:
    column = pa.array([b"ok", b"caf\xe9", b"fine"], type=pa.binary()).view(pa.string())
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": column}), buffer)
    report = validate_bytes(buffer.getvalue(), "latin.parquet")
    assert [str(p) for p in report.problems] == ["row 2, field 'text': not valid UTF-8 (byte 0xe9)"]


def test_a_utf16_file_is_named_as_such() -> None:
    report = validate_bytes('{"text": "hi"}\n'.encode("utf-16"), "d.jsonl")
    assert [str(p) for p in report.problems] == ["line 1: the file is UTF-16 encoded: save it as UTF-8"]


def test_a_utf8_byte_order_mark_is_accepted() -> None:
    assert validate_bytes(b"\xef\xbb\xbftext\nhello\n", "d.csv").ok
    assert validate_bytes(b'\xef\xbb\xbf{"text": "hello"}\n', "d.jsonl").ok


def test_a_line_separator_inside_a_json_string_does_not_split_the_row() -> None:
    # str.splitlines() splits on U+2028 and U+0085, which JSON strings may hold unescaped.
    data = (json.dumps({"text": "one\u2028two\x85three"}, ensure_ascii=False) + "\n").encode()
    report = validate_bytes(data, "d.jsonl")
    assert report.ok and report.row_count == 1, report.problems


# --- the report ----------------------------------------------------------------------------------------------------


def test_the_report_keeps_the_first_problems_and_says_it_left_some_out() -> None:
    report = validate_bytes(jsonl(*[{"text": ""} for _ in range(MAX_PROBLEMS + 10)]), "d.jsonl")
    assert len(report.problems) == MAX_PROBLEMS and report.truncated
    assert report.as_dict()["problems"][0] == {"line": 1, "unit": "line", "field": "text", "message": "must not be empty"}


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"text": "a"}, "text"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages"),
    ],
)
def test_it_detects_each_format(record: dict, fmt: str) -> None:
    assert validate_bytes(jsonl(record), "d.jsonl").format == fmt


# --- conversion ----------------------------------------------------------------------------------------------------


def test_chat_rows_become_prompt_and_completion_on_the_last_assistant_turn() -> None:
    row = to_trl_row("messages", {"messages": chat(("system", "s"), ("user", "u"), ("assistant", "a"), ("user", "u2"), ("assistant", "a2"))})
    assert [t["role"] for t in row["prompt"]] == ["system", "user", "assistant", "user"]
    assert row["completion"] == [{"role": "assistant", "content": "a2"}]


def test_sharegpt_rows_get_chat_roles_and_alpaca_rows_join_instruction_and_input() -> None:
    row = to_trl_row("sharegpt", {"conversations": sharegpt(("system", "s"), ("human", "q"), ("gpt", "a"))})
    assert row == {"prompt": chat(("system", "s"), ("user", "q")), "completion": chat(("assistant", "a"))}
    row = to_trl_row("alpaca", {"instruction": "Add.", "input": "1 2", "output": "3"})
    assert row == {"prompt": chat(("user", "Add.\n\n1 2")), "completion": chat(("assistant", "3"))}


def test_load_raises_with_the_first_problems(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl({"instruction": "x", "output": "y"}, "[1, 2]"))
    with pytest.raises(DatasetError, match=r"bad.jsonl: line 2: expected a JSON object"):
        load_trl_rows(path)


# --- hostile files: bounds on what a file may decode to ---------------------------------------------------------


def zstd_parquet(table: pa.Table, **options: Any) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", **options)
    return buffer.getvalue()


SMALL = Limits(max_rows=1000, max_decoded_bytes=2 * 2**20, max_row_bytes=16 * 2**10, max_row_group_bytes=2**20,
               max_depth=8)


def test_a_compressed_cell_past_the_row_bound_is_refused_from_the_footer_naming_row_and_field() -> None:
    data = zstd_parquet(pa.table({"text": ["x" * (2 * 2**20)]}))  # 2 MB of text in a few hundred bytes
    assert len(data) < 10_000
    report = validate_bytes(data, "bomb.parquet")  # the default bounds: a row holds at most 1 MB
    assert not report.ok and report.row_count == 0 and report.preview == []
    assert [(p.line, p.field, p.unit) for p in report.problems] == [(1, "text", "row")]
    assert "decodes to 2 MB" in report.problems[0].message
    assert "TUNEDECK_DATASET_MAX_ROW_KB" in report.problems[0].message


def test_a_parquet_file_of_too_many_rows_is_refused_from_its_footer() -> None:
    data = zstd_parquet(pa.table({"text": ["a"] * 5000}))
    report = validate_bytes(data, "many.parquet", limits=SMALL)
    assert [str(p) for p in report.problems] == [
        "the file holds 5,000 rows: at most 1,000 are read (TUNEDECK_DATASET_MAX_ROWS)"
    ]
    assert report.row_count == 0


def test_a_row_group_past_its_bound_is_refused_naming_its_rows_and_largest_field() -> None:
    rows = [{"prompt": f"{i} " + "p" * 500, "completion": f"c{i}" * 200} for i in range(3000)]
    table = pa.Table.from_pylist(rows)
    limits = Limits(max_rows=10_000, max_decoded_bytes=16 * 2**20, max_row_group_bytes=2**20)
    report = validate_bytes(zstd_parquet(table, row_group_size=1000), "big.parquet", limits=limits)
    assert [(p.line, p.field) for p in report.problems] == [(1, "completion"), (1001, "completion"), (2001, "completion")]
    assert report.problems[0].message.startswith("rows 1 to 1,000 (row group 1) decode to ")
    assert "TUNEDECK_DATASET_MAX_ROW_GROUP_MB" in report.problems[0].message
    assert "row_group_size=" in report.problems[0].message
    assert validate_bytes(zstd_parquet(table, row_group_size=500), "fine.parquet", limits=limits).ok


def test_dictionary_encoded_values_are_counted_as_they_decode() -> None:
    # 500 rows share one 64 KB value: the footer says ~64 KB, the rows decode to 32 MB.
    data = zstd_parquet(pa.table({"text": ["y" * 2**16] * 500}))
    limits = Limits(max_rows=1000, max_decoded_bytes=4 * 2**20, max_row_bytes=2**17, max_row_group_bytes=2**20)
    report = validate_bytes(data, "dict.parquet", limits=limits)
    assert not report.ok
    assert "decodes to more than 4 MB" in str(report.problems[-1])
    assert "TUNEDECK_DATASET_MAX_DECODED_MB" in str(report.problems[-1])


def test_a_line_past_the_row_bound_is_named_and_never_parsed() -> None:
    data = jsonl({"text": "ok"}, {"text": "z" * 40_000}, {"text": "fine"})
    report = validate_bytes(data, "long.jsonl", limits=SMALL)
    assert [(p.line, p.message) for p in report.problems] == [
        (2, "is longer than 16 KB, the most a row may hold (TUNEDECK_DATASET_MAX_ROW_KB)")
    ]
    assert report.row_count == 2


def test_a_csv_record_past_the_row_bound_is_named_by_its_first_line() -> None:
    data = b'text\nok\n"' + b"w\n" * 20_000 + b'"\nlast\n'
    report = validate_bytes(data, "long.csv", limits=SMALL)
    assert [p.line for p in report.problems] == [3]
    assert "longer than 16 KB" in report.problems[0].message


def test_a_json_array_item_past_the_row_bound_is_named_by_its_line() -> None:
    data = json_array({"text": "a"}, {"text": "b" * 40_000}, {"text": "c"})
    report = validate_bytes(data, "long.json", limits=SMALL)
    assert [(p.line, p.message.split(",")[0]) for p in report.problems] == [(3, "the item starting here is longer than 16 KB")]


def test_a_minified_json_array_on_one_long_line_is_read_item_by_item() -> None:
    rows = [{"text": f"row {i} " + "t" * 100} for i in range(2000)]  # 230 KB on one line, items of ~120 bytes
    data = json.dumps(rows).encode()
    report = validate_bytes(data, "minified.json", limits=dataclasses.replace(SMALL, max_rows=10_000))
    assert report.ok and report.row_count == 2000, report.problems[:3]


def test_a_json_array_split_across_reads_keeps_line_and_column_of_a_syntax_error() -> None:
    items = ",\n".join(json.dumps({"text": f"row {i}"}) for i in range(3000))
    data = ("[\n" + items + ',\n{"text": oops}\n]\n').encode()  # ~60 KB: read in several pieces
    report = validate_bytes(data, "late-error.json", limits=dataclasses.replace(SMALL, max_rows=10_000))
    assert [str(p) for p in report.problems] == ["line 3002: invalid JSON: Expecting value (column 10)"]


def test_more_rows_than_the_bound_are_refused_without_reading_on() -> None:
    report = validate_bytes(jsonl(*[{"text": "r"} for _ in range(1500)]), "many.jsonl", limits=SMALL)
    assert [str(p) for p in report.problems] == ["line 1001: the file holds more than 1,000 rows (TUNEDECK_DATASET_MAX_ROWS)"]


NESTED = "[" * 200_000 + "]" * 200_000


@pytest.mark.parametrize(
    ("name", "data", "line", "field"),
    [
        ("deep.jsonl", jsonl({"text": "ok"}, NESTED), 2, ""),
        ("deep.json", ("[" + NESTED + "]").encode(), 1, ""),
        ("deep-item.json", ('[{"text": "ok"},\n{"text": ' + NESTED + "}]").encode(), 2, ""),
        ("deep.csv", ("messages\n" + NESTED + "\n").encode(), 2, "messages"),
        ("deep-object.jsonl", jsonl({"text": "ok", "meta": json.loads("[" * 40 + "]" * 40)}), 1, ""),
    ],
)
def test_json_nested_too_deeply_is_a_problem_naming_the_line(name: str, data: bytes, line: int, field: str) -> None:
    report = validate_bytes(data, name)
    assert [(p.line, p.field) for p in report.problems] == [(line, field)]
    assert "nested deeper than 32 levels (TUNEDECK_DATASET_MAX_DEPTH)" in report.problems[0].message


def test_a_parquet_schema_nested_too_deeply_is_refused() -> None:
    value: Any = "leaf"
    for _ in range(10):
        value = [value]
    report = validate_bytes(zstd_parquet(pa.Table.from_pylist([{"text": "t", "deep": value}])), "deep.parquet", limits=SMALL)
    assert [(p.line, p.field) for p in report.problems] == [(0, "deep")]
    assert "nested deeper than 8 levels" in report.problems[0].message


# --- previews: a few rows of clipped cells ------------------------------------------------------------------


def test_the_preview_holds_clipped_cells_of_the_first_rows() -> None:
    long_text = "L" * 100_000
    rows = [{"messages": chat(("user", long_text), ("assistant", "ok"))}] + [
        {"messages": chat(("user", f"q{i}"), ("assistant", f"a{i}"))} for i in range(20)
    ]
    report = validate_bytes(jsonl(*rows), "chat.jsonl")
    assert report.ok and len(report.preview) == PREVIEW_ROWS
    assert len(json.dumps(report.preview)) < PREVIEW_ROWS * 4 * PREVIEW_CELL_CHARS
    first = report.preview[0]["messages"][0]["content"]
    assert first.startswith("L" * 100) and first.endswith(f"… [{100_000 - PREVIEW_CELL_CHARS:,} more characters]")
    assert report.preview[1] == rows[1]


def test_a_preview_of_a_wide_row_stays_small() -> None:
    row = {"text": "t", **{f"extra_{i}": "v" * 1000 for i in range(200)}}
    report = validate_bytes(jsonl(row), "wide.jsonl")
    assert report.ok and len(json.dumps(report.preview)) < 4 * PREVIEW_CELL_CHARS + 2000


# --- the CSV header ---------------------------------------------------------------------------------------------


def test_a_csv_without_a_header_says_its_first_row_was_read_as_the_header() -> None:
    report = validate_bytes(b"What is 1 + 1?,2\nWhat is 2 + 2?,4\n", "noheader.csv")
    assert len(report.problems) == 1
    message = str(report.problems[0])
    assert message.startswith("line 1: the first row is read as the header (What is 1 + 1?, 2)")
    assert "prompt,completion" in message and "instruction,input,output" in message and "text" in message


# --- the settings -------------------------------------------------------------------------------------------


def test_the_bounds_come_from_the_environment_and_bad_values_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEDECK_DATASET_MAX_ROW_KB", "64")
    monkeypatch.setenv("TUNEDECK_DATASET_MAX_ROWS", "10")
    assert Limits.from_env().max_row_bytes == 64 * 2**10 and Limits.from_env().max_rows == 10
    monkeypatch.setenv("TUNEDECK_DATASET_MAX_DEPTH", "lots")
    with pytest.raises(ConfigError, match="TUNEDECK_DATASET_MAX_DEPTH='lots' is not an integer"):
        Limits.from_env()
    monkeypatch.setenv("TUNEDECK_DATASET_MAX_DEPTH", "500")
    with pytest.raises(ConfigError, match="TUNEDECK_DATASET_MAX_DEPTH=500 must be at most 100"):
        Limits.from_env()


def test_validating_a_decompression_bomb_keeps_memory_bounded(tmp_path: Path) -> None:
    """In a fresh process, whose peak resident memory is measured around the validation alone."""
    import pyarrow.compute as pc

    path = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"text": pc.binary_repeat(pa.array(["x"]), 128 * 2**20).cast(pa.string())}), path,
                   compression="zstd")
    assert path.stat().st_size < 100_000
    script = (
        "import json, resource, sys\n"
        "from workers.data.datasets import validate_file\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "report = validate_file(sys.argv[1])\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'ok': report.ok, 'problems': [str(p) for p in report.problems],"
        " 'growth_kb': after - before}))\n"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2], check=True)
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert not outcome["ok"] and outcome["problems"][0].startswith("row 1, field 'text': decodes to 128 MB")
    assert outcome["growth_kb"] < 64 * 1024, outcome  # generous: it decodes nothing
