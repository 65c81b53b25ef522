"""Evaluation: score adapters (and their base) on a dataset whose rows carry reference answers.

`run_evaluate(spec, reporter, store)` has the contract of the train runner. For every column (the
base, then each adapter) it measures:

- loss: mean cross-entropy over the reference answer's tokens given the prompt (prompt tokens
  masked, every reference token weighted alike), and perplexity = exp(loss);
- from greedy answers (spec.generation, temperature 0 by default): exact match and ROUGE-L F1
  against the reference (see workers.adapters.scoring), and the mean answer length in tokens.

A row's prompt is every turn before its reference answer, a system prompt included (workers.data.prompts,
as for comparisons drawn from a dataset). Prompts are tokenized the way training saw them: conversational
rows (alpaca, messages, sharegpt) through the chat template, plain prompt/completion rows as raw text with
EOS after the completion; the same prompt tokens feed the loss and the generation
(GenerationParams.chat_template is not used). Answers end at EOS or where the chat template ends an
assistant's turn (workers.generation.stops).

`completion_loss(model, tokenizer, rows)` is the loss part alone, for instruction/output rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers.adapters.scoring import exact_match, rouge_l
from workers.contract.jobrunner import Cancelled, RunnerError, check_cancel, run_reported
from workers.contract.jobspecs import BASE_KEY, EvaluateSpec, PromptRow
from workers.contract.reporter import Reporter
from workers.contract.store import ArtifactStore
from workers.data.datasets import DatasetError, load_trl_rows, to_trl_row
from workers.data.prompts import chat_ids, prompt_ids
from workers.data.splits import eval_rows, held_out_indices
from workers.generation.stops import Stops
from workers.training.modelinfo import ModelNotFound

SAMPLE_ROWS = 20
MAX_LOSS_BATCH_ROWS = 32
LOGITS_BUDGET_BYTES = 512 * 2**20  # float32 logits of one loss batch; bounds memory for large vocabularies
GENERATION_CHUNK = 16  # prompts per progress report while generating (each with every column)


@dataclass
class Encoded:
    ids: list[int]  # prompt and reference
    start: int  # index of the first reference token
    prompt_ids: list[int]  # what generation continues from


# --- rows --------------------------------------------------------------------------------------------------


def select_rows(spec: EvaluateSpec, rows: list[PromptRow]) -> list[PromptRow]:
    if spec.split == "held_out":
        rows = [rows[i] for i in held_out_indices(len(rows), spec.eval_fraction, spec.seed)]
    return rows[: spec.max_rows] if spec.max_rows else rows


# --- tokens ------------------------------------------------------------------------------------------------


def encode(tokenizer: Any, row: PromptRow) -> Encoded:
    """Token ids of prompt + reference, and where the reference starts (where the two tokenizations diverge)."""
    prompt = prompt_ids(tokenizer, row, chat_template=row.conversational)
    if row.conversational:
        ids = chat_ids(tokenizer, [*row.turns, {"role": "assistant", "content": row.reference}], False)
    else:
        completion = row.reference
        eos = tokenizer.eos_token or ""
        if eos and not completion.endswith(eos):
            completion += eos
        ids = list(tokenizer(row.prompt + completion)["input_ids"])
    start = 0
    while start < min(len(prompt), len(ids)) and prompt[start] == ids[start]:
        start += 1
    return Encoded(ids, max(start, 1), prompt)


# --- loss --------------------------------------------------------------------------------------------------


def _loss_batches(encoded: list[Encoded], vocab_size: int) -> list[list[int]]:
    """Row indices grouped by similar length, each group's padded logits within LOGITS_BUDGET_BYTES."""
    budget = max(64, LOGITS_BUDGET_BYTES // (4 * max(vocab_size, 1)))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids)):
        width = len(encoded[index].ids)  # sorted: the longest so far
        if current and ((len(current) + 1) * width > budget or len(current) >= MAX_LOSS_BATCH_ROWS):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def reference_nll(
    model: Any,
    encoded: list[Encoded],
    pad_token_id: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """Summed cross-entropy of every reference token and how many there are (right-padded batches).

    on_batch(rows) is called after each batch; it may raise to stop."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in _loss_batches(encoded, _vocab_size(model)):
            rows = [encoded[i] for i in batch]
            width = max(len(r.ids) for r in rows)
            input_ids = torch.tensor([r.ids + [pad_token_id] * (width - len(r.ids)) for r in rows], device=device)
            mask = torch.tensor([[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in rows], device=device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            logits = logits[:, -width:]  # prompt tuning prepends its virtual tokens' positions
            targets = torch.zeros_like(input_ids, dtype=torch.bool)
            for j, r in enumerate(rows):
                targets[j, r.start : len(r.ids)] = True
            # Position t predicts token t + 1.
            picked = logits[:, :-1][targets[:, 1:]].float()
            wanted = input_ids[:, 1:][targets[:, 1:]]
            total += float(torch.nn.functional.cross_entropy(picked, wanted, reduction="sum"))
            count += int(wanted.numel())
            if on_batch is not None:
                on_batch(len(batch))
    return total, count


def completion_loss(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> float:
    """Mean cross-entropy over the answer tokens of instruction/output rows (prompt tokens masked)."""
    trl_rows = [to_trl_row("alpaca", row) for row in rows]
    encoded = [encode(tokenizer, r) for r in eval_rows("alpaca", trl_rows)]
    total, count = reference_nll(model, encoded, _pad_id(tokenizer))
    return total / max(count, 1)


def _pad_id(tokenizer: Any) -> int:
    """Any id does for padding on the right: attention never looks ahead, padded positions are not scored."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


# --- the runner --------------------------------------------------------------------------------------------


def run_evaluate(spec: EvaluateSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any] | None:
    """Run one attempt and report its outcome; returns the result on success."""
    return run_reported(
        reporter,
        lambda: _evaluate(spec, reporter, store),
        expected=(RunnerError, DatasetError, ModelNotFound),
        cancelled_message="Cancelled: evaluation stopped at the user's request.",
    )


class _Progress:
    """Work units done (a row's loss or a row's answer, per column), sent as step / total_steps metrics."""

    def __init__(self, reporter: Reporter, total: int) -> None:
        self.reporter, self.total, self.done = reporter, total, 0
        reporter.metric(step=0, total_steps=total)

    def advance(self, units: int, **values: Any) -> None:
        self.done += units
        self.reporter.metric(step=self.done, total_steps=self.total, **values)
        self.reporter.maybe_flush()
        if self.reporter.cancel_requested:
            raise Cancelled()


def _load_rows(spec: EvaluateSpec, store: ArtifactStore) -> tuple[str, list[PromptRow], int]:
    try:
        path = store.path(spec.dataset.uri)
    except ValueError as exc:
        raise RunnerError(f"dataset: {exc}") from exc
    if not path.is_file():
        raise RunnerError(f"dataset {spec.dataset.uri}: the file does not exist in the artifact store")
    fmt, trl_rows = load_trl_rows(path)
    rows = eval_rows(fmt, trl_rows, path.name)
    return fmt, select_rows(spec, rows), len(rows)


def _evaluate(spec: EvaluateSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any]:
    from workers.adapters.generate import answer_stops
    from workers.adapters.inference import load_for_inference, precision_label

    started = time.monotonic()
    problems = spec.validate()
    if problems:
        raise RunnerError("; ".join(f"{name}: {message}" for name, message in problems.items()))
    fmt, rows, available = _load_rows(spec, store)
    split = f"the held-out {spec.eval_fraction:g} (seed {spec.seed})" if spec.split == "held_out" else "all rows"
    reporter.log(f"Dataset: {available} rows, format {fmt}; scoring {len(rows)} of {split}")
    columns = ([BASE_KEY] if spec.include_base else []) + [a.key for a in spec.adapters]
    labels = {BASE_KEY: "base model", **{a.key: a.label or a.key for a in spec.adapters}}
    check_cancel(reporter)

    model, tokenizer, device = load_for_inference(spec.base_model, spec.adapters, spec.load, store, reporter)
    stops = answer_stops(model, tokenizer, reporter)
    check_cancel(reporter)
    encoded = [encode(tokenizer, row) for row in rows]
    limit = getattr(model.config, "max_position_embeddings", None)
    cut = fit_context(encoded, limit, spec.generation.max_new_tokens)
    if cut:
        reporter.log(
            f"{cut} row(s) longer than the model's {limit}-token context: their reference is scored up to the limit "
            f"and their prompt shortened from the start for generation",
            level="warning",
        )
    progress = _Progress(reporter, total=2 * len(columns) * len(rows))
    scores = {column: _loss_of(model, tokenizer, encoded, column, labels[column], progress) for column in columns}
    outputs, lengths = _answers(model, tokenizer, stops, spec, encoded, columns, labels, progress)
    for column in columns:
        texts = [outputs[(i, column)] for i in range(len(rows))]
        scores[column].update(
            exact_match=_mean(exact_match(t, r.reference) for t, r in zip(texts, rows, strict=True)),
            rouge_l=_mean(rouge_l(t, r.reference) for t, r in zip(texts, rows, strict=True)),
            mean_output_tokens=_mean(lengths[(i, column)] for i in range(len(rows))),
        )
        s = scores[column]
        reporter.log(
            f"{labels[column]}: exact match {s['exact_match']:.3f}, ROUGE-L {s['rouge_l']:.3f}, "
            f"{s['mean_output_tokens']:.1f} tokens per answer"
        )
    samples = [
        {
            "prompt": row.prompt,
            "reference": row.reference,
            "outputs": {column: outputs[(i, column)] for column in columns},
        }
        for i, row in enumerate(rows[:SAMPLE_ROWS])
    ]
    return {
        "columns": columns,
        "labels": {column: labels[column] for column in columns},
        "scores": scores,
        "samples": samples,
        "split": spec.split,
        "rows": len(rows),
        "format": fmt,
        "device": device.kind,
        "base_precision": precision_label(spec.load, device),
        "stop_tokens": stops.as_json(),
        "runtime_s": round(time.monotonic() - started, 2),
    }


def _loss_of(model: Any, tokenizer: Any, encoded: list[Encoded], column: str, label: str, progress: _Progress) -> dict:
    from workers.generation.engine import column_context

    with column_context(model, column):
        total, count = reference_nll(
            model, encoded, _pad_id(tokenizer), on_batch=lambda n: progress.advance(n, phase="loss", column=column)
        )
    loss = total / max(count, 1)
    if not math.isfinite(loss):  # JSON (and PostgreSQL's jsonb) has no NaN or infinity
        progress.reporter.log(f"{label}: the loss is {loss} (overflow in {_dtype_of(model)}?)", level="warning")
        return {"loss": None, "perplexity": None, "rows": len(encoded), "reference_tokens": count}
    perplexity = math.exp(min(loss, 700.0))
    progress.reporter.log(f"{label}: loss {loss:.4f}, perplexity {perplexity:.2f} over {count} reference tokens")
    return {"loss": loss, "perplexity": perplexity, "rows": len(encoded), "reference_tokens": count}


def _dtype_of(model: Any) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def fit_context(encoded: list[Encoded], limit: int | None, max_new_tokens: int) -> int:
    """Cut rows to the model's context: the loss sequence at its end, the generation prompt from its start
    (the latest tokens stay, with room for the answer). Returns how many rows were cut."""
    if not limit:
        return 0
    cut = 0
    keep = max(1, limit - max_new_tokens)
    for e in encoded:
        if len(e.ids) > limit or len(e.prompt_ids) > keep:
            cut += 1
            e.ids = e.ids[:limit]
            e.start = min(e.start, len(e.ids))  # a prompt that fills the context leaves nothing to score
            e.prompt_ids = e.prompt_ids[-keep:]
    return cut


def _answers(
    model: Any,
    tokenizer: Any,
    stops: Stops,
    spec: EvaluateSpec,
    encoded: list[Encoded],
    columns: list[str],
    labels: dict[str, str],
    progress: _Progress,
) -> tuple[dict[tuple[int, str], str], dict[tuple[int, str], int]]:
    """Every column's answer to every row (text, and its length in tokens without its stop)."""
    from workers.adapters.generate import prepare_generation
    from workers.generation.columns import mixed_batch_refusals
    from workers.generation.engine import generate_token_grid

    reporter = progress.reporter
    refusals = mixed_batch_refusals(model, labels)
    if refusals:
        reporter.log("Answers column by column: " + "; ".join(refusals))
    decoding = (
        "greedy" if spec.generation.temperature == 0 else f"sampling at temperature {spec.generation.temperature:g}"
    )
    reporter.log(f"Generating answers ({decoding}, at most {spec.generation.max_new_tokens} tokens)")
    _, plan = prepare_generation(
        model, [e.prompt_ids for e in encoded], columns, spec.generation,
        batched=not refusals, batch_size=GENERATION_CHUNK, reporter=reporter,
    )  # fmt: skip
    reporter.flush()

    def should_stop() -> bool:
        reporter.maybe_flush()
        return reporter.cancel_requested

    texts: dict[tuple[int, str], str] = {}
    lengths: dict[tuple[int, str], int] = {}
    for start in range(0, len(encoded), GENERATION_CHUNK):
        chunk = encoded[start : start + GENERATION_CHUNK]
        ids = generate_token_grid(
            model,
            [e.prompt_ids for e in chunk],
            columns,
            spec.generation,
            pad_token_id=tokenizer.pad_token_id,
            stops=stops,
            batched=not refusals,
            batch_size=GENERATION_CHUNK,
            should_stop=should_stop,
            cache=plan,
        )
        if reporter.cancel_requested:
            raise Cancelled()
        for (row, column), cell_ids in ids.items():
            texts[(start + row, column)] = stops.text(cell_ids)
            lengths[(start + row, column)] = stops.answer_tokens(cell_ids)
        progress.advance(len(chunk) * len(columns), phase="generate")
    return texts, lengths


def _mean(values: Any) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0
