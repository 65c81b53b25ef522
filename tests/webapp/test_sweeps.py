"""Sweeps: the search space's checks, Optuna's drive (grid, TPE, pruning) over Tunedeck's own rows, the sweep's
runs as ordinary queued runs, and the pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.webapp.api_helpers import Team, make_team
from tests.webapp.factories import make_run
from webapp.jobs.models import RunState
from webapp.sweeps import services
from webapp.sweeps.models import Sweep, SweepState, Trial, TrialState
from webapp.training.models import TrainingRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def team(tiny_model_dir: Path, store_dir: Path, db: Any) -> Team:
    return make_team(tiny_model_dir)


def spec_of(**over: Any) -> dict[str, Any]:
    return {"name": "lr search", "space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
            "num_runs": 4, "runs_at_once": 2, "metric": "eval_loss", "direction": "minimize", "sampler": "tpe",
            "pruner": "median", **over}


# The search space's checks: each error is named by its field.

@pytest.mark.parametrize(("space", "field", "words"), [
    ({"learnig_rate": {"type": "float", "low": 1, "high": 2}}, "space.learnig_rate", "unknown setting"),
    ({"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-3}}, "space.learning_rate", "empty range"),
    ({"learning_rate": {"type": "float", "low": 0, "high": 1e-3, "log": True}}, "space.learning_rate", "log range"),
    ({"batch_size": {"type": "int", "low": "x", "high": 8}}, "space.batch_size", "integers"),
    ({"batch_size": {"low": 1, "high": 8}}, "space.batch_size", "give a type"),
    ({"lr_scheduler": {"type": "categorical", "choices": []}}, "space.lr_scheduler", "non-empty"),
    ({"lr_scheduler": {"type": "int", "low": 1, "high": 3}}, "space.lr_scheduler", "not a number"),
    ({}, "space", "at least one setting"),
])
def test_a_bad_search_space_is_refused_by_field(space: dict[str, Any], field: str, words: str) -> None:
    _, errors = services.distributions(space)
    assert list(errors) == [field] and words in errors[field][0]


def test_a_grid_over_floats_needs_a_step_and_every_sweep_field_is_checked(team: Team) -> None:
    errors = services.validate(spec_of(sampler="grid", num_runs=0, pruner="sometimes", name=" "), None)
    assert set(errors) == {"space.learning_rate", "num_runs", "pruner", "name", "base_run"}
    with pytest.raises(services.SweepRefused):
        services.create_sweep(team.owner, spec_of(runs_at_once=0), make_run(team.owner, team.base, team.dataset,
                                                                            team.config))
    assert not Sweep.objects.exists() and TrainingRun.objects.count() == 1


def finish(run: TrainingRun, losses: list[tuple[int, float]], state: str = RunState.SUCCEEDED) -> None:
    run.metric_points = [{"step": step, "eval_loss": loss} for step, loss in losses]
    run.state = state
    run.save()


def test_a_grid_sweep_covers_the_grid_with_queued_runs_under_its_concurrency(team: Team) -> None:
    base = make_run(team.owner, team.base, team.dataset, team.config, eval_steps=2)
    space = {"learning_rate": {"type": "categorical", "choices": [1e-4, 3e-4]},
             "batch_size": {"type": "int", "low": 2, "high": 4, "step": 2}}
    sweep = services.create_sweep(team.owner, spec_of(sampler="grid", space=space, num_runs=4, runs_at_once=2,
                                                      pruner="none"), base)
    trials = list(sweep.trials.select_related("run"))
    assert len(trials) == 2  # runs at once
    assert all(t.run.state == RunState.QUEUED and t.run.owner == team.owner for t in trials)
    assert trials[0].run.train_params().learning_rate == trials[0].params["learning_rate"]
    assert trials[0].run.train_params().batch_size == trials[0].params["batch_size"]
    assert trials[0].run.train_params().eval_steps == 2  # the base run's other settings
    for number, trial in enumerate(trials):
        finish(trial.run, [(4, 1.0 + number)])
    services.advance(sweep)
    trials = list(sweep.trials.select_related("run"))
    assert len(trials) == 4, [(t.params, t.system_attrs) for t in trials]
    assert {(t.params["learning_rate"], t.params["batch_size"]) for t in trials} == {
        (1e-4, 2), (1e-4, 4), (3e-4, 2), (3e-4, 4)}
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE] * 2 and trials[0].value == 1.0
    for trial in trials[2:]:
        finish(trial.run, [(4, 0.5)], state=RunState.FAILED if trial.number == 3 else RunState.SUCCEEDED)
    services.advance(sweep)
    sweep.refresh_from_db()
    assert sweep.state == SweepState.FINISHED and sweep.trials.count() == 4
    assert sweep.trials.get(number=3).state == TrialState.FAILED
    assert services.best_trial(sweep, list(sweep.trials.all())).number == 2


def test_tpe_asks_within_the_bounds(team: Team) -> None:
    base = make_run(team.owner, team.base, team.dataset, team.config)
    space = {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
             "grad_accum": {"type": "int", "low": 1, "high": 4}, "lr_scheduler": {"type": "categorical",
                                                                              "choices": ["cosine", "linear"]}}
    sweep = services.create_sweep(team.owner, spec_of(space=space, num_runs=8, runs_at_once=1, pruner="none"), base)
    for _ in range(8):
        trial = sweep.trials.select_related("run").get(state=TrialState.ACTIVE)
        params = trial.params
        assert 1e-5 <= params["learning_rate"] <= 1e-3 and 1 <= params["grad_accum"] <= 4
        assert params["lr_scheduler"] in ("cosine", "linear")
        finish(trial.run, [(2, params["learning_rate"] * 1000)])
        services.advance(sweep)
    assert sweep.trials.count() == 8 and len({t.params["learning_rate"] for t in sweep.trials.all()}) == 8


def test_first_trials_are_tried_in_order_before_the_sampler_chooses(team: Team) -> None:
    base = make_run(team.owner, team.base, team.dataset, team.config)
    space = {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
             "batch_size": {"type": "categorical", "choices": [2, 4]}}
    first = [{"learning_rate": 3e-4, "batch_size": 4}, {"learning_rate": 1e-5}]
    sweep = services.create_sweep(team.owner, spec_of(space=space, first_trials=first, num_runs=3, runs_at_once=1,
                                                      pruner="none"), base)
    for number in range(3):
        trial = sweep.trials.select_related("run").get(number=number)
        hp = trial.run.hyperparameters
        if number == 0:
            assert trial.params == first[0] and (hp["learning_rate"], hp["batch_size"]) == (3e-4, 4)
        elif number == 1:  # the setting left out is sampled from its choices
            assert trial.params["learning_rate"] == 1e-5 and trial.params["batch_size"] in (2, 4)
        else:
            assert trial.params["learning_rate"] not in (3e-4, 1e-5) and "fixed_params" not in trial.system_attrs
        finish(trial.run, [(2, 1.0 + number)])
        services.advance(sweep)
    page = Client()
    page.force_login(team.owner)
    html = page.get(f"/sweeps/{sweep.pk}/").content.decode()
    assert "(2 given first)" in html and html.count(">given</small>") == 2


@pytest.mark.parametrize(("first", "field", "words"), [
    ([{"learning_rate": 1e-2}], "first_trials[0].learning_rate", "outside the search space"),
    ([{}, {"batch_size": 8}], "first_trials[1].batch_size", "not a setting of the search space"),
    ([{"learning_rate": "fast"}], "first_trials[0].learning_rate", "outside the search space"),
    ({"learning_rate": 1e-4}, "first_trials", "a list of settings"),
])
def test_bad_first_trials_are_refused_by_field(first: Any, field: str, words: str) -> None:
    errors = services.validate({**spec_of(), "first_trials": first}, TrainingRun())
    assert words in " ".join(errors[field]), errors


def test_a_grid_sweep_refuses_first_trials() -> None:
    spec = spec_of(sampler="grid", space={"batch_size": {"type": "categorical", "choices": [2, 4]}},
                   first_trials=[{"batch_size": 2}])
    assert "every point of the grid" in services.validate(spec, TrainingRun())["first_trials"][0]


def test_the_median_pruner_pauses_a_run_worse_than_the_finished_ones(team: Team) -> None:
    base = make_run(team.owner, team.base, team.dataset, team.config)
    sweep = services.create_sweep(team.owner, spec_of(num_runs=3, runs_at_once=1), base)
    first = sweep.trials.get(number=0)
    finish(first.run, [(2, 1.0), (4, 0.8), (6, 0.6)])
    services.advance(sweep)
    second = sweep.trials.select_related("run").get(number=1)
    run = second.run
    run.state, run.metric_points = RunState.RUNNING, [{"step": 2, "eval_loss": 0.9}]
    run.save()
    services.advance(sweep)  # better than the median at step 2: goes on
    second.refresh_from_db()
    assert second.state == TrialState.ACTIVE and not TrainingRun.objects.get(pk=run.pk).pause_requested
    run.metric_points = [{"step": 2, "eval_loss": 0.9}, {"step": 4, "eval_loss": 1.5}]
    run.save()
    services.advance(sweep)  # worse than the median at step 4: pruned
    second.refresh_from_db()
    assert second.state == TrialState.PRUNED and second.pruned_at_step == 4 and second.value == 1.5
    assert TrainingRun.objects.get(pk=run.pk).pause_requested  # the worker checkpoints and stops
    assert sweep.trials.count() == 3  # its place goes to a new trial


def test_stop_asks_no_new_trials(team: Team) -> None:
    base = make_run(team.owner, team.base, team.dataset, team.config)
    sweep = services.create_sweep(team.owner, spec_of(num_runs=4, runs_at_once=1), base)
    services.stop(sweep)
    finish(sweep.trials.get().run, [(2, 1.0)])
    services.advance(sweep)
    sweep.refresh_from_db()
    assert sweep.state == SweepState.STOPPED and sweep.trials.count() == 1
    assert Trial.objects.get().state == TrialState.COMPLETE


# The pages.

def logged_in(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_the_sweep_page_shows_the_trials_the_plot_the_best_and_the_pruned_step(team: Team) -> None:
    base = make_run(team.owner, team.base, team.dataset, team.config)
    sweep = services.create_sweep(team.owner, spec_of(name="<b>lr</b>", num_runs=3, runs_at_once=1), base)
    finish(sweep.trials.get(number=0).run, [(2, 1.0), (4, 0.8)])
    services.advance(sweep)
    run = sweep.trials.get(number=1).run
    run.state, run.metric_points = RunState.RUNNING, [{"step": 2, "eval_loss": 1.4}, {"step": 4, "eval_loss": 1.5}]
    run.save()
    page = logged_in(team.mate).get(f"/sweeps/{sweep.pk}/")
    html = page.content.decode()
    assert page.status_code == 200
    assert "&lt;b&gt;lr&lt;/b&gt;" in html and "<b>lr</b>" not in html  # the name, escaped
    assert 'id="trial-0"' in html and 'id="trial-1"' in html
    assert "pruned by the sweep at step 4" in html
    assert html.count('class="pc-line"') == 3 and "<svg" in html  # the plot: a line per trial
    best = sweep.trials.get(number=0)
    assert f"/runs/compare/?ids={best.run_id}" in html and "0.8" in html
    assert 'id="sweep-stop"' not in html  # the mate may not stop the owner's sweep
    assert logged_in(team.mate).post(f"/sweeps/{sweep.pk}/stop/").status_code == 403
    owner = logged_in(team.owner)
    assert 'id="sweep-stop"' in owner.get(f"/sweeps/{sweep.pk}/").content.decode()
    assert owner.post(f"/sweeps/{sweep.pk}/stop/").status_code == 302
    assert Sweep.objects.get().state == SweepState.STOPPED
    assert owner.get(f"/sweeps/{sweep.pk}/?sort=-value", HTTP_HX_REQUEST="true").status_code == 200
    assert "&lt;b&gt;lr&lt;/b&gt;" in owner.get("/sweeps/").content.decode()


def test_the_new_sweep_form_names_bad_fields_and_keeps_what_was_typed(team: Team) -> None:
    base = make_run(team.owner, team.base, team.dataset, team.config)
    owner = logged_in(team.owner)
    spec = "space:\n  learnig_rate: {type: float, low: 1.0e-5, high: 1.0e-3}\nnum_runs: 2\n"
    page = owner.post("/sweeps/new/", {"name": "s", "base_run": str(base.pk), "spec": spec})
    assert page.status_code == 400 and "space.learnig_rate: unknown setting" in page.content.decode()
    assert "learnig_rate: {type: float" in page.content.decode() and not Sweep.objects.exists()
    spec = spec.replace("learnig_rate", "learning_rate")
    page = owner.post("/sweeps/new/", {"name": "s", "base_run": str(base.pk), "spec": spec})
    sweep = Sweep.objects.get()
    assert page.status_code == 302 and page["Location"] == f"/sweeps/{sweep.pk}/" and sweep.trials.count() == 1
    assert "New sweep" in owner.get("/sweeps/new/").content.decode()


def test_the_scheduler_loop_drives_sweeps_without_a_page_open(team: Team) -> None:
    """`tunedeck up` and the compose file start only the scheduler: its pass records ended trials and asks new ones."""
    from webapp.fleet.scheduler import run_extra_passes

    base = make_run(team.owner, team.base, team.dataset, team.config, eval_steps=2)
    sweep = services.create_sweep(team.owner, spec_of(sampler="random", num_runs=3, runs_at_once=1, pruner="none"),
                                  base)
    first = sweep.trials.get()
    finish(first.run, [(2, 1.5)])
    run_extra_passes()  # what the scheduler command runs after placing, every pass
    trials = list(sweep.trials.order_by("number"))
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.ACTIVE]
    assert trials[0].value == 1.5
