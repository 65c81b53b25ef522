"""Checkpoints that keep_checkpoints deleted are listed nowhere: the run page, the REST API and the OpenAI API
agree on the checkpoints a retry can resume from."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client

from tests.webapp.api_helpers import bearer, key_for
from tests.webapp.team import login, make
from webapp.jobs.ledger import record_events
from webapp.training.models import TrainingRun

pytestmark = pytest.mark.django_db


def saved(run: TrainingRun, *checkpoints: tuple[int, list[int] | None], attempt: int = 1, seq: int = 1) -> None:
    """Checkpoint events as a worker reports them: the step saved and the steps still on disk after it."""
    record_events(run, attempt, [
        {"seq": seq + i, "kind": "checkpoint", "message": f"Checkpoint saved at step {step}",
         "data": {"step": step, **({"kept": kept} if kept is not None else {})}}
        for i, (step, kept) in enumerate(checkpoints)
    ])


def listed(client: Client, run: TrainingRun) -> dict[str, list[int]]:
    """The checkpoints' steps as the run page, the REST API and the OpenAI API list them, oldest first."""
    raw = key_for(run.owner, "read")
    page = client.get(f"/runs/{run.pk}/").content.decode()
    table = page[page.index('id="run-checkpoints"'):]
    table = table[:table.index("</details>")]
    rest = client.get(f"/api/v1/runs/{run.pk}/checkpoints/", **bearer(raw)).json()["results"]
    openai = client.get(f"/v1/fine_tuning/jobs/ftjob-{run.pk}/checkpoints", **bearer(raw)).json()["data"]
    return {
        "page": [int(s) for s in re.findall(r"<tr><td>(\d+)</td>", table)],
        "rest": [c["step"] for c in rest],
        "openai": [c["step_number"] for c in reversed(openai)],
    }


def test_checkpoints_the_worker_deleted_are_listed_nowhere(team: Any, client: Client) -> None:
    run = make(team, state="running", attempt=1)
    saved(run, (2, [2]), (4, [2, 4]), (6, [4, 6]))
    login(client, "owner")
    assert listed(client, run) == {"page": [4, 6], "rest": [4, 6], "openai": [4, 6]}
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "Checkpoints (2)" in page and "1 earlier checkpoint removed" in page


def test_a_resumed_attempt_lists_the_folder_as_its_worker_found_it(team: Any, client: Client) -> None:
    """Attempt 1 saved 4 and 8 and died; attempt 2 resumed from 8, saved 12 and the trainer deleted 4."""
    run = make(team, state="running", attempt=1)
    saved(run, (4, [4]), (8, [4, 8]))
    TrainingRun.objects.filter(pk=run.pk).update(attempt=2)
    saved(run, (12, [8, 12]), attempt=2)
    login(client, "owner")
    assert listed(client, run) == {"page": [8, 12], "rest": [8, 12], "openai": [8, 12]}
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert page.count("latest: a retry resumes here") == 1 and re.search(r"<tr><td>12</td>.*latest: a retry", page)


def test_without_the_workers_list_the_trainers_rule_applies(team: Any, client: Client) -> None:
    """Events of workers that did not report `kept`: the trainer keeps the latest keep_checkpoints."""
    run = make(team, state="running", attempt=1)
    TrainingRun.objects.filter(pk=run.pk).update(hyperparameters={**run.hyperparameters, "keep_checkpoints": 2})
    saved(run, (10, None), (20, None), (30, None))
    login(client, "owner")
    assert listed(client, run) == {"page": [20, 30], "rest": [20, 30], "openai": [20, 30]}
