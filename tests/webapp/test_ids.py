"""Ids, steps and limits read from requests take ASCII digits only: "¹" or "²" pass str.isdigit() but not int(),
and a number past a bigint fails in PostgreSQL's query. Each gets a 4xx (or is ignored where optional), never a 500.
Found by the API fuzzer on PostgreSQL (GET /api/v1/adapters/by-alias/¹/…/download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.webapp.api_helpers import Team, bearer, key_for, make_team
from tests.webapp.factories import make_run
from webapp.ids import MAX_ID, whole

pytestmark = pytest.mark.django_db
ODD = ["¹", "²", "٣", str(MAX_ID + 1), "99999999999999999999999"]


def test_whole_takes_ascii_digits_within_a_bigint() -> None:
    assert whole("42") == 42 and whole(" 7 ") == 7 and whole(str(MAX_ID)) == MAX_ID
    assert whole("-3", signed=True) == -3 and whole("-3") is None
    for text in [*ODD, "", "1.5", "0x10", "+4", None, "1 2"]:
        assert whole(text) is None, text
    assert whole("11", maximum=10) is None


@pytest.fixture
def team(tiny_model_dir: Path, store_dir: Path, db: Any) -> Team:
    return make_team(tiny_model_dir)


@pytest.mark.parametrize("odd", ODD)
def test_odd_numbers_in_requests_get_a_clear_answer_not_a_server_error(team: Team, odd: str) -> None:
    run = make_run(team.owner, team.base, team.dataset, team.config)
    api = Client(**bearer(key_for(team.owner)))
    page = Client()
    page.force_login(team.owner)
    answers = {
        "by-alias": api.get(f"/api/v1/adapters/by-alias/{odd}/prod/download/"),
        "run metrics": api.get(f"/api/v1/runs/{run.pk}/metrics/?after={odd}"),
        "run events": api.get(f"/api/v1/runs/{run.pk}/events/?after={odd}"),
        "openai limit": api.get(f"/v1/fine_tuning/jobs?limit={odd}"),
        "openai job": api.get(f"/v1/fine_tuning/jobs/ftjob-{odd}"),
        "compare": page.get(f"/runs/compare/?ids={run.pk},{odd}"),
        "compare json": page.get(f"/runs/compare/metrics.json?ids={run.pk},{odd}"),
        "run metrics json": page.get(f"/runs/{run.pk}/metrics.json?after={odd}"),
        "lora config from": page.get(f"/lora-configs/?from={odd}"),
        "new run": page.get(f"/runs/new/?base_model={odd}"),
        "new sweep": page.post("/sweeps/new/", {"name": "s", "base_run": odd, "spec": "space: {}"}),
        "compare adapters": page.get(f"/compare/new/?adapters={odd}&prompt_set={odd}"),
    }
    errors = {name: r.status_code for name, r in answers.items() if r.status_code >= 500}
    assert not errors, errors
    assert answers["by-alias"].status_code == 404 and answers["run metrics"].status_code == 400
    assert answers["openai limit"].status_code == 400 and answers["new sweep"].status_code == 400
