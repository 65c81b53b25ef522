"""An interactive chat session on a worker: the base and its adapters are loaded once and stay loaded; each
message of the session is answered by every column (the base and/or adapters), token by token, until the
session is closed or has been idle for `idle_timeout_s`, when the job ends and its GPU is free again.

The control plane hands each message over through `Reporter.next_turn` (a long poll of the worker API) as a
turn: its index, each column's conversation so far (every column keeps its own answers: the turns differ per
column) and the sampling settings. The answers stream as `output` events (row = the turn's index), a turn's
end as a `chat` event with each answer's text, tokens, time to first token and whether it was stopped. The
user's stop reaches the worker in the replies to its batches (`stop_turn`: the newest turn to stop).

`run_chat(spec, reporter, store)` has the contract of every runner.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from workers.adapters.generate import answer_stops
from workers.adapters.inference import (
    can_batch,
    dequantize_for_generation,
    kv_cache_bytes,
    load_for_inference,
    precision_label,
    ref_refusals,
)
from workers.contract.jobrunner import RunnerError, check_cancel, run_reported
from workers.contract.jobspecs import BASE_KEY, ChatSpec, GenerationParams, PromptRow
from workers.contract.reporter import Reporter
from workers.contract.store import ArtifactStore
from workers.data.prompts import prompt_ids
from workers.formatting import duration, figure, plural
from workers.generation.columns import mixed_batch_refusals, peft_adapter_name
from workers.generation.engine import TextStream, column_context, generate_rows, generation_options, plan_decoding
from workers.generation.stacked import stacked_lora
from workers.generation.stops import Stops
from workers.training.modelinfo import ModelNotFound

POLL_WAIT_S = 20.0  # the longest a long poll for the next message waits before asking again
CACHE_POSITIONS = 8192  # the conversation length the GPU must keep room for when a 4-bit base is dequantized


def run_chat(spec: ChatSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any] | None:
    return run_reported(
        reporter,
        lambda: ChatSession(spec, reporter, store).serve(),
        expected=(RunnerError, ModelNotFound),
        cancelled_message="The chat session was stopped: the model is unloaded.",
    )


class ChatSession:
    def __init__(self, spec: ChatSpec, reporter: Reporter, store: ArtifactStore) -> None:
        problems = spec.validate()
        if problems:
            raise RunnerError("; ".join(f"{name}: {message}" for name, message in problems.items()))
        self.spec, self.reporter, self.store = spec, reporter, store
        self.columns = ([BASE_KEY] if spec.include_base else []) + [a.key for a in spec.adapters]

    def serve(self) -> dict[str, Any]:
        spec, reporter = self.spec, self.reporter
        started = time.monotonic()
        reporter.chat(f"Loading {spec.base_model.source} with {plural(len(spec.adapters), 'adapter')}",
                      state="loading")
        reporter.flush()
        self.model, self.tokenizer, device = load_for_inference(
            spec.base_model, spec.adapters, spec.load, self.store, reporter)
        self.stops: Stops = answer_stops(self.model, self.tokenizer, reporter)
        # A 4-bit base dequantized once where the GPU has room beside a long conversation's KV cache of every
        # column: each decode step then reads compute-dtype weights only (time to first token and speed).
        weights = dequantize_for_generation(self.model, kv_cache_bytes(self.model, len(self.columns), CACHE_POSITIONS))
        if weights:
            reporter.log(weights)
        refusals = mixed_batch_refusals(self.model, {a.key: a.label or a.key for a in spec.adapters})
        self.batched = len(self.columns) > 1 and can_batch(spec.adapters) and not refusals
        if len(self.columns) > 1 and not self.batched:
            reporter.log("Columns answer one after another: " + "; ".join(refusals or ref_refusals(spec.adapters)),
                         level="warning")
        self.decoding = plan_decoding(self.model, self.columns, "auto", self.batched)
        reporter.log(f"Decoding: {self.decoding.describe()}")
        config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        self.context = int(getattr(config, "max_position_embeddings", 0) or 0)  # 0: unknown, nothing is left out
        load_s = time.monotonic() - started
        reporter.chat(f"Ready: loaded in {duration(load_s)} ({precision_label(spec.load, device)} on {device.kind}); "
                      f"released after {duration(spec.idle_timeout_s)} without a message",
                      state="ready", load_s=round(load_s, 2), device=device.kind)
        reporter.flush()

        answered, last, idle_since, closed = 0, 0, time.monotonic(), "closed"
        while True:
            check_cancel(reporter)
            left = spec.idle_timeout_s - (time.monotonic() - idle_since)
            if left <= 0:
                closed = "idle"
                reporter.chat(f"Released after {duration(spec.idle_timeout_s)} without a message", state="released")
                break
            reply = reporter.next_turn(last, min(POLL_WAIT_S, left))
            check_cancel(reporter)
            if reply.get("close"):
                reporter.chat("Closed: the model is unloaded", state="closed")
                break
            turn = reply.get("turn")
            if not turn:
                continue
            self.answer(turn)
            answered += 1
            last = int(turn["index"])
            idle_since = time.monotonic()
        return {"turns": answered, "closed": closed, "load_s": round(load_s, 2), "columns": self.columns}

    def answer(self, turn: dict[str, Any]) -> None:
        """Every column's answer to one message, streamed; then the turn's `chat` event with the final texts."""
        reporter, index = self.reporter, int(turn["index"])
        received = time.monotonic()
        params = GenerationParams(**{**turn.get("generation", {}), "chat_template": True})
        fitted = {c: self.fit(turn["conversations"][c], params.max_new_tokens) for c in self.columns}
        refused = {c: why for c, (_, _, _, why) in fitted.items() if why}
        if refused:  # the message alone does not fit the model's context: said on the answers, the session goes on
            answers = {c: {"text": "", "tokens": 0, "first_token_s": None, "seconds": 0.0, "stopped": False,
                           "error": refused.get(c) or "not answered: another column's conversation does not fit"}
                       for c in self.columns}
            reporter.chat(f"Turn {index}: {next(iter(refused.values()))}", state="answered", turn=index,
                          answers=answers)
            reporter.flush()
            return
        rows = [fitted[c][0] for c in self.columns]
        dropped = max(fitted[c][1] for c in self.columns)
        if dropped:
            reporter.log(f"Turn {index}: the {plural(dropped, 'oldest exchange')} left out to fit the model's "
                         f"{self.context:,}-token context with {params.max_new_tokens:,} new tokens")
        room = min(fitted[c][2] for c in self.columns)
        if room < params.max_new_tokens:
            reporter.log(f"Turn {index}: at most {room:,} new tokens fit the model's {self.context:,}-token context")
            params = dataclasses.replace(params, max_new_tokens=room)
        first_token: dict[str, float] = {}
        stream = TextStream(lambda row, column, text: reporter.output(row, column, text), self.stops,
                            reporter.flush_interval)

        def on_step(cells: list[tuple[int, str]], generated: Any) -> None:
            for _, column in cells:
                first_token.setdefault(column, time.monotonic() - received)
            stream.step(cells, generated)

        def should_stop() -> bool:
            reporter.maybe_flush()
            reply = reporter.last_reply
            return reporter.cancel_requested or bool(reply.get("close")) or int(reply.get("stop_turn") or 0) >= index

        import torch

        torch.manual_seed(params.seed)
        options = {**generation_options(params, self.tokenizer.pad_token_id, 0), **self.stops.generate_options()}
        criteria = self.stops.criteria()
        ids: dict[str, list[int]] = {}
        seconds: dict[str, float] = {}
        if self.batched:
            cells = [(index, column) for column in self.columns]
            with stacked_lora(self.model, self.columns) as stacking:
                names = None if stacking else [c if c == BASE_KEY else peft_adapter_name(c) for c in self.columns]
                generated = generate_rows(self.model, rows, cells, self.tokenizer.pad_token_id, options, names, on_step,
                                          should_stop, criteria, columns=len(self.columns), decoding=self.decoding)
            for column, row_ids in zip(self.columns, generated, strict=True):
                ids[column], seconds[column] = self.stops.cut(row_ids), time.monotonic() - received
        else:
            for column, row in zip(self.columns, rows, strict=True):
                if should_stop():
                    ids[column], seconds[column] = [], 0.0
                    continue
                begun = time.monotonic()
                with column_context(self.model, column):
                    generated = generate_rows(self.model, [row], [(index, column)], self.tokenizer.pad_token_id,
                                              options, None, on_step, should_stop, criteria, columns=1,
                                              decoding=self.decoding)
                ids[column], seconds[column] = self.stops.cut(generated[0]), time.monotonic() - begun
        stopped = should_stop()
        texts = {(index, column): self.stops.text(ids[column]) for column in self.columns}
        stream.finish(texts)
        answers = {
            column: {
                "text": texts[(index, column)],
                "tokens": self.stops.answer_tokens(ids[column]),
                "first_token_s": round(first_token[column], 3) if column in first_token else None,
                "seconds": round(seconds[column], 3),
                "stopped": stopped and not self._ended(ids[column], params),
            }
            for column in self.columns
        }
        tokens = sum(a["tokens"] for a in answers.values())
        elapsed = time.monotonic() - received
        firsts = [a["first_token_s"] for a in answers.values() if a["first_token_s"] is not None]
        first = f", first token after {duration(min(firsts))}" if firsts else ""
        reporter.chat(f"Turn {index}: {plural(tokens, 'token')} in {duration(elapsed)} "
                      f"({figure(tokens / max(elapsed, 1e-9))} tokens/s{first}){' · stopped' if stopped else ''}",
                      state="answered", turn=index, answers=answers)
        reporter.flush()

    def fit(self, turns: list[dict[str, str]], max_new_tokens: int) -> tuple[list[int], int, int, str]:
        """A conversation's prompt ids within the model's context, with room for the new tokens where there is:
        the oldest exchanges (a message and its answer; the system prompt stays) are left out first, then the new
        tokens capped. Returns (ids, exchanges left out, new tokens that fit, "" or why the message cannot be
        answered at all: it fills the context by itself)."""
        start = 1 if turns and turns[0]["role"] == "system" else 0
        dropped = 0
        while True:
            ids = prompt_ids(self.tokenizer, PromptRow(turns=turns), True)
            if not self.context or len(ids) + max_new_tokens <= self.context:
                return ids, dropped, max_new_tokens, ""
            if len(turns) - start <= 1:
                room = self.context - len(ids)
                if room > 0:
                    return ids, dropped, room, ""
                return ids, dropped, 0, (f"the message takes {len(ids):,} tokens: it does not fit the model's "
                                         f"{self.context:,}-token context")
            turns = turns[:start] + turns[start + 2 :]
            dropped += 1

    def _ended(self, ids: list[int], params: GenerationParams) -> bool:
        """Whether an answer ended by itself (its stop, or the token limit) rather than by the user's stop."""
        return len(ids) >= params.max_new_tokens or self.stops.visible(ids)[1]

