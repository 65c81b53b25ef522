"""Every page writes figures, percentages, sizes and times by the rules of workers/formatting.py."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from tests.webapp.team import login, make
from webapp.catalog.models import Dataset
from webapp.fleet.models import Worker
from webapp.jobs.ledger import record_events
from webapp.playground import services
from webapp.playground.models import MergedModel
from webapp.training.models import Adapter, RunEvent, TrainingRun

pytestmark = pytest.mark.django_db
CREATED = datetime(2026, 12, 5, 7, 10, 54, tzinfo=UTC)
TIME = '<time datetime="2026-12-05T07:10:54Z">2026-12-05 07:10 UTC</time>'
# What the old pages wrote: Django's default date format, raw floats, Python's exponents, filesizeformat.
RAW = (r"Dec\. 5, 2026", r"a\.m\.", r"0\.000019550323486328125", r"\de[+-]0\d", r"\xa0KB", r"\xa0bytes")


def text_of(client: Client, path: str) -> str:
    response = client.get(path)
    assert response.status_code == 200, path
    return response.content.decode()


def assert_no_raw(page: str) -> None:
    for raw in RAW:
        assert not re.search(raw, page), raw


def test_the_run_page_writes_times_steps_losses_and_chart_axes_by_one_rule(team: Any, client: Client) -> None:
    run = make(team, state="running", attempt=1)
    record_events(run, 1, [
        {"seq": 1, "kind": "metric", "data": {"step": 10, "total_steps": 4000, "loss": 2.3456, "learning_rate": 2e-4,
                                             "tokens_per_s": 19660.4}},
        {"seq": 2, "kind": "metric", "data": {"step": 1200, "total_steps": 4000, "loss": 0.000019550323486328125,
                                             "learning_rate": 1e-4, "tokens_per_s": 1.966e4}},
        {"seq": 3, "kind": "checkpoint", "data": {"step": 1200}, "message": "Checkpoint saved at step 1200"},
    ])
    TrainingRun.objects.filter(pk=run.pk).update(created_at=CREATED)
    RunEvent.objects.filter(run=run, kind="checkpoint").update(created_at=CREATED)
    login(client, "mate")
    page = text_of(client, f"/runs/{run.pk}/")
    assert page.count(TIME) == 2  # created, and the checkpoint's time
    assert "1,200 / 4,000" in page and 'id="latest-loss">1.96e-5<' in page
    latest = re.findall(r'class="legend[^"]*">([^<]*)<', page)  # each chart's latest values, drawn without script
    assert "tokens/s: 19,660" in latest and "learning rate: 1e-4" in latest and "train: 1.96e-5" in latest, latest
    assert_no_raw(page)
    rows = text_of(client, "/runs/")
    assert 'title="2026-12-05 07:10 UTC">' in rows and " ago</time>" in rows and "1,200/4,000" in rows
    assert_no_raw(rows)


def test_the_adapters_pages_write_shares_sizes_and_losses_by_one_rule(team: Any, client: Client) -> None:
    run = make(team, state="succeeded")
    adapter = Adapter.objects.create(run=run, name="a", owner=run.owner, base_model=run.base_model, uri="file:///a",
                                     size_bytes=2048, sha256="0" * 64, trainable_params=22_466, total_params=100_000,
                                     final_loss=0.25, metrics={"eval_loss": 0.37512})
    Adapter.objects.filter(pk=adapter.pk).update(created_at=CREATED)
    login(client, "mate")
    listing = text_of(client, "/adapters/")
    assert "22,466 <small>(22.5%)</small>" in listing and "22.466%" not in listing
    assert "2.0 KiB" in listing and "0.25" in listing and "0.375" in listing and "0.2500" not in listing
    assert 'title="2026-12-05 07:10 UTC">' in listing
    detail = text_of(client, f"/adapters/{adapter.pk}/")
    assert "22,466 of 100,000 (22.5%)" in detail and "2.0 KiB" in detail
    for page in (listing, detail):
        assert_no_raw(page)


def merge_job(team: Any) -> tuple[Adapter, Any, MergedModel]:
    run = make(team, state="succeeded")
    adapter = Adapter.objects.create(run=run, name="a", owner=run.owner, base_model=run.base_model, uri="file:///a",
                                     size_bytes=10, sha256="0" * 64, trainable_params=1, total_params=10)
    job = services.start_merge(run.owner, adapter, "bfloat16")
    figures = {
        "max_abs_logit_diff": 0.000019550323486328125, "mean_abs_logit_diff": 1.2345678e-6,
        "token_agreement": 0.9876, "greedy_agreement": 0.75,
        "tolerance": {"rule": "noise_floor", "description": "2x the bfloat16 reference's", "max_abs": 0.0123456,
                      "mean_abs": 0.00123456},
        "exact_reference": {"merged": {"max_abs_logit_diff": 3.0517578125e-05, "mean_abs_logit_diff": 4.1e-06},
                            "low_precision_reference": {"max_abs_logit_diff": 0.0625, "mean_abs_logit_diff": 0.00390625}},
        "quantized_gap": {"max_abs_logit_diff": 0.5, "mean_abs_logit_diff": 0.05, "token_agreement": 0.9,
                          "greedy_agreement": 0.5},
    }
    merged = MergedModel.objects.create(adapter=adapter, job=job, uri="store://jobs/1/output", dtype="bfloat16",
                                        size_bytes=15 * 2**30 + 2**29, sha256="f" * 64, verified=True, figures=figures)
    MergedModel.objects.filter(pk=merged.pk).update(created_at=CREATED)
    return adapter, job, merged


def test_a_merge_check_is_written_in_figures_and_percentages_not_raw_floats(team: Any, client: Client) -> None:
    adapter, job, _ = merge_job(team)
    login(client, "mate")
    page = text_of(client, f"/jobs/{job.pk}/")
    assert 'id="merge-max-diff">1.96e-5' in page and "1.23e-6" in page
    assert "3.05e-5" in page and "0.0625" in page and "0.0123" in page and "0.00123" in page
    assert "98.8%" in page and "75.0%" in page and "15.5 GiB" in page
    # The gap to the 4-bit base is written out, not a Python dict.
    assert "{&#x27;" not in page and "max |Δ logit| 0.5, mean 0.05, argmax agreement 90.0%, greedy agreement 50.0%" in page
    assert_no_raw(page)
    detail = text_of(client, f"/adapters/{adapter.pk}/")
    assert "1.96e-5" in detail and "75.0%" in detail and "15.5 GiB" in detail
    assert_no_raw(detail)


def test_the_overview_writes_progress_rates_and_sizes_by_one_rule(team: Any, client: Client) -> None:
    run = make(team, state="running", step=1200, total_steps=4000, started_at=timezone.now())
    Adapter.objects.create(run=make(team, state="succeeded"), name="a", base_model=run.base_model, uri="file:///a",
                           size_bytes=3 * 2**20, sha256="0" * 64, trainable_params=1, total_params=10, final_loss=1.23456)
    login(client, "mate")
    page = text_of(client, "/")
    assert "1,200/4,000 (30.0%)" in page and "3.0 MiB" in page and "1.23" in page and "1.2346" not in page
    assert_no_raw(page)


def test_the_catalog_and_fleet_pages_write_counts_and_sizes_by_one_rule(team: Any, client: Client) -> None:
    Dataset.objects.create(name="big", uri="file:///big", original_filename="big.jsonl", format="text",
                           row_count=113_000, size_bytes=5_000_000, sha256="0" * 64)
    Dataset.objects.filter(name="big").update(created_at=CREATED)
    Worker.objects.create(name="gpu-1", state="online", last_heartbeat=CREATED, max_gpu_bytes=40 * 2**30 + 2**29,
                          inventory={"gpus": [{"index": 0, "name": "H100", "memory_total": 80 * 2**30}]})
    login(client, "staff")
    datasets = text_of(client, "/datasets/")
    assert "113,000" in datasets and "4.8 MiB" in datasets and 'title="2026-12-05 07:10 UTC">' in datasets
    workers = text_of(client, "/workers/")
    assert "80.0 GiB" in workers and "40.5 GiB GPU memory per job" in workers
    assert 'title="2026-12-05 07:10 UTC">' in workers
    for page in (datasets, workers):
        assert_no_raw(page)


def test_the_token_length_histogram_labels_its_axes_as_counts() -> None:
    from webapp.catalog.charts import histogram_chart

    chart = histogram_chart([(0, 1500, 3), (1500, 3000, 113_000), (3000, 4500, 10)], max_length=2048)
    assert [label for _, label in chart.ticks] == ["0", "1,500", "3,000", "4,500"]
    assert chart.y_max_label == "113,000"
