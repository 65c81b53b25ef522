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
- A job that cannot be placed now does not block the jobs behind it, until it has waited too long (below).
  A job that fits no online worker even when idle says so, with the sizes, and is not counted as ahead
  of anyone.

Reservations (against starvation): without them a job needing 2 GPUs on a busy worker can wait forever,
because each time one GPU frees up a one-GPU job behind it takes it. So a job that fits some online worker
when idle, cannot be placed now, and has been queued for at least `reserve_after` seconds (the setting
TUNEDECK_RESERVE_AFTER; counted from `Job.queued_since`) reserves one worker, if jobs behind it could
otherwise overtake it (`overtakable`): it needs several GPUs, or a GPU that is free by Tunedeck's count
lacks the memory for it because of memory used outside Tunedeck (a smaller job could take that GPU). A
one-GPU job needs no reservation otherwise: it comes before the jobs behind it, so the first GPU that fits
it and frees up is its own; letting it reserve would only take workers away from the jobs that need them.
A job that would have been placed but for another job's reservation waits behind that job, reserving
nothing.

- Which worker: among the workers with its labels that could hold it when idle and that no job earlier
  in the order has reserved in this pass, the one where the fewest busy GPUs must free up before it fits
  (the GPUs that fit it less those free now; a worker at its `max_jobs` also needs one job to end), then
  the smallest GPUs that fit (as `choose` prefers), then the name. Without job durations "fewest to free"
  is the best guess of "soonest", and ties by name keep a reservation where it is from pass to pass.
- What it keeps: the worker takes no new job, from any job later in the order, on a GPU that fits the
  reserved job (`Reservation.gpus`); its other GPUs and other workers stay open to everyone. Only GPU
  workers are reserved. A worker whose `max_jobs` is below its GPU count takes no new job at all
  (`Reservation.whole`): jobs on its other GPUs would use up the job slots the reserved job waits for.
- The cost: GPUs that fit the reserved job stay idle while the busy ones drain, at most `needs_gpus - 1` of
  them at a time (as soon as enough are free the job is placed; a worker reserved whole also idles its
  other free GPUs), longer only while memory used outside Tunedeck keeps a kept GPU too full. Keeping only
  the GPUs that will free up first would idle fewer, but which those are needs job durations Tunedeck
  does not know.
- One reservation per worker: several starving jobs reserve different workers, in order; one that finds
  every worker it fits reserved waits without one. Jobs earlier in the order (higher priority, an earlier
  turn) are never held back by a reservation: it is made in the pass when its job's turn comes, and a
  pass starts with none (it is recomputed every pass, from the rows, so nothing is stored).
- Wait reasons: the reserved job says "next in line: worker gpu-box-1 is kept for it (GPUs 0, 1 fit; 1 of
  them busy)"; a job that would have been placed but for a reservation says "waiting: GPUs of gpu-box-1 are
  kept for run 12, which needs 2 GPUs with ~30 GiB each".
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from workers.contract.kinds import KINDS

GiB = 2**30
MiB = 2**20
# Left free on every GPU: the estimate is a prediction, and the card's driver keeps some for itself.
GPU_MARGIN_BYTES = 512 * MiB
# A job estimated below this runs on a CPU too (tiny models: tests, demos, smoke runs).
CPU_MAX_BYTES = 2 * GiB


# Runtimes a worker may have beside the ML stack, by the package its inventory reports, and their names. A worker
# that reports one carries the label runtime_label(package) for placement; jobs that run in it need that label.
RUNTIMES = {"vllm": "vLLM"}
RUNTIME_PREFIX = "runtime:"


def runtime_label(package: str) -> str:
    return RUNTIME_PREFIX + package


def runtime_labels(inventory: object) -> frozenset[str]:
    """The runtime labels of a worker's inventory (the packages of RUNTIMES it reports a version of)."""
    if not isinstance(inventory, dict):
        return frozenset()
    return frozenset(runtime_label(name) for name in RUNTIMES if isinstance(inventory.get(name), str))


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
    queued: float | None = None  # epoch seconds it last entered the queue (requeued, retried); None: `created`
    noun: str = "job"  # how reasons name it: "run 12", "job 5"
    failed_on: str = ""  # the worker its last attempt failed on (lost, or handed back: a full disk, say)

    @property
    def name(self) -> str:
        return f"{self.noun} {self.key[1]}"

    @property
    def queued_since(self) -> float:
        return self.created if self.queued is None else max(self.created, self.queued)

    @property
    def cpu_capable(self) -> bool:
        return self.needs_gpu_bytes is None and self.needs_gpus <= 1

    @property
    def gpus_wanted(self) -> int:
        return max(1, self.needs_gpus)

    @property
    def bytes_wanted(self) -> int:
        return self.needs_gpu_bytes or 0


@dataclass(frozen=True)
class Reservation:
    """A GPU worker kept for a starving job: no job later in the order takes `gpus` (the GPUs that fit the
    job), nor any GPU of the worker where `whole`."""

    job: Job
    slot: Slot
    gpus: frozenset[int]
    whole: bool = False

    def keeps(self, gpu: Gpu) -> bool:
        return self.whole or gpu.index in self.gpus


@dataclass
class Plan:
    placements: list[tuple[Job, Slot, list[int]]] = field(default_factory=list)
    reasons: dict[tuple[str, int], str] = field(default_factory=dict)
    reservations: dict[int, Reservation] = field(default_factory=dict)  # by slot id


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


def choose(
    job: Job, slots: Sequence[Slot], kept: dict[int, Reservation] | None = None
) -> tuple[Slot, list[int]] | None:
    """The best place for the job now: the smallest GPUs that fit (CPU-only workers first for CPU-capable
    jobs), then the worker with the fewest jobs; None if nothing fits now. GPUs `kept` for a reserved job
    (by slot id) are not taken."""
    kept = kept or {}
    best: tuple[tuple[int, int, str], Slot, list[int]] | None = None
    for slot in slots:
        reservation = kept.get(slot.id)
        if slot.full or not set(job.needs_labels) <= slot.labels or (reservation and reservation.whole):
            continue
        if not slot.gpus:
            if job.cpu_capable:
                score = (0, slot.active, slot.name)
                if best is None or score < best[0]:
                    best = (score, slot, [])
            continue
        fitting = sorted((g for g in slot.free_gpus() if slot.available(g) >= job.bytes_wanted
                          and not (reservation and reservation.keeps(g))),
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
        runtimes = [RUNTIMES.get(label.removeprefix(RUNTIME_PREFIX), label) for label in job.needs_labels
                    if label.startswith(RUNTIME_PREFIX)]
        labels = [label for label in job.needs_labels if not label.startswith(RUNTIME_PREFIX)]
        if runtimes and not any(set(labels) <= s.labels for s in slots):
            return (f"needs a worker with {' and '.join(runtimes)} installed and labels {', '.join(labels)}; "
                    "no online worker has them all")
        if runtimes:
            return (f"needs a worker with {' and '.join(runtimes)} installed; no online worker reports it "
                    "(pip install it on a GPU worker: the worker's inventory, sent every 30 heartbeats and at its "
                    "start, then reports it)")
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
    line = _line(ahead)
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


def _fitting(job: Job, slot: Slot) -> list[Gpu]:
    """The worker's GPUs that could hold the job when nothing else runs on them."""
    return [g for g in slot.gpus if slot.usable(g) >= job.bytes_wanted]


def overtakable(job: Job, slots: Sequence[Slot]) -> bool:
    """Whether jobs behind this one could take what it waits for (see the module's docstring): it needs
    several GPUs, or a GPU with its labels is free by our count and large enough, but too full now."""
    if job.gpus_wanted > 1:
        return True
    return any(g.index not in s.held and s.usable(g) >= job.bytes_wanted > s.available(g)
               for s in slots if set(job.needs_labels) <= s.labels for g in s.gpus)


def reserve(job: Job, slots: Sequence[Slot], taken: dict[int, Reservation]) -> Reservation | None:
    """The GPU worker kept for a starving job: of those with its labels that could hold it when idle and
    that no one has reserved (`taken`, by slot id), the one with the fewest busy GPUs to free up before it
    fits (a worker at its `max_jobs` also needs one job to end), then the smallest GPUs that fit, then the
    name; None if every such worker is reserved."""
    best: tuple[tuple[int, int, str], Reservation] | None = None
    for slot in slots:
        if slot.id in taken or slot.capacity < 1 or not slot.gpus or not set(job.needs_labels) <= slot.labels:
            continue
        fitting = _fitting(job, slot)
        if len(fitting) < job.gpus_wanted:
            continue
        free = [g for g in fitting if g.index not in slot.held]
        smallest = sorted(fitting, key=lambda g: slot.usable(g))[: job.gpus_wanted]
        to_free = max(job.gpus_wanted - len(free), slot.active - slot.capacity + 1)
        score = (to_free, sum(slot.usable(g) for g in smallest), slot.name)
        if best is None or score < best[0]:
            whole = slot.max_jobs is not None and slot.max_jobs < len(slot.gpus)
            best = (score, Reservation(job, slot, frozenset(g.index for g in fitting), whole=whole))
    return None if best is None else best[1]


def _line(ahead: int) -> str:
    return "next in line" if ahead == 0 else f"{ahead} job{'s' if ahead != 1 else ''} ahead"


def _indices(gpus: Sequence[Gpu]) -> str:
    return f"GPU{'s' if len(gpus) != 1 else ''} {', '.join(str(g.index) for g in gpus)}"


def reserved(reservation: Reservation, ahead: int) -> str:
    """The wait reason of a job that has a worker kept for it."""
    job, slot = reservation.job, reservation.slot
    fitting = _fitting(job, slot)
    busy = sum(g.index in slot.held for g in fitting)
    details = [f"{_indices(fitting)} fit{'s' if len(fitting) == 1 else ''}"]
    if busy:
        details.append("it is busy" if len(fitting) == 1 else f"{busy} of them busy")
    if slot.full and slot.capacity < len(slot.gpus):
        details.append(f"the worker runs its limit of {slot.capacity} job{'s' if slot.capacity != 1 else ''}")
    elif busy <= len(fitting) - job.gpus_wanted:
        details.append("waiting for GPU memory used outside Tunedeck")
    return f"{_line(ahead)}: worker {slot.name} is kept for it ({'; '.join(details)})"


def needs(job: Job) -> str:
    """What a job needs, for another job's wait reason: "needs 2 GPUs with ~30 GiB each"."""
    size = f"~{gib(job.bytes_wanted)}"
    if job.gpus_wanted > 1:
        return f"needs {job.gpus_wanted} GPUs" + (f" with {size} each" if job.needs_gpu_bytes else "")
    if job.needs_gpu_bytes:
        return f"needs {size} of GPU memory"
    return "is ahead of it in the queue"


def held_back(reservation: Reservation) -> str:
    """The wait reason of a job that would have been placed but for this reservation."""
    what = f"worker {reservation.slot.name} is" if reservation.whole else f"GPUs of {reservation.slot.name} are"
    return f"waiting: {what} kept for {reservation.job.name}, which {needs(reservation.job)}"


def candidates(job: Job, slots: Sequence[Slot]) -> Sequence[Slot]:
    """The workers a job may go to: all of them, but the one its last attempt failed on while another online worker
    could take it (when idle). A job that failed for what its worker lacks (a full disk, a GPU that ran out of
    memory) would otherwise go straight back and spend its attempts there."""
    if not job.failed_on:
        return slots
    others = [slot for slot in slots if slot.name != job.failed_on]
    return others if others and misfit(job, others) is None else slots


def plan(jobs: Sequence[Job], slots: Sequence[Slot], active: dict[int, int], last_served: dict[int, float],
         now: float = 0.0, reserve_after: float | None = None) -> Plan:
    """Place what fits now, in order; give every job left queued its reason. `slots` are updated as
    jobs are placed on them. A job queued since `reserve_after` seconds before `now` or earlier that cannot
    be placed reserves a worker (None: no reservations)."""
    result = Plan()
    ahead = 0
    every_slot = slots
    for job in order(jobs, active, last_served):
        slots = candidates(job, every_slot)
        reason = misfit(job, slots)
        if reason is not None:
            result.reasons[job.key] = reason
            continue
        choice = choose(job, slots, result.reservations)
        if choice is None:
            starving = reserve_after is not None and now - job.queued_since >= reserve_after
            unkept = choose(job, slots) if result.reservations else None
            reservation = (reserve(job, slots, result.reservations)
                           if starving and unkept is None and overtakable(job, slots) else None)
            if unkept is not None:
                result.reasons[job.key] = held_back(result.reservations[unkept[0].id])
            elif reservation is not None:
                result.reservations[reservation.slot.id] = reservation
                result.reasons[job.key] = reserved(reservation, ahead)
            else:
                result.reasons[job.key] = waiting(job, slots, ahead)
            ahead += 1
            continue
        slot, gpus = choice
        slot.hold(gpus)
        result.placements.append((job, slot, gpus))
    return result


# --- What a job needs, decided when it is created --------------------------------------------------------

# Adapter jobs load the base once (bytes per parameter: workers.contract.kinds) plus the adapters, generation's
# KV cache and the CUDA context: a share and a fixed amount on top.
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
    decl = KINDS.get(kind)
    per_param = None if decl is None else decl.weight_bytes_per_param
    return None if per_param is None else gpu_bytes_or_cpu(rough_bytes(num_parameters, per_param))
