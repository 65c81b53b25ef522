"""Aliases over the API: move one (creating it), its history, a required evaluation that refuses a worse adapter and
accepts a better one, and the by-alias download that deployment scripts use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.webapp.api_helpers import bearer, key_for, problem_of
from tests.webapp.evaluations import record_evaluation
from tests.webapp.team import make
from webapp.catalog.models import Dataset
from webapp.playground.models import AdapterAlias, AliasMove
from webapp.training.models import Adapter

pytestmark = pytest.mark.django_db


def post(client: Client, body: Any, raw: str) -> Any:
    return client.post("/api/v1/aliases/", json.dumps(body), content_type="application/json", **bearer(raw))


def trained(team: Any, store: Path, name: str, base: int = 0) -> Adapter:
    run = make(team, base=base, name=name, state="succeeded")
    folder = store / "runs" / str(run.pk) / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "name": name}))
    (folder / "adapter_model.safetensors").write_bytes(name.encode() * 100)
    return Adapter.objects.create(run=run, name=name, owner=run.owner, base_model=run.base_model,
                                  uri=f"store://runs/{run.pk}/adapter", size_bytes=1, sha256="0" * 64,
                                  trainable_params=1, total_params=2)


@pytest.fixture
def evalset(team: Any) -> Dataset:
    return Dataset.objects.create(name="qa-eval", uri="store://datasets/qa.jsonl", original_filename="qa.jsonl",
                                  format="alpaca", row_count=10, size_bytes=100, sha256="0" * 64)


def test_a_first_move_creates_the_alias_and_a_second_moves_it_with_history(client: Client, team: Any,
                                                                           store_dir: Path) -> None:
    users, bases = team[0], team[1]
    one, two = trained(team, store_dir, "one"), trained(team, store_dir, "two")
    raw = key_for(users["owner"])
    first = post(client, {"name": "Production", "adapter": one.pk}, raw)
    assert first.status_code == 201, first.content
    assert (first.json()["name"], first.json()["adapter"], first.json()["base_model_name"]) == ("production", one.pk,
                                                                                               "base-0")
    moved = post(client, {"name": "production", "adapter": two.pk, "base_model": "base-0"}, key_for(users["mate"]))
    assert moved.status_code == 200, moved.content
    body = moved.json()
    assert body["adapter"] == two.pk and body["updated_by"] == "mate"
    assert [(m["outcome"], m["from_adapter"], m["to_adapter"], m["by"]) for m in body["history"]] == [
        ("moved", one.pk, two.pk, "mate"), ("moved", None, one.pk, "owner")]
    assert body["download"] == "/api/v1/adapters/by-alias/base-0/production/download"

    listed = client.get(f"/api/v1/aliases/?base_model={bases[0].pk}&name=production", **bearer(raw)).json()
    assert [a["adapter"] for a in listed["results"]] == [two.pk]


def test_moves_that_cannot_be_tried_are_400s_naming_the_field(client: Client, team: Any, store_dir: Path) -> None:
    raw = key_for(team[0]["owner"])
    one, other_base = trained(team, store_dir, "one"), trained(team, store_dir, "elsewhere", base=1)
    post(client, {"name": "production", "adapter": one.pk}, raw)
    body = problem_of(post(client, {"name": "production", "adapter": other_base.pk, "base_model": "base-0"}, raw), 400)
    assert body["errors"]["adapter"] == [f"adapter {other_base.pk} is an adapter of base-1, not of base-0: an alias "
                                         "points at adapters of its own base"]
    body = problem_of(post(client, {"name": "prod/1", "adapter": one.pk}, raw), 400)
    assert list(body["errors"]) == ["name"]
    body = problem_of(post(client, {"name": "production", "adapter": one.pk}, raw), 400)
    assert body["errors"]["adapter"] == [f"production already points at one (adapter {one.pk})"]
    body = problem_of(post(client, {"name": "x", "adapter": one.pk, "require": {"dataset": 99, "metric": "bleu"}},
                           raw), 400)
    assert set(body["errors"]) == {"require.dataset", "require.metric"}
    assert AliasMove.objects.count() == 1


def test_a_required_evaluation_refuses_a_worse_adapter_and_accepts_a_better_one(
        client: Client, team: Any, store_dir: Path, evalset: Dataset) -> None:
    owner = team[0]["owner"]
    raw = key_for(owner)
    holder, worse, better = (trained(team, store_dir, n) for n in ("holder", "worse", "better"))
    post(client, {"name": "production", "adapter": holder.pk}, raw)
    record_evaluation(owner, evalset, {holder: {"rouge_l": 0.50}, worse: {"rouge_l": 0.48}})
    record_evaluation(owner, evalset, {better: {"rouge_l": 0.58}})
    # A held-out split of a run is other rows: it never counts as the evaluation set.
    record_evaluation(owner, evalset, {worse: {"rouge_l": 0.99}}, split="held_out")
    require = {"dataset": "qa-eval", "metric": "rouge_l", "margin": 0.05}

    body = problem_of(post(client, {"name": "production", "adapter": worse.pk, "require": require}, raw), 409)
    assert body["detail"] == ("Not moved: worse does not beat the current holder by 0.05: ROUGE-L on qa-eval: worse "
                              "0.48 vs the current holder holder 0.5 (higher is better; required margin 0.05)")
    assert body["move"]["outcome"] == "refused"
    assert (body["move"]["requirement"]["holder_score"], body["move"]["requirement"]["candidate_score"]) == (0.5, 0.48)
    assert AdapterAlias.objects.get(name="production").adapter_id == holder.pk

    moved = post(client, {"name": "production", "adapter": better.pk, "require": require}, raw)
    assert moved.status_code == 200, moved.content
    history = moved.json()["history"]
    assert [(m["outcome"], m["to_adapter"]) for m in history] == [
        ("moved", better.pk), ("refused", worse.pk), ("moved", holder.pk)]
    assert history[0]["message"].startswith("production moved to better: beats the current holder: ROUGE-L on qa-eval")
    assert history[0]["requirement"]["gain"] == pytest.approx(0.08)

    # Lower is better for the loss; and an adapter never evaluated on the set is refused, saying so.
    record_evaluation(owner, evalset, {better: {"loss": 0.9}, worse: {"loss": 1.2}})
    body = problem_of(post(client, {"name": "production", "adapter": worse.pk,
                                    "require": {"dataset": evalset.pk, "metric": "loss"}}, raw), 409)
    assert "loss on qa-eval: worse 1.2 vs the current holder better 0.9 (lower is better" in body["detail"]
    unscored = trained(team, store_dir, "unscored")
    body = problem_of(post(client, {"name": "production", "adapter": unscored.pk, "require": require}, raw), 409)
    assert body["detail"] == (f"Not moved: unscored no ROUGE-L of unscored (adapter {unscored.pk}) on all of qa-eval: "
                              "evaluate it on that dataset first")
    assert AdapterAlias.objects.get(name="production").adapter_id == better.pk


def test_the_by_alias_download_is_the_adapters_zip(client: Client, team: Any, store_dir: Path) -> None:
    raw = key_for(team[0]["owner"])
    one = trained(team, store_dir, "one")
    post(client, {"name": "production", "adapter": one.pk}, raw)
    direct = client.get(f"/api/v1/adapters/{one.pk}/download/", **bearer(raw))
    expected = b"".join(direct.streaming_content)
    for path in ("/api/v1/adapters/by-alias/base-0/production/download",
                 f"/api/v1/adapters/by-alias/{one.base_model_id}/production/download/"):
        response = client.get(path, **bearer(raw))
        assert response.status_code == 200 and response["Content-Type"] == "application/zip"
        assert b"".join(response.streaming_content) == expected and len(expected) > 100

    body = problem_of(client.get("/api/v1/adapters/by-alias/base-0/staging/download", **bearer(raw)), 404)
    assert body["detail"] == "no alias 'staging' of base model 'base-0' (GET /api/v1/aliases/ lists them)"
    body = problem_of(client.get("/api/v1/adapters/by-alias/nobody/production/download", **bearer(raw)), 404)
    assert body["detail"] == "no base model named 'nobody' (GET /api/v1/aliases/ lists them)"
    problem_of(client.get("/api/v1/adapters/by-alias/base-0/production/download"), 401)
