"""Graders: every type's definition checked with field-named problems, and scores on controlled strings."""

from __future__ import annotations

import pytest

from workers.grading import Grader, GraderError, build_grader, describe, grader_problems

ANSWER = "{{item.answer}}"


def string_check(**fields: object) -> dict:
    return {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": ANSWER} | fields


@pytest.mark.parametrize(
    ("operation", "completion", "expected"),
    [
        ("eq", "Paris", 1.0),
        ("eq", "paris", 0.0),
        ("ne", "Lyon", 1.0),
        ("ne", "Paris", 0.0),
        ("like", "It is Paris.", 1.0),
        ("like", "It is paris.", 0.0),
        ("ilike", "IT IS PARIS.", 1.0),
        ("ilike", "Lyon", 0.0),
    ],
)
def test_string_check_scores_each_operation(operation: str, completion: str, expected: float) -> None:
    grader = build_grader(string_check(operation=operation))
    assert grader.score(completion, {"answer": "Paris"}) == expected


def test_a_grader_scores_batches_and_is_its_only_part() -> None:
    grader = build_grader(string_check(operation="eq"))
    assert isinstance(grader, Grader)
    assert grader.name == "exact"
    assert grader.score_batch(["a", "b", "c"], [{"answer": "a"}, {"answer": "a"}, {"answer": "c"}]) == [1.0, 0.0, 1.0]
    assert grader.parts() == [grader]


def test_string_check_problems_name_their_fields() -> None:
    definition = {"type": "string_check", "name": "", "reference": "{{item.label}}", "operation": "lt", "refrence": 1}
    assert grader_problems(definition, fields={"answer"}, path="graders[1]") == {
        "graders[1].name": "must not be empty",
        "graders[1].refrence": "unknown field (this grader takes type, name, input, reference, operation)",
        "graders[1].reference": "{{item.label}} names no field of the rows (fields: answer)",
        "graders[1].operation": "must be one of eq, ne, like, ilike",
    }
    with pytest.raises(GraderError) as caught:
        build_grader({"type": "string_check", "name": "x", "input": "{{smaple.output_text}}"})
    assert caught.value.problems == {
        "grader.input": "unknown placeholder {{smaple.output_text}}: use {{item.<field>}} or {{sample.output_text}}",
        "grader.reference": "missing",
        "grader.operation": "missing (one of eq, ne, like, ilike)",
    }


def test_definitions_must_be_objects_of_a_known_type() -> None:
    assert grader_problems([]) == {"grader": "must be an object, got an array"}  # type: ignore[arg-type]
    assert set(grader_problems({"type": "exact_match", "name": "x"})) == {"grader.type"}
    assert grader_problems(string_check(operation="eq"), fields={"answer"}) == {}


def test_templates_reach_nested_fields_and_render_values_as_json() -> None:
    grader = build_grader(string_check(operation="eq", reference="{{ item.meta.city }}"))
    assert grader.score("Paris", {"meta": {"city": "Paris"}}) == 1.0
    numbers = build_grader(string_check(operation="eq", reference="{{item.answer}}"))
    assert numbers.score("[1, 2]", {"answer": [1, 2]}) == 1.0
    assert numbers.score("", {}) == 1.0  # a missing field renders empty


def test_describe_says_what_is_graded() -> None:
    assert (
        describe(string_check(operation="ilike")) == "string_check exact: {{sample.output_text}} ilike {{item.answer}}"
    )
