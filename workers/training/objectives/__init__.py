"""Training objectives: what the train runner optimizes (see base.Objective), one module each.

`OBJECTIVES` holds one instance of each, keyed by the name a spec gives in TrainParams.objective (whose allowed
values, workers.contract.spec.OBJECTIVE_NAMES, are these names).
"""

from __future__ import annotations

from workers.training.objectives.base import Objective
from workers.training.objectives.dpo import DirectPreference
from workers.training.objectives.grpo import GroupRelativePolicy
from workers.training.objectives.kto import KahnemanTversky
from workers.training.objectives.orpo import OddsRatioPreference
from workers.training.objectives.sft import SupervisedFineTuning
from workers.training.objectives.simpo import SimplePreference

OBJECTIVES: dict[str, Objective] = {
    objective.name: objective
    for objective in (
        SupervisedFineTuning(), DirectPreference(), KahnemanTversky(), OddsRatioPreference(), SimplePreference(),
        GroupRelativePolicy(),
    )
}


def objective_for(name: str) -> Objective:
    """The objective named `name`; ValueError naming the known ones otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {name!r}") from None
