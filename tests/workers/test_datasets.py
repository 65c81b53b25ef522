from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.datasets import DatasetError, load_trl_rows, to_trl_row, validate_bytes


def jsonl(*rows: object) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def test_it_names_the_line_and_problem_of_a_malformed_row() -> None:
    data = jsonl({"text": "fine"}, '{"text": "broken', {"text": "fine too"})
    report = validate_bytes(data, "train.jsonl")
    assert not report.ok
    assert [(p.line, p.message.split(":")[0]) for p in report.problems] == [(2, "invalid JSON")]
    assert "line 2" in str(report.problems[0])


def test_it_reports_missing_fields_empty_turns_and_wrong_roles_with_lines() -> None:
    data = jsonl(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "robot", "content": "beep"}]},
    )
    report = validate_bytes(data, "chat.jsonl")
    found = {(p.line, p.field) for p in report.problems}
    assert found == {(2, "messages[0].content"), (3, "messages[0].role")}


def test_it_refuses_non_utf8_with_the_line() -> None:
    data = b'{"text": "ok"}\n{"text": "caf\xe9"}\n'
    report = validate_bytes(data, "latin.jsonl")
    assert report.problems[0].line == 2 and "UTF-8" in report.problems[0].message


@pytest.mark.parametrize(
    ("record", "fmt"),
    [
        ({"text": "a"}, "text"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ],
)
def test_it_detects_each_format(record: dict, fmt: str) -> None:
    assert validate_bytes(jsonl(record), "d.jsonl").format == fmt


def test_csv_and_parquet_are_read_with_row_numbers() -> None:
    csv_data = b"instruction,output\nWhat is 1 + 1?,2\n,missing\n"
    report = validate_bytes(csv_data, "d.csv")
    assert report.format == "alpaca" and [(p.line, p.field) for p in report.problems] == [(3, "instruction")]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": ["a", "b"]}), buffer)
    assert validate_bytes(buffer.getvalue(), "d.parquet").row_count == 2


def test_chat_rows_become_prompt_and_completion_on_the_last_assistant_turn() -> None:
    row = to_trl_row("messages", {"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
    ]})
    assert [t["role"] for t in row["prompt"]] == ["system", "user"]
    assert row["completion"] == [{"role": "assistant", "content": "a"}]


def test_load_raises_with_the_first_problems(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl({"instruction": "x", "output": "y"}, "[1, 2]"))
    with pytest.raises(DatasetError, match=r"bad.jsonl: line 2: expected a JSON object"):
        load_trl_rows(path)
