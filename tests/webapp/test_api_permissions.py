"""Who may do what through the REST API: a matrix of callers over representative endpoints (read a list, create
a run, cancel the owner's run, register a worker), with what each refusal says and that it changed nothing."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from tests.webapp.api_helpers import Team, key_for, make_team
from tests.webapp.factories import make_run, make_worker
from webapp.api.models import ApiKey
from webapp.fleet.models import Worker
from webapp.training.models import TrainingRun


@pytest.fixture
def api_team(tiny_model_dir: Path, store_dir: Path, db: Any) -> Team:
    return make_team(tiny_model_dir)


def _credentials(team: Team, who: str) -> str | None:
    """The Authorization value of each caller (None: no credentials at all)."""
    if who == "anonymous":
        return None
    if who == "worker token":
        return make_worker("w-perm")[1]
    if who == "deactivated user":
        raw = key_for(team.mate)
        team.mate.is_active = False
        team.mate.save(update_fields=["is_active"])
        return raw
    if who == "expired key":
        return key_for(team.owner, expires_at=timezone.now() - timedelta(seconds=1))
    if who == "revoked key":
        key, raw = ApiKey.issue(team.owner, "old", ["read", "write"])
        ApiKey.objects.filter(pk=key.pk).update(revoked_at=timezone.now())
        return raw
    user, scopes = {
        "owner": (team.owner, ("read", "write")), "teammate": (team.mate, ("read", "write")),
        "staff": (team.boss, ("read", "write")), "staff admin key": (team.boss, ("admin",)),
        "read-only key": (team.owner, ("read",)),
    }[who]
    return key_for(user, *scopes)


# caller -> (list runs, create a run, cancel the owner's run, register a worker): expected status, message part
MATRIX: dict[str, tuple[tuple[int, str], ...]] = {
    "owner": ((200, ""), (201, ""), (200, ""), (403, "for staff")),
    "teammate": ((200, ""), (201, ""), (403, "only the run's owner or an admin"), (403, "for staff")),
    "staff": ((200, ""), (201, ""), (200, ""), (403, "lacks the 'admin' scope")),
    "staff admin key": ((200, ""), (201, ""), (200, ""), (201, "")),
    "read-only key": ((200, ""), (403, "lacks the 'write' scope"), (403, "lacks the 'write' scope"),
                      (403, "for staff")),
    "anonymous": ((401, "credentials were not provided"),) * 4,
    "deactivated user": ((401, "inactive"),) * 4,
    "worker token": ((401, "this is a worker token"),) * 4,
    "expired key": ((401, "expired"),) * 4,
    "revoked key": ((401, "revoked"),) * 4,
}


@pytest.mark.parametrize("who", list(MATRIX))
def test_the_permission_matrix(client: Client, api_team: Team, who: str) -> None:
    t = api_team
    target = make_run(t.owner, t.base, t.dataset, t.config)
    raw = _credentials(t, who)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {raw}"} if raw else {}
    runs_before, workers_before = TrainingRun.objects.count(), Worker.objects.count()

    def send(method: str, path: str, body: Any = None) -> Any:
        if method == "get":
            return client.get(path, **headers)
        return client.post(path, json.dumps(body or {}), content_type="application/json", **headers)

    answers = [
        send("get", "/api/v1/runs/"),
        send("post", "/api/v1/runs/", t.run_body()),
        send("post", f"/api/v1/runs/{target.pk}/cancel/"),
        send("post", "/api/v1/workers/", {"name": "gpu-new", "labels": ["a100"]}),
    ]
    for response, (status, message) in zip(answers, MATRIX[who], strict=True):
        assert response.status_code == status, (who, response.wsgi_request.path, response.content[:500])
        if status >= 400:
            assert response["Content-Type"] == "application/problem+json"
            assert message in response.json()["detail"], (who, response.json())
        if status == 401:
            assert response["WWW-Authenticate"].startswith("Bearer")

    created_run, cancelled, registered = (answers[1].status_code == 201, answers[2].status_code == 200,
                                          answers[3].status_code == 201)
    assert TrainingRun.objects.count() == runs_before + created_run
    assert TrainingRun.objects.get(pk=target.pk).state == ("cancelled" if cancelled else "queued")
    assert Worker.objects.count() == workers_before + registered
    if registered:
        worker = Worker.objects.get(name="gpu-new")
        token = answers[3].json()["token"]
        assert token.startswith("tdw_") and worker.token_hash and token not in json.dumps(
            client.get(f"/api/v1/workers/{worker.pk}/", **headers).json())


# caller -> (list prompt sets, create a prompt set, read the own blind ballot, vote on the owner's comparison).
# There are no outsiders among signed-in users: everyone on the team sees and votes on every comparison.
VOTE_MATRIX: dict[str, tuple[tuple[int, str], ...]] = {
    "owner": ((200, ""), (201, ""), (200, ""), (201, "")),
    "teammate": ((200, ""), (201, ""), (200, ""), (201, "")),
    "staff": ((200, ""), (201, ""), (200, ""), (201, "")),
    "staff admin key": ((200, ""), (201, ""), (200, ""), (201, "")),
    "read-only key": ((200, ""), (403, "lacks the 'write' scope"), (200, ""), (403, "lacks the 'write' scope")),
    **{who: answers for who, answers in MATRIX.items() if answers[0][0] == 401},
}


@pytest.mark.parametrize("who", list(VOTE_MATRIX))
def test_the_permission_matrix_of_prompt_sets_and_votes(client: Client, api_team: Team, who: str) -> None:
    from tests.webapp.test_api_votes import comparison_of
    from webapp.playground.models import PromptSet, Vote

    t = api_team
    comparison = comparison_of(t)
    raw = _credentials(t, who)
    headers = {"HTTP_AUTHORIZATION": f"Bearer {raw}"} if raw else {}
    sets_before = PromptSet.objects.count()
    answers = [
        client.get("/api/v1/prompt-sets/", **headers),
        client.post("/api/v1/prompt-sets/", json.dumps({"prompts": ["hi"]}), content_type="application/json",
                    **headers),
        client.get(f"/api/v1/comparisons/{comparison.pk}/ballot/", **headers),
        client.post(f"/api/v1/comparisons/{comparison.pk}/votes/", json.dumps({"row": 0, "option": "tie"}),
                    content_type="application/json", **headers),
    ]
    for response, (status, message) in zip(answers, VOTE_MATRIX[who], strict=True):
        assert response.status_code == status, (who, response.wsgi_request.path, response.content[:500])
        if status >= 400:
            assert response["Content-Type"] == "application/problem+json"
            assert message in response.json()["detail"], (who, response.json())
    assert PromptSet.objects.count() == sets_before + (answers[1].status_code == 201)
    assert Vote.objects.filter(comparison=comparison).count() == (answers[3].status_code == 201)
