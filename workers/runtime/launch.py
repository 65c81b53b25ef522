"""Start a training attempt on one GPU in this process, or on several through torchrun.

`run_training_job(spec, reporter_factory, store)` is what the Celery task calls. A one-GPU run is the
train runner in this process. A run of num_gpus > 1 is `python -m torch.distributed.run --standalone
--nproc-per-node N -m workers.runtime.distributed <spec.json> <store>` in its own process group, with this
worker's environment (CUDA_VISIBLE_DEVICES names the GPUs it may use). torchrun is PyTorch's own
launcher: it sets each rank's environment, watches the ranks and tears the group down when one dies.

This process keeps the job's one reporter. Rank 0 relays its events over a local socket (see
workers/runtime/distributed.py); they are posted from here in batches, and the reply carries the cancel flag
back. Rank 0's final state is held until the group has exited: if a rank died first, the attempt fails
with which rank and how (the scheduler's retry resumes from the latest checkpoint). The group is killed
when this function returns, however it returns; a cancel not honoured within CANCEL_GRACE_S kills it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

from workers.contract.refusals import StaleAttempt
from workers.contract.reporter import Reporter
from workers.contract.spec import TrainSpec
from workers.contract.store import ArtifactStore
from workers.runtime.distributed import RELAY_ADDRESS_ENV, RELAY_KEY_ENV

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 120  # after a cancel, the ranks stop at their next step; a group stuck longer is killed
POLL_S = 5.0  # how often the launcher asks the server itself while rank 0 is silent (loading a model)
LOG_TAIL_LINES = 40
ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def run_training_job(
    spec: TrainSpec, reporter_factory: Callable[[], Reporter], store: ArtifactStore
) -> dict[str, Any] | None:
    """Run one attempt of a training job; returns the result on success (reported either way)."""
    reporter = reporter_factory()
    if not spec.train.distributed:
        from workers.training.train import run_training

        return run_training(spec, reporter, store)
    return GroupLaunch(spec, reporter, store).run()


def torchrun_command(nproc: int, spec_path: Path, store_root: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "--max-restarts=0", "-m", "workers.runtime.distributed", str(spec_path), str(store_root),
    ]


class GroupLaunch:
    def __init__(self, spec: TrainSpec, reporter: Reporter, store: ArtifactStore) -> None:
        self.spec, self.reporter, self.store = spec, reporter, store
        self.lock = threading.Lock()  # the reporter is used by the relay thread and by the waiting loop
        self.final: dict[str, Any] | None = None
        self.stale: StaleAttempt | None = None
        self.last_relay = time.monotonic()
        self.process: subprocess.Popen[bytes] | None = None

    def run(self) -> dict[str, Any] | None:
        self.reporter.started()
        if self.reporter.user_cancelled:  # cancelled after the claim, before this first report: launch nothing
            self.reporter.log("Cancelled at the user's request before the processes were launched.", level="warning")
            self.reporter.finish("cancelled")
            return None
        problem = self._problem()
        if problem:
            self.reporter.log(f"Failed: {problem}", level="error")
            self.reporter.finish("failed", error=problem)
            return None
        with tempfile.TemporaryDirectory(prefix="tunedeck-group-") as tmp:
            return self._run_in(Path(tmp))

    def _problem(self) -> str:
        train = self.spec.train
        problems = {**train.validate(has_eval_dataset=self.spec.eval_dataset is not None), **self.spec.lora.validate(train)}
        if problems:
            return "; ".join(f"{name}: {message}" for name, message in problems.items())
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible and visible < train.num_gpus:
            devices = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
            return f"num_gpus: the run asks for {train.num_gpus} GPUs; this worker sees {visible} (CUDA_VISIBLE_DEVICES={devices})"
        return ""

    def _run_in(self, tmp: Path) -> dict[str, Any] | None:
        train = self.spec.train
        spec_path = tmp / "spec.json"
        spec_path.write_text(self.spec.to_json(), encoding="utf-8")
        key = secrets.token_bytes(32)
        listener = Listener(str(tmp / "relay.sock"), family="AF_UNIX", authkey=key)
        relay = threading.Thread(target=self._relay, args=(listener,), daemon=True, name="rank0-relay")
        relay.start()
        import torch

        where = "GPUs " + os.environ.get("CUDA_VISIBLE_DEVICES", "(all)") if torch.cuda.is_available() else "the CPU (gloo)"
        strategy = train.strategy if train.distributed else "single"
        micro, accum = train.per_rank_batch() or (train.batch_size, train.grad_accum)
        with self.lock:
            self.reporter.log(
                f"Launching {train.num_gpus} processes ({strategy}) on {where}: micro-batch {micro} x {accum} "
                f"accumulation per process, global batch {train.batch_size * train.grad_accum}"
            )
            self.reporter.flush()
        env = {**os.environ, RELAY_ADDRESS_ENV: str(tmp / "relay.sock"), RELAY_KEY_ENV: key.hex()}
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
        output = tmp / "group.log"
        try:
            with output.open("wb") as sink:
                self.process = subprocess.Popen(
                    torchrun_command(train.num_gpus, spec_path, self.store.root), stdout=sink,
                    stderr=subprocess.STDOUT, env=env, cwd=package_root, start_new_session=True,
                    preexec_fn=_terminate_with_parent,
                )
                code = self._wait()
        finally:
            self._kill_group()
            listener.close()
        relay.join(timeout=10)
        if self.stale is not None:
            raise self.stale
        if self.reporter.superseded:
            raise StaleAttempt("a newer attempt owns this job")
        return self._report(code, output.read_text(encoding="utf-8", errors="replace"))

    def _wait(self) -> int:
        """Wait for the group; ask the server now and then while rank 0 is silent; kill a group that
        does not stop within the grace period after a cancel."""
        assert self.process is not None
        cancelled_at: float | None = None
        while True:
            try:
                return self.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            if self.stale is not None:
                self._kill_group()
                continue
            with self.lock:
                self.reporter.poll_stop()
            if time.monotonic() - self.last_relay > POLL_S:
                with self.lock:
                    self.last_relay = time.monotonic()
                    try:
                        self.reporter.flush()
                    except StaleAttempt as exc:
                        self.stale = exc
                    except Exception as exc:  # the server may be restarting; rank 0 keeps going
                        log.warning("report failed: %s", exc)
            if self.reporter.cancel_requested and cancelled_at is None:  # cancelled, handed over or superseded
                cancelled_at = time.monotonic()
            if cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_GRACE_S:
                with self.lock:
                    self.reporter.log(f"The ranks did not stop within {CANCEL_GRACE_S} s of the cancel: killed", level="warning")
                self._kill_group()

    def _relay(self, listener: Listener) -> None:
        """Rank 0's events into the job's reporter; its states kept until the group has exited."""
        try:
            connection = listener.accept()
        except OSError:
            return  # the group ended before rank 0 connected
        with connection:
            while True:
                try:
                    kind, payload = connection.recv()
                except (EOFError, OSError):
                    return
                with self.lock:
                    self.last_relay = time.monotonic()
                    if kind == "events":
                        self._forward(payload)
                    elif payload["state"] != "running":
                        self.final = payload
                    self.reporter.poll_stop()
                    reply = {
                        "cancel": self.reporter.user_cancelled, "interrupt": self.reporter.interrupt_reason,
                        "superseded": self.reporter.superseded or self.stale is not None,
                    }
                try:
                    connection.send(reply)
                except OSError:
                    return

    def _forward(self, batch: list[dict[str, Any]]) -> None:
        for event in batch:  # renumbered by this reporter: one sequence for the attempt
            self.reporter._event(event["kind"], event["message"], event["level"], event["data"])
        try:
            self.reporter.maybe_flush()
        except StaleAttempt as exc:
            self.stale = exc
        except Exception as exc:  # kept in the buffer for the next flush
            log.warning("report failed: %s", exc)

    def _report(self, code: int, output: str) -> dict[str, Any] | None:
        final = self.final
        root = ROOT_CAUSE.search(output)
        failed_rank = int(root.group(1)) if root else None
        if final is not None and (code == 0 or final["state"] != "failed" or failed_rank in (None, 0)):
            if code != 0:
                self.reporter.log(f"The process group exited with code {code} after rank 0 finished", level="warning")
            self.reporter.finish(final["state"], final["result"], final["error"])
            return final["result"] if final["state"] == "succeeded" else None
        reason = self._failure_reason(code, failed_rank, int(root.group(2)) if root else None)
        if final is not None and final["error"]:
            reason += f"; rank 0 then failed: {final['error']}"
        tail = "\n".join(output.strip().splitlines()[-LOG_TAIL_LINES:])
        if tail:
            self.reporter.log(f"Last lines of the process group's output:\n{tail}", level="warning")
        self.reporter.log(f"Failed: {reason}", level="error")
        self.reporter.finish("failed", error=reason)
        return None

    def _failure_reason(self, code: int, rank: int | None, exit_code: int | None) -> str:
        n = self.spec.train.num_gpus
        if rank is None:
            return f"the process group of {n} ranks exited with code {code} before rank 0 reported a result"
        how = f"exit code {exit_code}"
        if exit_code is not None and exit_code < 0:
            how = f"signal {signal.Signals(-exit_code).name}" if -exit_code in signal.valid_signals() else f"signal {-exit_code}"
        return f"rank {rank} of {n} died ({how}); the other ranks were stopped"

    def _kill_group(self) -> None:
        """End torchrun and every rank: SIGTERM, then SIGKILL whatever is left of the group."""
        if self.process is None:
            return
        pgid = self.process.pid  # its own session: the group id is its pid
        if self.process.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(pgid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate_with_parent() -> None:
    """torchrun gets SIGTERM (and stops its ranks) if the worker process dies without cleaning up (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
