"""The generation engine: a grid of cells (prompt row by column, a column being an adapter key or `BASE_KEY`)
answered from one loaded base and its adapters, used by compare, evaluate and chat jobs, the model grader and GRPO's
sampling.

Every column of a prompt goes in the same batch where PEFT allows it (`stacked_lora`: each LoRA layer computes all
columns' adapters in two batched matmuls; PEFT's `adapter_names` otherwise), or one column after another
(`set_adapter` / `disable_adapter`); both pad the same prompts alike, so greedy answers agree. The prompts' pass
runs by length buckets (`prefill_by_length`), then Tunedeck's decode loop (workers.generation.decode: a static KV
cache, each step one CUDA graph replay on a GPU) or generate() where the loop cannot run (`plan_decoding`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from workers.contract.jobspecs import BASE_KEY, GenerationParams, PromptRow
from workers.data.prompts import prompt_ids
from workers.generation.columns import mixed_batch_refusals, peft_adapter_name
from workers.generation.prefill import cache_argument, can_prefill, prefill_by_length
from workers.generation.stacked import can_stack, stacked_lora
from workers.generation.stops import Stops, stop_tokens

Cell = tuple[int, str]  # (prompt row, column)
OnStep = Callable[[list[Cell], Any], None]  # the cells of a generate() call's rows, and their generated ids so far


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
    an assistant's turn (workers.generation.stops). Returns {(row, column): text}, special tokens and the stop left out.
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
    cache: str | Decoding = "auto",
) -> tuple[dict[Cell, str], dict[Cell, list[int]]]:
    """`generate_grid` that also returns each cell's generated token ids (up to and including its stop).

    `stops`: where answers end (by default `stop_tokens(tokenizer, model)`). `stream_interval`: the least seconds
    between two rounds of on_text calls (0: every decode step). `cache`: as in `generate_token_grid`."""
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
        cache=cache,
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
    cache: str | Decoding = "auto",
) -> dict[Cell, list[int]]:
    """The token level of `generate_grid`: prompts as token ids, answers as token ids (cut after their stop:
    `stops.cut`; `min_new_tokens` holds back single-token stops only).

    Prompts go `batch_size` at a time; batched, each call holds every column of those prompts (rows column by
    column), sequential, each call holds one column of them: either way a prompt is padded to the same length,
    so greedy answers agree. Batched LoRA layers compute all columns' adapters in two batched matmuls
    (`stacked_lora`) where they can, else through PEFT's `adapter_names`; `stacked=False` forces the latter.
    `prefill=False` leaves the prompts' pass to generate() (over the padding too) instead of `prefill_by_length`.
    `cache`: the KV cache and decode step (`plan_decoding`: "auto", "dynamic", "static"), or a plan made already.
    """
    _check_columns(model, columns, batched)
    import torch

    decoding = cache if isinstance(cache, Decoding) else plan_decoding(model, columns, cache, batched, stacked)
    # One static cache length for every call: a compiled step then compiles again only for a smaller last batch.
    longest = max((len(ids) for ids in prompt_ids), default=0)
    cache_length = max(decoding.length, static_length(longest, params.max_new_tokens)) if decoding.static else None

    torch.manual_seed(params.seed)
    options = {**generation_options(params, pad_token_id, min_new_tokens), **stops.generate_options()}
    criteria = stops.criteria()
    chunks = [list(range(i, min(i + batch_size, len(prompt_ids)))) for i in range(0, len(prompt_ids), batch_size)]
    calls: list[tuple[list[Cell], AbstractContextManager[Any]]]
    base_only = all(column == BASE_KEY for column in columns)  # batched: every adapter off, no mixed batch
    if batched:
        calls = [([(row, col) for col in columns for row in chunk],
                  column_context(model, BASE_KEY) if base_only else nullcontext()) for chunk in chunks]  # fmt: skip
    else:
        calls = [([(row, col) for row in chunk], column_context(model, col)) for col in columns for chunk in chunks]
    results: dict[Cell, list[int]] = {}
    with stacked_lora(model, columns) if batched and stacked else nullcontext(False) as stacking:
        names = _adapter_names(model, columns) if batched and not stacking and not base_only else None
        for cells, context in calls:
            if should_stop is not None and should_stop():
                break
            rows = [prompt_ids[row] for row, _ in cells]
            row_names = [name for name in names for _ in range(len(cells) // len(columns))] if names else None
            with context:
                generated = generate_rows(
                    model, rows, cells, pad_token_id, options, row_names, on_step, should_stop, criteria,
                    columns=(len(columns) if batched else 1) if prefill else 0, decoding=decoding,
                    cache_length=cache_length,
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


def generation_options(params: GenerationParams, pad_token_id: int, min_new_tokens: int) -> dict[str, Any]:
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


CACHE_MODES = ("auto", "dynamic", "static", "graph")
# A static cache's length is rounded up to this many positions, so that jobs of nearby prompt lengths share one
# compiled step; more would cost memory at large batches (8B shape, 512 rows: 64 MB a position).
STATIC_CACHE_STEP = 64


@dataclass(frozen=True)
class Decoding:
    """How the KV cache is kept and a decode step runs (`plan_decoding`); `describe()` is for job logs."""

    static: bool = False  # a StaticCache (written in place) instead of a DynamicCache (grown by concatenation)
    compiled: bool = False  # generate()'s decode step through torch.compile (reduce-overhead: CUDA graphs)
    loop: bool = False  # Tunedeck's decode loop (workers.generation.decode) instead of generate(); static
    graphs: bool = False  # the loop's step captured as a CUDA graph (CUDA only)
    why: str = ""  # why not the loop, static or compiled, where that is not what was asked for
    length: int = 0  # a static cache's positions for every call (a job's longest prompt); 0: the calls' own

    def describe(self) -> str:
        if self.loop:
            step = "each step one CUDA graph replay" if self.graphs else "each step run eagerly"
            return f"static KV cache, Tunedeck's decode loop ({step}" + (f"; {self.why})" if self.why else ")")
        cache = "static KV cache" if self.static else "dynamic KV cache"
        step = "compiled decode step (torch.compile, CUDA graphs)" if self.compiled else "eager decode step"
        return f"{cache}, {step}" + (f" ({self.why})" if self.why else "")

    def generate_options(self, device_type: str) -> dict[str, Any]:
        """generate()'s switches for this plan; transformers compiles a static cache's decode step on CUDA itself."""
        if not self.static or self.loop:
            return {}
        if not self.compiled:
            return {"disable_compile": True}
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=False, mode="reduce-overhead")
        if device_type != "cuda":  # transformers compiles on CUDA only unless told; a test compiles on the CPU
            config._compile_all_devices = True  # type: ignore[assignment]  # declared None in transformers
        return {"compile_config": config}


def plan_decoding(
    model: Any, columns: list[str], cache: str = "auto", batched: bool = True, stacked: bool = True
) -> Decoding:
    """The KV cache and decode step of `generate_token_grid` for these columns (the same arguments).

    "graph", what "auto" picks wherever it can: Tunedeck's decode loop (workers.generation.decode), a static cache
    filled by `prefill_by_length` and each step one CUDA graph replay on CUDA (run eagerly elsewhere). Where the
    loop cannot run (`loop_refusal`; PEFT's mixed batches, which the prefill does not take), generate() with a
    dynamic cache. "dynamic": generate()'s default, the cache grown by concatenation at every step. "static":
    generate() with a preallocated cache, its decode step compiled where transformers and this path allow it
    (CUDA, a model transformers compiles, no 4-bit layers, one graph for every call), else eager; measured slower
    than the dynamic cache for eight adapters batched on an H200 (bench/README.md)."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
    if cache == "dynamic":
        return Decoding()
    if cache in ("auto", "graph"):
        refusal = _loop_refusal(model, columns, batched, stacked)
        if refusal:
            return Decoding(why=refusal)
        cuda = next(model.parameters()).device.type == "cuda"
        return Decoding(static=True, loop=True, graphs=cuda, why="" if cuda else "CUDA graphs on GPUs only")
    refusal = _static_refusal(model)
    if refusal:
        return Decoding(why=refusal)
    not_compiled = _compile_refusal(model, columns, batched, stacked)
    return Decoding(static=True, compiled=not not_compiled, why=not_compiled)


def _loop_refusal(model: Any, columns: list[str], batched: bool, stacked: bool) -> str:
    from peft import PeftModel

    from workers.generation.decode import loop_refusal

    base_only = all(column == BASE_KEY for column in columns)
    if isinstance(model, PeftModel) and batched and not base_only and not (stacked and can_stack(model, columns)):
        return "PEFT's mixed batches (adapter_names) go through generate()"
    return _static_refusal(model) or loop_refusal(model)


def _inner_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _static_refusal(model: Any) -> str:
    inner = _inner_model(model)
    if getattr(inner.config, "is_encoder_decoder", False) or not inner._supports_default_dynamic_cache():
        return "this model keeps no plain KV cache"
    if any(getattr(c, "is_prompt_learning", False) for c in getattr(model, "peft_config", {}).values()):
        return "virtual tokens of a prompt-learning adapter"
    return ""


def _compile_refusal(model: Any, columns: list[str], batched: bool, stacked: bool) -> str:
    """Why the decode step is not compiled here; empty where it is."""
    from peft import PeftModel

    inner = _inner_model(model)
    quantizer = getattr(inner, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_compileable:
        return "transformers compiles no 4-bit or 8-bit bitsandbytes layers"
    if not getattr(inner, "_can_compile_fullgraph", False):
        return f"transformers does not compile {type(inner).__name__}"
    if isinstance(model, PeftModel) and not batched:
        return "one column after another: every adapter switch would compile the step again"
    if isinstance(model, PeftModel) and not (stacked and can_stack(model, columns)):
        return "PEFT's mixed batches (adapter_names) are not compiled"
    if next(model.parameters()).device.type != "cuda":  # last: the reasons above hold on a GPU too
        return "the decode step is compiled on CUDA only"
    return ""


def static_length(width: int, max_new_tokens: int) -> int:
    """The positions of a static cache for prompts left-padded to `width` and `max_new_tokens` new tokens."""
    return -(-(width + max_new_tokens) // STATIC_CACHE_STEP) * STATIC_CACHE_STEP


def generate_rows(
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
    decoding: Decoding = Decoding(),
    cache_length: int | None = None,
) -> list[list[int]]:
    """One generate() call over left-padded rows; returns each row's generated ids.

    `columns`: the rows are that many equal column blocks of the same prompts (the stacked layout); 0 turns the
    prefill off. Where the prompts differ in length, their KV cache is filled first by `prefill_by_length`, so
    that the prompts' pass does not compute the padding; generate() then starts from the prompts' last token.
    `decoding`: its switches; where static, the cache (the prefill's, or one generate() makes) has `cache_length`
    positions, at least the longest row and its new tokens.
    """
    import torch
    from transformers import StoppingCriteriaList

    from workers.generation.decode import Sampling, decode_rows, rows_refusal

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    hooks = [_StepHook(cells, width, on_step, should_stop)] if on_step is not None or should_stop is not None else []
    if decoding.loop:
        if columns and adapter_names is None and not rows_refusal(rows):
            with _attention_backends(device):
                generated, _ = decode_rows(
                    model, rows, columns, pad_token_id, Sampling.of(options), [*hooks, *criteria],
                    cache_length or static_length(width, options["max_new_tokens"]), decoding.graphs,
                )  # fmt: skip
            return generated
        decoding = Decoding()  # this call's prompts go through generate(), as before the loop
    input_ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    kwargs = dict(options)
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    if hooks or criteria:
        kwargs["stopping_criteria"] = StoppingCriteriaList([*hooks, *criteria])
    kwargs.update(decoding.generate_options(device.type))
    with _attention_backends(device):
        if columns and adapter_names is None and can_prefill(model, rows):
            kwargs[cache_argument(model)] = prefill_by_length(model, rows, columns, pad_token_id, cache_length)
        elif decoding.static:
            kwargs.update(cache_implementation="static", max_cache_len=cache_length)
        try:
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        except RuntimeError as exc:  # torch.compile's and CUDA graphs' errors are RuntimeErrors (OOM too)
            if not decoding.compiled:
                raise
            # A compiled step that cannot be built or captured costs this call its speed, never its answers:
            # it runs again as before, with a dynamic cache, eagerly (the job's log gets the warning).
            warnings.warn(f"The compiled decode step failed ({type(exc).__name__}: {str(exc)[:300]}); generation "
                          "goes on with a dynamic KV cache and an eager step", RuntimeWarning, stacklevel=2)
            return generate_rows(model, rows, cells, pad_token_id, options, adapter_names, on_step, should_stop,
                                 criteria, columns, Decoding(why="the compiled step failed"))
    return [list(map(int, row)) for row in output[:, width:].tolist()]


def _attention_backends(device: Any) -> AbstractContextManager[Any]:
    """Generation without cuDNN's attention: it builds a plan for every new shape, and a growing KV cache is a
    new shape at every step (measured on an H100, 8B shape, 64 new tokens: 8.8 s on first shapes with cuDNN,
    2.9 s without; FlashAttention and memory-efficient attention have no such cost)."""
    if getattr(device, "type", "cpu") != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


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
