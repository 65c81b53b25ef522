"""Blind votes and prompt sets over the REST API and the CLI: the ballot hides the names until the caller has
voted on a row, one vote per person per row (shared with the vote page), and reusable prompt sets."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.core.handlers.wsgi import WSGIHandler
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.test import Client

from tests.webapp.api_helpers import Team, bearer, key_for, make_team, problem_of
from tests.webapp.factories import make_worker
from tunedeck_cli import adapters as cli
from tunedeck_cli.api import Api
from tunedeck_cli.config import Settings
from tunedeck_cli.errors import AUTH, FAILED, NOT_FOUND, OK, USAGE, CliError
from webapp.playground import services
from webapp.playground.models import AdapterJob, Comparison, PromptSet, Vote
from webapp.training.models import Adapter
from workers.contract import jobspecs

NAMES = ("add-adapter", "double-adapter")


@pytest.fixture
def api_team(tiny_model_dir: Path, store_dir: Path, db: Any) -> Team:
    return make_team(tiny_model_dir)


def post(client: Client, path: str, body: Any, raw: str, **headers: Any) -> Any:
    return client.post(path, json.dumps(body), content_type="application/json", **bearer(raw), **headers)


def comparison_of(team: Team, finished: bool = True) -> Comparison:
    """Two adapters and the base on two prompts, every output stored (no worker: the job is marked done)."""
    adapters = [
        Adapter.objects.create(
            name=name,
            owner=team.owner,
            base_model=team.base,
            rank=8,
            uri=f"store://a/{name}",
            size_bytes=1,
            sha256="0" * 64,
            trainable_params=1,
            total_params=2,
        )
        for name in NAMES
    ]
    prompts = PromptSet.objects.create(
        name="two",
        owner=team.owner,
        rows=[{"prompt": "What is 2 + 3?", "reference": "5"}, {"prompt": "Double 4", "reference": ""}],
    )
    comparison = services.start_compare(team.owner, prompts, adapters, jobspecs.GenerationParams(max_new_tokens=8))
    keys = [key for key, _ in comparison.columns()]
    comparison.store_outputs(
        [{"row": r, "column": k, "text": f"output {n} of row {r}"} for r in range(2) for n, k in enumerate(keys)]
    )
    if finished:
        AdapterJob.objects.filter(pk=comparison.job_id).update(state="succeeded")
    return Comparison.objects.select_related("job", "prompt_set").get(pk=comparison.pk)


def text_of(comparison: Comparison, key: str, row: int) -> str:
    return f"output {[k for k, _ in comparison.columns()].index(key)} of row {row}"


def option_for(comparison: Comparison, user: Any, row: int, key: str) -> str:
    """The letter under which `user`'s ballot shows the column `key` on `row`."""
    return "ABCDEFGHI"[comparison.blind_order(user.pk, row).index(key)]


# --- the ballot and votes -----------------------------------------------------------------------------------


def test_the_ballot_hides_names_until_voted_and_a_vote_reveals_its_row(client: Client, api_team: Team) -> None:
    t = api_team
    comparison = comparison_of(t)
    raw = key_for(t.mate)
    url = f"/api/v1/comparisons/{comparison.pk}/ballot/"
    answer = client.get(url, **bearer(raw))
    assert answer.status_code == 200, answer.content
    ballot = answer.json()
    assert ballot["open"] is True and ballot["state"] == "succeeded" and ballot["voted"] == 0
    text = answer.content.decode()
    for column, label in comparison.columns():  # neither keys nor names anywhere before a vote
        assert column not in text and label not in text
    first = ballot["rows"][0]
    assert first["prompt"] == "What is 2 + 3?" and first["reference"] == "5" and first["choice"] is None
    assert [o["option"] for o in first["options"]] == ["A", "B", "C"]
    assert all(o["key"] is None and o["label"] is None and o["done"] for o in first["options"])

    adapter_key = comparison.columns()[1][0]
    letter = option_for(comparison, t.mate, 0, adapter_key)
    vote = post(client, f"/api/v1/comparisons/{comparison.pk}/votes/", {"row": 0, "option": letter.lower()}, raw)
    assert vote.status_code == 201, vote.content
    revealed = vote.json()
    assert revealed["row"] == 0 and revealed["choice"] == letter and revealed["choice_key"] == adapter_key
    assert revealed["choice_label"] == "add-adapter"
    by_letter = {o["option"]: o for o in revealed["options"]}
    assert by_letter[letter]["label"] == "add-adapter" and by_letter[letter]["key"] == adapter_key
    assert by_letter[letter]["text"] == text_of(comparison, adapter_key, 0)
    assert {o["label"] for o in revealed["options"]} == {label for _, label in comparison.columns()}
    assert Vote.objects.get(comparison=comparison, user=t.mate).choice == adapter_key

    again = client.get(url, **bearer(raw)).json()
    assert again["voted"] == 1 and again["rows"][0] == revealed
    assert again["rows"][1]["choice"] is None and all(o["label"] is None for o in again["rows"][1]["options"])
    # Another voter's ballot is still blind on every row.
    other = client.get(url, **bearer(key_for(t.owner))).json()
    assert other["voted"] == 0 and all(o["key"] is None for r in other["rows"] for o in r["options"])


def test_each_voter_sees_the_outputs_in_their_own_blind_order(client: Client, api_team: Team) -> None:
    t = api_team
    comparison = comparison_of(t)
    voters = [t.owner, t.mate, t.boss, *(get_user_model().objects.create_user(f"voter{i}") for i in range(6))]
    orders = set()
    for voter in voters:
        ballot = client.get(f"/api/v1/comparisons/{comparison.pk}/ballot/", **bearer(key_for(voter))).json()
        for row in ballot["rows"]:
            expected = [text_of(comparison, key, row["row"]) for key in comparison.blind_order(voter.pk, row["row"])]
            assert [o["text"] for o in row["options"]] == expected
        orders.add(tuple(o["text"] for o in ballot["rows"][0]["options"]))
    assert len(orders) > 1  # not one order for everybody


def many_rows_comparison(team: Team, rows: int) -> Comparison:
    """The base and two adapters on `rows` prompts, finished; each cell's text names its row and column."""
    adapters = [
        Adapter.objects.create(name=name, owner=team.owner, base_model=team.base, rank=8, uri=f"store://a/{name}",
                               size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=2)
        for name in NAMES
    ]
    prompts = PromptSet.objects.create(name="many", owner=team.owner,
                                       rows=[{"prompt": f"prompt {r}", "reference": ""} for r in range(rows)])
    comparison = services.start_compare(team.owner, prompts, adapters, jobspecs.GenerationParams(max_new_tokens=8))
    comparison.store_outputs([{"row": r, "column": k, "text": f"{k} on row {r}"}
                              for r in range(rows) for k, _ in comparison.columns()])
    AdapterJob.objects.filter(pk=comparison.job_id).update(state="succeeded")
    return Comparison.objects.select_related("job", "prompt_set").get(pk=comparison.pk)


def base_positions(client: Client, comparison: Comparison, raw: str) -> list[int]:
    """Where the base's output stands on each row of the caller's ballot (0: option A)."""
    rows = client.get(f"/api/v1/comparisons/{comparison.pk}/ballot/", **bearer(raw)).json()["rows"]
    return [[o["text"] for o in row["options"]].index(f"{jobspecs.BASE_KEY} on row {row['row']}") for row in rows]


def test_the_base_moves_from_row_to_row_stays_put_on_reload_and_differs_between_voters(
    client: Client, api_team: Team
) -> None:
    t = api_team
    comparison = many_rows_comparison(t, rows=24)
    mate, owner = key_for(t.mate), key_for(t.owner)
    mine = base_positions(client, comparison, mate)
    assert len(set(mine)) == 3  # one glance at a voted row unmasks nothing on the others
    assert base_positions(client, comparison, mate) == mine  # stable across reloads
    assert base_positions(client, comparison, owner) != mine  # each voter has their own order
    # Every vote for the option showing the base's text records the base, whichever letter it stands under.
    for row, position in enumerate(mine):
        vote = post(client, f"/api/v1/comparisons/{comparison.pk}/votes/", {"row": row, "option": "ABC"[position]}, mate)
        assert vote.status_code == 201, vote.content
    assert set(Vote.objects.filter(comparison=comparison, user=t.mate).values_list("choice", flat=True)) == {
        jobspecs.BASE_KEY}


def test_the_blind_order_cannot_be_worked_out_from_the_ids_a_voter_knows(api_team: Team, settings: Any) -> None:
    """The order is keyed with the server's secret: the comparison, voter and row ids are all public."""
    comparison = many_rows_comparison(api_team, rows=12)
    voter = api_team.mate.pk
    before = [comparison.blind_order(voter, row) for row in range(12)]
    settings.SECRET_KEY = "another-secret-key-for-this-test-only-0123456789"
    assert [comparison.blind_order(voter, row) for row in range(12)] != before


def test_one_vote_per_person_per_row_and_an_idempotent_retry_replays(client: Client, api_team: Team) -> None:
    t = api_team
    comparison = comparison_of(t)
    raw = key_for(t.mate)
    url = f"/api/v1/comparisons/{comparison.pk}/votes/"
    first = post(client, url, {"row": 1, "option": "tie"}, raw, HTTP_IDEMPOTENCY_KEY="vote-1")
    assert first.status_code == 201 and first.json()["choice"] == "tie" and first.json()["choice_label"] == "Tie"
    replay = post(client, url, {"row": 1, "option": "tie"}, raw, HTTP_IDEMPOTENCY_KEY="vote-1")
    assert replay.status_code == 201 and replay["Idempotent-Replayed"] == "true" and replay.json() == first.json()

    second = problem_of(post(client, url, {"row": 1, "option": "B"}, raw), 409)
    assert "already voted on row 1" in second["detail"] and "one vote per person per row" in second["detail"]
    assert problem_of(post(client, url, {"row": 1, "option": "tie"}, raw, HTTP_IDEMPOTENCY_KEY="vote-2"), 409)
    assert list(Vote.objects.filter(comparison=comparison).values_list("user", "row", "choice")) == [
        (t.mate.pk, 1, "tie")
    ]
    # Someone else may still vote on that row.
    assert post(client, url, {"row": 1, "option": "A"}, key_for(t.owner)).status_code == 201


def test_no_vote_before_the_comparison_has_finished(client: Client, api_team: Team) -> None:
    t = api_team
    comparison = comparison_of(t, finished=False)
    raw = key_for(t.mate)
    ballot = client.get(f"/api/v1/comparisons/{comparison.pk}/ballot/", **bearer(raw)).json()
    assert ballot["open"] is False and ballot["state"] == "queued"
    refused = problem_of(
        post(client, f"/api/v1/comparisons/{comparison.pk}/votes/", {"row": 0, "option": "A"}, raw), 409
    )
    assert "has not finished (it is queued)" in refused["detail"] and "errors" not in refused
    assert not Vote.objects.exists()


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"row": 2, "option": "A"}, "row", "no row 2 in this comparison (rows 0 to 1)"),
        ({"row": -1, "option": "A"}, "row", "greater than or equal to 0"),
        ({"row": "first", "option": "A"}, "row", "valid integer"),
        ({"option": "A"}, "row", "required"),
        ({"row": 0, "option": "D"}, "option", "pick one of A, B, C, tie; got 'D'"),
        ({"row": 0, "option": "a1"}, "option", "pick one of A, B, C, tie"),
        ({"row": 0, "option": ""}, "option", "may not be blank"),
        ({"row": 0}, "option", "required"),
    ],
)
def test_a_bad_row_or_option_is_a_400_naming_the_field(
    client: Client, api_team: Team, body: dict[str, Any], field: str, message: str
) -> None:
    comparison = comparison_of(api_team)
    answer = post(client, f"/api/v1/comparisons/{comparison.pk}/votes/", body, key_for(api_team.mate))
    errors = problem_of(answer, 400)["errors"]
    assert list(errors) == [field] and message in errors[field][0], errors
    assert not Vote.objects.exists()


def test_who_may_vote(client: Client, api_team: Team) -> None:
    t = api_team
    comparison = comparison_of(t)
    votes_url, ballot_url = (
        f"/api/v1/comparisons/{comparison.pk}/votes/",
        f"/api/v1/comparisons/{comparison.pk}/ballot/",
    )
    read_only = key_for(t.mate, "read")
    assert client.get(ballot_url, **bearer(read_only)).status_code == 200
    assert (
        "lacks the 'write' scope"
        in problem_of(post(client, votes_url, {"row": 0, "option": "A"}, read_only), 403)["detail"]
    )
    anonymous = client.post(votes_url, json.dumps({"row": 0, "option": "A"}), content_type="application/json")
    assert problem_of(anonymous, 401) and problem_of(client.get(ballot_url), 401)
    worker = make_worker("w-votes")[1]
    assert "worker token" in problem_of(post(client, votes_url, {"row": 0, "option": "A"}, worker), 401)["detail"]
    assert (
        "no comparison with id 999999"
        in problem_of(
            post(client, "/api/v1/comparisons/999999/votes/", {"row": 0, "option": "A"}, key_for(t.mate)), 404
        )["detail"]
    )
    assert not Vote.objects.exists()
    # Staff vote like any teammate; the owner too.
    for user in (t.boss, t.owner):
        assert post(client, votes_url, {"row": 0, "option": "A"}, key_for(user)).status_code == 201


def test_win_rates_on_the_comparison_count_the_api_votes(client: Client, api_team: Team) -> None:
    t = api_team
    comparison = comparison_of(t)
    winner = comparison.columns()[2][0]
    url = f"/api/v1/comparisons/{comparison.pk}/votes/"
    for user in (t.owner, t.mate):
        for row in range(2):
            assert (
                post(
                    client, url, {"row": row, "option": option_for(comparison, user, row, winner)}, key_for(user)
                ).status_code
                == 201
            )
    assert post(client, url, {"row": 0, "option": "tie"}, key_for(t.boss)).status_code == 201
    detail = client.get(f"/api/v1/comparisons/{comparison.pk}/", **bearer(key_for(t.mate))).json()
    rates = {r["key"]: r for r in detail["win_rates"]}
    assert detail["votes"] == 5
    assert rates[winner]["wins"] == 4 and rates[winner]["rate"] == 1.0 and rates[winner]["label"] == "double-adapter"
    assert rates["tie"]["wins"] == 1 and rates[comparison.columns()[0][0]]["wins"] == 0


def test_the_page_and_the_api_share_one_vote_per_row(client: Client, api_team: Team) -> None:
    t = api_team
    comparison = comparison_of(t)
    assert client.login(username="mate", password="pw-mate-123")
    page = f"/compare/{comparison.pk}/vote/"
    assert client.post(page, {"row": 0, "choice": "tie"}).status_code == 302
    raw = key_for(t.mate)
    refused = problem_of(
        post(client, f"/api/v1/comparisons/{comparison.pk}/votes/", {"row": 0, "option": "A"}, raw), 409
    )
    assert "one vote per person per row" in refused["detail"]
    # The other way round: voted through the API, refused on the page, shown as voted there.
    assert (
        post(client, f"/api/v1/comparisons/{comparison.pk}/votes/", {"row": 1, "option": "B"}, raw).status_code == 201
    )
    again = client.post(page, {"row": 1, "choice": "tie"})
    assert again.status_code == 409 and "one vote per person per row" in again.content.decode()
    shown = client.get(page).content.decode()
    assert shown.count("Your vote:") == 2
    # The ballot over the API shows the page's vote too.
    ballot = client.get(f"/api/v1/comparisons/{comparison.pk}/ballot/", **bearer(raw)).json()
    assert [r["choice"] for r in ballot["rows"]] == ["tie", "B"] and ballot["voted"] == 2


# --- prompt sets --------------------------------------------------------------------------------------------


def test_prompt_sets_from_typed_prompts_or_a_dataset_listed_and_read(client: Client, api_team: Team) -> None:
    t = api_team
    raw = key_for(t.mate)
    typed = post(
        client, "/api/v1/prompt-sets/", {"name": "arith", "prompts": ["1+1=", "2+2="], "references": ["2", ""]}, raw
    )
    assert typed.status_code == 201, typed.content
    created = typed.json()
    assert created["rows"] == [{"prompt": "1+1=", "reference": "2", "turns": []},
                               {"prompt": "2+2=", "reference": "", "turns": []}]  # fmt: skip
    assert created["owner"] == "mate" and created["size"] == 2 and created["has_references"] is True

    rows = post(client, "/api/v1/prompt-sets/", {"dataset": t.dataset.pk, "dataset_rows": 3}, raw).json()
    assert rows["name"] == "3 rows of toy" and rows["size"] == 3 and rows["source_dataset"] == t.dataset.pk
    assert all(r["prompt"] and r["reference"] for r in rows["rows"])
    assert all(r["turns"] == [{"role": "user", "content": r["prompt"]}] for r in rows["rows"])  # the conversation
    plain = post(client, "/api/v1/prompt-sets/", {"prompts": ["hello"]}, raw, HTTP_IDEMPOTENCY_KEY="ps-1").json()
    assert plain["name"] == "1 prompts" and plain["has_references"] is False
    assert (
        post(client, "/api/v1/prompt-sets/", {"prompts": ["hello"]}, raw, HTTP_IDEMPOTENCY_KEY="ps-1").json() == plain
    )
    PromptSet.objects.create(name="owner's", owner=t.owner, rows=[{"prompt": "x", "reference": ""}])
    assert PromptSet.objects.count() == 4

    page = client.get("/api/v1/prompt-sets/?page_size=2", **bearer(raw)).json()
    assert [p["name"] for p in page["results"]] == ["owner's", "1 prompts"] and "rows" not in page["results"][0]
    rest = client.get(page["next"], **bearer(raw)).json()
    assert [p["name"] for p in rest["results"]] == ["3 rows of toy", "arith"] and rest["next"] is None
    mine = client.get("/api/v1/prompt-sets/?owner=me", **bearer(raw)).json()["results"]
    assert len(mine) == 3 and {p["owner"] for p in mine} == {"mate"}
    detail = client.get(f"/api/v1/prompt-sets/{created['id']}/", **bearer(key_for(t.owner, "read"))).json()
    assert detail == created
    assert (
        "no prompt set with id 999999"
        in problem_of(client.get("/api/v1/prompt-sets/999999/", **bearer(raw)), 404)["detail"]
    )

    # A comparison runs on it by id.
    adapter = Adapter.objects.create(
        name="a",
        owner=t.owner,
        base_model=t.base,
        rank=8,
        uri="store://a/a",
        size_bytes=1,
        sha256="0" * 64,
        trainable_params=1,
        total_params=2,
    )
    comparison = post(client, "/api/v1/comparisons/", {"adapters": [adapter.pk], "prompt_set": created["id"]}, raw)
    assert comparison.status_code == 201 and comparison.json()["prompt_set"] == created["id"]
    assert [r["reference"] for r in comparison.json()["rows"]] == ["2", ""]
    assert PromptSet.objects.count() == 4


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({}, "non_field_errors", "give one of prompts or dataset"),
        ({"prompts": ["a"], "dataset": 1}, "non_field_errors", "(got prompts, dataset)"),
        ({"prompts": ["a", "b"], "references": ["x"]}, "references", "one per prompt: 2 prompts, 1 references"),
        ({"dataset": 1, "references": ["x"]}, "references", "references go with typed prompts"),
        ({"prompts": ["a", " "]}, "prompts.1", "may not be blank"),
        ({"prompts": []}, "prompts", "at least 1"),
        ({"dataset": 999999}, "dataset", "no dataset with id 999999"),
        ({"prompts": ["a"], "name": "n" * 201}, "name", "no more than 200"),
    ],
)
def test_a_refused_prompt_set_names_the_field(
    client: Client, api_team: Team, body: dict[str, Any], field: str, message: str
) -> None:
    if body.get("dataset") == 1:
        body = {**body, "dataset": api_team.dataset.pk}
    errors = problem_of(post(client, "/api/v1/prompt-sets/", body, key_for(api_team.mate)), 400)["errors"]
    assert field in errors and message in errors[field][0], errors
    assert not PromptSet.objects.exists()


def test_a_read_only_key_lists_prompt_sets_but_creates_none(client: Client, api_team: Team) -> None:
    raw = key_for(api_team.mate, "read")
    assert client.get("/api/v1/prompt-sets/", **bearer(raw)).status_code == 200
    refused = problem_of(post(client, "/api/v1/prompt-sets/", {"prompts": ["a"]}, raw), 403)
    assert "lacks the 'write' scope" in refused["detail"] and not PromptSet.objects.exists()
    assert problem_of(client.get("/api/v1/prompt-sets/"), 401)


# --- the CLI, in process against the same database ----------------------------------------------------------


@pytest.fixture
def api_for(api_team: Team) -> Iterator[Any]:
    """An `Api` of the CLI whose requests go to this process's Django through WSGI (no server, no subprocess).

    As Django's test client does, requests leave the test's database connection open (and its transaction)."""
    opened: list[Api] = []
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)

    def make(user: Any, *scopes: str) -> Api:
        api = Api(Settings(server="http://testserver", api_key=key_for(user, *scopes), source="test"))
        api.http = httpx.Client(
            transport=httpx.WSGITransport(app=WSGIHandler()), base_url=api.http.base_url, headers=api.http.headers
        )
        opened.append(api)
        return api

    try:
        yield make
    finally:
        for api in opened:
            api.close()
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"json": False, **kw})


def test_the_cli_shows_a_blind_ballot_votes_and_exits_with_the_usual_codes(
    api_team: Team, api_for: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    t = api_team
    comparison = comparison_of(t)
    api = api_for(t.mate)
    assert cli.comparisons_ballot(args(id=comparison.pk, full=False), api) == OK
    out = capsys.readouterr().out
    assert "you voted on 0 of 2 rows" in out and "ROW  PROMPT" in out and "YOUR VOTE" in out
    assert "What is 2 + 3?" in out and not any(name in out for name in NAMES)
    assert f"tunedeck comparisons vote {comparison.pk} ROW OPTION  (OPTION: A, B, C, tie)" in out

    key = comparison.columns()[2][0]
    letter = option_for(comparison, t.mate, 1, key)
    assert cli.comparisons_vote(args(id=comparison.pk, row=1, option=letter), api) == OK
    out = capsys.readouterr().out
    assert f"Row 1: you voted {letter} = double-adapter" in out and "add-adapter" in out and "(base)" in out

    assert cli.comparisons_ballot(args(id=comparison.pk, full=True), api) == OK
    out = capsys.readouterr().out
    assert f"your vote: {letter} = double-adapter" in out and f"{text_of(comparison, key, 1)} [double-adapter]" in out
    assert "row 0: What is 2 + 3?" in out and "reference: 5" in out and "add-adapter]" not in out.split("row 1:")[0]
    assert cli.comparisons_ballot(args(id=comparison.pk, full=False, json=True), api) == OK
    assert json.loads(capsys.readouterr().out)["voted"] == 1

    with pytest.raises(CliError) as again:
        cli.comparisons_vote(args(id=comparison.pk, row=1, option="A"), api)
    assert again.value.code == FAILED and "one vote per person per row" in again.value.message
    with pytest.raises(CliError) as bad:
        cli.comparisons_vote(args(id=comparison.pk, row=0, option="Z"), api)
    assert bad.value.code == USAGE and any(
        line.startswith("option: pick one of A, B, C, tie") for line in bad.value.details
    )
    with pytest.raises(CliError) as missing:
        cli.comparisons_vote(args(id=999999, row=0, option="A"), api)
    assert missing.value.code == NOT_FOUND
    with pytest.raises(CliError) as read_only:
        cli.comparisons_vote(args(id=comparison.pk, row=0, option="A"), api_for(t.mate, "read"))
    assert read_only.value.code == AUTH
    assert Vote.objects.filter(comparison=comparison).count() == 1


def test_the_cli_compares_in_the_chosen_base_precision_and_shows_it(
    api_team: Team, api_for: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    t = api_team
    qlora = Adapter.objects.create(name="qlora", owner=t.owner, base_model=t.base, rank=8, quantization="4bit",
                                   uri="store://a/q", size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=2)
    options = {"adapter": [qlora.pk], "prompt": ["Double 4"], "prompt_set": None, "base_model": None,
               "max_new_tokens": None, "name": "", "no_base": False, "wait": False, "quiet": True}  # fmt: skip
    api = api_for(t.mate)
    assert cli.compare(args(**options, base_precision="bfloat16"), api) == OK
    assert cli.compare(args(**options, base_precision="auto"), api) == OK
    loads = [c.job.params["load"] for c in Comparison.objects.order_by("id")]
    assert loads == [{"quantization": "none", "compute_dtype": "bfloat16"}, {"quantization": "4bit", "compute_dtype": "auto"}]
    capsys.readouterr()
    latest = Comparison.objects.order_by("id").last()
    assert latest is not None
    AdapterJob.objects.filter(pk=latest.job_id).update(result={
        "base_precision": "4-bit NF4 double-quant (compute bfloat16)",
        "stop_tokens": [{"text": "<|im_end|>", "token_id": 7, "why": "end of turn"}]})  # fmt: skip
    assert cli.compare_show(args(id=latest.pk), api) == OK
    out = capsys.readouterr().out
    assert "base: 4-bit NF4 double-quant (compute bfloat16) (base precision auto)" in out
    assert "answers stop at: <|im_end|> (end of turn)" in out


def test_the_cli_lists_and_shows_prompt_sets(api_team: Team, api_for: Any, capsys: pytest.CaptureFixture[str]) -> None:
    t = api_team
    PromptSet.objects.create(
        name="arith", owner=t.owner, rows=[{"prompt": "1+1=", "reference": "2"}, {"prompt": "2+2=", "reference": ""}]
    )
    latest = PromptSet.objects.create(name="greetings", owner=t.mate, rows=[{"prompt": "hello", "reference": ""}])
    api = api_for(t.mate)
    assert cli.prompt_sets_list(args(limit=50, owner=None), api) == OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "OWNER", "PROMPTS", "REFERENCES", "DATASET", "CREATED"]
    assert lines[1].split()[:5] == [str(latest.pk), "greetings", "mate", "1", "False"] and "arith" in lines[2]
    assert cli.prompt_sets_list(args(limit=50, owner="me", json=True), api) == OK
    assert [p["name"] for p in json.loads(capsys.readouterr().out)] == ["greetings"]
    arith = PromptSet.objects.get(name="arith")
    assert cli.prompt_sets_show(args(id=arith.pk), api) == OK
    out = capsys.readouterr().out
    assert "name            arith" in out and "1+1=    2" in out and "ROW  PROMPT  REFERENCE" in out
    with pytest.raises(CliError) as missing:
        cli.prompt_sets_show(args(id=999999), api)
    assert missing.value.code == NOT_FOUND


def test_the_vote_page_never_shows_which_output_is_whose_before_the_vote(client: Client, api_team: Team) -> None:
    """The page's buttons post option letters: neither a column key nor a name is in the page's source."""
    from webapp.playground import votes

    t = api_team
    comparison = comparison_of(t)
    assert client.login(username="mate", password="pw-mate-123")
    page = f"/compare/{comparison.pk}/vote/"
    source = client.get(page).content.decode()
    for key, label in comparison.columns():
        assert f'value="{key}"' not in source and label not in source
    letters = dict(votes.options(comparison, t.mate.pk, 0))
    assert sorted(f'value="{letter}"' in source for letter in letters) == [True] * len(letters)
    letter, key = next(iter(letters.items()))
    reply = client.post(page, {"row": 0, "choice": letter}, HTTP_HX_REQUEST="true")
    assert reply.status_code == 200 and dict(comparison.columns())[key] in reply.content.decode()
    assert Vote.objects.get(comparison=comparison, user=t.mate, row=0).choice == key
    refused = client.post(page, {"row": 1, "choice": key})  # a column key is not an option of the ballot
    assert refused.status_code == 400 and "pick one of" in refused.content.decode()
