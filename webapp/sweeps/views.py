from __future__ import annotations

from typing import Any

import yaml
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from webapp.ids import whole
from webapp.jobs.views import can_act, check_can_act
from webapp.sweeps import services
from webapp.sweeps.charts import label, parallel_coordinates
from webapp.sweeps.models import Sweep, SweepState, TrialState
from webapp.training.models import TrainingRun

TRIAL_SORTS = {"number": lambda t: t.number, "state": lambda t: t.state, "step": lambda t: t.run.step or 0,
               "value": lambda t: (t.value is None, t.value if t.value is not None else 0)}
EXAMPLE_SPEC = """space:
  learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
  batch_size: {type: categorical, choices: [4, 8]}
num_runs: 8
runs_at_once: 2
metric: eval_loss
direction: minimize
sampler: tpe
pruner: median
base_settings: {eval_steps: 10}
"""


@login_required
def sweeps_list(request: HttpRequest) -> HttpResponse:
    sweeps = Sweep.objects.select_related("owner", "base_run")[:200]
    return render(request, "sweeps/sweeps_list.html", {"sweeps": sweeps})


def sweep_context(request: HttpRequest, sweep: Sweep) -> dict[str, Any]:
    trials = list(sweep.trials.select_related("run").defer("run__metric_points", "run__hyperparameters"))
    sort = request.GET.get("sort", "number")
    key = TRIAL_SORTS.get(sort.lstrip("-"), TRIAL_SORTS["number"])
    ordered = sorted(trials, key=key, reverse=sort.startswith("-"))
    best = services.best_trial(sweep, trials)
    for trial in trials:  # the searched settings, in the space's order, numbers to 3 significant digits
        trial.cells = [label(trial.params[n]) if n in trial.params else "–" for n in sweep.space]  # type: ignore[attr-defined]
    ranked = sorted((t for t in trials if t.value is not None and t.state == TrialState.COMPLETE),
                    key=lambda t: t.value, reverse=sweep.direction == "maximize")[:5]
    return {
        "sweep": sweep, "trials": ordered, "can_act": can_act(request, sweep), "names": list(sweep.space), "best": best, "sort": sort,
        "plot": parallel_coordinates(sweep, trials), "top_ids": ",".join(str(t.run_id) for t in ranked),
        "live": sweep.state == SweepState.RUNNING or any(t.state == TrialState.ACTIVE for t in trials),
        "finished": sum(t.state != TrialState.ACTIVE for t in trials),
        "columns": [("number", "#"), ("state", "State"), ("step", "Step"), ("value", sweep.metric)],
    }


@login_required
def sweep_detail(request: HttpRequest, pk: int) -> HttpResponse:
    sweep = get_object_or_404(Sweep.objects.select_related("owner", "base_run"), pk=pk)
    if sweep.state != SweepState.FINISHED:  # a finished sweep has nothing left to record or start
        try:
            services.advance(sweep)
        except services.SweepRefused:
            pass  # the sweep stopped; its page says so
        sweep.refresh_from_db()
    template = "sweeps/_sweep_live.html" if request.headers.get("HX-Request") else "sweeps/sweep_detail.html"
    return render(request, template, sweep_context(request, sweep))


@login_required
@require_POST
def sweep_stop(request: HttpRequest, pk: int) -> HttpResponse:
    sweep = get_object_or_404(Sweep, pk=pk)
    check_can_act(request, sweep)
    services.stop(sweep)
    return redirect("sweep-detail", pk=pk)


@login_required
def sweep_new(request: HttpRequest) -> HttpResponse:
    errors: dict[str, list[str]] = {}
    name = request.POST.get("name", "")
    base_id = request.POST.get("base_run", request.GET.get("base_run", ""))
    spec_text = request.POST.get("spec", EXAMPLE_SPEC)
    if request.method == "POST":
        try:
            data = yaml.safe_load(spec_text) or {}
        except yaml.YAMLError as exc:
            data, errors["spec"] = {}, [f"not valid YAML: {exc}"]
        if not isinstance(data, dict):
            data, errors["spec"] = {}, ["give a mapping of space, num_runs, runs_at_once, metric…"]
        base_pk = whole(base_id)
        base = TrainingRun.objects.filter(pk=base_pk).first() if base_pk is not None else None
        if not errors:
            try:
                sweep = services.create_sweep(request.user, {**data, "name": name}, base)
                return redirect("sweep-detail", pk=sweep.pk)
            except services.SweepRefused as exc:
                errors = exc.errors
    runs = TrainingRun.objects.filter(owner=request.user).only("id", "name")[:100]
    return render(request, "sweeps/sweep_new.html", {"errors": errors, "name": name, "base_id": base_id,
                                                      "spec": spec_text, "runs": runs},
                  status=400 if errors else 200)


