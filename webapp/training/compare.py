"""Runs side by side: their curves overlaid (drawn by static/tunedeck/charts.js from the JSON below), the settings
that differ, their final figures and their adapters' evaluations; and one run's curve as JSON for its live charts.

The rules: 2 to 10 runs, named by id in the query string (`?ids=3,5,9`, the order kept, repeats dropped); every
run is visible to the whole team, as on the run page. A bad list is a 400 that says what is wrong with `ids`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from django.contrib.auth.decorators import login_required
from django.db.models import TextField
from django.db.models.functions import Cast
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.utils import timezone

from webapp.ids import whole
from webapp.jobs.models import RunState
from webapp.training.charts import chart_specs, metric_keys, metric_keys_of_json, metrics_after
from webapp.training.metrics import TOKENS
from webapp.training.models import Adapter, TrainingRun
from workers.contract.spec import applies_to

MIN_RUNS, MAX_RUNS = 2, 10
MISSING = "—"
# What the settings table shows before the hyperparameters, from each run's own fields.
RUN_SETTINGS = ("Base model", "Dataset", "Evaluation dataset", "LoRA config", "Warm start")


class CompareError(ValueError):
    """A list of runs that cannot be compared; the message names the `ids` parameter."""


def parse_ids(raw: str) -> list[int]:
    """The run ids of `?ids=3,5,9`, in order, repeats dropped."""
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    bad = [part for part in parts if whole(part) is None]
    if bad:
        raise CompareError(f"ids: {bad[0][:20]!r} is not a run id; give run ids separated by commas, e.g. ?ids=3,5")
    ids = list(dict.fromkeys(int(part) for part in parts))
    if not MIN_RUNS <= len(ids) <= MAX_RUNS:
        raise CompareError(f"ids: compare {MIN_RUNS} to {MAX_RUNS} runs; {len(ids)} given")
    return ids


def runs_to_compare(raw: str) -> list[TrainingRun]:
    """The runs `raw` names, in its order, without their curves (read apart, where needed)."""
    ids = parse_ids(raw)
    runs = TrainingRun.objects.filter(pk__in=ids).select_related(
        "base_model", "dataset", "eval_dataset", "lora_config", "owner").defer("metric_points")
    by_id = {run.pk: run for run in runs}
    missing = [str(pk) for pk in ids if pk not in by_id]
    if missing:
        raise CompareError(f"ids: no run {', '.join(missing)}")
    return [by_id[pk] for pk in ids]


def run_label(run: TrainingRun) -> str:
    return f"#{run.pk} {run.name}" if run.name else f"#{run.pk}"


# ---- settings -----------------------------------------------------------------------------------------------


@dataclass
class SettingRow:
    name: str
    values: list[str]

    @property
    def differs(self) -> bool:
        return len(set(self.values)) > 1


def _shown(value: Any) -> str:
    return MISSING if value is None or value == "" else str(value)


def run_settings(run: TrainingRun) -> dict[str, str]:
    """What the run was made of and the settings of its objective (others' defaults it never used are left out)."""
    lora = run.lora_config
    values = {
        "Base model": str(run.base_model),
        "Dataset": str(run.dataset),
        "Evaluation dataset": _shown(run.eval_dataset),
        "LoRA config": f"{lora} ({lora.summary})",
        "Warm start": _shown(run.init_adapter_name),
    }
    hyperparameters = run.hyperparameters or {}
    objective = str(hyperparameters.get("objective", "sft"))
    values.update({name: _shown(value) for name, value in hyperparameters.items() if applies_to(name, objective)})
    return values


def settings_rows(runs: list[TrainingRun]) -> tuple[list[SettingRow], list[SettingRow]]:
    """(settings that differ, settings all runs share): a setting one run lacks reads "—" there."""
    per_run = [run_settings(run) for run in runs]
    names = list(RUN_SETTINGS) + sorted({name for values in per_run for name in values} - set(RUN_SETTINGS))
    rows = [SettingRow(name, [values.get(name, MISSING) for values in per_run]) for name in names]
    return [row for row in rows if row.differs], [row for row in rows if not row.differs]


# ---- final figures and evaluations --------------------------------------------------------------------------


def _last(points: list[dict[str, Any]], key: str) -> float | None:
    for point in reversed(points):
        if isinstance(point, dict) and isinstance(point.get(key), int | float):
            return float(point[key])
    return None


def _has_final_figures(adapter: Adapter | None) -> bool:
    metrics = adapter.metrics if adapter and isinstance(adapter.metrics, dict) else {}
    return "eval_loss" in metrics and "trained_tokens" in metrics


def final_figures(run: TrainingRun, adapter: Adapter | None, points: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's last figures: its adapter's where it has one, else the latest its curve (`points`) has."""
    metrics = adapter.metrics if adapter and isinstance(adapter.metrics, dict) else {}
    end = run.finished_at or (timezone.now() if run.state == RunState.RUNNING else None)
    return {
        "loss": run.last_loss,
        "eval_loss": metrics["eval_loss"] if "eval_loss" in metrics else _last(points, "eval_loss"),
        "step": run.step,
        "total_steps": run.total_steps,
        "tokens": metrics["trained_tokens"] if "trained_tokens" in metrics else _last(points, TOKENS),
        "duration": (end - run.started_at).total_seconds() if end and run.started_at else None,
        "peak_memory": metrics.get("peak_memory_reserved"),
        "estimated_memory": (metrics.get("plan") or {}).get("estimate_bytes"),
    }


def evaluations(adapters: list[Adapter | None]) -> tuple[list[str], list[dict[str, Any] | None]]:
    """Per adapter, the scores of the latest succeeded evaluation that scored it (None if none), and the score
    names any of them has. Evaluations are adapter jobs of the playground app, read through the adapter's `jobs`
    relation: this app sits below that one and does not import it."""
    scores: list[dict[str, Any] | None] = []
    names: dict[str, None] = {}
    for adapter in adapters:
        found = None
        if adapter is not None:
            for job in adapter.jobs.filter(kind="evaluate", state=RunState.SUCCEEDED).order_by("-id")[:5]:
                mine = ((job.result or {}).get("scores") or {}).get(adapter.key)
                if isinstance(mine, dict):
                    found = {"job": job.pk, "dataset": (job.params or {}).get("dataset_name", ""),
                             **{k: v for k, v in mine.items() if isinstance(v, int | float)}}
                    break
        scores.append(found)
        names.update({k: None for k in (found or {}) if k not in ("job", "dataset")})
    return list(names), scores


# ---- views -------------------------------------------------------------------------------------------------


@login_required
def run_compare(request: HttpRequest) -> HttpResponse:
    raw = ",".join(request.GET.getlist("ids"))  # ?ids=3,5,9, or the runs list's checkboxes: ?ids=3&ids=5
    try:
        runs = runs_to_compare(raw)
    except CompareError as error:
        return render(request, "training/compare.html", {"error": str(error), "ids": raw}, status=400)
    adapters = {a.run_id: a for a in Adapter.objects.filter(run__in=runs)}
    run_adapters = [adapters.get(run.pk) for run in runs]
    # A finished run's adapter has its final figures; only the others' curves are read for theirs.
    unfinished = [run.pk for run, a in zip(runs, run_adapters, strict=True) if not _has_final_figures(a)]
    curves = dict(TrainingRun.objects.filter(pk__in=unfinished).values_list("pk", "metric_points"))
    differ, same = settings_rows(runs)
    score_names, scores = evaluations(run_adapters)
    columns = [
        {"run": run, "label": run_label(run), "adapter": adapter, "scores": score,
         "final": final_figures(run, adapter, curves.get(run.pk) or [])}
        for run, adapter, score in zip(runs, run_adapters, scores, strict=True)
    ]
    with_adapters = [a.pk for a in run_adapters if a is not None]
    context = {
        "columns": columns, "differ": differ, "same": same,
        "score_rows": [(name, [(score or {}).get(name) for score in scores]) for name in score_names],
        "ids": ",".join(str(run.pk) for run in runs), "adapter_ids": with_adapters,
        "one_base": len({a.base_model_id for a in run_adapters if a is not None}) == 1,
        "live": any(not run.is_final for run in runs),
    }
    return render(request, "training/compare.html", context)


def _error(message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=400)


def curves_json(ids: list[int]) -> dict[int, str]:
    """Each run's curve as the JSON text the database keeps: sent on as it is, never decoded and encoded again
    (10 curves of 2,000 points took 300 ms to decode and encode, the text 10 ms to read)."""
    rows = TrainingRun.objects.filter(pk__in=ids).annotate(curve=Cast("metric_points", TextField()))
    return {pk: curve or "[]" for pk, curve in rows.values_list("pk", "curve")}


def _json(head: dict[str, Any], tail: list[tuple[str, str]]) -> HttpResponse:
    """`head` as JSON, with members whose values are JSON text already appended."""
    members = "".join(f", {json.dumps(name)}: {text}" for name, text in tail)
    return HttpResponse(json.dumps(head)[:-1] + members + "}", content_type="application/json")


@login_required
def compare_metrics(request: HttpRequest) -> HttpResponse:
    """Every compared run's curve, and the charts of all of them together (a chart any run has)."""
    try:
        runs = runs_to_compare(",".join(request.GET.getlist("ids")))
    except CompareError as error:
        return _error(str(error))
    curves = curves_json([run.pk for run in runs])
    keys = set().union(*(metric_keys_of_json(curve) for curve in curves.values()))
    entries = [
        _json({"id": run.pk, "label": run_label(run), "state": run.state, "final": run.is_final,
               "attempt": run.attempt}, [("points", curves[run.pk])]).content.decode()
        for run in runs
    ]
    return _json({"charts": chart_specs(keys)}, [("runs", "[" + ", ".join(entries) + "]")])


@login_required
def run_metrics(request: HttpRequest, pk: int) -> HttpResponse:
    """One run's charts and its points past step `after` (all without it): a live chart asks for what is new.
    `attempt` tells it when to ask for everything again: a new attempt may have replaced the curve past its
    checkpoint's step."""
    raw = request.GET.get("after", "")
    if raw and whole(raw, signed=True) is None:
        return _error(f"after: {raw[:20]!r} is not a step number")
    run = get_object_or_404(TrainingRun.objects.only("pk", "state", "attempt"), pk=pk)
    head = {"run": run.pk, "state": run.state, "final": run.is_final, "attempt": run.attempt}
    if not raw:
        curve = curves_json([run.pk])[run.pk]
        return _json({**head, "charts": chart_specs(metric_keys_of_json(curve))}, [("points", curve)])
    points = TrainingRun.objects.values_list("metric_points", flat=True).get(pk=run.pk) or []
    return JsonResponse({**head, "charts": chart_specs(metric_keys(points)), "points": metrics_after(points, int(raw))})
