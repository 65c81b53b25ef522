"""/api/v1/sweeps/: create from the spec, field-named refusals, list, detail with trials, stop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.webapp.api_helpers import Team, bearer, key_for, make_team, problem_of
from tests.webapp.factories import make_run
from webapp.jobs.models import RunState
from webapp.sweeps.models import Sweep
from webapp.training.models import TrainingRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def team(tiny_model_dir: Path, store_dir: Path, db: Any) -> Team:
    return make_team(tiny_model_dir)


def post(raw: str, path: str, body: dict[str, Any]) -> Any:
    return Client().post(path, json.dumps(body), content_type="application/json", **bearer(raw))


def test_a_sweep_is_created_read_listed_and_stopped(team: Team) -> None:
    base = make_run(team.owner, team.base, team.dataset, team.config)
    raw = key_for(team.owner)
    body = {"name": "lr", "base_run": base.pk, "num_runs": 3, "runs_at_once": 2, "sampler": "random",
            "pruner": "median", "space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}}}
    created = post(raw, "/api/v1/sweeps/", body)
    assert created.status_code == 201, created.content
    sweep = created.json()
    assert sweep["state"] == "running" and len(sweep["trials"]) == 2
    runs = TrainingRun.objects.filter(pk__in=[t["run"] for t in sweep["trials"]])
    assert {r.state for r in runs} == {RunState.QUEUED}
    for trial in sweep["trials"]:
        assert 1e-5 <= trial["params"]["learning_rate"] <= 1e-3
        assert TrainingRun.objects.get(pk=trial["run"]).train_params().learning_rate == trial["params"]["learning_rate"]
    mate = key_for(team.mate)
    listed = Client().get("/api/v1/sweeps/", **bearer(mate)).json()
    assert [s["id"] for s in listed["results"]] == [sweep["id"]]
    detail = Client().get(f"/api/v1/sweeps/{sweep['id']}/", **bearer(mate)).json()
    assert detail["trials_ended"] == 0 and detail["best_run"] is None
    problem_of(post(mate, f"/api/v1/sweeps/{sweep['id']}/stop/", {}), 403)
    stopped = post(raw, f"/api/v1/sweeps/{sweep['id']}/stop/", {})
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
    problem_of(Client().get("/api/v1/sweeps/999/", **bearer(raw)), 404)


@pytest.mark.parametrize(("change", "field"), [
    ({"space": {"learnig_rate": {"type": "float", "low": 1, "high": 2}}}, "space.learnig_rate"),
    ({"space": {"batch_size": {"type": "int", "low": 8, "high": 2}}}, "space.batch_size"),
    ({"base_run": 424242}, "base_run"),
    ({"sampler": "bayes"}, "sampler"),
    ({"runs_at_once": 0}, "runs_at_once"),
])
def test_a_bad_spec_is_refused_by_field_and_nothing_is_made(team: Team, change: dict[str, Any], field: str) -> None:
    base = make_run(team.owner, team.base, team.dataset, team.config)
    body = {"name": "x", "base_run": base.pk, "space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3}},
            **change}
    answer = post(key_for(team.owner), "/api/v1/sweeps/", body)
    problem = problem_of(answer, 400)
    assert field in json.dumps(problem)
    assert not Sweep.objects.exists() and TrainingRun.objects.count() == 1


def test_the_example_spec_is_what_the_cli_loads_and_the_api_accepts(team: Team) -> None:
    from tunedeck_cli import sweeps as cli
    from webapp.api.sweeps import SweepCreateSerializer

    root = Path(__file__).resolve().parents[2]
    spec = cli.load(str(root / "examples" / "sweep.yaml"))
    assert set(cli.FIELDS) == set(SweepCreateSerializer().fields)
    base = make_run(team.owner, team.base, team.dataset, team.config)
    created = post(key_for(team.owner), "/api/v1/sweeps/", {**spec, "base_run": base.pk})
    assert created.status_code == 201, created.content
    assert created.json()["space"] == spec["space"] and len(created.json()["trials"]) == spec["runs_at_once"]


def test_the_cli_refuses_a_spec_with_an_unknown_field(tmp_path: Path) -> None:
    from tunedeck_cli import sweeps as cli
    from tunedeck_cli.errors import USAGE, CliError

    path = tmp_path / "sweep.yaml"
    path.write_text("name: x\nbase_run: 1\nspace: {learning_rate: {type: float, low: 1, high: 2}}\nbudget: 3\n")
    with pytest.raises(CliError) as refused:
        cli.load(str(path))
    assert refused.value.code == USAGE and "budget: unknown field" in "\n".join(refused.value.lines())
