"""GRPO runs through the control plane: created over the REST API on prompt_only rows with a grader, refused with
every grader problem named by its path, and watched on the run page through the answers they sample."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.webapp.api_helpers import Team, key_for, make_team, problem_of
from tests.webapp.factories import make_run
from webapp.catalog.services import register_dataset
from webapp.training.models import RunEvent, TrainingRun
from workers.training.demo import SEVENS_GRADER, prompt_rows

GRPO = {"objective": "grpo", "graders": SEVENS_GRADER, "num_generations": 4, "batch_size": 8,
        "max_completion_length": 6}


@pytest.fixture
def team(tiny_model_dir: Path, store_dir: Path, db: Any) -> Team:
    return make_team(tiny_model_dir)


@pytest.fixture
def prompts(team: Team) -> Any:
    rows = "".join(json.dumps(row) + "\n" for row in prompt_rows(8, seed=0))
    return register_dataset("prompts", "prompts.jsonl", rows.encode())


def post(client: Client, body: Any, raw: str) -> Any:
    return client.post("/api/v1/runs/", json.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {raw}")


def test_a_grpo_run_takes_prompts_and_a_grader_and_clones_with_them(client: Client, team: Team, prompts: Any) -> None:
    raw = key_for(team.owner)
    assert prompts.format == "prompt_only"

    response = post(client, team.run_body(dataset=prompts.pk, hyperparameters=GRPO), raw)

    assert response.status_code == 201, response.content
    assert {k: response.json()["hyperparameters"][k] for k in GRPO} == GRPO
    run = TrainingRun.objects.get(pk=response.json()["id"])
    assert run.job_spec().train.graders == SEVENS_GRADER
    clone = client.post(f"/api/v1/runs/{run.pk}/clone/", "{}", content_type="application/json",
                        HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert clone.status_code == 201 and TrainingRun.objects.get(pk=clone.json()["id"]).train_params().graders == (
        SEVENS_GRADER)
    body = problem_of(post(client, team.run_body(hyperparameters=GRPO), raw), 400)
    assert list(body["errors"]) == ["dataset"] and "(grpo) trains on prompt_only rows" in body["errors"]["dataset"][0]


def test_bad_graders_and_an_uneven_group_are_refused_on_their_fields(client: Client, team: Team,
                                                                      prompts: Any) -> None:
    raw = key_for(team.owner)
    multi = {"type": "multi", "name": "both", "calculate_output": "accuracy + brief", "graders": {
        "accuracy": {**SEVENS_GRADER, "name": "accuracy", "reference": "{{item.solution}}"},
        "brief": {"type": "string_check", "input": "{{sample.output_text}}", "reference": "7", "operation": "same"}}}

    body = problem_of(post(client, team.run_body(dataset=prompts.pk, hyperparameters={
        **GRPO, "graders": multi, "batch_size": 6}), raw), 400)

    errors = body["errors"]
    assert set(errors) == {"hyperparameters.num_generations", "hyperparameters.graders.graders.accuracy.reference",
                           "hyperparameters.graders.graders.brief.operation"}, errors
    assert "{{item.solution}} names no field of the rows (fields: answer, prompt)" in errors[
        "hyperparameters.graders.graders.accuracy.reference"][0]
    assert "(batch_size 6 x grad_accum 1 = 6) must hold whole groups of num_generations 4" in errors[
        "hyperparameters.num_generations"][0]
    body = problem_of(post(client, team.run_body(dataset=prompts.pk, hyperparameters={**GRPO, "graders": {}}), raw),
                      400)
    assert "give one" in body["errors"]["hyperparameters.graders"][0]
    body = problem_of(post(client, team.run_body(dataset=prompts.pk, hyperparameters={**GRPO, "graders": "exact"}),
                           raw), 400)
    assert list(body["errors"]) == ["hyperparameters.graders"]
    assert not TrainingRun.objects.exists()


def test_python_graders_need_the_admin_setting(client: Client, team: Team, prompts: Any, settings: Any) -> None:
    raw = key_for(team.owner)
    python = {"type": "python", "name": "sevens", "source": "def grade(sample, item):\n    return 1.0\n"}
    run = team.run_body(dataset=prompts.pk, hyperparameters={**GRPO, "graders": python})

    body = problem_of(post(client, run, raw), 400)
    assert list(body["errors"]) == ["hyperparameters.graders.type"]
    assert "TUNEDECK_ALLOW_PYTHON_GRADERS=1" in body["errors"]["hyperparameters.graders.type"][0]

    settings.ALLOW_PYTHON_GRADERS = True
    assert post(client, run, raw).status_code == 201


def test_the_grpo_example_run_spec_trains_on_the_demo_prompts(client: Client, store_dir: Path,
                                                              django_user_model: Any) -> None:
    import yaml

    from webapp.catalog.demo import DEMO_PROMPTS, ensure_demo_content
    from webapp.catalog.models import Dataset

    assert f"dataset {DEMO_PROMPTS}" in ensure_demo_content()
    assert Dataset.objects.get(name=DEMO_PROMPTS).format == "prompt_only"
    owner = django_user_model.objects.create_user("owner", password="pw-owner-123")
    body = yaml.safe_load(Path("examples/grpo.yaml").read_text())

    response = post(client, body, key_for(owner))

    assert response.status_code == 201, response.content
    job = TrainingRun.objects.get(pk=response.json()["id"]).job_spec()
    assert (job.train.objective, job.dataset.format, job.train.graders) == ("grpo", "prompt_only", SEVENS_GRADER)


def test_the_run_page_shows_the_latest_sampled_answers_escaped(client: Client, team: Team, prompts: Any) -> None:
    run = make_run(team.owner, team.base, prompts, team.config, **GRPO)
    rows = [{"prompt": "What is <b>1</b> + 1?", "completion": "<script>alert(7)</script>77",
             "rewards": {"sevens": 0.5}, "total": 0.5}]
    RunEvent.objects.create(run=run, attempt=1, seq=1, kind="samples", data={"step": 5, "rows": [
        {**rows[0], "completion": "an older answer"}], "errors": []})
    RunEvent.objects.create(run=run, attempt=1, seq=2, kind="samples", message="step 10: 1 sampled answers",
                            data={"step": 10, "rows": rows, "errors": ["sevens: <i>timed out</i>"]})
    client.force_login(team.owner)

    page = client.get(f"/runs/{run.pk}/").content.decode()

    assert 'id="run-samples"' in page and "step 10" in page and "an older answer" not in page
    assert "&lt;script&gt;alert(7)&lt;/script&gt;77" in page and "<script>alert(7)" not in page
    assert "What is &lt;b&gt;1&lt;/b&gt; + 1?" in page and "sevens 0.500" in page
    assert "sevens: &lt;i&gt;timed out&lt;/i&gt;" in page
    sft = make_run(team.owner, team.base, team.dataset, team.config)
    assert 'id="run-samples"' not in client.get(f"/runs/{sft.pk}/").content.decode()

    listed = client.get(f"/api/v1/runs/{run.pk}/events/", {"kind": "samples"},
                        HTTP_AUTHORIZATION=f"Bearer {key_for(team.owner)}").json()
    assert [event["data"]["step"] for event in listed["results"]] == [5, 10]
    assert listed["results"][-1]["data"]["rows"] == rows


def test_the_run_form_takes_the_grader_as_json(client: Client, team: Team, prompts: Any) -> None:
    from webapp.training.forms import RunForm

    form = RunForm()
    assert 'name="graders"' in str(form["graders"]) and "<textarea" in str(form["graders"])
    data = {"base_model": team.base.pk, "dataset": prompts.pk, "lora_config": team.config.pk, "priority": 0,
            **{k: v for k, v in form.initial.items() if k not in ("base_model", "dataset", "lora_config")}}
    fields = {name: form.fields[name].initial for name in form.fields if name not in data}
    bound = RunForm({**fields, **data, **GRPO, "graders": json.dumps({**SEVENS_GRADER, "reference": "{{item.x}}"})})

    assert not bound.is_valid()
    assert bound.errors["graders"] == ["graders.reference: {{item.x}} names no field of the rows (fields: answer, "
                                       "prompt)"]
    assert not RunForm({**fields, **data, **GRPO, "graders": "[1, 2]"}).is_valid()


def test_the_dataset_page_shows_prompts_alone_with_their_tokens(client: Client, team: Team, prompts: Any) -> None:
    client.force_login(team.owner)

    page = client.get(f"/datasets/{prompts.pk}/", {"base_model": team.base.pk, "batching": "pad", "row": 2})

    text = page.content.decode()
    assert page.status_code == 200 and "prompt_only" in text and "7777" in text
    assert 'class="error"' not in text and "Row 2" in text
