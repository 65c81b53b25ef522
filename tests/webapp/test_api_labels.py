"""Tags and notes over the API: set them with PATCH, read them back, filter lists by tag, search by text; refusals
name the field and change nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from tests.webapp.api_helpers import bearer, key_for, problem_of
from tests.webapp.team import make
from webapp.training.models import Adapter, Tag, TrainingRun

pytestmark = pytest.mark.django_db


def patch(client: Client, path: str, body: Any, raw: str) -> Any:
    return client.patch(path, json.dumps(body), content_type="application/json", **bearer(raw))


def adapter_of(run: TrainingRun, name: str) -> Adapter:
    return Adapter.objects.create(run=run, name=name, owner=run.owner, base_model=run.base_model, uri="store://x",
                                  size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=2)


def ids(response: Any) -> list[int]:
    assert response.status_code == 200, response.content
    return [row["id"] for row in response.json()["results"]]


def test_it_sets_tags_and_a_note_on_a_run_and_reads_them_back(client: Client, team: Any) -> None:
    run = make(team, name="first")
    raw = key_for(team[0]["owner"])
    response = patch(client, f"/api/v1/runs/{run.pk}/", {"tags": ["Baseline", "lr-sweep", "baseline"],
                                                          "note": "  <b>try</b> a lower rate\n"}, raw)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["tags"] == ["baseline", "lr-sweep"] and body["note"] == "<b>try</b> a lower rate"
    assert client.get(f"/api/v1/runs/{run.pk}/", **bearer(raw)).json()["tags"] == ["baseline", "lr-sweep"]

    # The note alone leaves the tags as they were; an empty list clears them.
    assert patch(client, f"/api/v1/runs/{run.pk}/", {"note": ""}, raw).json()["tags"] == ["baseline", "lr-sweep"]
    cleared = patch(client, f"/api/v1/runs/{run.pk}/", {"tags": []}, raw).json()
    assert (cleared["tags"], cleared["note"], cleared["name"]) == ([], "", "first")
    assert list(run.tags.all()) == []


def test_bad_tags_are_a_400_naming_the_field_and_change_nothing(client: Client, team: Any) -> None:
    run = make(team)
    raw = key_for(team[0]["owner"])
    patch(client, f"/api/v1/runs/{run.pk}/", {"tags": ["kept"], "note": "kept note"}, raw)

    body = problem_of(patch(client, f"/api/v1/runs/{run.pk}/", {"tags": ["ok", "no spaces!"], "note": "new"}, raw), 400)
    assert body["errors"]["tags"] == ["'no spaces!' is not a tag: use lowercase letters, digits and . _ : / - "
                                      "(starting with a letter or digit)"]
    body = problem_of(patch(client, f"/api/v1/runs/{run.pk}/", {"tags": [f"t{i}" for i in range(21)]}, raw), 400)
    assert body["errors"]["tags"] == ["at most 20 tags (21 given)"]
    body = problem_of(patch(client, f"/api/v1/runs/{run.pk}/", {"note": "x" * 5001}, raw), 400)
    assert body["errors"]["note"] == ["at most 5000 characters (5001 given)"]
    body = problem_of(patch(client, f"/api/v1/runs/{run.pk}/", {"name": "renamed"}, raw), 400)
    assert "name" in body["errors"]

    run.refresh_from_db()
    assert (sorted(t.name for t in run.tags.all()), run.note, run.name) == (["kept"], "kept note", "")
    assert not Tag.objects.filter(name="ok").exists()


def test_only_the_owner_or_staff_change_them(client: Client, team: Any) -> None:
    users = team[0]
    run = make(team)
    problem_of(patch(client, f"/api/v1/runs/{run.pk}/", {"tags": ["mine"]}, key_for(users["mate"])), 403)
    problem_of(patch(client, f"/api/v1/runs/{run.pk}/", {"tags": ["mine"]}, key_for(users["owner"], "read")), 403)
    assert patch(client, f"/api/v1/runs/{run.pk}/", {"tags": ["ok"]}, key_for(users["staff"])).status_code == 200


def test_lists_filter_by_every_tag_given_and_search_name_note_and_tags(client: Client, team: Any) -> None:
    raw = key_for(team[0]["owner"])
    a, b, c = make(team, name="alpha"), make(team, name="beta"), make(team, name="gamma")
    patch(client, f"/api/v1/runs/{a.pk}/", {"tags": ["prod", "llama"]}, raw)
    patch(client, f"/api/v1/runs/{b.pk}/", {"tags": ["prod"], "note": "the Alpaca mix"}, raw)
    patch(client, f"/api/v1/runs/{c.pk}/", {"tags": ["alpaca-data"]}, raw)

    assert ids(client.get("/api/v1/runs/?tag=prod", **bearer(raw))) == [b.pk, a.pk]
    assert ids(client.get("/api/v1/runs/?tag=prod&tag=llama", **bearer(raw))) == [a.pk]
    assert ids(client.get("/api/v1/runs/?tag=PROD&tag=nothing", **bearer(raw))) == []
    assert ids(client.get("/api/v1/runs/?q=alpaca", **bearer(raw))) == [c.pk, b.pk]  # a tag, a note
    assert ids(client.get("/api/v1/runs/?q=ALPH", **bearer(raw))) == [a.pk]  # a name
    assert ids(client.get("/api/v1/runs/?q=alpaca&tag=prod", **bearer(raw))) == [b.pk]


def test_adapters_carry_tags_and_notes_too(client: Client, team: Any) -> None:
    raw = key_for(team[0]["owner"])
    first, second = adapter_of(make(team), "one"), adapter_of(make(team), "two")
    response = patch(client, f"/api/v1/adapters/{first.pk}/", {"tags": ["candidate"], "note": "beats one on ROUGE"}, raw)
    assert response.status_code == 200, response.content
    assert (response.json()["tags"], response.json()["note"]) == (["candidate"], "beats one on ROUGE")
    assert ids(client.get("/api/v1/adapters/?tag=candidate", **bearer(raw))) == [first.pk]
    assert ids(client.get("/api/v1/adapters/?q=rouge", **bearer(raw))) == [first.pk]
    assert ids(client.get("/api/v1/adapters/?q=two", **bearer(raw))) == [second.pk]
