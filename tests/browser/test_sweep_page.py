"""The sweep page in Chromium, over trials recorded in the database: the trials table (sortable), the
parallel-coordinates plot, the pruned trial's step, the best run and "compare the top 5"; then stopping it."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import SCREENSHOTS
from tests.webapp.factories import make_run
from webapp.jobs.models import RunState
from webapp.sweeps import services
from webapp.sweeps.models import Sweep, SweepState

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def finish(run, points, state=RunState.SUCCEEDED) -> None:  # type: ignore[no-untyped-def]
    run.metric_points = [{"step": s, "eval_loss": v} for s, v in points]
    run.state, run.step, run.total_steps = state, points[-1][0], 6
    run.save()


def test_the_sweep_page_shows_trials_plot_pruning_and_stops(page, demo) -> None:  # type: ignore[no-untyped-def]
    user, base, dataset, config = demo
    spec = {"name": "lr <search>", "num_runs": 4, "runs_at_once": 1, "sampler": "tpe", "pruner": "median",
            "space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                      "batch_size": {"type": "categorical", "choices": [2, 4]}}}
    sweep = services.create_sweep(user, spec, make_run(user, base, dataset, config))
    finish(sweep.trials.get(number=0).run, [(2, 1.2), (4, 1.0), (6, 0.9)])
    services.advance(sweep)
    finish(sweep.trials.get(number=1).run, [(2, 1.1), (4, 0.8), (6, 0.7)])
    services.advance(sweep)
    finish(sweep.trials.get(number=2).run, [(2, 1.5), (4, 1.6)], state=RunState.RUNNING)
    services.advance(sweep)  # worse than the median at step 4: pruned
    assert sweep.trials.get(number=2).pruned_at_step == 4

    page.goto(f"/sweeps/{sweep.pk}/")
    expect(page.get_by_role("heading", name="Sweep lr <search>")).to_be_visible()
    expect(page.locator("#trials tbody tr")).to_have_count(4)
    expect(page.locator("#trial-2")).to_contain_text("pruned by the sweep at step 4")
    expect(page.locator("svg.parallel polyline.pc-line")).to_have_count(4)
    expect(page.locator("svg.parallel")).to_contain_text("learning_rate")
    best_run = sweep.trials.get(number=1).run_id
    expect(page.locator("#sweep-best")).to_contain_text("0.7")
    href = page.locator("#compare-top").get_attribute("href")
    assert href and href.startswith("/runs/compare/?ids=") and href.split("=")[1].split(",")[0] == str(best_run)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "sweep.png"), full_page=True)

    page.locator("#trials thead a", has_text="eval_loss").click()  # best first
    expect(page.locator("#trials tbody tr").first).to_have_id("trial-1")
    page.locator("#sweep-stop").click()
    expect(page.locator("#sweep-progress")).to_contain_text("stopped")
    assert Sweep.objects.get().state == SweepState.STOPPED

    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"/sweeps/{sweep.pk}/")
    width = page.evaluate("document.querySelector('svg.parallel').getBoundingClientRect().width")
    assert width <= 390
    page.screenshot(path=str(SCREENSHOTS / "sweep-phone.png"), full_page=True)
