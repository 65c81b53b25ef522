"""Activation offloading for the runner's memory mode, with the backward's copies back started a layer ahead.

In memory mode every decoder layer is recomputed (non-reentrant checkpointing), so what autograd saves is mostly each
layer's input, and this moves those tensors to host memory until the backward needs them. trl's OffloadActivations
starts a tensor's copy back only when autograd unpacks it, and the compute stream waits for it at once, so no
transfer hides behind compute. Here, unpacking one offloaded tensor starts the copies of the ones saved just before
it (the layer the backward reaches next), about as many bytes as were just unpacked, on a side stream; the compute
stream later waits for that one copy's event, not for the side stream as a whole.

Copies go device to host on the side stream right after the save, into pinned buffers; the host buffer belongs to the
handle autograd keeps, so it lives exactly as long as the graph does (retain_graph included) and this object's own
bookkeeping (what prefetching walks, what deduplication looks up) is dropped at the end of each backward.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks

STAT_KEYS = ("offloaded", "offloaded_bytes", "deduped", "prefetched", "on_demand", "resident")


class _Entry:
    """One offloaded tensor, the handle autograd keeps for every save of it: its host copy, and the device copy
    while one is loaded (by a prefetch, or kept for a further save of the same tensor)."""

    __slots__ = ("device", "event", "host", "index", "key", "loaded", "nbytes", "prefetched", "saves", "source",
                 "unpacks", "version")

    def __init__(self, tensor: torch.Tensor, host: torch.Tensor, index: int) -> None:
        self.source = weakref.ref(tensor)  # the original, for deduplication and to skip copies while it lives
        self.key = id(tensor)  # an id is reused once its object dies: only `source` says whether it is still the one
        self.version = tensor._version
        self.device = tensor.device
        self.host = host
        self.nbytes = tensor.nbytes
        self.index = index  # position in the pass's pack order
        self.saves = 1
        self.unpacks = 0
        self.loaded: torch.Tensor | None = None
        self.event: torch.cuda.Event | None = None  # when the copy in `loaded` is done (cuda)
        self.prefetched = False  # loaded ahead and not unpacked yet


class ActivationOffload(saved_tensors_hooks):
    """Context under which the tensors autograd saves move to host memory, and come back a layer ahead of the
    backward that needs them.

    Offloaded: plain tensors (not Parameters, their subclasses, or views of them: weights stay where they are) on
    `device`, contiguous, of at least `min_bytes`. A tensor saved several times is offloaded once. `device="cpu"`
    runs the same bookkeeping with copies into other CPU tensors instead of streams and pinned memory: it exists so
    the deduplication, prefetch and cleanup logic can be tested on a machine without an accelerator.

    `stats` counts the current (or last) forward and backward, `totals` every pass since construction: tensors
    offloaded and their bytes, saves deduplicated, unpacks served by a prefetch, by a copy started on demand, or by
    the original tensor when it was still alive and unchanged.
    """

    def __init__(self, min_bytes: int = 2**20, prefetch: bool = True, device: str = "cuda") -> None:
        super().__init__(self._pack, self._unpack)
        self.min_bytes = min_bytes
        self.prefetch = prefetch
        self.device_type = torch.device(device).type
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.totals = dict.fromkeys(STAT_KEYS, 0)
        self._entries: list[_Entry | None] = []  # this pass's offloaded tensors in pack order; None once consumed
        self._by_id: dict[int, _Entry] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._cleanup_task = -1  # the backward (graph task) whose end drops this pass's bookkeeping
        self._new_pass = True

    @property
    def tracked(self) -> int:
        """Offloaded tensors this object still tracks (0 after each backward)."""
        return sum(entry is not None for entry in self._entries)

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] += n
        self.totals[key] += n

    def _offloadable(self, tensor: torch.Tensor) -> bool:
        return (type(tensor) is torch.Tensor and tensor.device.type == self.device_type
                and tensor.nbytes >= self.min_bytes and tensor.is_contiguous()
                and not isinstance(tensor._base, torch.nn.Parameter))

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    @staticmethod
    def _alive(entry: _Entry) -> torch.Tensor | None:
        """The original tensor, if something else still holds it unchanged: no copy back needed."""
        source = entry.source()
        return source if source is not None and source._version == entry.version else None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | _Entry:
        if not self._offloadable(tensor):
            return tensor
        if self._new_pass:
            self.stats = dict.fromkeys(STAT_KEYS, 0)
            self._new_pass = False
        entry = self._by_id.get(id(tensor))
        if entry is not None and self._alive(entry) is tensor:
            entry.saves += 1
            self._count("deduped")
            return entry
        if tensor.device.type == "cuda":
            compute = torch.cuda.current_stream(tensor.device)
            side = self._side_stream(tensor.device)
            side.wait_stream(compute)  # the copy reads what the compute stream has written so far
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            with torch.cuda.stream(side):
                host.copy_(tensor, non_blocking=True)
            # The original may be freed (all we keep is a weakref) while the copy is still queued: record_stream makes
            # the allocator hold its block until the side stream's work queued so far is done. No event is needed
            # for the copy back either, which runs on the same stream after this one.
            tensor.record_stream(side)
        else:
            host = tensor.clone()
        entry = _Entry(tensor, host, len(self._entries))
        self._entries.append(entry)
        self._by_id[entry.key] = entry
        self._count("offloaded")
        self._count("offloaded_bytes", entry.nbytes)
        return entry

    def _load(self, entry: _Entry) -> None:
        """Start the copy of an entry back to its device."""
        if entry.device.type != "cuda":
            entry.loaded = entry.host.clone()
            return
        side = self._side_stream(entry.device)
        # Allocated under the side stream: its block comes from that stream's pool, so no earlier use of it by the
        # compute stream can race the copy (the allocator hands such a block back only after the compute stream's
        # recorded uses are done). The host buffer was written by this same stream, so the copy is ordered after it.
        with torch.cuda.stream(side):
            entry.loaded = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=entry.device)
            entry.loaded.copy_(entry.host, non_blocking=True)
            entry.event = side.record_event()

    def _unpack(self, packed: torch.Tensor | _Entry) -> torch.Tensor:
        task = torch._C._current_graph_task_id()  # -1 when a saved tensor is read outside a backward
        if self._entries and task not in (-1, self._cleanup_task):
            torch.autograd.variable.Variable._execution_engine.queue_callback(self._end_backward)
            self._cleanup_task = task
        if isinstance(packed, torch.Tensor):
            return packed
        entry = packed
        entry.unpacks += 1
        tensor = self._alive(entry)
        if tensor is not None:
            self._count("resident")
        else:
            if entry.prefetched:
                self._count("prefetched")
                entry.prefetched = False
            elif entry.loaded is None:
                self._load(entry)
                self._count("on_demand")
            tensor = entry.loaded
            assert tensor is not None
            if entry.event is not None:
                compute = torch.cuda.current_stream(entry.device)
                compute.wait_event(entry.event)
                # Made on the side stream, used on the compute one: the allocator must not give the block back to
                # the side stream before the compute stream's work queued up to the tensor's free is done.
                tensor.record_stream(compute)
        tracked = entry.index < len(self._entries) and self._entries[entry.index] is entry
        if entry.unpacks >= entry.saves:  # every save unpacked: let go of the device copy (a rerun loads again)
            entry.loaded = entry.event = None
            if tracked:
                self._entries[entry.index] = None
                if self._by_id.get(entry.key) is entry:
                    del self._by_id[entry.key]
        if tracked and self.prefetch:
            self._prefetch_below(entry.index, entry.nbytes)
        return tensor

    def _prefetch_below(self, index: int, nbytes: int) -> None:
        """Load the entries saved before `index` (the backward's next ones) until at least one and `nbytes` bytes
        are loaded ahead."""
        ahead = count = 0
        for i in range(index - 1, -1, -1):
            if ahead >= nbytes and count:
                break
            entry = self._entries[i]
            if entry is None or self._alive(entry) is not None:
                continue
            if entry.loaded is None:
                self._load(entry)
                entry.prefetched = True
            ahead += entry.nbytes
            count += 1

    def _end_backward(self) -> None:
        """Drop this pass's bookkeeping and whatever was loaded and not used; host copies go with autograd's
        handles. A device copy loaded on the side stream and never used on the compute stream can be freed without
        a sync: its block goes back to the side stream's pool, whose later work is ordered after the copy."""
        for entry in self._entries:
            if entry is not None:
                entry.loaded = entry.event = None
                entry.prefetched = False
        self._entries = []
        self._by_id = {}
        self._cleanup_task = -1
        self._new_pass = True


def install(trainer: Any, context: Any = None) -> Any:
    """Run each of the trainer's steps (forward and backward) under `context` (default: a new ActivationOffload,
    returned for its stats), for trainers that have no offloading setting of their own (ORPO, CPO)."""
    context = context if context is not None else ActivationOffload()
    step = trainer.training_step

    def training_step(*args: Any, **kwargs: Any) -> Any:
        with context:
            return step(*args, **kwargs)

    trainer.training_step = training_step
    return context
