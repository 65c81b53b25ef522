"""The merged models page (/merged/) and the navigation's links to it and to the adapter jobs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from django.test import Client

from tests.webapp.team import login, make
from webapp.playground import services
from webapp.playground.models import MergedModel
from webapp.training.models import Adapter

pytestmark = pytest.mark.django_db
CREATED = datetime(2026, 12, 5, 7, 10, 54, tzinfo=UTC)


def merged(team: Any, name: str, verified: bool, **figures: Any) -> MergedModel:
    run = make(team, state="succeeded")
    adapter = Adapter.objects.create(run=run, name=name, owner=run.owner, base_model=run.base_model, uri=f"file:///{name}",
                                     size_bytes=10, sha256="0" * 64, trainable_params=1, total_params=10)
    job = services.start_merge(run.owner, adapter, "bfloat16")
    model = MergedModel.objects.create(adapter=adapter, job=job, uri=f"store://jobs/{job.pk}/output", dtype="bfloat16",
                                       size_bytes=15 * 2**30 + 2**29, sha256="f" * 64, verified=verified, figures=figures)
    MergedModel.objects.filter(pk=model.pk).update(created_at=CREATED)
    return model


def test_the_navigation_links_to_the_jobs_and_the_merged_models(team: Any, client: Client) -> None:
    login(client, "mate")
    nav = client.get("/runs/").content.decode().split("<nav>")[1].split("</nav>")[0]
    assert '<a href="/jobs/">Jobs</a>' in nav and '<a href="/merged/">Merged models</a>' in nav


def test_the_merged_models_page_lists_each_with_its_adapter_check_size_and_download(
        team: Any, client: Client, django_assert_max_num_queries: Any) -> None:
    good = merged(team, "<b>support</b>", True, max_abs_logit_diff=0.000019550323486328125, greedy_agreement=1.0)
    bad = merged(team, "sales", False, max_abs_logit_diff=3.5, greedy_agreement=0.25)
    login(client, "mate")
    with django_assert_max_num_queries(6):
        page = client.get("/merged/").content.decode()
    assert page.index(f'id="merged-{bad.pk}"') < page.index(f'id="merged-{good.pk}"')  # newest first
    row = page[page.index(f'id="merged-{good.pk}"'):]
    row = row[:row.index("</tr>")]
    assert f'href="/adapters/{good.adapter_id}/"' in row and "&lt;b&gt;support&lt;/b&gt;" in row and "<b>support" not in row
    assert "base-0" in row and "bfloat16" in row and "verified" in row
    assert "1.96e-5" in row and "100.0%" in row and "15.5 GiB" in row
    assert f'href="/jobs/{good.job_id}/"' in row and f'href="/merged/{good.pk}/download.zip"' in row
    assert 'title="2026-12-05 07:10 UTC">' in row and "owner" in row
    bad_row = page[page.index(f'id="merged-{bad.pk}"'):]
    assert "check failed" in bad_row[:bad_row.index("</tr>")] and "3.5" in bad_row and "25.0%" in bad_row
    for i in range(10):
        merged(team, f"more-{i}", True)
    with django_assert_max_num_queries(6):
        assert client.get("/merged/").status_code == 200


def test_the_merged_models_page_says_how_to_make_one_and_needs_a_login(team: Any, client: Client) -> None:
    assert client.get("/merged/").status_code == 302
    login(client, "mate")
    page = client.get("/merged/").content.decode()
    assert "No merged models yet" in page and 'href="/adapters/"' in page
