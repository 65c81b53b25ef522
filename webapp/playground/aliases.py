"""Aliases of adapters (`production`, `candidate`): one name per base model pointing at one adapter, moved by people
and deployment scripts, every move and every refusal kept in the alias's history.

A move may require an evaluation: "move only if the new adapter beats the current holder on dataset X by at least
d". The scores are those the evaluate jobs recorded (an `AdapterJob` of kind evaluate: `result.scores[key]`, one
entry per adapter it scored); for each adapter the newest succeeded job that scored it on all of dataset X
counts, and a job that scored both is preferred (the same rows for both). Without a score for either side the move
is refused, saying which evaluation to run; it is never guessed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from django.db import transaction

from webapp.catalog.models import BaseModel, Dataset
from webapp.ids import whole
from webapp.jobs.models import RunState
from webapp.playground.kinds import JobKind
from webapp.playground.models import AdapterAlias, AdapterJob, AliasMove
from webapp.training.models import Adapter
from webapp.training.organise import TAG_PATTERN, TAG_RULE

MAX_ALIAS_LENGTH = 50
# The scores an evaluate job records per adapter, and which way is better.
METRICS = {"rouge_l": "higher", "exact_match": "higher", "loss": "lower", "perplexity": "lower"}
METRIC_LABELS = {"rouge_l": "ROUGE-L", "exact_match": "exact match", "loss": "loss", "perplexity": "perplexity"}


class AliasError(ValueError):
    """A move that cannot even be tried (bad name, adapter of another base…): {field: message}; nothing recorded."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


class MoveRefused(Exception):
    """The required evaluation was not met; the refusal is in the alias's history (`move`)."""

    def __init__(self, move: AliasMove) -> None:
        super().__init__(move.message)
        self.move = move


@dataclasses.dataclass(frozen=True)
class Requirement:
    """Move only if the candidate beats the holder on `dataset`'s `metric` by at least `margin`."""

    dataset: Dataset
    metric: str = "rouge_l"
    margin: float = 0.0


@dataclasses.dataclass(frozen=True)
class Score:
    value: float
    job_id: int


def clean_name(name: Any) -> str:
    text = str(name or "").strip().lower()
    if not text:
        raise AliasError({"name": "give the alias a name, e.g. production"})
    if len(text) > MAX_ALIAS_LENGTH or not TAG_PATTERN.match(text) or "/" in text:
        raise AliasError({"name": f"{text[:60]!r} is not an alias name: up to {MAX_ALIAS_LENGTH} "
                                  f"{TAG_RULE.replace(' / ', ' ')}, no slash"})
    return text


def check_requirement(metric: Any, margin: Any) -> tuple[str, float]:
    if metric not in METRICS:
        raise AliasError({"metric": f"{str(metric)[:40]!r} is not a score evaluations record; one of "
                                    f"{', '.join(METRICS)}"})
    try:
        value = float(margin)
    except (TypeError, ValueError):
        raise AliasError({"margin": f"{str(margin)[:40]!r} is not a number"}) from None
    if not 0.0 <= value < 1e9:
        raise AliasError({"margin": "must be 0 or more"})
    return str(metric), value


def evaluation_scores(adapters: list[Adapter], dataset: Dataset, metric: str) -> dict[int, Score]:
    """Each adapter's `metric` on all rows of `dataset`, from the newest succeeded evaluate job that scored it
    (a job that scored all of them first). Adapters without such a score are left out."""
    jobs = (AdapterJob.objects.filter(kind=JobKind.EVALUATE, state=RunState.SUCCEEDED, params__dataset_id=dataset.pk,
                                      adapters__in=adapters)
            .distinct().order_by("-id").only("id", "params", "result"))
    per_job: list[tuple[int, dict[int, float]]] = []
    for job in jobs:
        if (job.params or {}).get("split", "all") != "all":
            continue  # a run's held-out split: other rows than the whole dataset
        scores = (job.result or {}).get("scores") or {}
        found = {}
        for adapter in adapters:
            value = (scores.get(adapter.key) or {}).get(metric)
            if isinstance(value, int | float) and not isinstance(value, bool):
                found[adapter.pk] = float(value)
        if found:
            per_job.append((job.pk, found))
    chosen: dict[int, Score] = {}
    both = next(((pk, found) for pk, found in per_job if len(found) == len(adapters)), None)
    for pk, found in ([both] if both else []) + per_job:
        for adapter_id, value in found.items():
            chosen.setdefault(adapter_id, Score(value, pk))
    return chosen


def judge(holder: Adapter, candidate: Adapter, need: Requirement) -> tuple[bool, dict[str, Any], str]:
    """Whether the candidate beats the holder as required, the figures compared, and the sentence that says so."""
    label = METRIC_LABELS[need.metric]
    direction = METRICS[need.metric]
    scores = evaluation_scores([holder, candidate], need.dataset, need.metric)
    figures: dict[str, Any] = {
        "dataset": need.dataset.pk, "dataset_name": str(need.dataset), "metric": need.metric, "margin": need.margin,
        "direction": direction,
        "holder": holder.pk, "holder_score": None, "holder_job": None,
        "candidate": candidate.pk, "candidate_score": None, "candidate_job": None,
    }
    for side, adapter in (("holder", holder), ("candidate", candidate)):
        score = scores.get(adapter.pk)
        if score is not None:
            figures.update({f"{side}_score": score.value, f"{side}_job": score.job_id})
    missing = [a for a in (candidate, holder) if a.pk not in scores]
    if missing:
        names = " and ".join(f"{a} (adapter {a.pk})" for a in missing)
        return False, figures, (f"no {label} of {names} on all of {need.dataset}: evaluate "
                                f"{'them' if len(missing) > 1 else 'it'} on that dataset first")
    held, new = scores[holder.pk].value, scores[candidate.pk].value
    gain = new - held if direction == "higher" else held - new
    figures["gain"] = gain
    said = (f"{label} on {need.dataset}: {candidate} {new:.4g} vs the current holder {holder} {held:.4g} "
            f"({direction} is better; required margin {need.margin:g})")
    if gain + 1e-12 < need.margin:
        return False, figures, f"does not beat the current holder by {need.margin:g}: {said}"
    return True, figures, f"beats the current holder: {said}"


def move(base_model: BaseModel, name: Any, adapter: Adapter, user: Any,
         requirement: Requirement | None = None) -> AdapterAlias:
    """Point the alias `name` of `base_model` at `adapter` (creating the alias on its first move), recording the
    move. Raises AliasError (nothing recorded) or MoveRefused (the refusal recorded, the alias unchanged)."""
    alias_name = clean_name(name)
    if adapter.base_model_id != base_model.pk:
        raise AliasError({"adapter": f"adapter {adapter.pk} is an adapter of {adapter.base_model}, not of "
                                     f"{base_model}: an alias points at adapters of its own base"})
    with transaction.atomic():
        alias, _ = AdapterAlias.objects.select_for_update().get_or_create(base_model=base_model, name=alias_name)
        holder = alias.adapter
        if holder is not None and holder.pk == adapter.pk:
            raise AliasError({"adapter": f"{alias_name} already points at {adapter} (adapter {adapter.pk})"})
        ok, figures, message = True, {}, f"{alias_name} moved to {adapter}"
        if requirement is not None and holder is None:
            figures = {"dataset": requirement.dataset.pk, "dataset_name": str(requirement.dataset),
                       "metric": requirement.metric, "margin": requirement.margin, "holder": None}
            message += " (no current holder to beat)"
        elif requirement is not None and holder is not None:
            ok, figures, said = judge(holder, adapter, requirement)
            message = f"{alias_name} moved to {adapter}: {said}" if ok else f"Not moved: {adapter} {said}"
        if ok:
            alias.adapter = adapter
            alias.updated_by = user if getattr(user, "is_authenticated", False) else None
            alias.save(update_fields=["adapter", "updated_by", "updated_at"])
        entry = record(alias, holder, adapter, user, AliasMove.MOVED if ok else AliasMove.REFUSED, figures, message)
    if not ok:
        raise MoveRefused(entry)  # after the commit: the refusal stays in the history
    return alias


def record(alias: AdapterAlias, holder: Adapter | None, adapter: Adapter, user: Any, outcome: str,
           figures: dict[str, Any], message: str) -> AliasMove:
    return AliasMove.objects.create(
        alias=alias, from_adapter=holder, from_name=str(holder) if holder else "", to_adapter=adapter,
        to_name=str(adapter), by=user if getattr(user, "is_authenticated", False) else None, outcome=outcome,
        requirement=figures, message=message[:1000])


def resolve(base: str, name: str) -> AdapterAlias | None:
    """The alias `name` of the base model named `base` (or with id `base`), or None."""
    bases = BaseModel.objects.filter(name=base)
    pk = whole(base)
    if pk is not None:
        bases = BaseModel.objects.filter(pk=pk) | bases
    return (AdapterAlias.objects.select_related("adapter", "base_model")
            .filter(base_model__in=bases, name=name.strip().lower()).order_by("id").first())
