"""Where queued jobs go, in what order, and why a job waits: pure functions over plain values.

`fleet/scheduler.py` reads the rows into `Job` and `Slot` values, calls `plan`, then commits each
placement with the ledger's conditional update and writes the wait reasons that changed.

Rules:

- A worker runs one job per GPU (a CPU-only worker one job), at most `max_jobs`. A job holds
  `needs_gpus` GPUs of its worker that no other active job holds; each must offer `needs_gpu_bytes`:
  the GPU's total memory, capped by the worker's `max_gpu_bytes`, less `GPU_MARGIN_BYTES`, and no more
  than its reported free memory less the margin (something outside Tunedeck may use the card).
- A job is CPU-capable when `needs_gpu_bytes` is None and it needs at most one GPU: the creation code
  sets None when the estimate is below `CPU_MAX_BYTES` (or the size is unknown). Only CPU-capable jobs
  go to CPU-only workers; they go there first (best fit), keeping GPUs for the jobs that need them.
- Order: priority (higher first); then owners take turns: a job's turn is its owner's active jobs plus
  its place in the owner's queue (`queue_order`) at that priority, fewest first; ties go to the owner
  served least recently (never served first), then to the older job.
- A job that cannot be placed now does not block the jobs behind it. A job that fits no online worker
  even when idle says so, with the sizes, and is not counted as ahead of anyone.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

GiB = 2**30
MiB = 2**20
# Left free on every GPU: the estimate is a prediction, and the card's driver keeps some for itself.
GPU_MARGIN_BYTES = 512 * MiB
# A job estimated below this runs on a CPU too (tiny models: tests, demos, smoke runs).
CPU_MAX_BYTES = 2 * GiB


def gib(value: float) -> str:
    """Bytes as GiB for a wait reason: "38 GiB", "23.5 GiB"."""
    text = f"{value / GiB:.1f}"
    return (text[:-2] if text.endswith(".0") else text) + " GiB"


@dataclass(frozen=True)
class Gpu:
    index: int
    total: int
    free: int | None = None  # memory_free as last reported, when reported


@dataclass
class Slot:
    """A worker that may take jobs, with what its active jobs hold (updated as the plan places jobs)."""

    id: int
    name: str
    labels: frozenset[str]
    gpus: tuple[Gpu, ...]
    max_gpu_bytes: int | None = None
    max_jobs: int | None = None
    active: int = 0
    held: set[int] = field(default_factory=set)

    @property
    def capacity(self) -> int:
        slots = len(self.gpus) if self.gpus else 1
        return slots if self.max_jobs is None else min(slots, self.max_jobs)

    @property
    def full(self) -> bool:
        return self.active >= self.capacity

    def usable(self, gpu: Gpu) -> int:
        """What a job may use of this GPU when nothing else runs on it."""
        cap = gpu.total if self.max_gpu_bytes is None else min(gpu.total, self.max_gpu_bytes)
        return cap - GPU_MARGIN_BYTES

    def available(self, gpu: Gpu) -> int:
        """What a job may use of this GPU now (its reported free memory may be lower than its total)."""
        usable = self.usable(gpu)
        return usable if gpu.free is None else min(usable, gpu.free - GPU_MARGIN_BYTES)

    def free_gpus(self) -> list[Gpu]:
        return [g for g in self.gpus if g.index not in self.held]

    def hold(self, gpus: Iterable[int]) -> None:
        self.active += 1
        self.held.update(gpus)


@dataclass(frozen=True)
class Job:
    key: tuple[str, int]  # (kind of row, id): runs and adapter jobs have separate ids
    owner: int
    created: float  # epoch seconds
    priority: int = 0
    queue_order: float = 0.0
    needs_labels: tuple[str, ...] = ()
    needs_gpu_bytes: int | None = None
    needs_gpus: int = 1
    wait_reason: str = ""  # as stored: written again only when it changes

    @property
    def cpu_capable(self) -> bool:
        return self.needs_gpu_bytes is None and self.needs_gpus <= 1

    @property
    def gpus_wanted(self) -> int:
        return max(1, self.needs_gpus)

    @property
    def bytes_wanted(self) -> int:
        return self.needs_gpu_bytes or 0


@dataclass
class Plan:
    placements: list[tuple[Job, Slot, list[int]]] = field(default_factory=list)
    reasons: dict[tuple[str, int], str] = field(default_factory=dict)


def order(jobs: Sequence[Job], active: dict[int, int], last_served: dict[int, float]) -> list[Job]:
    """Queued jobs in the order they get their chance: priority, owners' turns, then age."""
    per_owner: dict[tuple[int, int], list[Job]] = defaultdict(list)
    for job in jobs:
        per_owner[(job.owner, job.priority)].append(job)
    keyed = []
    for (owner, _), queue in per_owner.items():
        queue.sort(key=lambda j: (j.queue_order, j.created, j.key))
        for place, job in enumerate(queue):
            turn = active.get(owner, 0) + place
            keyed.append(((-job.priority, turn, last_served.get(owner, -math.inf), job.created, job.key), job))
    keyed.sort(key=lambda item: item[0])
    return [job for _, job in keyed]


def choose(job: Job, slots: Sequence[Slot]) -> tuple[Slot, list[int]] | None:
    """The best place for the job now: the smallest GPUs that fit (CPU-only workers first for CPU-capable
    jobs), then the worker with the fewest jobs; None if nothing fits now."""
    best: tuple[tuple[int, int, str], Slot, list[int]] | None = None
    for slot in slots:
        if slot.full or not set(job.needs_labels) <= slot.labels:
            continue
        if not slot.gpus:
            if job.cpu_capable:
                score = (0, slot.active, slot.name)
                if best is None or score < best[0]:
                    best = (score, slot, [])
            continue
        fitting = sorted((g for g in slot.free_gpus() if slot.available(g) >= job.bytes_wanted),
                         key=lambda g: (slot.usable(g), g.index))
        if len(fitting) < job.gpus_wanted:
            continue
        chosen = fitting[: job.gpus_wanted]
        score = (1 + sum(slot.usable(g) for g in chosen), slot.active, slot.name)
        if best is None or score < best[0]:
            best = (score, slot, sorted(g.index for g in chosen))
    return None if best is None else (best[1], best[2])


def misfit(job: Job, slots: Sequence[Slot]) -> str | None:
    """Why the job fits none of these workers even when they are idle; None if one of them fits it."""
    if not slots:
        return "no worker is online"
    if job.needs_labels and not any(set(job.needs_labels) <= s.labels for s in slots):
        return f"needs labels {', '.join(job.needs_labels)}; no online worker has them all"
    matching = [s for s in slots if set(job.needs_labels) <= s.labels]
    where = "an online worker with those labels" if job.needs_labels else "an online worker"
    if any(s.capacity > 0 and (not s.gpus) for s in matching) and job.cpu_capable:
        return None
    gpu_slots = [s for s in matching if s.gpus and s.capacity > 0]
    need = f"~{gib(job.bytes_wanted)} of GPU memory" if job.needs_gpu_bytes else "a GPU"
    if not gpu_slots:
        return f"needs {need}; no {where.removeprefix('an ')} has a GPU"
    most = max(len(s.gpus) for s in gpu_slots)
    if job.gpus_wanted > most:
        return f"needs {job.gpus_wanted} GPUs; the largest {where.removeprefix('an ')} has {most}"
    if any(sum(s.usable(g) >= job.bytes_wanted for g in s.gpus) >= job.gpus_wanted for s in gpu_slots):
        return None
    largest = max(s.usable(g) for s in gpu_slots for g in s.gpus)
    if job.gpus_wanted > 1 and largest >= job.bytes_wanted:
        return (f"needs {job.gpus_wanted} GPUs with ~{gib(job.bytes_wanted)} each; "
                f"no {where.removeprefix('an ')} has {job.gpus_wanted} such GPUs")
    each = f" on each of {job.gpus_wanted} GPUs" if job.gpus_wanted > 1 else ""
    return f"needs ~{gib(job.bytes_wanted)} of GPU memory{each}; the largest GPU of {where} can give a job {gib(largest)}"


def waiting(job: Job, slots: Sequence[Slot], ahead: int) -> str:
    """Why a job that fits some worker was not placed in this pass."""
    line = "next in line" if ahead == 0 else f"{ahead} job{'s' if ahead != 1 else ''} ahead"
    matching = [s for s in slots if set(job.needs_labels) <= s.labels and not s.full and s.gpus]
    for slot in matching:  # a worker has room by our own accounting, but the card's memory is used elsewhere
        free = slot.free_gpus()
        big_enough = [g for g in free if slot.usable(g) >= job.bytes_wanted]
        if len(big_enough) >= job.gpus_wanted and not any(g.free is None for g in big_enough):
            most = max(big_enough, key=lambda g: g.free or 0)
            return (f"waiting for GPU memory used outside Tunedeck: GPU {most.index} of {slot.name} "
                    f"has {gib(max(0, (most.free or 0)))} free ({line})")
    if job.cpu_capable and any(not s.gpus for s in slots):
        return f"waiting for a free worker ({line})"
    return f"waiting for a free GPU ({line})"


def plan(jobs: Sequence[Job], slots: Sequence[Slot], active: dict[int, int], last_served: dict[int, float]) -> Plan:
    """Place what fits now, in order; give every job left queued its reason. `slots` are updated as
    jobs are placed on them."""
    result = Plan()
    ahead = 0
    for job in order(jobs, active, last_served):
        reason = misfit(job, slots)
        if reason is not None:
            result.reasons[job.key] = reason
            continue
        choice = choose(job, slots)
        if choice is None:
            result.reasons[job.key] = waiting(job, slots, ahead)
            ahead += 1
            continue
        slot, gpus = choice
        slot.hold(gpus)
        result.placements.append((job, slot, gpus))
    return result


# --- What a job needs, decided when it is created --------------------------------------------------------

# Adapter jobs load the base once (compare, evaluate, combine in bf16; a merge's check runs it in float32)
# plus the adapters, generation's KV cache and the CUDA context: a share and a fixed amount on top.
ADAPTER_JOB_WEIGHT_BYTES = {"compare": 2, "evaluate": 2, "combine": 2, "merge": 4}
ADAPTER_JOB_SHARE = 0.2
ADAPTER_JOB_FIXED_BYTES = 1 * GiB
# A run whose base's shape cannot be read: its weights at the quantization's bytes per parameter, same margin.
WEIGHT_BYTES_PER_PARAM = {"none": 2.0, "8bit": 1.0, "4bit": 0.6}


def gpu_bytes_or_cpu(estimate: float | None) -> int | None:
    """A job's needs_gpu_bytes from its estimate: None (it may run on a CPU) below CPU_MAX_BYTES or unknown."""
    if estimate is None or estimate < CPU_MAX_BYTES:
        return None
    return int(estimate)


def rough_bytes(num_parameters: int | None, bytes_per_param: float) -> int | None:
    if not num_parameters:
        return None
    return int(num_parameters * bytes_per_param * (1 + ADAPTER_JOB_SHARE) + ADAPTER_JOB_FIXED_BYTES)


def adapter_job_bytes(kind: str, num_parameters: int | None) -> int | None:
    """needs_gpu_bytes of an adapter job from its base's size; a push only uploads files (no GPU)."""
    per_param = ADAPTER_JOB_WEIGHT_BYTES.get(kind)
    return None if per_param is None else gpu_bytes_or_cpu(rough_bytes(num_parameters, per_param))


def needs_from_hyperparameters(hyperparameters: dict[str, Any]) -> int:
    """needs_gpus of a run: its num_gpus setting where it has one, else 1."""
    value = hyperparameters.get("num_gpus", 1)
    return max(1, int(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else 1
