"""A training process's place in its group (rank, local rank, world size) and the collectives every rank makes.

Outside torchrun a process is rank 0 of 1 and the collectives return what they were given.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

from workers.contract.reporter import Reporter

# Rank 0 saving a checkpoint of a large model keeps the others waiting at the next collective:
# long enough for that, short enough that a stuck GPU ends the attempt.
COLLECTIVE_TIMEOUT_S = 900


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current_rank() -> Rank:
    """This process's place in the group (rank 0 of 1 outside torchrun)."""
    return Rank(
        int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    )


def init_group(rank: Rank) -> str:
    """Join the process group (NCCL on GPUs, gloo on the CPU) with a collective timeout; returns the backend."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank.local_rank)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
            **({"device_id": torch.device("cuda", rank.local_rank)} if cuda else {}),
        )
    return backend


def any_rank(*flags: bool) -> list[bool]:
    """Each flag true on every rank when it is true on any, in one collective (as given outside a group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return list(flags)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([1 if flag else 0 for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def gather(value: Any) -> list[Any]:
    """Every rank's value, in rank order, on every rank ([value] outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class StopTogether(TrainerCallback):  # type: ignore[misc]
    """All ranks stop (and save) at the same step. What any rank decided at the end of a step (rank 0's
    cancel, handover or supersession learnt from the launcher, early stopping, a checkpoint to write) is
    agreed on in one collective, so that no rank waits alone in the next one."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        r = self.reporter
        cancel, interrupt, superseded, stop, save = any_rank(
            r.user_cancelled, bool(r.interrupt_reason), r.superseded,
            bool(control.should_training_stop), bool(control.should_save),
        )
        r.user_cancelled = cancel
        r.superseded = superseded
        if interrupt and not r.interrupt_reason:
            r.interrupt_reason = "the worker is shutting down"
        control.should_training_stop = stop or cancel or interrupt or superseded
        control.should_save = save
