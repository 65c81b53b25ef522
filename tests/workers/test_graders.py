"""Graders: every type's definition checked with field-named problems, and scores on controlled strings."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from workers.grading import Grader, GraderError, build_grader, describe, grader_problems
from workers.grading.judge import ScoreModel, judgement
from workers.grading.registry import Multi

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


# --- text_similarity ------------------------------------------------------------------------------------------------


def similarity(metric: str, **fields: object) -> dict:
    return {"type": "text_similarity", "name": "close", "reference": ANSWER, "evaluation_metric": metric} | fields


def test_text_similarity_metrics_on_known_pairs() -> None:
    item = {"answer": "the cat sat on the mat"}
    assert build_grader(similarity("bleu")).score("the cat sat on the mat", item) == pytest.approx(1.0)
    # 1- to 4-gram precisions 5/6, (3+1)/(5+1), (2+1)/(4+1), (1+1)/(3+1); same length, no brevity penalty
    expected = (5 / 6 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25
    assert build_grader(similarity("bleu")).score("the cat sat on a mat", item) == pytest.approx(expected)
    assert build_grader(similarity("bleu")).score("dog", item) == 0.0
    # longest common subsequence "the cat on the mat": 5 of 6 words on both sides
    assert build_grader(similarity("rouge_l")).score("The cat is on the mat", item) == pytest.approx(5 / 6)
    assert build_grader(similarity("fuzzy_match")).score("kitten", {"answer": "sitting"}) == pytest.approx(8 / 13)


def test_text_similarity_pass_threshold_makes_a_pass_or_fail() -> None:
    grader = build_grader(similarity("rouge_l", pass_threshold=0.8))
    item = {"answer": "the cat sat on the mat"}
    assert grader.score("The cat is on the mat", item) == 1.0  # 0.83
    assert grader.score("a cat is on a rug", item) == 0.0


def test_text_similarity_problems() -> None:
    assert grader_problems(similarity("meteor", pass_threshold=1.5)) == {
        "grader.evaluation_metric": "must be one of fuzzy_match, bleu, rouge_l",
        "grader.pass_threshold": "must be at most 1",
    }
    assert grader_problems(similarity("bleu", pass_threshold="high")) == {
        "grader.pass_threshold": "must be a number, got a string"
    }


# --- regex ------------------------------------------------------------------------------------------------------------


def test_regex_matches_partly_or_fully() -> None:
    partial = build_grader({"type": "regex", "name": "boxed", "pattern": r"\\boxed\{\d+\}"})
    assert partial.score(r"so the answer is \boxed{42}.", {}) == 1.0
    assert partial.score("the answer is 42", {}) == 0.0
    full = build_grader({"type": "regex", "name": "digits", "pattern": r"\d+", "match": "full"})
    assert full.score("42", {}) == 1.0
    assert full.score("42 apples", {}) == 0.0
    shouting = build_grader({"type": "regex", "name": "yes", "pattern": "yes", "ignore_case": True})
    assert shouting.score("YES", {}) == 1.0


def test_an_invalid_regex_is_a_field_error() -> None:
    problems = grader_problems({"type": "regex", "name": "r", "pattern": "(unclosed", "match": "whole"})
    assert problems == {
        "grader.pattern": "not a valid regular expression: missing ), unterminated subpattern at position 0",
        "grader.match": "must be one of partial, full",
    }


# --- json ------------------------------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}, "n": {"type": "integer"}}}


def test_json_scores_parsing_schema_and_fields() -> None:
    parses = build_grader({"type": "json", "name": "is_json"})
    assert parses.score('{"a": 1}', {}) == 1.0
    assert parses.score("{'a': 1}", {}) == 0.0
    fits = build_grader({"type": "json", "name": "fits", "schema": SCHEMA})
    assert fits.score('{"city": "Paris", "n": 3}', {}) == 1.0
    assert fits.score('{"city": "Paris", "n": "3"}', {}) == 0.0
    assert fits.score('{"n": 3}', {}) == 0.0
    fields = build_grader(
        {"type": "json", "name": "f", "schema": SCHEMA, "fields": {"city": "{{item.city}}", "n": "{{item.n}}"}}
    )
    assert fields.score('{"city": "Paris", "n": 3}', {"city": "Paris", "n": 3}) == 1.0
    assert fields.score('{"city": "Paris", "n": 4}', {"city": "Paris", "n": 3}) == 0.5
    assert fields.score('{"city": "Lyon"}', {"city": "Paris", "n": 3}) == 0.0


def test_json_problems() -> None:
    definition = {"type": "json", "name": "j", "schema": {"type": "objekt"}, "fields": {"city": 3, "n": "{{item.x}}"}}
    problems = grader_problems(definition, fields={"city"})
    assert problems["grader.schema"].startswith("not a valid JSON Schema at type: 'objekt' is not valid")
    assert problems["grader.fields.city"] == "must be a string template, got a number"
    assert problems["grader.fields.n"] == "{{item.x}} names no field of the rows (fields: city)"
    assert set(problems) == {"grader.schema", "grader.fields.city", "grader.fields.n"}


# --- numeric ---------------------------------------------------------------------------------------------------------


def test_numeric_takes_the_last_number_within_tolerance() -> None:
    exact = build_grader({"type": "numeric", "name": "n", "reference": ANSWER})
    assert exact.score("3 apples plus 4 apples make 7", {"answer": "7"}) == 1.0
    assert exact.score("7 apples? no: 8", {"answer": 7}) == 0.0
    assert exact.score("It costs $1,234.50.", {"answer": "1234.5"}) == 1.0
    assert exact.score("no idea", {"answer": "7"}) == 0.0
    loose = build_grader({"type": "numeric", "name": "n", "reference": ANSWER, "tolerance": 0.01})
    assert loose.score("3.145", {"answer": "3.14"}) == 1.0
    assert loose.score("3.16", {"answer": "3.14"}) == 0.0
    relative = build_grader({"type": "numeric", "name": "n", "reference": ANSWER, "relative_tolerance": 0.01})
    assert relative.score("1005", {"answer": "1000"}) == 1.0
    assert relative.score("1011", {"answer": "1000"}) == 0.0


def test_numeric_reads_a_pattern_capture_and_reports_a_reference_without_number() -> None:
    grader = build_grader({"type": "numeric", "name": "n", "reference": ANSWER, "pattern": r"answer: (\S+)"})
    assert grader.score("step 1: 5, step 2: 6. answer: -2.5e1 then 99", {"answer": "-25"}) == 1.0
    assert grader.score("the total is -25", {"answer": "-25"}) == 0.0
    assert grader.score_batch(["answer: 3"], [{"answer": "three"}]) == [0.0]
    assert grader.errors == ["reference 'three' holds no number"]


def test_numeric_problems() -> None:
    definition = {"type": "numeric", "name": "n", "tolerance": -1, "relative_tolerance": True, "pattern": "("}
    assert grader_problems(definition) == {
        "grader.reference": "missing",
        "grader.tolerance": "must be at least 0",
        "grader.relative_tolerance": "must be a number, got a boolean",
        "grader.pattern": "not a valid regular expression: missing ), unterminated subpattern at position 0",
    }


# --- length ----------------------------------------------------------------------------------------------------------


def test_length_scores_inside_and_decays_outside() -> None:
    hard = build_grader({"type": "length", "name": "brief", "unit": "words", "min": 2, "max": 4})
    assert [hard.score(text, {}) for text in ("one", "one two", "a b c d", "a b c d e")] == [0.0, 1.0, 1.0, 0.0]
    soft = build_grader({"type": "length", "name": "brief", "max": 10, "falloff": 5})
    assert [soft.score("x" * n, {}) for n in (10, 12, 15, 30)] == pytest.approx([1.0, 0.6, 0.0, 0.0])


def test_length_problems() -> None:
    assert grader_problems({"type": "length", "name": "l"}) == {"grader.max": "set min, max or both"}
    assert grader_problems({"type": "length", "name": "l", "min": 5, "max": 2, "unit": "tokens"}) == {
        "grader.unit": "must be one of characters, words",
        "grader.max": "must be at least min (5)",
    }


# --- multi -----------------------------------------------------------------------------------------------------------


def multi(formula: str, **graders: dict) -> dict:
    return {"type": "multi", "name": "reward", "graders": graders, "calculate_output": formula}


EXACT = {"type": "string_check", "reference": ANSWER, "operation": "like"}
BRIEF = {"type": "length", "name": "brief", "max": 10, "falloff": 10}


def test_multi_combines_its_graders_by_formula() -> None:
    grader = build_grader(multi("0.75 * exact + 0.25 * brief", exact=EXACT, brief=BRIEF))
    assert isinstance(grader, Multi)
    item = {"answer": "Paris"}
    assert grader.score_batch(["Paris", "It is Paris!", "Lyon"], [item] * 3) == pytest.approx(
        [1.0, 0.75 + 0.25 * 0.8, 0.25]  # 12 characters: 2 over the maximum of 10, falling off over 10
    )
    assert [part.name for part in grader.parts()] == ["exact", "brief"]
    assert grader.part_scores == {"exact": [1.0, 1.0, 0.0], "brief": pytest.approx([1.0, 0.8, 1.0])}


def test_multi_formula_clips_into_the_unit_range_and_division_by_zero_scores_zero() -> None:
    item = {"answer": "Paris"}
    assert build_grader(multi("2 * exact - -1", exact=EXACT)).score("Paris", item) == 1.0
    assert build_grader(multi("exact - 1", exact=EXACT)).score("Paris", item) == 0.0
    assert build_grader(multi("1 / exact", exact=EXACT)).score("Lyon", item) == 0.0
    assert build_grader(multi("min(exact, brief) / 2", exact=EXACT, brief=BRIEF)).score("Paris", item) == 0.5


@pytest.mark.parametrize(
    ("formula", "problem"),
    [
        ("exact + sneaky", "'sneaky' is not one of the graders (exact)"),
        ("exact ** 2", "only + - * / combine values"),
        ("__import__('os').system('true')", "only min, max, abs may be called, with one or more arguments"),
        ("exact.real", "Attribute is not allowed: use numbers, grader names, + - * / and min/max/abs"),
        ("exact if exact else 1", "IfExp is not allowed: use numbers, grader names, + - * / and min/max/abs"),
        ("'1' + exact", "'1': only numbers and grader names may appear"),
        ("exact +", "not a formula: invalid syntax"),
    ],
)
def test_multi_formula_allows_arithmetic_over_grader_names_only(formula: str, problem: str) -> None:
    assert grader_problems(multi(formula, exact=EXACT)) == {"grader.calculate_output": problem}


def test_multi_sub_grader_problems_are_named_by_their_key() -> None:
    definition = multi(
        "exact + close",
        exact=EXACT | {"operation": "is"},
        close={"type": "text_similarity", "name": "near", "reference": "{{item.gold}}", "evaluation_metric": "bleu"},
    )
    definition["graders"]["not a name"] = BRIEF
    assert grader_problems(definition, fields={"answer"}) == {
        "grader.graders.exact.operation": "must be one of eq, ne, like, ilike",
        "grader.graders.close.name": "must be its key in graders ('close') or left out",
        "grader.graders.close.reference": "{{item.gold}} names no field of the rows (fields: answer)",
        "grader.graders.not a name": "the name must be a word of letters, digits and _ (the formula refers to it)",
    }
    assert grader_problems({"type": "multi", "name": "m", "graders": {}}) == {
        "grader.graders": "must be an object of name → grader definition, with at least one grader",
        "grader.calculate_output": "missing",
    }


def test_multi_reports_its_graders_errors_under_their_names() -> None:
    definition = multi(
        "0.5 * math + 0.5 * code",
        math={"type": "numeric", "reference": ANSWER},
        code={"type": "python", "source": "def grade(sample, item):\n    return 1 / len(sample['output_text'])\n"},
    )
    grader = build_grader(definition, allow_python=True)
    assert grader.score_batch(["7", ""], [{"answer": "seven"}, {"answer": "0"}]) == [0.5, 0.0]
    assert grader.errors == [
        "math: reference 'seven' holds no number",
        "code: completion 2: ZeroDivisionError: division by zero",
    ]


def test_multi_nests_and_describes_its_parts() -> None:
    inner = multi("exact", exact=EXACT) | {"name": "inner"}
    definition = multi("0.5 * inner + 0.5 * brief", inner=inner, brief=BRIEF)
    grader = build_grader(definition)
    assert grader.score("Paris", {"answer": "Paris"}) == 1.0
    assert describe(definition) == (
        "multi reward: 0.5 * inner + 0.5 * brief where inner = multi exact where exact = string_check "
        "{{sample.output_text}} like {{item.answer}}; brief = length 0–10 characters of {{sample.output_text}}, "
        "falling off over 10"
    )


# --- python ----------------------------------------------------------------------------------------------------------


def python(source: str, **fields: object) -> dict:
    return {"type": "python", "name": "code", "source": source} | fields


GRADE_BY_LENGTH = """
def grade(sample, item):
    print("user output goes to stderr")
    return len(sample["output_text"]) / item["max"]
"""


def test_python_is_refused_unless_allowed() -> None:
    definition = python(GRADE_BY_LENGTH)
    problem = {"grader.type": "python graders run user code, which this server does not allow"}
    assert grader_problems(definition) == problem
    with pytest.raises(GraderError) as caught:
        build_grader(multi("code", code=definition))
    assert caught.value.problems == {"grader.graders.code.type": problem["grader.type"]}
    assert grader_problems(definition, allow_python=True) == {}


def test_python_scores_in_a_separate_process_and_reports_failures() -> None:
    grader = build_grader(python(GRADE_BY_LENGTH), allow_python=True)
    scores = grader.score_batch(["ab", "abcd", "abcdefgh", "x"], [{"max": 4}, {"max": 4}, {"max": 4}, {"max": 0}])
    assert scores == [0.5, 1.0, 1.0, 0.0]  # 2.0 clipped to 1; a ZeroDivisionError scores 0
    assert grader.errors == ["completion 4: ZeroDivisionError: division by zero"]


def test_python_source_problems() -> None:
    assert grader_problems(python("def grade(sample):\n    return 1"), allow_python=True) == {
        "grader.source": "grade must take two arguments: grade(sample, item)"
    }
    assert grader_problems(python("def grade(sample, item)\n"), allow_python=True) == {
        "grader.source": "line 1: expected ':'"
    }
    assert grader_problems(python("x = 1"), allow_python=True) == {
        "grader.source": "must define grade(sample, item) at the top level"
    }


def test_python_limits_stay_within_the_admins_maxima(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEDECK_GRADER_MAX_SECONDS", "10")
    monkeypatch.setenv("TUNEDECK_GRADER_MAX_MEMORY_MB", "1024")
    definition = python(GRADE_BY_LENGTH, timeout_seconds=60, memory_mb=4096)
    assert grader_problems(definition, allow_python=True) == {
        "grader.timeout_seconds": "must be at most 10",
        "grader.memory_mb": "must be at most 1024",
    }
    assert grader_problems(python(GRADE_BY_LENGTH, memory_mb=16), allow_python=True) == {
        "grader.memory_mb": "must be at least 64"
    }


def test_python_is_killed_at_its_time_limit() -> None:
    spinning = (
        "def grade(sample, item):\n    if sample['output_text'] == 'spin':\n        while True:\n"
        "            pass\n    return 1.0\n"
    )
    grader = build_grader(python(spinning, timeout_seconds=1), allow_python=True)
    started = time.monotonic()
    assert grader.score_batch(["spin", "ok"], [{}, {}]) == [0.0, 1.0]
    assert time.monotonic() - started < 5
    assert grader.errors == ["completion 1: timed out after 1s"]


def test_python_that_ignores_its_alarm_is_killed_at_the_wall_clock_limit() -> None:
    stubborn = (
        "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
        "def grade(sample, item):\n    while True:\n        pass\n"
    )
    grader = build_grader(python(stubborn, timeout_seconds=0.5), allow_python=True)
    started = time.monotonic()
    assert grader.score("x", {}) == 0.0
    assert time.monotonic() - started < 10
    assert grader.errors == ["completion 1: killed at the wall-clock limit of 5.5s"]


def test_python_memory_limit() -> None:
    hungry = "def grade(sample, item):\n    block = bytearray(512 * 1024 * 1024)\n    return 1.0\n"
    grader = build_grader(python(hungry, memory_mb=256), allow_python=True)
    assert grader.score("x", {}) == 0.0
    assert grader.errors == ["completion 1: MemoryError: over the 256 MiB limit"]
    assert build_grader(python(hungry, memory_mb=1024), allow_python=True).score("x", {}) == 1.0


def test_python_cannot_see_the_workers_environment_or_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEDECK_WORKER_TOKEN", "worker-secret")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    snooping = (
        "import os\n"
        "def grade(sample, item):\n"
        "    seen = [k for k in os.environ if k.startswith('TUNEDECK_') or 'TOKEN' in k]\n"
        "    return 1.0 if seen or os.listdir('.') else 0.5\n"
    )
    grader = build_grader(python(snooping), allow_python=True)
    assert grader.score("x", {}) == 0.5
    assert grader.errors == []


def test_a_crashing_python_grader_scores_zero_and_says_why() -> None:
    grader = build_grader(python("import os\nos._exit(3)\ndef grade(sample, item):\n    return 1\n"), allow_python=True)
    assert grader.score_batch(["a", "b"], [{}, {}]) == [0.0, 0.0]
    assert grader.errors == [
        "completion 1: the grader process exited with code 3: no message",
        "completion 2: the grader process exited with code 3: no message",
    ]


# --- score_model -----------------------------------------------------------------------------------------------------

JUDGE_INPUT = [
    {"role": "system", "content": "Rate the answer from 0 to 10. Reply with the number only."},
    {
        "role": "user",
        "content": "Question: {{item.question}}\nReference: {{item.answer}}\nAnswer: {{sample.output_text}}",
    },
]


def judge(model: str = "/models/judge", **fields: object) -> dict:
    return {"type": "score_model", "name": "judge", "model": model, "input": JUDGE_INPUT, "range": [0, 10]} | fields


def build_judge(model: str = "/models/judge", **fields: object) -> ScoreModel:
    grader = build_grader(judge(model, **fields))
    assert isinstance(grader, ScoreModel)
    return grader


def test_score_model_builds_its_prompt_from_the_templates() -> None:
    grader = build_judge()
    assert grader.prompt("4", {"question": "2+2?", "answer": "4"}) == [
        JUDGE_INPUT[0],
        {"role": "user", "content": "Question: 2+2?\nReference: 4\nAnswer: 4"},
    ]


@pytest.mark.parametrize(
    ("answer", "score"),
    [
        ("7", 0.7),
        (" 10/10, excellent", 1.0),
        ("Score: 2.5 (weak)", 0.25),
        ("0", 0.0),
        ("11", None),  # outside the range is malformed, not clipped
        ("-3", None),
        ("great answer!", None),
        ("", None),
    ],
)
def test_judgements_are_the_first_number_normalised_by_range(answer: str, score: float | None) -> None:
    assert judgement(answer, 0, 10) == (pytest.approx(score) if score is not None else None)


def test_an_unreadable_judgement_scores_zero_and_is_reported() -> None:
    grader = build_judge()
    assert [grader.read(index, answer) for index, answer in enumerate(["8", "no idea"])] == [0.8, 0.0]
    assert grader.errors == ["completion 2: the judge gave no number in 0–10: 'no idea'"]
    assert judgement("3", -5, 5) == pytest.approx(0.8)


def test_score_model_problems() -> None:
    definition = judge(
        model="not a hub id",
        input=[{"role": "judge", "content": "{{item.q}}"}, "rate it", {"role": "user", "content": "", "name": "x"}],
        range=[10, 0],
        max_new_tokens=0,
        batch_size=2.5,
    )
    assert grader_problems(definition, fields={"question"}) == {
        "grader.model": 'neither a local folder (an absolute path) nor a Hub id: must be "namespace/name": your user '
        "or organisation name, a slash, and the repository name",
        "grader.input[0].role": "must be one of system, user, assistant",
        "grader.input[0].content": "{{item.q}} names no field of the rows (fields: question)",
        "grader.input[1]": "must be an object with role and content, got a string",
        "grader.input[2].content": "must be a non-empty string",
        "grader.input[2].name": "unknown field (a message takes role, content)",
        "grader.range": "min must be below max",
        "grader.max_new_tokens": "must be at least 1",
        "grader.batch_size": "must be a whole number",
    }
    assert grader_problems(judge(model="org/judge-7b", range=[0, "ten"])) == {
        "grader.range": "must be [min, max], two numbers"
    }
    assert grader_problems(judge(input="rate it")) == {
        "grader.input": 'must be a non-empty list of messages ({"role": …, "content": …})'
    }


def test_score_model_judges_with_a_real_model_loaded_once(tiny_model_dir: Path) -> None:
    grader = build_judge(model=str(tiny_model_dir), batch_size=2, max_new_tokens=6)
    completions, items = ["4", "5", "four"], [{"question": "2+2?", "answer": "4"}] * 3
    scores = grader.score_batch(completions, items)
    assert grader.loaded is not None
    model = grader.loaded[0]
    # greedy, in the same batches: the judge's answers again, read the same way
    conversations = [grader.prompt(completion, item) for completion, item in zip(completions, items, strict=True)]
    answers = grader.generate(conversations[:2]) + grader.generate(conversations[2:])
    readings = [judgement(answer, 0, 10) for answer in answers]
    assert scores == [reading or 0.0 for reading in readings]
    # a random-weight judge mostly writes garbage: each answer without a number in range is reported
    assert len(grader.errors) == readings.count(None)
    assert grader.load()[0] is model
    # the engine of compare jobs: generate()'s own answers with a dynamic cache, through the loop
    from workers.contract.jobspecs import BASE_KEY
    from workers.generation.engine import plan_decoding

    assert plan_decoding(model, [BASE_KEY]).loop
    tokenizer = grader.loaded[1]
    dynamic = generate_grid_texts(model, tokenizer, conversations[:2], 6) + generate_grid_texts(
        model, tokenizer, conversations[2:], 6)  # fmt: skip
    assert answers == dynamic


def generate_grid_texts(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], tokens: int) -> list[str]:
    from workers.contract.jobspecs import BASE_KEY, GenerationParams
    from workers.data.prompts import chat_ids
    from workers.generation.engine import generate_token_grid
    from workers.generation.stops import stop_tokens

    stops = stop_tokens(tokenizer, model)
    ids = generate_token_grid(
        model, [chat_ids(tokenizer, c, add_generation_prompt=True) for c in conversations], [BASE_KEY],
        GenerationParams(max_new_tokens=tokens), pad_token_id=tokenizer.pad_token_id, stops=stops, cache="dynamic",
    )  # fmt: skip
    return [stops.text(ids[(row, BASE_KEY)]) for row in range(len(conversations))]


@pytest.mark.parametrize(
    ("definition", "line"),
    [
        (
            similarity("bleu", pass_threshold=0.5),
            "text_similarity close: bleu of {{sample.output_text}} against {{item.answer}}, passes at 0.5",
        ),
        (
            {"type": "regex", "name": "r", "pattern": r"\d+", "match": "full"},
            r"regex r: /\d+/ matches all of "
            "{{sample.output_text}}",
        ),
        (
            {"type": "json", "name": "j", "schema": SCHEMA, "fields": {"city": "{{item.city}}"}},
            "json j: {{sample.output_text}} parses as JSON fitting its schema, fields city as expected",
        ),
        (
            {"type": "numeric", "name": "n", "reference": ANSWER, "tolerance": 0.5},
            "numeric n: number in {{sample.output_text}} = {{item.answer}} within ±0.5",
        ),
        (
            python(GRADE_BY_LENGTH, timeout_seconds=2),
            "python code: grade(sample, item) in a separate process, 2s a call, 512 MiB",
        ),
        (
            judge(adapter="/adapters/strict"),
            "score_model judge: /models/judge + /adapters/strict judges on a 0–10 scale",
        ),
    ],
)
def test_describe_every_type(definition: dict, line: str) -> None:
    assert grader_problems(definition, allow_python=True) == {}
    assert describe(definition) == line


def test_a_top_level_grader_needs_a_name() -> None:
    assert grader_problems({"type": "json"}) == {"grader.name": "missing"}
    assert grader_problems({"type": "json", "name": "x" * 65}) == {"grader.name": "must be at most 64 characters"}
