"""The compare runner: every adapter's answer to each prompt beside the base's, side by side.

The base is loaded once and every adapter is attached to it under its key; the grid of cells (prompt row by
column) is answered by the generation engine (workers.generation.engine): every column of a prompt in one batch
where PEFT allows it, else one column after another. A job first dequantizes a 4-bit base once where the GPU has
room and plans how the steps run (`prepare_generation`), and says both in its log.

`run_compare(spec, reporter, store)` has the contract of the train runner.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from workers.adapters.inference import (
    can_batch,
    dequantize_for_generation,
    kv_cache_bytes,
    load_for_inference,
    precision_label,
    ref_refusals,
)
from workers.contract.jobrunner import Cancelled, RunnerError, check_cancel, run_reported
from workers.contract.jobspecs import BASE_KEY, CompareSpec, GenerationParams
from workers.contract.reporter import Reporter
from workers.contract.store import ArtifactStore
from workers.formatting import count, duration, figure, plural
from workers.generation.columns import mixed_batch_refusals
from workers.generation.engine import Cell, Decoding, encode_prompts, generate_text_grid, plan_decoding, static_length
from workers.generation.stops import Stops, stop_tokens
from workers.training.modelinfo import ModelNotFound

# --- the runner -------------------------------------------------------------------------------------------


def run_compare(spec: CompareSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any] | None:
    """Run one attempt of a comparison and report its outcome; returns the result on success."""
    return run_reported(
        reporter,
        lambda: _compare(spec, reporter, store),
        expected=(RunnerError, ModelNotFound),
        cancelled_message="Cancelled: generation stopped at the user's request.",
    )


def _compare(spec: CompareSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any]:
    started = time.monotonic()
    problems = spec.validate()
    if problems:  # the control plane checks before queueing; a spec from elsewhere gets the same answer
        raise RunnerError("; ".join(f"{name}: {message}" for name, message in problems.items()))
    columns = ([BASE_KEY] if spec.include_base else []) + [a.key for a in spec.adapters]
    reporter.log(f"Comparing {len(columns)} column(s) on {len(spec.prompts)} prompt(s)")
    model, tokenizer, device = load_for_inference(spec.base_model, spec.adapters, spec.load, store, reporter)
    stops = answer_stops(model, tokenizer, reporter)
    check_cancel(reporter)

    refusals = mixed_batch_refusals(model, {a.key: a.label or a.key for a in spec.adapters})
    batched = can_batch(spec.adapters) and not refusals
    if batched:
        reporter.log("Batched: every column of a prompt in one generate() call (PEFT mixed-adapter batches)")
    else:
        reasons = refusals or ref_refusals(spec.adapters)
        reporter.log("Sequential, one column after another: " + "; ".join(reasons), level="warning")
    weights, decoding = prepare_generation(
        model, encode_prompts(tokenizer, spec.prompts, spec.generation.chat_template), columns, spec.generation,
        batched=batched, batch_size=spec.batch_size, reporter=reporter,
    )  # fmt: skip
    reporter.flush()
    stream = _OutputStream(reporter)
    generating = time.monotonic()
    texts, ids = generate_text_grid(
        model,
        tokenizer,
        spec.prompts,
        columns,
        spec.generation,
        stops=stops,
        batched=batched,
        batch_size=spec.batch_size,
        on_text=stream.add,
        should_stop=stream.poll,
        stream_interval=reporter.flush_interval,
        cache=decoding,
    )
    stream.send()
    seconds = time.monotonic() - generating
    if reporter.cancel_requested:
        raise Cancelled()

    outputs = [
        {"row": row, "column": column, "text": texts[(row, column)], "tokens": stops.answer_tokens(ids[(row, column)])}
        for row in range(len(spec.prompts))
        for column in columns
    ]
    generated = sum(len(cell_ids) for cell_ids in ids.values())
    speed = figure(generated / max(seconds, 1e-9))
    reporter.log(f"Generated {plural(count(generated), 'token')} in {duration(seconds)} ({speed} tokens/s)")
    return {
        "outputs": outputs,
        "mode": "batched" if batched else "sequential",
        "columns": columns,
        "runtime_s": round(time.monotonic() - started, 2),
        "generation_s": round(seconds, 2),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / max(seconds, 1e-9), 1),
        "device": device.kind,
        "dtype": device.dtype_name,
        "base_precision": precision_label(spec.load, device),
        "stop_tokens": stops.as_json(),
        "decoding": decoding.describe(),
        "base_weights": weights or None,
    }


def prepare_generation(
    model: Any,
    prompt_ids: list[list[int]],
    columns: list[str],
    params: GenerationParams,
    *,
    batched: bool,
    batch_size: int,
    reporter: Reporter | None = None,
) -> tuple[str, Decoding]:
    """Before a job's generation: a 4-bit base dequantized once where the GPU has room for it beside the largest
    call's KV cache (`dequantize_for_generation`), then the KV cache and decode step (`plan_decoding`, auto).
    Both are said in the job's log; returns (what became of 4-bit weights, "" for none; the decoding plan, its
    static cache sized for the longest prompt)."""
    rows = min(batch_size, len(prompt_ids)) * (len(columns) if batched else 1)
    longest = max((len(ids) for ids in prompt_ids), default=0)
    weights = dequantize_for_generation(model, kv_cache_bytes(model, rows, longest + params.max_new_tokens))
    decoding = plan_decoding(model, columns, "auto", batched)
    if decoding.static:  # the job's calls (an evaluation's chunks too) share one cache length
        decoding = replace(decoding, length=static_length(longest, params.max_new_tokens))
    if reporter is not None:
        if weights:
            reporter.log(weights)
        reporter.log(f"Decoding: {decoding.describe()}")
    return weights, decoding


def answer_stops(model: Any, tokenizer: Any, reporter: Reporter) -> Stops:
    """Where this job's answers end (workers.generation.stops), said in its log."""
    stops = stop_tokens(tokenizer, model)
    reporter.log(stops.describe())
    return stops


class _OutputStream:
    """Text deltas to the reporter, merged per cell between flushes: one event per cell and flush, not per token.

    The text is decoded at the pace of the flushes too (`stream_interval`), so streaming costs the GPU nothing."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.pending: dict[Cell, str] = {}
        self.last_send = time.monotonic()

    def add(self, row: int, column: str, text: str) -> None:
        self.pending[(row, column)] = self.pending.get((row, column), "") + text

    def poll(self) -> bool:
        """Called every decode step: sends what is due and says whether to stop (cancel requested)."""
        if time.monotonic() - self.last_send >= self.reporter.flush_interval:
            self.send()
        self.reporter.maybe_flush()
        return self.reporter.cancel_requested

    def send(self) -> None:
        for (row, column), text in self.pending.items():
            self.reporter.output(row, column, text)
        self.pending.clear()
        self.last_send = time.monotonic()


