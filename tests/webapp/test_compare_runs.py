"""The compare page (/runs/compare/?ids=...), its curves' JSON, and a run's metrics.json for its live charts."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from tests.webapp.team import login, make
from webapp.jobs.ledger import record_events
from webapp.playground.models import AdapterJob
from webapp.training.models import Adapter, TrainingRun

HOSTILE = "<img src=x onerror=alert(1)>"


def report(run: TrainingRun, steps: range, loss_at: float = 2.0, start: float = 1_800_000_000.0) -> None:
    """Metric events as a worker sends them (its clock in `time`), through the ledger."""
    events: list[dict[str, Any]] = []
    for step in steps:
        events.append({"seq": step, "kind": "metric", "time": start + 2.0 * step, "data": {
            "step": step, "total_steps": steps.stop - 1, "epoch": step / 100, "loss": loss_at / step,
            "learning_rate": 1e-4, "grad_norm": 0.5, "num_tokens": 512.0 * step, "tokens_per_s": 256.0}})
        if step % 5 == 0:
            events.append({"seq": 10_000 + step, "kind": "metric", "time": start + 2.0 * step + 1,
                           "data": {"step": step, "eval_loss": loss_at / step + 0.1}})
    record_events(run, run.attempt, events)
    run.refresh_from_db()


def adapter_of(run: TrainingRun, **metrics: Any) -> Adapter:
    return Adapter.objects.create(run=run, name=run.name, owner=run.owner, base_model=run.base_model, rank=8,
                                  size_bytes=100, uri=f"store://runs/{run.pk}/adapter", sha256="0" * 64,
                                  trainable_params=1, total_params=2, metrics=metrics)


@pytest.fixture
def two_runs(team):  # type: ignore[no-untyped-def]
    fast = make(team, name="fast", state="running", attempt=1)
    slow = make(team, name="slow", state="running", attempt=1, data=1)
    slow.hyperparameters = {"learning_rate": 5e-5, "num_epochs": 1}
    slow.save()
    report(fast, range(1, 21), loss_at=2.0)
    report(slow, range(1, 11), loss_at=3.0)
    return fast, slow


# ---- the run's metrics.json ----------------------------------------------------------------------------------

def test_it_gives_the_charts_and_every_point_with_tokens_and_time(team, client, two_runs) -> None:  # type: ignore[no-untyped-def]
    fast, _ = two_runs
    login(client, "mate")
    body = client.get(f"/runs/{fast.pk}/metrics.json").json()
    assert body["run"] == fast.pk and body["attempt"] == 1 and body["final"] is False
    assert [c["title"] for c in body["charts"]] == ["Loss", "Learning rate", "Grad norm", "Throughput"]
    loss = body["charts"][0]
    assert [(s["key"], s["name"], s["dashed"]) for s in loss["series"]] == [("loss", "train", False),
                                                                             ("eval_loss", "eval", True)]
    assert [p["step"] for p in body["points"]] == list(range(1, 21))
    fifth = body["points"][4]
    assert fifth["num_tokens"] == 2560 and fifth["loss"] == pytest.approx(0.4) and fifth["eval_loss"] == pytest.approx(0.5)
    # The eval point came a second after the training one at its step: the latest report's clock is kept.
    assert fifth["time"] == pytest.approx(1_800_000_011.0)
    assert "epoch" not in fifth and "total_steps" not in fifth


def test_it_gives_only_the_points_after_a_step(team, client, two_runs) -> None:  # type: ignore[no-untyped-def]
    fast, _ = two_runs
    login(client, "mate")
    body = client.get(f"/runs/{fast.pk}/metrics.json?after=17").json()
    assert [p["step"] for p in body["points"]] == [18, 19, 20]
    assert len(body["charts"]) == 4  # the specs always come whole: a new metric may have added a chart
    report(fast, range(21, 23))
    assert [p["step"] for p in client.get(f"/runs/{fast.pk}/metrics.json?after=20").json()["points"]] == [21, 22]


def test_a_bad_after_is_a_400_naming_it(team, client, two_runs) -> None:  # type: ignore[no-untyped-def]
    fast, _ = two_runs
    login(client, "mate")
    response = client.get(f"/runs/{fast.pk}/metrics.json?after=x1")
    assert response.status_code == 400 and response.json()["error"].startswith("after:")
    assert client.get("/runs/999999/metrics.json").status_code == 404


def test_metrics_need_a_login(team, client, two_runs) -> None:  # type: ignore[no-untyped-def]
    fast, slow = two_runs
    assert client.get(f"/runs/{fast.pk}/metrics.json").status_code == 302
    assert client.get(f"/runs/compare/metrics.json?ids={fast.pk},{slow.pk}").status_code == 302
    assert client.get(f"/runs/compare/?ids={fast.pk},{slow.pk}").status_code == 302


def test_a_hostile_metric_name_is_data_in_json_and_text_on_the_page(team, client) -> None:  # type: ignore[no-untyped-def]
    run = make(team, state="running", attempt=1)
    record_events(run, 1, [{"seq": 1, "kind": "metric", "data": {"step": 1, "loss": 1.0, HOSTILE: 2.0}}])
    login(client, "mate")
    body = client.get(f"/runs/{run.pk}/metrics.json").json()
    assert HOSTILE in [c["title"] for c in body["charts"]]
    assert HOSTILE not in client.get(f"/runs/{run.pk}/").content.decode()


# ---- the compare page ----------------------------------------------------------------------------------------

def test_the_compare_page_shows_what_differs_and_folds_what_is_shared(team, client, two_runs) -> None:  # type: ignore[no-untyped-def]
    fast, slow = two_runs
    login(client, "mate")  # a teammate's runs: visible to the whole team, like the run page
    response = client.get(f"/runs/compare/?ids={slow.pk},{fast.pk}")
    assert response.status_code == 200
    page = response.content.decode()
    differ = page[page.index('id="compare-settings"'):page.index('id="compare-same"')]
    rows = dict(re.findall(r'<th scope="row">([^<]+)</th>((?:<td>[^<]*</td>)+)', differ))
    assert rows["Dataset"] == "<td>data-1</td><td>data-0</td>"  # in the order the address names them
    assert rows["learning_rate"] == "<td>5e-05</td><td>0.0002</td>"
    assert "num_epochs" not in rows and "Base model" not in rows
    same = page[page.index('id="compare-same"'):]
    assert "<summary>5 settings they share</summary>" in same  # base model, LoRA config, eval data, warm start, num_epochs
    assert '<th scope="row">num_epochs</th><td>1</td>' in same
    final = page[page.index('id="compare-final"'):page.index("</table>", page.index('id="compare-final"'))]
    assert "<td>0.3</td><td>0.1</td>" in final  # last loss: 3.0/10, 2.0/20
    assert "<td>0.4</td><td>0.2</td>" in final  # last eval loss
    assert "<td>10 / 10</td><td>20 / 20</td>" in final
    assert "<td>5.12K</td><td>10.2K</td>" in final  # tokens seen
    assert f'data-metrics-url="/runs/compare/metrics.json?ids={slow.pk},{fast.pk}"' in page
    assert "tunedeck/charts.js" in page and "<script>" not in page and "style=" not in page


def test_the_compare_page_takes_the_runs_lists_checkboxes_too(team, client, two_runs) -> None:  # type: ignore[no-untyped-def]
    fast, slow = two_runs
    login(client, "owner")
    page = client.get(f"/runs/compare/?ids={fast.pk}&ids={slow.pk}").content.decode()
    assert f"/runs/compare/metrics.json?ids={fast.pk},{slow.pk}" in page
    runs_list = client.get("/runs/").content.decode()
    assert 'form id="compare-runs"' in runs_list and 'action="/runs/compare/"' in runs_list
    assert f'name="ids" value="{fast.pk}" form="compare-runs"' in runs_list


@pytest.mark.parametrize(("ids", "message"), [
    ("", "ids: compare 2 to 10 runs; 0 given"),
    ("{a}", "ids: compare 2 to 10 runs; 1 given"),
    ("{a},{a}", "ids: compare 2 to 10 runs; 1 given"),  # a repeat counts once
    ("{a},x", "ids: &#x27;x&#x27; is not a run id"),
    ("{a},999999", "ids: no run 999999"),
    (",".join(str(i) for i in range(1, 12)), "ids: compare 2 to 10 runs; 11 given"),
])
def test_a_bad_list_of_runs_is_a_400_that_says_why(team, client, two_runs, ids, message) -> None:  # type: ignore[no-untyped-def]
    fast, _ = two_runs
    login(client, "mate")
    response = client.get("/runs/compare/?ids=" + ids.format(a=fast.pk))
    assert response.status_code == 400
    assert message in response.content.decode()
    as_json = client.get("/runs/compare/metrics.json?ids=" + ids.format(a=fast.pk))
    assert as_json.status_code == 400 and as_json.json()["error"].startswith("ids: ")


def test_the_compare_json_has_every_runs_points_and_the_charts_of_all(team, client, two_runs) -> None:  # type: ignore[no-untyped-def]
    fast, slow = two_runs
    other = make(team, name="dpo", state="running", attempt=1)
    record_events(other, 1, [{"seq": 1, "kind": "metric", "data": {"step": 1, "loss": 0.7, "rewards/margins": 0.2}}])
    login(client, "mate")
    body = client.get(f"/runs/compare/metrics.json?ids={fast.pk},{slow.pk},{other.pk}").json()
    assert [r["label"] for r in body["runs"]] == [f"#{fast.pk} fast", f"#{slow.pk} slow", f"#{other.pk} dpo"]
    assert [len(r["points"]) for r in body["runs"]] == [20, 10, 1]
    assert [c["title"] for c in body["charts"]] == ["Loss", "Reward margin", "Learning rate", "Grad norm", "Throughput"]


def test_final_figures_take_the_adapters_memory_duration_and_evaluations(team, client, two_runs) -> None:  # type: ignore[no-untyped-def]
    fast, slow = two_runs
    now = timezone.now()
    TrainingRun.objects.filter(pk=fast.pk).update(state="succeeded", started_at=now - timedelta(minutes=12),
                                                  finished_at=now)
    fast_adapter = adapter_of(fast, peak_memory_reserved=3 * 2**30, plan={"estimate_bytes": 4 * 2**30},
                              trained_tokens=123_000)
    slow_adapter = adapter_of(slow)
    users, bases, _, _ = team
    evaluation = AdapterJob.objects.create(kind="evaluate", owner=users["owner"], base_model=bases[0], state="succeeded",
                                           attempt=1, params={"dataset_name": "holdout"},
                                           result={"scores": {fast_adapter.key: {"loss": 0.81, "exact_match": 0.5}}})
    evaluation.adapters.set([fast_adapter, slow_adapter])
    login(client, "mate")
    page = client.get(f"/runs/compare/?ids={fast.pk},{slow.pk}").content.decode()
    final = page[page.index('id="compare-final"'):page.index('id="compare-evaluations"')]
    assert "<td>12 min</td><td>—</td>" in final
    assert "3.0 GiB <small>(estimated 4.0 GiB)</small>" in final and "<td>123K</td>" in final
    scores = page[page.index('id="compare-evaluations"'):]
    assert f'href="/jobs/{evaluation.pk}/">holdout</a>' in scores
    assert '<th scope="row">loss</th><td>0.81</td><td>—</td>' in scores
    assert '<th scope="row">exact_match</th><td>0.5</td><td>—</td>' in scores
    assert f'href="/compare/new/?adapters={fast_adapter.pk}&amp;adapters={slow_adapter.pk}"' in page


def test_the_compare_outputs_page_preselects_the_adapters(team, client, two_runs) -> None:  # type: ignore[no-untyped-def]
    fast, slow = two_runs
    a, b = adapter_of(fast), adapter_of(slow)
    login(client, "mate")
    page = client.get(f"/compare/new/?adapters={a.pk}&adapters={b.pk}").content.decode()
    assert re.search(rf'value="{a.pk}"[^>]*checked', page) and re.search(rf'value="{b.pk}"[^>]*checked', page)


# ---- the REST API does what the pages do -------------------------------------------------------------------

def test_the_api_gives_the_points_after_a_step_with_tokens_and_time(team, client, two_runs) -> None:  # type: ignore[no-untyped-def]
    from tests.webapp.api_helpers import bearer, key_for

    fast, _ = two_runs
    users = team[0]
    raw = key_for(users["mate"], "read")
    body = client.get(f"/api/v1/runs/{fast.pk}/metrics/?after=18", **bearer(raw)).json()
    assert [p["step"] for p in body["points"]] == [19, 20]
    assert body["points"][-1]["num_tokens"] == 10240 and body["points"][-1]["time"] == pytest.approx(1_800_000_041.0)
    bad = client.get(f"/api/v1/runs/{fast.pk}/metrics/?after=soon", **bearer(raw))
    assert bad.status_code == 400 and "after" in bad.json()["errors"]
