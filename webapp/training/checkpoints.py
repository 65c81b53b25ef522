"""The checkpoints a run still has: the run page, the REST API and the OpenAI API list these and no others.

A worker reports each checkpoint it saves as a `checkpoint` event whose data holds the step and `kept`: the
steps of the checkpoint folders left on disk once the trainer has deleted those beyond `keep_checkpoints`.
Every attempt of a run writes to the run's one folder, so the latest event's `kept` is the truth for all
of them. Events from a worker that did not send `kept` fall back to the trainer's own rule: the latest
`keep_checkpoints` steps (all of them when it is 0). A step saved twice (a lost attempt's checkpoint saved
again by the next) is listed once, as its latest event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from webapp.training.models import RunEvent, TrainingRun
from workers.contract.spec import TrainParams


@dataclass
class Checkpoints:
    kept: list[dict[str, Any]] = field(default_factory=list)  # event rows with their step, oldest step first
    removed: int = 0  # steps saved and since deleted


def _step(data: Any) -> int | None:
    step = data.get("step") if isinstance(data, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _kept_steps(latest: dict[str, Any], steps: list[int], keep: Any) -> set[int]:
    reported = latest["data"].get("kept")
    if isinstance(reported, list):
        return {s for s in reported if isinstance(s, int)}
    keep = keep if isinstance(keep, int) else TrainParams().keep_checkpoints
    return set(sorted(steps)[-keep:] if keep > 0 else steps)


def run_checkpoints(run: TrainingRun) -> Checkpoints:
    rows = RunEvent.objects.filter(run=run, kind="checkpoint").order_by("id").values("id", "attempt", "data", "created_at")
    by_step = {step: {**row, "step": step} for row in rows if (step := _step(row["data"])) is not None}
    if not by_step:
        return Checkpoints()
    latest = max(by_step.values(), key=lambda row: row["id"])
    kept = _kept_steps(latest, list(by_step), (run.hyperparameters or {}).get("keep_checkpoints"))
    return Checkpoints([by_step[s] for s in sorted(by_step) if s in kept], len(set(by_step) - kept))
