"""What a run needs of a worker, read from its typed spec: model-free (plain values in, plain values out), so the
run service that sets a new run's placement fields and the scheduler that reads them share one reading."""

from __future__ import annotations

from workers.contract.spec import TrainParams


def gpus_wanted(train: TrainParams) -> int:
    """needs_gpus of a run: its num_gpus setting, at least 1. A spec read back from a stored row is built without
    type coercion (`spec.build`), so a value that is not a number counts as one GPU."""
    value = train.num_gpus
    return max(1, int(value)) if isinstance(value, int | float) and not isinstance(value, bool) else 1
