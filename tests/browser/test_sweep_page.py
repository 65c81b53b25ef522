"""The sweep page in Chromium, over trials recorded in the database: the trials table (sortable), the
parallel-coordinates plot, the pruned trial's step, the best run and "compare the top 5"; then stopping it."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import SCREENSHOTS
from tests.webapp.factories import make_run
from webapp.jobs.models import RunState
from webapp.sweeps import services
from webapp.sweeps.models import Sweep, SweepState, TrialState

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
STEPS, EVAL_STEPS = 120, 10


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


def test_a_sweep_of_four_trials_trains_the_tiny_model_and_prunes_a_bad_one(  # type: ignore[no-untyped-def]
        page, demo, worker_process, scheduler, screenshot) -> None:
    """End to end: the sweep is created on its page, a real worker trains each trial, the scheduler's loop asks
    Optuna for trials and judges the running ones on their eval loss; a trial whose learning rate cannot learn is
    pruned (paused at its checkpoint, resumable) while the others run to the end."""
    user, base, dataset, config = demo
    base_run = make_run(user, base, dataset, config, max_steps=STEPS, eval_fraction=0.1, eval_steps=EVAL_STEPS,
                        logging_steps=EVAL_STEPS, save_steps=0, max_seq_length=64, gradient_checkpointing="off",
                        warmup_ratio=0.0, lr_scheduler="constant")
    base_run.state = RunState.SUCCEEDED  # the configuration the trials clone; not itself trained here
    base_run.save(update_fields=["state"])
    page.goto(f"/sweeps/new/?base_run={base_run.pk}")
    page.get_by_label("Name").fill("lr e2e")
    # The good rate first, then one that cannot learn: the median pruner has a finished trial to judge it by.
    page.get_by_label("Search space and budget").fill(
        "space:\n  learning_rate: {type: categorical, choices: [0.003, 1.0e-8]}\n"
        "first_trials:\n  - {learning_rate: 0.003}\n  - {learning_rate: 1.0e-8}\n"
        "num_runs: 4\nruns_at_once: 1\nmetric: eval_loss\ndirection: minimize\nsampler: tpe\npruner: median\n")
    page.get_by_role("button", name="Start sweep").click()
    expect(page.get_by_role("heading", name="Sweep lr e2e")).to_be_visible()
    sweep = Sweep.objects.get(name="lr e2e")

    # The page follows the sweep live (it polls); wait until every trial has ended.
    expect(page.locator("#sweep-progress")).to_contain_text("finished", timeout=420_000)
    expect(page.locator("#trials tbody tr")).to_have_count(4)
    trials = list(sweep.trials.select_related("run"))
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.params["learning_rate"] == 1e-8 for t in pruned), [(t.params, t.state) for t in trials]
    good = [t for t in trials if t.state == "complete"]
    assert good and all(t.run.state == RunState.SUCCEEDED and t.run.step == STEPS for t in good)
    first = pruned[0]
    expect(page.locator(f"#trial-{first.number}")).to_contain_text(f"pruned by the sweep at step {first.pruned_at_step}")
    assert first.pruned_at_step < STEPS and first.value > max(t.value for t in good)
    # A pruned run stopped at the checkpoint the pause saved: it is paused, not failed, and can be resumed.
    run = first.run
    run.refresh_from_db()
    assert run.state == RunState.PAUSED and run.step < STEPS, (run.state, run.step)
    assert run.events.filter(message__contains="Pause requested by the sweep at step").exists()
    expect(page.locator("svg.parallel polyline.pc-line")).to_have_count(4)
    best = min(good, key=lambda t: t.value)
    expect(page.locator("#sweep-best")).to_contain_text(str(best.run))
    screenshot(page, "sweep-e2e")
    page.goto(f"/runs/{run.pk}/")
    expect(page.get_by_role("button", name="Resume")).to_be_visible()
