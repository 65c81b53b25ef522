"""One rank of a multi-GPU run: `python -m torch.distributed.run ... -m workers.runtime.distributed <spec.json>`.

torchrun starts one process per GPU with RANK, LOCAL_RANK and WORLD_SIZE set; each runs the same train
runner (workers/training/train.py). Rank 0 reports through a `RelayReporter`, which carries its events and final
state to the launcher (workers/runtime/launch.py) over a local socket; the launcher holds the job's one reporter,
so the sequence numbers and the final state are those of a single process. The other ranks report to a
`SilentReporter` (their errors go to stderr, which the launcher keeps). A rank whose attempt fails exits
non-zero so that torchrun tears the whole group down instead of leaving the others waiting in a
collective; a collective that waits longer than COLLECTIVE_TIMEOUT_S (workers.training.ranks) ends the same way.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

from workers.contract.reporter import Reporter
from workers.training.ranks import current_rank, init_group

RELAY_ADDRESS_ENV = "TUNEDECK_RELAY_ADDRESS"
RELAY_KEY_ENV = "TUNEDECK_RELAY_KEY"


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
