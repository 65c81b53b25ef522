"""What a job needs of a worker (GPU count and memory), read from its typed spec when it is created: the run
service and the adapter-job service set a new job's placement fields here, and the scheduler places by what
they stored. No job model is read or written here."""

from __future__ import annotations

from typing import Any

from webapp.fleet import placement
from workers.contract.spec import TrainParams


def gpus_wanted(train: TrainParams) -> int:
    """needs_gpus of a run: its num_gpus setting, at least 1. A spec read back from a stored row is built without
    type coercion (`spec.build`), so a value that is not a number counts as one GPU."""
    value = train.num_gpus
    return max(1, int(value)) if isinstance(value, int | float) and not isinstance(value, bool) else 1


def run_gpu_bytes(base: Any, lora: Any, train: Any) -> int | None:
    """needs_gpu_bytes of a run: the engine's estimate on the smallest GPU it could use (every layer recomputed
    where the plan is left to decide), or, where the base's config cannot be read, its weights plus a margin.
    None (it may run on a CPU) when that is below placement.CPU_MAX_BYTES or the size is unknown."""
    from webapp.catalog.services import model_shape
    from workers.training.modelinfo import ModelNotFound
    from workers.training.specestimate import estimate_for_spec

    try:
        estimate: float | None = estimate_for_spec(model_shape(base), lora, train).estimate.device_total
    except (ModelNotFound, ValueError):  # an unreadable config, an architecture the estimator does not know
        per_param = placement.WEIGHT_BYTES_PER_PARAM.get(getattr(lora, "quantization", "none"), 2.0)
        estimate = placement.rough_bytes(base.num_parameters, per_param)
    return placement.gpu_bytes_or_cpu(estimate)


def run_needs(base: Any, lora: Any, train: TrainParams) -> dict[str, Any]:
    """The placement fields of a new run: needs_gpu_bytes is what each of its GPUs needs (the estimator
    shares the work out by the run's num_gpus and strategy)."""
    return {"needs_gpu_bytes": run_gpu_bytes(base, lora, train),
            "needs_gpus": gpus_wanted(train)}


def adapter_job_needs(kind: str, base: Any) -> dict[str, Any]:
    """The placement fields of a new adapter job: its base's weights in bf16 (float32 for a merge's check)
    plus a margin; a push needs no GPU."""
    return {"needs_gpu_bytes": placement.adapter_job_bytes(kind, base.num_parameters), "needs_gpus": 1}
