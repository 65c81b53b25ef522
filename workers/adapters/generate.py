"""Side-by-side generation from a base model and its adapters: the compare runner and the pieces it shares.

The base is loaded once and every adapter is attached to it under its key. A grid of cells (prompt row by
column, a column being an adapter key or `BASE_KEY`) is generated either in mixed-adapter batches (every
column of a prompt in the same `generate()` call, one pass over the base weights per step for all of them;
LoRA layers compute all adapters at once with `stacked_lora`, or through PEFT's `adapter_names`) or, for
adapters PEFT cannot mix in a batch, one column after another with `set_adapter` / `disable_adapter`. Both
paths pad the same prompts to the same length, so greedy outputs agree.

`run_compare(spec, reporter, store)` has the contract of the train runner.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import cache
from pathlib import Path
from typing import Any

from workers.adapters.stops import Stops, stop_tokens
from workers.contract.jobrunner import Cancelled, RunnerError, check_cancel, run_reported
from workers.contract.jobspecs import BASE_KEY, AdapterRef, CompareSpec, GenerationParams, LoadParams, PromptRow
from workers.contract.reporter import Reporter
from workers.contract.spec import PROMPT_LEARNING_METHODS, LoraParams, ModelRef
from workers.contract.store import ArtifactStore
from workers.data.prompts import FALLBACK_CHAT_TEMPLATE, prompt_ids
from workers.formatting import count, duration, figure, plural
from workers.training.device import Device, pick_device
from workers.training.modelinfo import ModelNotFound, check_source
from workers.training.peftsetup import quantization_config, quantization_label

Cell = tuple[int, str]  # (prompt row, column)
OnStep = Callable[[list[Cell], Any], None]  # the cells of a generate() call's rows, and their generated ids so far


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
        reasons = refusals or _ref_refusals(spec.adapters)
        reporter.log("Sequential, one column after another: " + "; ".join(reasons), level="warning")
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
    }


def answer_stops(model: Any, tokenizer: Any, reporter: Reporter) -> Stops:
    """Where this job's answers end (workers.adapters.stops), said in its log."""
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


# --- loading ---------------------------------------------------------------------------------------------


def load_for_inference(
    base: ModelRef, adapters: list[AdapterRef], load: LoadParams, store: ArtifactStore, reporter: Reporter | None = None
) -> tuple[Any, Any, Device]:
    """Load tokenizer + base once (quantization per `load`, device/dtype as workers.training.device.pick_device), then every
    adapter onto it under its `key` (PeftModel.from_pretrained for the first, load_adapter for the rest).
    Returns (model, tokenizer, device), the model in eval mode. With no adapters returns the plain base model.
    Left padding, pad token set, chat template fallback when the tokenizer has none.

    Raises RunnerError naming the adapter for a missing folder, adapters of different PEFT types (one PeftModel
    holds one type) and an adapter whose weights do not fit this base."""
    folders = {ref.key: _adapter_folder(ref, store) for ref in adapters}
    _check_one_peft_type(adapters, folders)
    check_source(base.source)
    device = pick_device(load.compute_dtype)
    tokenizer = _load_tokenizer(base, reporter)
    model = _load_base(base, load, device, reporter)
    for ref in adapters:
        model = _attach_adapter(model, ref, folders[ref.key], base)
        _say(reporter, f"Adapter {_name(ref)} loaded as {ref.key!r}")
    model.eval()
    return model, tokenizer, device


def _say(reporter: Reporter | None, message: str, level: str = "info") -> None:
    if reporter is not None:
        reporter.log(message, level=level)


def _name(ref: AdapterRef) -> str:
    return f"{ref.label or ref.key!r} ({ref.uri})"


def _adapter_folder(ref: AdapterRef, store: ArtifactStore) -> Path:
    try:
        folder = store.path(ref.uri)
    except ValueError as exc:
        raise RunnerError(f"adapter {_name(ref)}: {exc}") from exc
    if not folder.is_dir():
        raise RunnerError(f"adapter {_name(ref)}: the folder does not exist in the artifact store")
    if not (folder / "adapter_config.json").is_file():
        raise RunnerError(f"adapter {_name(ref)}: no adapter_config.json in the folder (not a PEFT adapter)")
    return folder


def _check_one_peft_type(adapters: list[AdapterRef], folders: dict[str, Path]) -> None:
    from peft import PeftConfig

    types: dict[str, list[str]] = {}
    for ref in adapters:
        try:
            peft_type = _peft_type_name(PeftConfig.from_pretrained(str(folders[ref.key])))
        except Exception as exc:  # PEFT raises several kinds for a broken config
            raise RunnerError(f"adapter {_name(ref)}: unreadable adapter_config.json: {exc}") from exc
        types.setdefault(peft_type, []).append(ref.label or ref.key)
    if len(types) > 1:
        kinds = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in types.items())
        raise RunnerError(f"adapters: PEFT holds adapters of one type per model, these mix several ({kinds})")


def _peft_type_name(config: Any) -> str:
    return str(getattr(config.peft_type, "value", config.peft_type)).lower()


def _load_tokenizer(base: ModelRef, reporter: Reporter | None) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        base.source, revision=base.revision or None, trust_remote_code=base.trust_remote_code
    )
    tokenizer.padding_side = "left"  # generation continues every row from its last prompt token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        _say(reporter, "The tokenizer has no chat template: using a ChatML-style template.", level="warning")
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return tokenizer


def _load_base(base: ModelRef, load: LoadParams, device: Device, reporter: Reporter | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    quantized = LoraParams(quantization=load.quantization, compute_dtype=load.compute_dtype)
    dtype = getattr(torch, device.dtype_name)
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": base.trust_remote_code}
    if base.revision:
        kwargs["revision"] = base.revision
    if device.kind == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    quantization = quantization_config(quantized, dtype)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    _say(reporter, f"Loading {base.source} in {precision_label(load, device)} on {device.kind}")
    return AutoModelForCausalLM.from_pretrained(base.source, **kwargs)


def precision_label(load: LoadParams, device: Device) -> str:
    """The base's precision as loaded: its weights' dtype, or their quantization and the compute dtype."""
    if load.quantization == "none":
        return device.dtype_name
    quantized = LoraParams(quantization=load.quantization, compute_dtype=load.compute_dtype)
    return f"{quantization_label(quantized)} (compute {device.dtype_name})"


def _attach_adapter(model: Any, ref: AdapterRef, folder: Path, base: ModelRef) -> Any:
    from peft import PeftModel

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Adapter weights in the base's dtype: PEFT's default upcast of bf16/fp16 to fp32 helps training only.
            name = peft_adapter_name(ref.key)
            if isinstance(model, PeftModel):
                missing = model.load_adapter(str(folder), name, autocast_adapter_dtype=False).missing_keys
            else:
                model = PeftModel.from_pretrained(model, str(folder), name, autocast_adapter_dtype=False)
                missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RunnerError(f"adapter {_name(ref)} does not fit the base {base.source}: {_load_failure(exc)}") from exc
    if missing:
        raise RunnerError(
            f"adapter {_name(ref)} does not fit the base {base.source}: the base has layers the adapter has no "
            f"weights for ({str(missing[0])[:200]}); was it trained on another base model?"
        )
    return model


def peft_adapter_name(key: str) -> str:
    """The name an adapter key is loaded under in PEFT: the key itself, unless torch or PEFT would trip on it.

    PEFT keeps adapters in ModuleDicts, so a key like "double" or "train" (an nn.Module method) cannot be a name,
    and a name inside a PEFT weight prefix ("lo" in "lora_") can get its weights re-initialised on loading."""
    import torch
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    clashes = (
        "." in key
        or hasattr(torch.nn.ModuleDict(), key)
        or any(key in prefix for prefix in PEFT_TYPE_TO_PREFIX_MAPPING.values())
    )
    return f"adapter_{hashlib.sha1(key.encode()).hexdigest()[:12]}" if clashes else key


def _load_failure(exc: Exception) -> str:
    """The first concrete line of a PEFT/torch loading error (size mismatches come one per line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    mismatch = next((line for line in lines if line.startswith("size mismatch")), None)
    if mismatch:
        return f"{mismatch} (shapes differ: was it trained on another base model?)"
    return lines[0] if lines else type(exc).__name__


# --- which adapters share a batch -------------------------------------------------------------------------


def can_batch(adapters: list[AdapterRef]) -> bool:
    """Whether PEFT can serve these adapters in one mixed batch (adapter_names=[...]), as far as the refs tell.

    Only LoRA layers read `adapter_names`: prompt-learning methods pass it on to the base model and IA3 drops it
    (every row would get the active adapter). DoRA and merged layers are refused by PEFT too, but those show only
    once loaded: `mixed_batch_refusals(model)` checks the loaded model."""
    return not _ref_refusals(adapters)


def _ref_refusals(adapters: list[AdapterRef]) -> list[str]:
    return [
        f"{ref.label or ref.key}: {ref.method.replace('_', ' ')} adapters cannot be mixed in one batch"
        + (" (virtual tokens change the input itself)" if ref.method in PROMPT_LEARNING_METHODS else "")
        for ref in adapters
        if ref.method != "lora"
    ]


def mixed_batch_refusals(model: Any, labels: dict[str, str] | None = None) -> list[str]:
    """Why PEFT would refuse (or silently misapply) `adapter_names` on this loaded model; empty when it can batch.

    `labels` (adapter key -> label) names the adapters in the reasons; by default they go by their PEFT names."""
    from peft import PeftModel, PeftType
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return []
    names = {peft_adapter_name(key): label for key, label in (labels or {}).items()}
    reasons = [
        f"{names.get(name, name)}: {_peft_type_name(config)} adapters cannot be mixed in one batch"
        for name, config in model.peft_config.items()
        if config.peft_type != PeftType.LORA
    ]
    if reasons:
        return reasons
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    dora = sorted({name for layer in layers for name, on in layer.use_dora.items() if on})
    reasons += [f"{names.get(name, name)}: DoRA adapters cannot be mixed in one batch (PEFT)" for name in dora]
    if any(layer.merged for layer in layers):
        reasons.append("an adapter is merged into the base weights; mixed batches need unmerged adapters")
    return reasons


# --- generation --------------------------------------------------------------------------------------------


Prompt = str | PromptRow  # typed text, or a row with its conversation (workers.data.prompts)


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt (workers.data.prompts.prompt_ids); typed text is a user turn with the chat template."""
    rows = [PromptRow(prompt=p) if isinstance(p, str) else p for p in prompts]
    return [prompt_ids(tokenizer, row, chat_template) for row in rows]


def generate_grid(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    columns: list[str],
    params: GenerationParams,
    *,
    batched: bool = True,
    batch_size: int = 64,
    on_text: Callable[[int, str, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[tuple[int, str], str]:
    """Generate the answer of every (prompt row, column) cell. Columns are adapter keys and/or BASE_KEY.

    batched=True: every column of a prompt in the same generate() call (mixed-adapter batches: `stacked_lora`,
    or PEFT's adapter_names where a layer is not plain LoRA);
    batched=False: one column after another (set_adapter, disable_adapter for the base). Greedy when
    temperature == 0, else seeded sampling. on_text(row, column, delta) is called as text appears; the deltas
    of a cell concatenate to its final text. should_stop() is polled every decode step and ends generation
    early (the cells then hold what was generated so far). An answer ends at EOS or where the chat template ends
    an assistant's turn (workers.adapters.stops). Returns {(row, column): text}, special tokens and the stop left out.
    """
    texts, _ = generate_text_grid(
        model,
        tokenizer,
        prompts,
        columns,
        params,
        batched=batched,
        batch_size=batch_size,
        on_text=on_text,
        should_stop=should_stop,
    )
    return texts


def generate_text_grid(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    columns: list[str],
    params: GenerationParams,
    *,
    stops: Stops | None = None,
    batched: bool = True,
    batch_size: int = 64,
    on_text: Callable[[int, str, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    stream_interval: float = 0.0,
) -> tuple[dict[Cell, str], dict[Cell, list[int]]]:
    """`generate_grid` that also returns each cell's generated token ids (up to and including its stop).

    `stops`: where answers end (by default `stop_tokens(tokenizer, model)`). `stream_interval`: the least seconds
    between two rounds of on_text calls (0: every decode step)."""
    if stops is None:
        stops = stop_tokens(tokenizer, model)
    stream = TextStream(on_text, stops, stream_interval) if on_text is not None else None
    ids = generate_token_grid(
        model,
        encode_prompts(tokenizer, prompts, params.chat_template),
        columns,
        params,
        pad_token_id=tokenizer.pad_token_id,
        stops=stops,
        batched=batched,
        batch_size=batch_size,
        on_step=stream.step if stream is not None else None,
        should_stop=should_stop,
    )
    texts = {cell: stops.text(cell_ids) for cell, cell_ids in ids.items()}
    if stream is not None:
        stream.finish(texts)
    return texts, ids


def generate_token_grid(
    model: Any,
    prompt_ids: list[list[int]],
    columns: list[str],
    params: GenerationParams,
    *,
    pad_token_id: int,
    stops: Stops,
    batched: bool = True,
    batch_size: int = 64,
    min_new_tokens: int = 0,
    on_step: OnStep | None = None,
    should_stop: Callable[[], bool] | None = None,
    stacked: bool = True,
    prefill: bool = True,
) -> dict[Cell, list[int]]:
    """The token level of `generate_grid`: prompts as token ids, answers as token ids (cut after their stop:
    `stops.cut`; `min_new_tokens` holds back single-token stops only).

    Prompts go `batch_size` at a time; batched, each call holds every column of those prompts (rows column by
    column), sequential, each call holds one column of them: either way a prompt is padded to the same length,
    so greedy answers agree. Batched LoRA layers compute all columns' adapters in two batched matmuls
    (`stacked_lora`) where they can, else through PEFT's `adapter_names`; `stacked=False` forces the latter.
    `prefill=False` leaves the prompts' pass to generate() (over the padding too) instead of `prefill_by_length`.
    """
    _check_columns(model, columns, batched)
    import torch

    torch.manual_seed(params.seed)
    options = {**_generation_options(params, pad_token_id, min_new_tokens), **stops.generate_options()}
    criteria = stops.criteria()
    chunks = [list(range(i, min(i + batch_size, len(prompt_ids)))) for i in range(0, len(prompt_ids), batch_size)]
    calls: list[tuple[list[Cell], AbstractContextManager[Any]]]
    if batched:
        calls = [([(row, col) for col in columns for row in chunk], nullcontext()) for chunk in chunks]
    else:
        calls = [([(row, col) for row in chunk], column_context(model, col)) for col in columns for chunk in chunks]
    results: dict[Cell, list[int]] = {}
    with stacked_lora(model, columns) if batched and stacked else nullcontext(False) as stacking:
        names = _adapter_names(model, columns) if batched and not stacking else None
        for cells, context in calls:
            if should_stop is not None and should_stop():
                break
            rows = [prompt_ids[row] for row, _ in cells]
            row_names = [name for name in names for _ in range(len(cells) // len(columns))] if names else None
            with context:
                generated = _generate(
                    model, rows, cells, pad_token_id, options, row_names, on_step, should_stop, criteria,
                    columns=(len(columns) if batched else 1) if prefill else 0,
                )
            for cell, row_ids in zip(cells, generated, strict=True):
                results[cell] = stops.cut(row_ids)
    return results


def _adapter_names(model: Any, columns: list[str]) -> list[str] | None:
    """PEFT's adapter_names of the columns (BASE_KEY is PEFT's name for the base too); None for a plain model."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return None
    return [column if column == BASE_KEY else peft_adapter_name(column) for column in columns]


def _check_columns(model: Any, columns: list[str], batched: bool) -> None:
    from peft import PeftModel

    loaded = set(model.peft_config) if isinstance(model, PeftModel) else set()
    unknown = [c for c in columns if c != BASE_KEY and peft_adapter_name(c) not in loaded]
    if unknown:
        raise ValueError(f"columns {', '.join(unknown)} are not adapters loaded in the model")
    refusals = mixed_batch_refusals(model) if batched else []
    if refusals:
        raise ValueError("mixed-adapter batches are not possible here: " + "; ".join(refusals))


@contextmanager
def column_context(model: Any, column: str) -> Iterator[None]:
    """The model set up for one column: the adapter active, or every adapter off for the base."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        yield
    elif column == BASE_KEY:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(peft_adapter_name(column))
        yield


def _generation_options(params: GenerationParams, pad_token_id: int, min_new_tokens: int) -> dict[str, Any]:
    """Every decoding setting explicit, so that a model's own generation_config.json does not change them."""
    options: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "min_new_tokens": min_new_tokens,
        "pad_token_id": pad_token_id,
        "num_beams": 1,
        "repetition_penalty": 1.0,
        "do_sample": params.temperature > 0,
    }
    if params.temperature > 0:
        options.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
    return options


def _generate(
    model: Any,
    rows: list[list[int]],
    cells: list[Cell],
    pad_token_id: int,
    options: dict[str, Any],
    adapter_names: list[str] | None,
    on_step: OnStep | None,
    should_stop: Callable[[], bool] | None,
    criteria: list[Any],
    columns: int = 1,
) -> list[list[int]]:
    """One generate() call over left-padded rows; returns each row's generated ids.

    `columns`: the rows are that many equal column blocks of the same prompts (the stacked layout); 0 turns the
    prefill off. Where the prompts differ in length, their KV cache is filled first by `prefill_by_length`, so
    that the prompts' pass does not compute the padding; generate() then starts from the prompts' last token.
    """
    import torch
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    kwargs = dict(options)
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    hooks = [_StepHook(cells, width, on_step, should_stop)] if on_step is not None or should_stop is not None else []
    if hooks or criteria:
        kwargs["stopping_criteria"] = StoppingCriteriaList([*hooks, *criteria])
    with _attention_backends(device):
        if columns and adapter_names is None and can_prefill(model, rows):
            kwargs[cache_argument(model)] = prefill_by_length(model, rows, columns, pad_token_id)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return [list(map(int, row)) for row in output[:, width:].tolist()]


# --- the prompts' pass without padding --------------------------------------------------------------------

BUCKET_COST = 1024  # what one more forward call costs, in padded token positions (launches, a pass over weights)


def can_prefill(model: Any, rows: list[list[int]]) -> bool:
    """Whether the prompts' pass goes by length buckets: prompts of several lengths, a model whose cache is a
    plain KV cache with full attention in every layer (no sliding windows, no recurrent state) and no adapter
    of virtual tokens (prompt or prefix tuning)."""
    if len({len(r) for r in rows}) < 2 or min(len(r) for r in rows) < 2:
        return False
    if any(getattr(c, "is_prompt_learning", False) for c in getattr(model, "peft_config", {}).values()):
        return False  # virtual tokens go before the prompt, in the cache too
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is None or getattr(text, "is_encoder_decoder", False) or getattr(text, "sliding_window", None):
        return False
    return all(kind == "full_attention" for kind in getattr(text, "layer_types", None) or ["full_attention"])


def cache_argument(model: Any) -> str:
    """The name forward() and generate() take a KV cache under: `cache` from transformers 5.24 (where
    `past_key_values` is deprecated), `past_key_values` before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_argument_of(type(inner))


@cache
def _cache_argument_of(model_class: type) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def length_buckets(lengths: list[int], step_cost: int = BUCKET_COST) -> list[list[int]]:
    """Row indexes grouped by length so that padding each group to its longest row, plus `step_cost` per group,
    costs least (dynamic programming over the rows sorted by length); shortest group first."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [0.0] + [float("inf")] * len(order)  # best[j]: least cost of the first j rows in sorted order
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            cost = best[i] + (j - i) * longest + step_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def prefill_by_length(model: Any, rows: list[list[int]], columns: int, pad_token_id: int) -> Any:
    """The KV cache of every row's prompt but its last token, laid out as generate() expects for the rows
    left-padded to the longest (padding positions stay zero and are masked), computed a length bucket at a time.

    The rows are `columns` equal blocks of the same prompts; a bucket takes its prompts in every block, in block
    order, so that a stacked LoRA layer still finds its columns as equal slices of the batch.
    """
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    prompts = len(rows) // columns
    width = max(len(r) for r in rows) - 1  # the cached positions: every prompt token but the last
    keys: list[Any] = []
    values: list[Any] = []
    for bucket in length_buckets([len(r) - 1 for r in rows[:prompts]], BUCKET_COST // columns):
        index = [block * prompts + p for block in range(columns) for p in bucket]
        part = [rows[i][:-1] for i in index]
        span = max(len(r) for r in part)
        ids = torch.tensor([[pad_token_id] * (span - len(r)) + r for r in part], device=device)
        mask = torch.tensor([[0] * (span - len(r)) + [1] * len(r) for r in part], device=device)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                  **{cache_argument(model): cache})
        rows_at = torch.tensor(index, device=device)
        for layer, cached in enumerate(cache.layers):
            if layer == len(keys):
                shape = (len(rows), *cached.keys.shape[1:2], width, cached.keys.shape[-1])
                keys.append(cached.keys.new_zeros(shape))
                values.append(cached.values.new_zeros((*shape[:3], cached.values.shape[-1])))
            keys[layer][rows_at, :, width - span :] = cached.keys
            values[layer][rows_at, :, width - span :] = cached.values
    full = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        full.update(k, v, layer)
    return full


def _attention_backends(device: Any) -> AbstractContextManager[Any]:
    """Generation without cuDNN's attention: it builds a plan for every new shape, and a growing KV cache is a
    new shape at every step (measured on an H100, 8B shape, 64 new tokens: 8.8 s on first shapes with cuDNN,
    2.9 s without; FlashAttention and memory-efficient attention have no such cost)."""
    if getattr(device, "type", "cpu") != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@contextmanager
def stacked_lora(model: Any, columns: list[str]) -> Iterator[bool]:
    """Mixed-adapter batches in two batched matmuls per LoRA layer, for rows laid out column by column.

    Inside, every LoRA layer computes base(x), then for the rows of each adapter column (an equal share of the
    batch, in `columns` order) x·Aᵀ·Bᵀ·scaling with all adapters stacked, added in place; BASE_KEY rows get the
    base alone. This is PEFT's mixed-batch arithmetic without its per-layer, per-step lists of row indices
    (Python loops over every row and an index copy to the GPU for each adapter of each layer). Yields False and
    changes nothing where a layer is not a plain, unmerged LoRA Linear (over a full-precision or bitsandbytes
    base) of plain LoRA adapters (DoRA, LoRA bias) or the model has extra trained modules (modules_to_save): PEFT's adapter_names then."""
    layers = _stackable_layers(model, columns)
    if layers is None:
        yield False
        return
    try:
        for layer, stack in layers:
            layer.forward = _StackedForward(layer, stack, len(columns))
        yield True
    finally:
        for layer, _ in layers:
            layer.__dict__.pop("forward", None)


def _stackable_layers(model: Any, columns: list[str]) -> list[tuple[Any, _Stack | None]] | None:
    from peft import PeftModel, PeftType
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    # Plain LoRA Linear layers over a full-precision or a bitsandbytes 4-/8-bit base: the stacked forward
    # runs the base layer as it is (quantized or not) and adds the adapters' deltas in their own dtype.
    stackable = {LoraLinear}
    try:
        from peft.tuners.lora import bnb as lora_bnb

        stackable |= {getattr(lora_bnb, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(lora_bnb, name)}
    except ImportError:  # bitsandbytes missing: no quantized bases either
        pass
    if not isinstance(model, PeftModel) or columns == [BASE_KEY] * len(columns):
        return None
    if any(config.peft_type != PeftType.LORA for config in model.peft_config.values()):
        return None
    names = [None if column == BASE_KEY else peft_adapter_name(column) for column in columns]
    layers: list[tuple[Any, _Stack | None]] = []
    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            return None
        if not isinstance(module, LoraLayer):
            continue
        if type(module) not in stackable or module.merged:
            return None
        present = [(i, name) for i, name in enumerate(names) if name is not None and name in module.lora_A]
        plain = all(
            not module.use_dora.get(name) and name not in module.lora_variant and module.lora_B[name].bias is None
            for _, name in present
        )
        if not plain:
            return None
        layers.append((module, _Stack.of(module, present) if present else None))
    return layers


class _Stack:
    """One layer's adapters of the columns, stacked: A (m, r, in), B (m, out, r), zero-padded to the largest r."""

    def __init__(self, a: Any, b: Any, scale: Any, columns: list[int]) -> None:
        import torch

        self.a_t, self.b_t, self.scale = a.transpose(1, 2), b.transpose(1, 2), scale
        self.columns = columns
        first = columns[0]
        self.span = (first, first + len(columns)) if columns == list(range(first, first + len(columns))) else None
        self.index = torch.tensor(columns, device=a.device)

    @classmethod
    def of(cls, layer: Any, present: list[tuple[int, str]]) -> _Stack:
        import torch

        weight = layer.lora_A[present[0][1]].weight
        rank = max(layer.r[name] for _, name in present)
        a = torch.zeros(len(present), rank, layer.in_features, dtype=weight.dtype, device=weight.device)
        b = torch.zeros(len(present), layer.out_features, rank, dtype=weight.dtype, device=weight.device)
        for i, (_, name) in enumerate(present):
            r = layer.r[name]
            a[i, :r] = layer.lora_A[name].weight
            b[i, :, :r] = layer.lora_B[name].weight
        scale = torch.tensor([layer.scaling[name] for _, name in present], dtype=weight.dtype, device=weight.device)
        return cls(a, b, scale.view(-1, 1, 1), [column for column, _ in present])


class _StackedForward:
    def __init__(self, layer: Any, stack: _Stack | None, columns: int) -> None:
        self.base_layer, self.stack, self.columns = layer.base_layer, stack, columns

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        result = self.base_layer(x, *args, **kwargs)
        stack = self.stack
        if stack is None:
            return result
        rows = x.reshape(self.columns, -1, x.shape[-1])  # (column, its rows x positions, in)
        part = rows[stack.span[0] : stack.span[1]] if stack.span else rows.index_select(0, stack.index)
        delta = torch.bmm(torch.bmm(part.to(stack.a_t.dtype), stack.a_t), stack.b_t) * stack.scale
        out = result.view(self.columns, -1, result.shape[-1])
        if stack.span:
            out[stack.span[0] : stack.span[1]] += delta.to(out.dtype)
        else:
            out.index_add_(0, stack.index, delta.to(out.dtype))
        return result


class _StepHook:
    """A stopping criterion that never stops a row by itself: it passes each step's ids on and polls for cancel."""

    def __init__(
        self, cells: list[Cell], prompt_width: int, on_step: OnStep | None, should_stop: Callable[[], bool] | None
    ):
        self.cells, self.prompt_width, self.on_step, self.should_stop = cells, prompt_width, on_step, should_stop

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if self.on_step is not None:
            self.on_step(self.cells, input_ids[:, self.prompt_width :])
        stop = self.should_stop is not None and self.should_stop()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class TextStream:
    """Turns each step's generated ids into text deltas per cell.

    Text is held back while it ends in an incomplete character (U+FFFD) or in what may be the start of a stop
    string, and a cell stops streaming at its stop. `finish` sends what is left, so a cell's deltas add up to its
    final text. With `interval` > 0 the ids are decoded at most that often (seconds): decoding every row at every
    step costs more than a GPU step."""

    def __init__(self, on_text: Callable[[int, str, str], None], stops: Stops, interval: float = 0.0) -> None:
        self.on_text, self.stops, self.interval = on_text, stops, interval
        self.sent: dict[Cell, str] = {}
        self.done: set[Cell] = set()
        self.last_decode = time.monotonic()

    def step(self, cells: list[Cell], generated: Any) -> None:
        if self.interval and time.monotonic() - self.last_decode < self.interval:
            return
        self.last_decode = time.monotonic()
        for cell, ids in zip(cells, generated.tolist(), strict=True):
            if cell in self.done:
                continue
            text, ended = self.stops.visible(ids)
            if ended:
                self.done.add(cell)
            self._send(cell, text)

    def finish(self, texts: dict[Cell, str]) -> None:
        for cell, text in texts.items():
            self._send(cell, text, final=True)

    def _send(self, cell: Cell, text: str, final: bool = False) -> None:
        sent = self.sent.get(cell, "")
        if not final and text.endswith("\ufffd"):
            return
        if not text.startswith(sent):
            # Only a decoder that rewrites earlier text gets here (not byte-level BPE or SentencePiece with the
            # clean-up off): the cell streams no more, and the final text stays authoritative.
            return
        if len(text) > len(sent):
            self.sent[cell] = text
            self.on_text(cell[0], cell[1], text[len(sent) :])
