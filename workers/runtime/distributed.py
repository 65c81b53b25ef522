"""One rank of a multi-GPU run: `python -m torch.distributed.run ... -m workers.runtime.distributed <spec.json>`.

torchrun starts one process per GPU with RANK, LOCAL_RANK and WORLD_SIZE set; each runs the same train
runner (workers/training/train.py). Rank 0 reports through a `RelayReporter`, which carries its events and final
state to the launcher (workers/runtime/launch.py) over a local socket; the launcher holds the job's one reporter,
so the sequence numbers and the final state are those of a single process. The other ranks report to a
`SilentReporter` (their errors go to stderr, which the launcher keeps). A rank whose attempt fails exits
non-zero so that torchrun tears the whole group down instead of leaving the others waiting in a
collective; a collective that waits longer than COLLECTIVE_TIMEOUT_S ends the same way.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from workers.contract.reporter import Reporter

# Rank 0 saving a checkpoint of a large model keeps the others waiting at the next collective:
# long enough for that, short enough that a stuck GPU ends the attempt.
COLLECTIVE_TIMEOUT_S = 900
RELAY_ADDRESS_ENV = "TUNEDECK_RELAY_ADDRESS"
RELAY_KEY_ENV = "TUNEDECK_RELAY_KEY"


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


class _Outcome(Reporter):
    """Remembers the last state it reported (a failed rank must exit non-zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_state = ""

    def _send_status(self, state: str, result: dict[str, Any], error: str) -> dict[str, Any]:
        self.last_state = state
        return self._relay_status(state, result, error)

    def _relay_status(self, state: str, result: dict[str, Any], error: str) -> dict[str, Any]:
        return {"cancel": False}


class SilentReporter(_Outcome):
    """Ranks other than 0: nothing is recorded; errors are written to stderr for the launcher's log."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def _send_events(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        for event in batch:
            if event["kind"] == "log" and event["level"] == "error":
                print(f"[rank {self.rank}] {event['message']}", file=sys.stderr, flush=True)
        return {"cancel": False}


class RelayReporter(_Outcome):
    """Rank 0: events and states go to the launcher, whose reply carries the cancel flag."""

    flush_interval = 0.25  # a local socket: the launcher batches for the server

    def __init__(self, address: str, key: bytes) -> None:
        super().__init__()
        self.connection = Client(address, authkey=key)

    def _send_events(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        self.connection.send(("events", batch))
        return self._reply()

    def _relay_status(self, state: str, result: dict[str, Any], error: str) -> dict[str, Any]:
        self.connection.send(("status", {"state": state, "result": result, "error": error}))
        return self._reply()

    def _reply(self) -> dict[str, Any]:
        """The launcher's reporter's flags: cancel, a handover's reason, a newer attempt."""
        reply = dict(self.connection.recv())
        self.interrupt_reason = self.interrupt_reason or str(reply.get("interrupt") or "")
        self.superseded = self.superseded or bool(reply.get("superseded"))
        return reply


def _die_with_parent() -> None:
    """If torchrun's agent is killed, this rank goes too (Linux; elsewhere the launcher kills the group)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    from workers.contract.spec import TrainSpec
    from workers.contract.store import ArtifactStore
    from workers.training.train import run_training

    _die_with_parent()
    spec_path, store_root = Path(argv[0]), argv[1]
    spec = TrainSpec.from_json(spec_path.read_text(encoding="utf-8"))
    rank = current_rank()
    init_group(rank)
    reporter: _Outcome
    if rank.is_main:
        reporter = RelayReporter(os.environ[RELAY_ADDRESS_ENV], bytes.fromhex(os.environ[RELAY_KEY_ENV]))
    else:
        reporter = SilentReporter(rank.rank)
    try:
        run_training(spec, reporter, ArtifactStore(store_root))
    finally:
        import torch.distributed as dist

        if reporter.last_state != "failed" and dist.is_initialized():
            dist.destroy_process_group()
    return 1 if reporter.last_state == "failed" else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
