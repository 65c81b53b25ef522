"""Votes and thumbs become training data: the pairs a comparison's blind votes give (winners against every column
with fewer votes, weighted by the margin; ties, unvoted rows and identical texts left out and counted), the
dataset registered like an upload with its provenance, thumbs, the pages, the REST API and the CLI."""

from __future__ import annotations

import argparse
import json
import re
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
from tests.webapp.factories import make_run
from tunedeck_cli import adapters as cli
from tunedeck_cli.api import Api
from tunedeck_cli.config import Settings
from tunedeck_cli.errors import FAILED, OK, USAGE, CliError
from webapp.catalog.models import Dataset
from webapp.playground import services, thumbs, votedata, votes
from webapp.playground.models import AdapterJob, Comparison, PromptSet, Thumb, VoteDataset
from webapp.training.models import Adapter
from workers.contract import jobspecs
from workers.contract.store import ArtifactStore
from workers.data.datasets import load_trl_rows, validate_bytes

ROWS = 6
SUMMARY = "4 pairs from 2 rows; 2 rows tied, 2 rows unvoted, 1 pair of identical texts left out"


@pytest.fixture
def team(tiny_model_dir: Path, store_dir: Path, db: Any) -> Team:
    t = make_team(tiny_model_dir)
    t.voter = get_user_model().objects.create_user("voter", password="pw-voter-123")  # type: ignore[attr-defined]
    return t


def finished_comparison(team: Team, turns: bool = False, finished: bool = True) -> Comparison:
    """The base and two adapters (`first`, `second`) on ROWS prompts; on row 3 both adapters wrote the same text."""
    adapters = [Adapter.objects.create(name=name, owner=team.owner, base_model=team.base, rank=8, uri=f"store://{name}",
                                       size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=2)
                for name in ("first", "second")]
    rows = [{"prompt": f"prompt {r}", "reference": ""} for r in range(ROWS)]
    if turns:
        rows[0] = {"prompt": "system: be brief\nuser: prompt 0", "reference": "",
                   "turns": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "prompt 0"}]}
    prompts = PromptSet.objects.create(name="six", owner=team.owner, rows=rows)
    comparison = services.start_compare(team.owner, prompts, adapters, jobspecs.GenerationParams(max_new_tokens=8),
                                        name="arith")
    outputs = [{"row": r, "column": key, "text": f"{label} says {r}"} for r in range(ROWS) for key, label in
               comparison.columns()]
    for out in outputs:
        if out["row"] == 3 and out["column"] != jobspecs.BASE_KEY:
            out["text"] = "both adapters say 3"
    comparison.store_outputs(outputs)
    if finished:
        AdapterJob.objects.filter(pk=comparison.job_id).update(state="succeeded")
    return Comparison.objects.select_related("job", "prompt_set", "base_model").get(pk=comparison.pk)


def keys(comparison: Comparison) -> tuple[str, str, str]:
    base, first, second = (key for key, _ in comparison.columns())
    return base, first, second


def cast_votes(team: Team, comparison: Comparison) -> None:
    """Row 0: first 3 times, base once. Row 1: two ties. Row 2: nobody. Row 3: first twice (first and second wrote the same
    text). Row 4: one vote each (level). Row 5: nobody. 11 votes in all."""
    base, first, second = keys(comparison)
    ballots = {
        0: [(team.owner, first), (team.mate, first), (team.boss, first), (team.voter, base)],  # type: ignore[attr-defined]
        1: [(team.owner, "tie"), (team.mate, "tie")],
        3: [(team.owner, first), (team.mate, first)],
        4: [(team.owner, first), (team.mate, second), (team.boss, base)],
    }
    for row, cast in ballots.items():
        for user, choice in cast:
            votes.cast(comparison, user, row, choice)


# --- the pairs ------------------------------------------------------------------------------------------------


def test_winners_pair_with_every_column_with_fewer_votes_weighted_by_the_margin(team: Team) -> None:
    comparison = finished_comparison(team)
    cast_votes(team, comparison)
    pairs, figures = votedata.preference_rows(comparison)
    label = dict(comparison.columns())
    base, first, second = keys(comparison)
    said = {key: label[key] for key in (base, first, second)}
    assert [(p["prompt"], p["chosen"], p["rejected"], p["weight"]) for p in pairs] == [
        ("prompt 0", f"{said[first]} says 0", f"{said[second]} says 0", 3),
        ("prompt 0", f"{said[first]} says 0", f"{said[base]} says 0", 2),
        ("prompt 0", f"{said[base]} says 0", f"{said[second]} says 0", 1),
        ("prompt 3", "both adapters say 3", f"{said[base]} says 3", 2),
    ]
    assert (figures.examples, figures.rows, figures.tied_rows, figures.unvoted_rows, figures.identical_pairs,
            figures.judgements) == (4, 2, 2, 2, 1, 11)
    assert figures.summary() == SUMMARY
    assert votedata.winning_adapter_id(comparison) == int(first.removeprefix("a"))


def test_a_chat_shaped_prompt_set_gives_conversational_pairs_that_dpo_reads(team: Team, store_dir: Path) -> None:
    comparison = finished_comparison(team, turns=True)
    cast_votes(team, comparison)
    source = votedata.make_dataset(comparison, team.mate, "preference")
    first = json.loads(ArtifactStore(store_dir).path(source.dataset.uri).read_text().splitlines()[0])
    assert first["prompt"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "prompt 0"}]
    assert first["chosen"] == [{"role": "assistant", "content": "first says 0"}] and first["weight"] == 3
    fmt, rows = load_trl_rows(ArtifactStore(store_dir).path(source.dataset.uri))
    assert fmt == "preference" and len(rows) == 4
    assert rows[3]["prompt"] == [{"role": "user", "content": "prompt 3"}]  # a typed prompt as a user turn


def test_the_preference_validator_accepts_the_weight_field() -> None:
    line = {"prompt": "p", "chosen": "a", "rejected": "b", "weight": 2}
    report = validate_bytes((json.dumps(line) + "\n").encode(), "pairs.jsonl")
    assert report.ok and report.format == "preference", report.problems


def test_empty_outputs_and_a_base_win_are_left_out_of_pairs_and_the_start(team: Team) -> None:
    comparison = finished_comparison(team)
    base, first, second = keys(comparison)
    comparison.cells.filter(row=0, column=second).update(text="")
    for user in (team.owner, team.mate):
        votes.cast(comparison, user, 0, base)
    votes.cast(comparison, team.boss, 0, first)
    pairs, figures = votedata.preference_rows(comparison)
    assert [(p["chosen"], p["rejected"], p["weight"]) for p in pairs] == [("tiny (base) says 0", "first says 0", 1)]
    assert figures.empty_outputs == 2 and "2 empty outputs left out" in figures.summary()
    assert votedata.winning_adapter_id(comparison) is None  # the base won: a run starts from the base


# --- the dataset and its provenance ---------------------------------------------------------------------------


def test_a_dataset_is_registered_like_an_upload_with_its_provenance(team: Team, store_dir: Path) -> None:
    comparison = finished_comparison(team)
    cast_votes(team, comparison)
    source = votedata.make_dataset(comparison, team.mate, "preference")
    dataset = source.dataset
    assert dataset.name == "votes of arith" and dataset.format == "preference" and dataset.row_count == 4
    assert dataset.original_filename == "preference.jsonl" and dataset.created_by == team.mate
    assert len(dataset.preview_rows()) == 4
    stored = ArtifactStore(store_dir).path(dataset.uri).read_text().splitlines()
    assert [json.loads(line)["weight"] for line in stored] == [3, 2, 1, 2]
    assert (source.comparison, source.judgements, source.summary, source.created_by) == (comparison, 11, SUMMARY,
                                                                                        team.mate)
    first = keys(comparison)[1]
    assert source.winner is not None and source.winner.key == first
    assert source.train_url() == (f"/runs/new/?objective=dpo&dataset={dataset.pk}&base_model={team.base.pk}"
                                  f"&init_adapter={source.winner.pk}")
    assert votedata.make_dataset(comparison, team.mate, "preference").dataset.name == "votes of arith (2)"


def test_refusals_name_the_field_or_say_what_was_left_out(team: Team) -> None:
    unfinished = finished_comparison(team, finished=False)
    with pytest.raises(votedata.DatasetRefused) as early:
        votedata.make_dataset(unfinished, team.mate, "preference")
    assert early.value.status == 409 and "has not finished" in early.value.message
    comparison = finished_comparison(team)
    with pytest.raises(votedata.DatasetRefused) as nothing:
        votedata.make_dataset(comparison, team.mate, "preference")
    assert nothing.value.status == 409 and "6 rows unvoted left out" in nothing.value.message
    cast_votes(team, comparison)
    with pytest.raises(votedata.DatasetRefused) as kind:
        votedata.make_dataset(comparison, team.mate, "ranking")
    assert kind.value.field == "kind"
    with pytest.raises(votedata.DatasetRefused) as taken:
        votedata.make_dataset(comparison, team.mate, "preference", name=team.dataset.name)
    assert taken.value.field == "name" and "exists already" in taken.value.message
    assert not VoteDataset.objects.exists() and Dataset.objects.count() == 1


# --- thumbs -------------------------------------------------------------------------------------------------


def test_thumbs_one_per_person_per_output_turned_over_or_taken_back(team: Team) -> None:
    comparison = finished_comparison(team)
    base, first, _ = keys(comparison)
    thumbs.give(comparison, team.owner, 0, first, "up")
    thumbs.give(comparison, team.mate, 0, first, "up")
    thumbs.give(comparison, team.owner, 0, first, "down")  # turned over
    assert thumbs.tally(comparison, team.owner, 0, first) == {"up": 1, "down": 1, "mine": "down"}
    thumbs.give(comparison, team.owner, 0, first, "none")
    assert thumbs.tally(comparison, team.mate, 0, first) == {"up": 1, "down": 0, "mine": "up"}
    assert Thumb.objects.count() == 1
    with pytest.raises(votes.VoteRefused) as column:
        thumbs.give(comparison, team.owner, 0, "a999999", "up")
    assert column.value.field == "column"
    with pytest.raises(votes.VoteRefused) as value:
        thumbs.give(comparison, team.owner, 0, base, "sideways")
    assert value.value.field == "value"
    with pytest.raises(votes.VoteRefused) as early:
        thumbs.give(finished_comparison(team, finished=False), team.owner, 0, base, "up")
    assert early.value.status == 409


def test_feedback_rows_take_the_majority_and_leave_split_outputs_out(team: Team) -> None:
    comparison = finished_comparison(team)
    base, first, second = keys(comparison)
    for user in (team.owner, team.mate):
        thumbs.give(comparison, user, 0, first, "up")
    thumbs.give(comparison, team.boss, 0, first, "down")
    thumbs.give(comparison, team.owner, 1, base, "down")
    thumbs.give(comparison, team.owner, 2, second, "up")
    thumbs.give(comparison, team.mate, 2, second, "down")
    rows, figures = votedata.feedback_rows(comparison)
    assert rows == [{"prompt": "prompt 0", "completion": "first says 0", "label": True},
                    {"prompt": "prompt 1", "completion": "tiny (base) says 1", "label": False}]
    assert (figures.judgements, figures.desirable, figures.undesirable, figures.split_outputs, figures.rows) == (
        6, 1, 1, 1, 2)
    assert figures.summary() == "2 feedback rows (1 up, 1 down) from 2 prompts; 1 output with split thumbs left out"


# --- pages --------------------------------------------------------------------------------------------------


def logged_in(client: Client, username: str, password: str) -> Client:
    assert client.login(username=username, password=password)
    return client


def test_the_pages_make_a_dataset_show_where_it_came_from_and_prefill_a_dpo_run(client: Client, team: Team) -> None:
    comparison = finished_comparison(team)
    cast_votes(team, comparison)
    logged_in(client, "mate", "pw-mate-123")
    page = client.get(f"/compare/{comparison.pk}/").content.decode()
    assert SUMMARY in page and 'id="make-preference"' in page and 'class="thumbs"' in page

    made = client.post(f"/compare/{comparison.pk}/to-dataset/", {"kind": "preference", "name": "arith <b>votes</b>"},
                       follow=True)
    source = VoteDataset.objects.get()
    assert made.redirect_chain[-1][0] == f"/datasets/{source.dataset_id}/"
    text = made.content.decode()
    assert f"Made arith &lt;b&gt;votes&lt;/b&gt;: {SUMMARY}." in text and "<b>votes</b>" not in text
    assert "Made from" in text and f'href="/compare/{comparison.pk}/">comparison arith</a>' in text
    assert "11 blind votes <small class=\"muted\">(the dataset made by mate" in text and "Train DPO on these votes" in text
    train_url = source.train_url().replace("&", "&amp;")
    assert f'href="{train_url}"' in text and "starting from first, the adapter that won the most votes" in text

    form = client.get(source.train_url()).content.decode()  # the New run page, filled in
    assert re.search(r'<option value="dpo" selected[ >]', form)
    assert re.search(rf'<option value="{source.dataset_id}" selected[^>]*>arith &lt;b&gt;votes&lt;/b&gt; '
                     r'\(preference rows\)</option>', form)

    download = client.get(f"/datasets/{source.dataset_id}/file")
    assert download.status_code == 200 and b'"weight": 3' in b"".join(download.streaming_content)  # type: ignore[attr-defined]
    assert "arith &lt;b&gt;votes&lt;/b&gt;" in client.get(f"/compare/{comparison.pk}/").content.decode()

    run = make_run(team.owner, team.base, source.dataset, team.config, objective="dpo")
    adapter = Adapter.objects.create(name="from votes", owner=team.owner, base_model=team.base, run=run, rank=8,
                                     uri="store://v", size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=2)
    lineage = client.get(f"/adapters/{adapter.pk}/").content.decode()
    assert f'href="/compare/{comparison.pk}/">comparison arith</a>\'s 11 votes' in lineage


def test_a_refusal_on_the_page_says_why_and_makes_nothing(client: Client, team: Team) -> None:
    comparison = finished_comparison(team)
    logged_in(client, "mate", "pw-mate-123")
    answer = client.post(f"/compare/{comparison.pk}/to-dataset/", {"kind": "preference"}, follow=True)
    assert "No dataset made: the votes give no rows: 0 pairs from 0 rows; 6 rows unvoted left out" in (
        answer.content.decode())
    assert not VoteDataset.objects.exists()


def test_thumbs_on_the_grid_swap_their_buttons(client: Client, team: Team) -> None:
    comparison = finished_comparison(team)
    first = keys(comparison)[1]
    logged_in(client, "mate", "pw-mate-123")
    answer = client.post(f"/compare/{comparison.pk}/thumbs/", {"row": 2, "column": first, "value": "up"},
                         HTTP_HX_REQUEST="true")
    assert answer.status_code == 200
    part = answer.content.decode()
    assert f'id="thumbs-2-{first}"' in part and 'aria-pressed="true"' in part and 'value="none"' in part
    bad = client.post(f"/compare/{comparison.pk}/thumbs/", {"row": 2, "column": "<script>", "value": "up"})
    assert bad.status_code == 400 and b"<script>" not in bad.content
    assert Thumb.objects.get().up is True


def test_only_people_who_can_see_the_comparison_make_datasets_or_give_thumbs(client: Client, team: Team) -> None:
    comparison = finished_comparison(team)
    cast_votes(team, comparison)
    answer = client.post(f"/compare/{comparison.pk}/to-dataset/", {"kind": "preference"})
    assert answer.status_code == 302 and answer["Location"].startswith("/login/")
    assert client.post(f"/compare/{comparison.pk}/thumbs/", {"row": 0, "column": "x", "value": "up"}).status_code == 302
    api = client.post(f"/api/v1/comparisons/{comparison.pk}/to-dataset/", {}, content_type="application/json")
    assert api.status_code in (401, 403)
    read_only = client.post(f"/api/v1/comparisons/{comparison.pk}/to-dataset/", {}, content_type="application/json",
                            **bearer(key_for(team.mate, "read")))
    assert read_only.status_code == 403
    get_user_model().objects.filter(pk=team.mate.pk).update(is_active=False)
    inactive = client.post(f"/api/v1/comparisons/{comparison.pk}/to-dataset/", {}, content_type="application/json",
                           **bearer(key_for(team.mate)))
    assert inactive.status_code in (401, 403)
    assert not VoteDataset.objects.exists() and not Thumb.objects.exists()


# --- the REST API and the CLI ----------------------------------------------------------------------------------


def post(client: Client, path: str, body: Any, raw: str) -> Any:
    return client.post(path, json.dumps(body), content_type="application/json", **bearer(raw))


def test_the_api_makes_a_dataset_and_returns_the_counts_and_the_run_to_train(client: Client, team: Team) -> None:
    comparison = finished_comparison(team)
    cast_votes(team, comparison)
    raw = key_for(team.mate)
    url = f"/api/v1/comparisons/{comparison.pk}/to-dataset/"
    made = post(client, url, {"kind": "preference", "name": "api votes"}, raw)
    assert made.status_code == 201, made.content
    body = made.json()
    assert body["dataset"]["name"] == "api votes" and body["dataset"]["format"] == "preference"
    assert body["dataset"]["row_count"] == 4 and body["kind"] == "preference" and body["judgements"] == 11
    assert body["summary"] == SUMMARY and body["comparison"] == comparison.pk and body["created_by"] == "mate"
    assert body["figures"]["tied_rows"] == 2 and body["figures"]["unvoted_rows"] == 2
    assert body["figures"]["identical_pairs"] == 1
    winner = VoteDataset.objects.get().winner
    assert body["train"] == {"objective": "dpo", "dataset": body["dataset"]["id"], "base_model": team.base.pk,
                             "init_adapter": winner.pk if winner else None}
    listed = client.get(f"/api/v1/datasets/{body['dataset']['id']}/", **bearer(raw))
    assert listed.status_code == 200 and listed.json()["row_count"] == 4
    made_from = listed.json()["made_from"]
    assert (made_from["comparison"], made_from["kind"], made_from["judgements"]) == (comparison.pk, "preference", 11)
    assert made_from["summary"] == SUMMARY and made_from["winner"] == (winner.pk if winner else None)
    upload = client.get(f"/api/v1/datasets/{team.dataset.pk}/", **bearer(raw))
    assert upload.status_code == 200 and upload.json()["made_from"] is None

    taken = post(client, url, {"name": "api votes"}, raw)
    assert taken.status_code == 400 and "exists already" in taken.json()["errors"]["name"][0]
    bad = post(client, url, {"kind": "ranking"}, raw)
    assert bad.status_code == 400 and "kind" in bad.json()["errors"]
    empty = finished_comparison(team)
    assert "6 rows unvoted" in problem_of(post(client, f"/api/v1/comparisons/{empty.pk}/to-dataset/", {}, raw),
                                          409)["detail"]


def test_thumbs_over_the_api(client: Client, team: Team) -> None:
    comparison = finished_comparison(team)
    first = keys(comparison)[1]
    url = f"/api/v1/comparisons/{comparison.pk}/thumbs/"
    given = post(client, url, {"row": 1, "column": first, "value": "down"}, key_for(team.mate))
    assert given.status_code == 200, given.content
    assert given.json() == {"row": 1, "column": first, "up": 0, "down": 1, "mine": "down"}
    post(client, url, {"row": 1, "column": first, "value": "up"}, key_for(team.owner))
    listed = client.get(url, **bearer(key_for(team.owner))).json()
    assert listed == [{"row": 1, "column": first, "up": 1, "down": 1, "mine": "up"}]
    bad = post(client, url, {"row": 99, "column": first, "value": "up"}, key_for(team.owner))
    assert bad.status_code == 400 and "row" in bad.json()["errors"]


@pytest.fixture
def api_for(team: Team) -> Iterator[Any]:
    """The CLI's `Api`, its requests going to this process's Django through WSGI (see test_api_votes.py)."""
    opened: list[Api] = []
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)

    def make(user: Any, *scopes: str) -> Api:
        api = Api(Settings(server="http://testserver", api_key=key_for(user, *scopes), source="test"))
        api.http = httpx.Client(transport=httpx.WSGITransport(app=WSGIHandler()), base_url=api.http.base_url,
                                headers=api.http.headers)
        opened.append(api)
        return api

    try:
        yield make
    finally:
        for api in opened:
            api.close()
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def test_the_cli_makes_a_dataset_and_prints_the_counts(
    team: Team, api_for: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    comparison = finished_comparison(team)
    api = api_for(team.mate)
    with pytest.raises(CliError) as nothing:
        cli.comparisons_to_dataset(argparse.Namespace(id=comparison.pk, kind="preference", name=None, json=False), api)
    assert nothing.value.code == FAILED and "6 rows unvoted" in nothing.value.message
    cast_votes(team, comparison)
    args = argparse.Namespace(id=comparison.pk, kind="preference", name="cli votes", json=False)
    assert cli.comparisons_to_dataset(args, api) == OK
    captured = capsys.readouterr()
    dataset = Dataset.objects.get(name="cli votes")
    assert f"Dataset {dataset.pk} 'cli votes' (preference, 4 rows) from comparison {comparison.pk}'s 11 votes" in (
        captured.out)
    assert SUMMARY in captured.out and f"objective: dpo, dataset: {dataset.pk}" in captured.err
    with pytest.raises(CliError) as taken:
        cli.comparisons_to_dataset(args, api)
    assert taken.value.code == USAGE and any("exists already" in line for line in taken.value.details)


def test_a_feedback_dataset_of_thumbs_over_the_api_and_one_with_a_single_label_refused(
    client: Client, team: Team, store_dir: Path
) -> None:
    comparison = finished_comparison(team)
    base, first, _ = keys(comparison)
    url = f"/api/v1/comparisons/{comparison.pk}/to-dataset/"
    raw = key_for(team.mate)
    thumbs.give(comparison, team.mate, 0, first, "up")
    single = problem_of(post(client, url, {"kind": "feedback"}, raw), 422)
    assert "both" in single["detail"] and not VoteDataset.objects.exists()
    thumbs.give(comparison, team.owner, 0, base, "down")
    made = post(client, url, {"kind": "feedback"}, raw)
    assert made.status_code == 201, made.content
    body = made.json()
    assert body["dataset"]["name"] == "thumbs of arith" and body["dataset"]["format"] == "feedback"
    assert body["train"]["objective"] == "kto" and body["judgements"] == 2
    assert body["summary"] == "2 feedback rows (1 up, 1 down) from 1 prompt"
    fmt, rows = load_trl_rows(ArtifactStore(store_dir).path(Dataset.objects.get(pk=body["dataset"]["id"]).uri))
    assert fmt == "feedback" and sorted(row["label"] for row in rows) == [False, True]


def test_the_cli_command_line_reads_the_kind_and_name() -> None:
    from webapp.cli import build_parser

    parsed = build_parser().parse_args(["comparisons", "to-dataset", "7", "--kind", "feedback", "--name", "mine"])
    assert (parsed.id, parsed.kind, parsed.name) == (7, "feedback", "mine")
    assert build_parser().parse_args(["comparisons", "to-dataset", "7"]).kind == "preference"
