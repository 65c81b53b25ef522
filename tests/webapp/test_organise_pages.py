"""Tags, notes, aliases and usage on the pages: the inline editor (escaped, refusals shown and nothing lost), chips that
filter the lists, free-text search, the adapter page's alias form and history, and the overview's usage table."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from tests.webapp.evaluations import record_evaluation
from tests.webapp.team import login, make
from webapp.catalog.models import Dataset
from webapp.playground.models import AdapterAlias
from webapp.training.models import Adapter, TrainingRun
from webapp.training.organise import set_labels

pytestmark = pytest.mark.django_db


def adapter_of(run: TrainingRun, name: str) -> Adapter:
    return Adapter.objects.create(run=run, name=name, owner=run.owner, base_model=run.base_model, uri="store://x",
                                  size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=2)


def test_the_owner_edits_tags_and_note_inline_and_the_page_escapes_them(client: Client, team: Any) -> None:
    run = make(team, name="first")
    login(client, "owner")
    response = client.post(f"/runs/{run.pk}/labels/", {"tags": "baseline, <script>x", "note": "<b>hi</b>"},
                           HTTP_HX_REQUEST="true")
    text = response.content.decode()
    assert response.status_code == 200 and "is not a tag" in text and "&lt;script&gt;x" in text
    assert 'value="baseline, &lt;script&gt;x"' in text and "&lt;b&gt;hi&lt;/b&gt;</textarea>" in text  # kept as typed
    run.refresh_from_db()
    assert (list(run.tags.all()), run.note) == ([], "")  # a refusal stores nothing

    response = client.post(f"/runs/{run.pk}/labels/", {"tags": "baseline lr-sweep", "note": "<b>hi</b>\nsecond"},
                           HTTP_HX_REQUEST="true")
    text = response.content.decode()
    assert '<a class="tag-chip" href="/runs/?tag=baseline"' in text and "&lt;b&gt;hi&lt;/b&gt;<br>second" in text
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "&lt;b&gt;hi&lt;/b&gt;" in page and "<b>hi</b>" not in page and 'id="labels-save"' in page


def test_a_teammate_sees_the_labels_but_cannot_edit_them(client: Client, team: Any) -> None:
    run = make(team)
    set_labels(run, ["shared"], "the owner's note")
    login(client, "mate")
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "the owner&#x27;s note" in page and 'id="labels-save"' not in page
    assert client.post(f"/runs/{run.pk}/labels/", {"tags": "mine"}).status_code == 403
    assert [t.name for t in run.tags.all()] == ["shared"]


def test_chips_filter_the_runs_list_and_search_finds_names_notes_and_tags(client: Client, team: Any) -> None:
    a, b, c = make(team, name="alpha"), make(team, name="beta"), make(team, name="gamma")
    set_labels(a, ["prod"])
    set_labels(b, ["prod", "llama"], "mixed alpaca")
    set_labels(c, [], "")
    login(client, "mate")

    def rows(query: str) -> list[int]:
        context = client.get(f"/runs/{query}").context
        return [run.pk for run in context["runs"]]

    page = client.get("/runs/").content.decode()
    assert '<a class="tag-chip" href="/runs/?tag=llama"' in page
    assert rows("?tag=prod") == [b.pk, a.pk] and rows("?tag=prod&tag=llama") == [b.pk]
    assert rows("?q=ALPACA") == [b.pk] and rows("?q=gam") == [c.pk] and rows("?q=llama") == [b.pk]
    filtered = client.get("/runs/?tag=prod&tag=llama").content.decode()
    # Each active tag's chip removes itself from the filter.
    assert 'href="?tag=llama"' in filtered and 'href="?tag=prod"' in filtered
    assert client.get("/runs/?tag=prod", HTTP_HX_REQUEST="true").status_code == 200


def test_chips_and_search_on_the_adapters_list(client: Client, team: Any) -> None:
    one, two = adapter_of(make(team), "one"), adapter_of(make(team), "two")
    set_labels(one, ["candidate"], "the one with <i>more</i> data")
    login(client, "owner")
    page = client.get("/adapters/?tag=candidate").content.decode()
    assert f'href="/adapters/{one.pk}/"' in page and f'href="/adapters/{two.pk}/"' not in page
    page = client.get("/adapters/?q=more").content.decode()
    assert f'href="/adapters/{one.pk}/"' in page and f'href="/adapters/{two.pk}/"' not in page
    assert "No adapters match." in client.get("/adapters/?q=nothing-like-this").content.decode()
    detail = client.get(f"/adapters/{one.pk}/").content.decode()
    assert "the one with &lt;i&gt;more&lt;/i&gt; data" in detail and 'href="/adapters/?tag=candidate"' in detail


def test_the_adapter_page_moves_an_alias_and_shows_a_refusal_with_the_scores(client: Client, team: Any) -> None:
    users = team[0]
    holder, worse = adapter_of(make(team), "holder"), adapter_of(make(team), "worse")
    evalset = Dataset.objects.create(name="qa-eval", uri="store://d/qa.jsonl", original_filename="qa.jsonl",
                                     format="alpaca", row_count=10, size_bytes=100, sha256="0" * 64)
    record_evaluation(users["owner"], evalset, {holder: {"rouge_l": 0.6}, worse: {"rouge_l": 0.4}})
    login(client, "mate")
    page = client.post(f"/adapters/{holder.pk}/alias/", {"name": "production"}, follow=True).content.decode()
    assert "production moved to holder" in page and '<span class="alias-chip">production</span>' in page

    page = client.post(f"/adapters/{worse.pk}/alias/", {"name": "production", "require": "on",
                                                         "dataset": evalset.pk, "metric": "rouge_l", "margin": "0"},
                       follow=True).content.decode()
    assert ("Not moved: worse does not beat the current holder by 0: ROUGE-L on qa-eval: worse 0.4 vs the current "
            "holder holder 0.6") in page
    assert 'data-outcome="refused"' in page and "No alias points at this adapter." in page
    assert AdapterAlias.objects.get(name="production").adapter_id == holder.pk

    page = client.post(f"/adapters/{worse.pk}/alias/", {"name": "production", "require": "on"},
                       follow=True).content.decode()
    assert "Alias not moved: dataset: choose the evaluation set" in page


def test_the_run_page_shows_its_usage_and_the_overview_the_teams(client: Client, team: Any) -> None:
    start = timezone.now() - dt.timedelta(hours=5)
    log = [{"attempt": 1, "worker": "w", "outcome": "succeeded", "reason": "", "at": (start + dt.timedelta(hours=3))
            .isoformat(), "started": start.isoformat(), "gpus": 2}]
    run = make(team, state="succeeded", attempt=1, attempt_log=log, finished_at=start + dt.timedelta(hours=3))
    adapter = adapter_of(run, "a")
    Adapter.objects.filter(pk=adapter.pk).update(metrics={"trained_tokens": 1_234_000})
    login(client, "mate")
    page = client.get(f"/runs/{run.pk}/").content.decode()
    shown = page.split('id="run-usage"')[1][:600]
    assert ">6 GPU-hours<" in shown and "1.23M tokens trained" in shown  # 3 h on 2 GPUs
    overview = client.get("/").content.decode()
    assert 'hx-get="/usage/" hx-trigger="load"' in overview
    panel = client.get("/usage/", HTTP_HX_REQUEST="true").content.decode()
    assert "<html" not in panel and 'id="usage-users"' in panel
    assert "<td>owner</td><td>6</td><td>1.23M</td><td>1</td>" in panel.replace("\n", "")
    assert "<html" in client.get("/usage/").content.decode()
