"""Reporters carry a job's log lines, metrics and final status to wherever they are recorded.

A runner only talks to a `Reporter`. `MemoryReporter` keeps everything in lists (tests,
notebooks); `HttpReporter` (workers.runtime.client) posts batches to the worker API, fenced by (job, attempt).
Every event carries a per-attempt sequence number so a retried batch is stored once.

A job stops early for three reasons, all seen through `cancel_requested` (the flag every runner
checks at its steps): the user cancelled it (the control plane says so in its replies), the
worker is shutting down or the job was paused (`interrupt_reason`, from the worker or from the control plane's
`interrupt` reply: the job is handed back, to resume later), or a
newer attempt owns it (`superseded`: a 409 reply, or the worker was told so: report nothing more).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from workers.contract.redaction import redact, secret_values
from workers.contract.refusals import StaleAttempt

log = logging.getLogger(__name__)


SUPERSEDED = "superseded"  # what a stop check returns when a newer attempt owns the job


class Reporter:
    """Buffers events and sends them in batches; remembers whether the job must stop, and why."""

    flush_interval = 1.0
    max_buffer = 200

    def __init__(self) -> None:
        self._buffer: list[dict[str, Any]] = []
        self._seq = 0
        self._last_flush = time.monotonic()
        self.user_cancelled = False
        self.interrupt_reason = ""
        self.superseded = False
        # Polled at every step (it must be cheap): "" to go on, SUPERSEDED, or why the job is handed back.
        self.stop_check: Callable[[], str] | None = None
        self._open_outputs: dict[tuple[int, str], dict[str, Any]] = {}
        # The worker's credentials, never reported (workers/contract/redaction.py).
        self.secrets = secret_values(os.environ)
        self.last_reply: dict[str, Any] = {}  # the control plane's last answer to a batch (a kind's own flags too)

    @property
    def cancel_requested(self) -> bool:
        """Whether the job must stop at its next step: cancelled, interrupted or superseded."""
        return self.user_cancelled or bool(self.interrupt_reason) or self.superseded

    @cancel_requested.setter
    def cancel_requested(self, value: bool) -> None:
        self.user_cancelled = value

    def poll_stop(self) -> None:
        if self.stop_check is None or self.interrupt_reason or self.superseded:
            return
        reason = self.stop_check()
        if reason == SUPERSEDED:
            self.superseded = True
        elif reason:
            self.interrupt_reason = reason

    def _event(self, kind: str, message: str = "", level: str = "info", data: dict[str, Any] | None = None) -> None:
        self._seq += 1
        self._buffer.append(
            {"seq": self._seq, "kind": kind, "level": level, "message": message, "data": data or {}, "time": time.time()}
        )
        if len(self._buffer) >= self.max_buffer:
            self.flush()

    def log(self, message: str, level: str = "info") -> None:
        self._event("log", redact(message, self.secrets) if self.secrets else message, level)

    def metric(self, **values: Any) -> None:
        self._event("metric", data=values)

    def output(self, row: int, column: str, text: str, done: bool = False) -> None:
        """Newly generated text of one cell of a comparison (appended to what came before).

        Deltas of one cell within one flush window travel as one event: a grid of 9 columns x 64
        prompts sends at most one event per cell per flush, not one per token."""
        pending = self._open_outputs.get((row, column))
        if pending is not None:
            pending["data"]["text"] += text
            pending["data"]["done"] = done
            return
        self._event("output", data={"row": row, "column": column, "text": text, "done": done})
        if self._buffer:  # (empty if that event filled the buffer and went out at once)
            self._open_outputs[(row, column)] = self._buffer[-1]

    def chat(self, message: str, **data: Any) -> None:
        """A chat session's news: loaded and ready, or a turn's answers complete (`data`, see adapters/chat.py)."""
        self._event("chat", message, data=data)

    def next_turn(self, after: int, wait: float) -> dict[str, Any]:
        """A chat session's next message after turn `after`, waiting up to `wait` seconds for one: {"turn": {...}}
        when one came, {"close": True} when the session was closed, else {} (nothing yet)."""
        raise NotImplementedError

    def samples(self, step: int, rows: list[dict[str, Any]], errors: list[str] | None = None) -> None:
        """A few answers a training step sampled, each with its prompt and rewards ({"prompt", "completion",
        "rewards": {grader: score}, "total"}), and what the graders could not score: reinforcement objectives'
        live view of what the model writes."""
        totals = [row["total"] for row in rows if isinstance(row.get("total"), int | float)]
        mean = f", mean reward {sum(totals) / len(totals):.3f}" if totals else ""
        problems = f"; graders' problems: {'; '.join(errors)}" if errors else ""
        self._event("samples", f"step {step}: {len(rows)} sampled answers{mean}{problems}",
                    data={"step": step, "rows": rows, "errors": list(errors or [])})

    def checkpoint(self, step: int, **values: Any) -> None:
        self._event("checkpoint", f"Checkpoint saved at step {step}", data={"step": step, **values})

    def maybe_flush(self) -> None:
        """Flush if the last one is older than flush_interval: keeps the page live and cancel prompt."""
        self.poll_stop()
        if time.monotonic() - self._last_flush >= self.flush_interval:
            self.flush()

    def flush(self) -> None:
        self.poll_stop()
        if self.superseded:
            raise StaleAttempt("a newer attempt owns this job")
        batch, self._buffer = self._buffer, []
        self._open_outputs = {}
        self._last_flush = time.monotonic()
        try:
            reply = self._send_events(batch)
        except StaleAttempt:
            self.superseded = True  # every later step check stops, even where this exception is swallowed
            raise
        except Exception:
            self._buffer = batch + self._buffer  # keep them for the next try; the server dedupes by seq
            raise
        self.last_reply = reply
        self.user_cancelled = self.user_cancelled or bool(reply.get("cancel"))
        self.interrupt_reason = self.interrupt_reason or str(reply.get("interrupt") or "")

    def finish(self, state: str, result: dict[str, Any] | None = None, error: str = "") -> None:
        self.flush()
        self._status(state, result or {}, redact(error, self.secrets))

    def started(self) -> None:
        reply = self._status("running", {}, "")
        self.user_cancelled = bool(reply.get("cancel"))
        self.interrupt_reason = self.interrupt_reason or str(reply.get("interrupt") or "")

    def _status(self, state: str, result: dict[str, Any], error: str) -> dict[str, Any]:
        try:
            return self._send_status(state, result, error)
        except StaleAttempt:
            self.superseded = True
            raise

    def _send_events(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def _send_status(self, state: str, result: dict[str, Any], error: str) -> dict[str, Any]:
        raise NotImplementedError


class MemoryReporter(Reporter):
    def __init__(self, cancel_after_events: int | None = None, turns: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self.states: list[tuple[str, dict[str, Any], str]] = []
        self.cancel_after_events = cancel_after_events
        # A chat session's messages, handed over in order; then the session is closed (`turns` given) or stays
        # quiet until its idle timeout (an empty list).
        self.turns = turns
        self.close_when_done = bool(turns)

    def next_turn(self, after: int, wait: float) -> dict[str, Any]:
        pending = [t for t in self.turns or [] if t["index"] > after]
        if pending:
            return {"turn": pending[0]}
        if self.close_when_done:
            return {"close": True}
        time.sleep(min(wait, 0.05))
        return {}

    def _send_events(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        self.events.extend(batch)
        cancel = self.cancel_after_events is not None and len(self.events) >= self.cancel_after_events
        return {"cancel": cancel}

    def _send_status(self, state: str, result: dict[str, Any], error: str) -> dict[str, Any]:
        self.states.append((state, result, error))
        return {"cancel": False}

    @property
    def logs(self) -> list[str]:
        return [e["message"] for e in self.events if e["kind"] == "log"]

    @property
    def metrics(self) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["kind"] == "metric"]
