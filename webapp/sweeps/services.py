"""Driving a sweep with Optuna.

Storage: Tunedeck's own rows are the record (Sweep, Trial: params, state, value; the runs' metric points are the
intermediate values). Each decision rebuilds an in-memory Optuna study from them with `study.add_trial` and then
asks (`study.ask`) or judges a running trial (the study's pruner). This keeps one schema, works the same on SQLite
and PostgreSQL, and needs no second migration system; the search itself is Optuna's samplers and pruners.

`advance(sweep)` is one step: record ended runs, prune unpromising active ones, ask new trials up to the budget
and `runs_at_once`. It runs on every pass of the scheduler's loop (registered in apps.py), and whenever a sweep's
page or API is read.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import optuna
from django.db import transaction

from webapp.jobs.ledger import request_pause
from webapp.jobs.models import FINAL_STATES, RunState
from webapp.sweeps.models import Sweep, SweepState, Trial, TrialState
from webapp.training.models import TrainingRun
from webapp.training.services import TRAIN_FIELDS, RunRefused, clone_request, queue_run
from workers.contract import spec

optuna.logging.set_verbosity(optuna.logging.WARNING)

KINDS = ("float", "int", "categorical")
MAX_GRID = 1000


class SweepRefused(Exception):
    """The sweep was not created: {field: [messages]}."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("; ".join(f"{field}: {' '.join(messages)}" for field, messages in errors.items()))
        self.errors = errors


def distributions(space: Any, sampler: str = "tpe") -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Optuna's distributions for a search space, and errors named `space.<setting>`."""
    errors: dict[str, list[str]] = {}
    found: dict[str, Any] = {}
    if not isinstance(space, dict) or not space:
        return {}, {"space": ["give at least one setting to search, e.g. {\"learning_rate\": {\"type\": \"float\", "
                              "\"low\": 1e-5, \"high\": 1e-3, \"log\": true}}"]}
    kinds = {f.name: f.type for f in dataclasses.fields(spec.TrainParams)}
    for name, entry in space.items():
        field = f"space.{name}"
        if name not in TRAIN_FIELDS:
            errors[field] = [f"unknown setting {name!r}"]
            continue
        if not isinstance(entry, dict) or entry.get("type") not in KINDS:
            errors[field] = [f"give a type: one of {', '.join(KINDS)}"]
            continue
        try:
            found[name] = distribution(entry, sampler)
        except (TypeError, ValueError) as exc:
            errors[field] = [str(exc)]
            continue
        if entry["type"] != "categorical" and str(kinds[name]) not in ("float", "int"):
            errors[field] = [f"{name} is not a number: search it with choices"]
    return found, errors


def distribution(entry: dict[str, Any], sampler: str) -> Any:
    kind = entry["type"]
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ValueError("choices must be a non-empty list")
        return optuna.distributions.CategoricalDistribution(choices)
    if "low" not in entry or "high" not in entry:
        raise ValueError("give low and high")
    cast = float if kind == "float" else int
    try:
        low, high = cast(entry["low"]), cast(entry["high"])
    except (TypeError, ValueError):
        raise ValueError(f"low and high must be {'numbers' if kind == 'float' else 'integers'}") from None
    if kind == "float" and not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("low and high must be finite")
    if low >= high:
        raise ValueError(f"empty range: low ({low}) must be below high ({high})")
    log = bool(entry.get("log", False))
    if log and low <= 0:
        raise ValueError("a log range needs low above 0")
    step = entry.get("step")
    if sampler == "grid" and kind == "float" and step is None:
        raise ValueError("a grid search over a float range needs a step")
    if kind == "float":
        return optuna.distributions.FloatDistribution(low, high, log=log, step=float(step) if step else None)
    return optuna.distributions.IntDistribution(low, high, log=log, step=int(step or 1))


def grid_of(dists: dict[str, Any]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for name, dist in dists.items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            grid[name] = list(dist.choices)
        else:
            step = dist.step
            count = round((dist.high - dist.low) / step) + 1
            values = [dist.low + i * step for i in range(count)]
            grid[name] = [int(v) if isinstance(dist, optuna.distributions.IntDistribution) else float(v) for v in values]
    return grid


def validate(data: dict[str, Any], base_run: TrainingRun | None) -> dict[str, list[str]]:
    """Errors by field for a sweep's settings; empty when it may be created."""
    errors: dict[str, list[str]] = {}
    sampler = data.get("sampler", "tpe")
    if sampler not in dict(Sweep.SAMPLERS):
        errors["sampler"] = [f"one of {', '.join(dict(Sweep.SAMPLERS))}"]
    if data.get("pruner", "none") not in dict(Sweep.PRUNERS):
        errors["pruner"] = [f"one of {', '.join(dict(Sweep.PRUNERS))}"]
    if data.get("direction", "minimize") not in ("minimize", "maximize"):
        errors["direction"] = ["minimize or maximize"]
    if not str(data.get("name", "")).strip():
        errors["name"] = ["give the sweep a name"]
    if not str(data.get("metric", "eval_loss")).strip():
        errors["metric"] = ["give the metric to optimise, a key of the runs' curves such as eval_loss"]
    for field, low, high in (("num_runs", 1, 1000), ("runs_at_once", 1, 100)):
        value = data.get(field, 1)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            errors[field] = [f"a whole number from {low} to {high}"]
    if base_run is None:
        errors["base_run"] = ["give the id of a run whose inputs every trial clones"]
    fixed = data.get("base_settings") or {}
    unknown = sorted(set(fixed) - set(TRAIN_FIELDS)) if isinstance(fixed, dict) else ["(not an object)"]
    if unknown:
        errors["base_settings"] = [f"unknown setting(s) {', '.join(unknown)}"]
    dists, space_errors = distributions(data.get("space"), sampler if sampler in dict(Sweep.SAMPLERS) else "tpe")
    errors.update(space_errors)
    if not space_errors:
        errors.update(first_trial_errors(data.get("first_trials") or [], dists, sampler))
    if dists and sampler == "grid" and not space_errors:
        size = math.prod(len(v) for v in grid_of(dists).values())
        if size > MAX_GRID:
            errors["space"] = [f"the grid has {size} points; at most {MAX_GRID}"]
    return errors


def first_trial_errors(first: Any, dists: dict[str, Any], sampler: str) -> dict[str, list[str]]:
    """Errors named `first_trials[i].<setting>`: each first trial is a {setting: value} of the space whose values
    its distributions contain."""
    if not isinstance(first, list) or not all(isinstance(entry, dict) for entry in first):
        return {"first_trials": ['give a list of settings to try first, e.g. [{"learning_rate": 0.0002}]']}
    if first and sampler == "grid":
        return {"first_trials": ["a grid search tries every point of the grid; first trials are for random and tpe"]}
    errors: dict[str, list[str]] = {}
    for index, entry in enumerate(first):
        for name, value in entry.items():
            field = f"first_trials[{index}].{name}"
            if name not in dists:
                errors[field] = [f"{name!r} is not a setting of the search space"]
            elif not contains(dists[name], value):
                errors[field] = [f"{value!r} is outside the search space of {name}"]
    return errors


def contains(dist: Any, value: Any) -> bool:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return any(value == choice and isinstance(value, bool) == isinstance(choice, bool) for choice in dist.choices)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(dist, optuna.distributions.IntDistribution) and not float(value).is_integer():
        return False
    return bool(dist._contains(dist.to_internal_repr(value)))


def create_sweep(owner: Any, data: dict[str, Any], base_run: TrainingRun | None) -> Sweep:
    errors = validate(data, base_run)
    if errors:
        raise SweepRefused(errors)
    sweep = Sweep.objects.create(
        owner=owner, name=str(data["name"]).strip()[:200], base_run=base_run,
        base_settings=data.get("base_settings") or {}, space=data["space"], first_trials=data.get("first_trials") or [],
        num_runs=data.get("num_runs", 8),
        runs_at_once=data.get("runs_at_once", 1), metric=str(data.get("metric", "eval_loss")).strip()[:100],
        direction=data.get("direction", "minimize"), sampler=data.get("sampler", "tpe"),
        pruner=data.get("pruner", "none"),
    )
    advance(sweep)
    return sweep


def make_sampler(sweep: Sweep, dists: dict[str, Any], seed: int) -> Any:
    if sweep.sampler == "grid":
        # One seed for the sweep's life: it shuffles the grid, and each trial's grid_id indexes that order.
        return optuna.samplers.GridSampler(grid_of(dists), seed=sweep.pk)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(4, max(1, sweep.num_runs // 3)))


def make_pruner(sweep: Sweep) -> Any:
    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    if sweep.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def curve(run: TrainingRun, metric: str) -> dict[int, float]:
    """The run's reported values of `metric` by step."""
    return {int(p["step"]): float(p[metric]) for p in run.metric_points or []
            if isinstance(p.get(metric), int | float) and "step" in p}


OPTUNA_STATES = {TrialState.ACTIVE: optuna.trial.TrialState.RUNNING, TrialState.COMPLETE: optuna.trial.TrialState.COMPLETE,
                 TrialState.PRUNED: optuna.trial.TrialState.PRUNED, TrialState.FAILED: optuna.trial.TrialState.FAIL}


def frozen(trial: Trial, dists: dict[str, Any], metric: str) -> Any:
    state = OPTUNA_STATES[TrialState(trial.state)]
    params = {k: v for k, v in trial.params.items() if k in dists}
    return optuna.trial.create_trial(
        state=state, value=trial.value if state == optuna.trial.TrialState.COMPLETE else None, params=params,
        distributions={k: dists[k] for k in params}, intermediate_values=curve(trial.run, metric),
        system_attrs=trial.system_attrs or {},
    )


def study_of(sweep: Sweep, trials: list[Trial], seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """An in-memory study holding `trials`, with the sweep's sampler and pruner."""
    dists, _ = distributions(sweep.space, sweep.sampler)
    study = optuna.create_study(direction=sweep.direction, sampler=make_sampler(sweep, dists, seed),
                                pruner=make_pruner(sweep))
    for trial in trials:
        if trial.state == TrialState.COMPLETE and trial.value is None:
            continue
        study.add_trial(frozen(trial, dists, sweep.metric))
    return study, dists


def ask(sweep: Sweep, trials: list[Trial]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The next trial's settings and Optuna's attributes for it."""
    study, dists = study_of(sweep, trials, seed=sweep.pk * 10007 + len(trials))
    if len(trials) < len(sweep.first_trials):  # a setting given to try first: Optuna's enqueued trial
        study.enqueue_trial(sweep.first_trials[len(trials)], skip_if_exists=False)
    asked = study.ask()
    for name, dist in dists.items():  # the suggest_* calls, as an objective function would make them
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            asked.suggest_categorical(name, dist.choices)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            asked.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            asked.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    attrs = study._storage.get_trial(asked._trial_id).system_attrs  # e.g. the grid point it took
    return dict(asked.params), dict(attrs)


def should_prune(sweep: Sweep, trials: list[Trial], trial: Trial) -> int | None:
    """The step at which `trial` is pruned, or None to let it go on."""
    points = curve(trial.run, sweep.metric)
    if not points or sweep.pruner == "none":
        return None
    study, dists = study_of(sweep, [t for t in trials if t.pk != trial.pk])
    study.add_trial(frozen(trial, dists, sweep.metric))
    judged = study.trials[-1]
    return max(points) if study.pruner.prune(study, judged) else None


def final_value(run: TrainingRun, metric: str) -> float | None:
    points = curve(run, metric)
    return points[max(points)] if points else None


def advance(sweep: Sweep) -> None:
    """One step of the sweep (see the module's note)."""
    with transaction.atomic():
        sweep = Sweep.objects.select_for_update().get(pk=sweep.pk)
        trials = list(sweep.trials.select_related("run"))
        for trial in trials:
            if trial.state != TrialState.ACTIVE:
                continue
            run = trial.run
            if run.state == RunState.SUCCEEDED:
                trial.value = final_value(run, sweep.metric)
                trial.state = TrialState.COMPLETE if trial.value is not None else TrialState.FAILED
            elif run.state in FINAL_STATES:
                trial.state = TrialState.FAILED
            elif run.state == RunState.RUNNING and not run.pause_requested:
                step = should_prune(sweep, trials, trial)
                if step is not None:
                    request_pause(run, f"the sweep at step {step}")
                    trial.state, trial.pruned_at_step = TrialState.PRUNED, step
                    trial.value = curve(run, sweep.metric).get(step)
            else:
                continue
            trial.save(update_fields=["state", "value", "pruned_at_step"])
        active = sum(t.state == TrialState.ACTIVE for t in trials)
        if sweep.state == SweepState.RUNNING:
            while len(trials) < sweep.num_runs and active < sweep.runs_at_once:
                params, attrs = ask(sweep, trials)
                request = clone_request(sweep.base_run, f"{sweep.name} #{len(trials)}", owner=sweep.owner)
                settings = {**dataclasses.asdict(request.hyperparameters), **sweep.base_settings, **params}
                request = dataclasses.replace(request, hyperparameters=spec.build(spec.TrainParams, settings))
                try:
                    run = queue_run(sweep.owner, request, via=f"sweep {sweep.name}")
                except RunRefused as exc:
                    sweep.state = SweepState.STOPPED
                    sweep.save(update_fields=["state"])
                    raise SweepRefused({f"trial {len(trials)}": [str(exc)]}) from exc
                trials.append(Trial.objects.create(sweep=sweep, number=len(trials), run=run, params=params,
                                                   system_attrs=attrs))
                active += 1
            if len(trials) >= sweep.num_runs and not active:
                sweep.state = SweepState.FINISHED
                sweep.save(update_fields=["state"])


def stop(sweep: Sweep) -> None:
    """No new trials; the running ones finish (and are still recorded and judged by the pruner)."""
    Sweep.objects.filter(pk=sweep.pk, state=SweepState.RUNNING).update(state=SweepState.STOPPED)


def best_trial(sweep: Sweep, trials: list[Trial]) -> Trial | None:
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not done:
        return None
    return (min if sweep.direction == "minimize" else max)(done, key=lambda t: t.value)


def advance_all() -> None:
    """One step of every sweep that has trials to record or to start: running ones, and stopped ones with
    trials still going."""
    live = Sweep.objects.filter(state=SweepState.RUNNING) | Sweep.objects.filter(trials__state=TrialState.ACTIVE)
    for sweep in live.distinct():
        try:
            advance(sweep)
        except SweepRefused as exc:
            logging.getLogger("tunedeck.sweeps").warning("sweep %s stopped: %s", sweep.pk, exc)
