"""Tunedeck's decode loop: a static KV cache filled by `prefill_by_length`, then one step per new token that is a
single CUDA graph replay on a GPU (the same step run eagerly elsewhere, or where a graph cannot be captured).

generate() runs thousands of small kernels a step for an 8B model, each launched from Python: at the batch
sizes of a comparison the GPU waits on the launches (bench/README.md). Here the whole forward of a step
(embedding, every layer with its stacked LoRA adapters, the cache writes, the head) is captured once per call
into a CUDA graph whose inputs live at fixed addresses:

- the step's token ids (written before each replay) and positions (advanced inside the graph);
- an additive attention mask over the cache's positions, one row per sequence: padding and positions not yet
  written are masked, and the graph unmasks the position the step writes (read off the cache's own position
  counter, which transformers' StaticLayer advances in place);
- the StaticCache's buffers, written in place.

Choosing the next token (greedy, or temperature and top-p sampling as generate() does them, min_new_tokens,
EOS, stop strings) runs eagerly on the step's logits: a handful of kernels. Greedy answers are generate()'s
(tested in float32 against it on the CPU, where the same loop runs without a graph).

Decode attention runs on the key/value heads without copying them per query head: transformers packs the query
heads of a single token (`pack_gqa`) where it is not compiling, which is the case here (a plain capture, no
torch.compile); a compiled step repeats the keys and values instead, which made it slower at large batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers.generation.prefill import cache_argument, prefill_by_length

Criterion = Callable[[Any, Any], Any]  # transformers' StoppingCriteria: (ids so far, scores) -> finished rows


@dataclass(frozen=True)
class Sampling:
    """generate()'s token choice as the loop makes it (see `generation_options`)."""

    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: every token
    top_p: float = 1.0
    eos: tuple[int, ...] = ()

    @classmethod
    def of(cls, options: dict[str, Any]) -> Sampling:
        eos = options.get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(
            max_new_tokens=int(options["max_new_tokens"]),
            min_new_tokens=int(options.get("min_new_tokens") or 0),
            do_sample=bool(options.get("do_sample")),
            temperature=float(options.get("temperature") or 1.0),
            top_k=int(options.get("top_k") or 0),
            top_p=float(options.get("top_p") or 1.0),
            eos=tuple(int(i) for i in eos),
        )

    def choose(self, logits: Any, step: int, eos: Any) -> Any:
        """The next token of every row from the step's float32 logits, as generate() picks it."""
        import torch

        scores = logits
        if eos is not None and step < self.min_new_tokens:  # MinNewTokensLengthLogitsProcessor
            scores = scores.index_fill(1, eos, -float("inf"))
        if not self.do_sample:
            return torch.argmax(scores, dim=-1)
        if self.temperature != 1.0:  # TemperatureLogitsWarper
            scores = scores / self.temperature
        if 0 < self.top_k < scores.shape[-1]:  # TopKLogitsWarper
            scores = scores.masked_fill(scores < torch.topk(scores, self.top_k)[0][..., -1, None], -float("inf"))
        if self.top_p < 1.0:  # TopPLogitsWarper
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - self.top_p)
            drop[..., -1:] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


def loop_refusal(model: Any) -> str:
    """Why this model cannot decode through the loop (empty where it can): the loop needs a plain KV cache with
    full attention in every layer (what `prefill_by_length` fills), an attention that takes a 4D mask, and
    transformers' StaticLayer keeping its position in a tensor."""
    from transformers.cache_utils import StaticLayer

    from workers.generation.prefill import prefill_refusal

    refusal = prefill_refusal(model)
    if refusal:
        return refusal
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    attention = getattr(inner.config, "_attn_implementation", None) or "eager"
    if attention not in ("sdpa", "eager"):
        return f"{attention} attention takes no 4D mask"
    if not hasattr(StaticLayer(max_cache_len=1), "cumulative_length"):
        return "this transformers keeps a static cache's position outside the cache"
    return ""


def rows_refusal(rows: list[list[int]]) -> str:
    """Why these prompts go through generate() instead (empty where the loop takes them)."""
    return "a prompt of a single token" if min(len(r) for r in rows) < 2 else ""


class _Step:
    """One decode step over fixed buffers: unmask the position being written, run the model, advance positions."""

    def __init__(self, model: Any, rows: list[list[int]], cache: Any, cache_length: int, width: int) -> None:
        import torch

        device = next(model.parameters()).device
        dtype = _compute_dtype(model)
        self.model, self.cache, self.argument = model, cache, cache_argument(model)
        self.ids = torch.tensor([[r[-1]] for r in rows], device=device)
        self.positions = torch.tensor([[len(r) - 1] for r in rows], device=device)
        # The prompt's cached tokens (every one but the last, left-padded to width) are open; the rest masked.
        first = torch.tensor([width + 1 - len(r) for r in rows], device=device).view(-1, 1)
        where = torch.arange(cache_length, device=device).view(1, -1)
        cached = (where >= first) & (where < width)
        self.mask = torch.zeros(cached.shape, dtype=dtype, device=device).masked_fill_(~cached, torch.finfo(dtype).min)
        self.mask = self.mask.view(len(rows), 1, 1, cache_length)
        self.counter = cache.layers[0].cumulative_length  # the position this step writes, advanced by the cache
        self.start, self.width = self.positions.clone(), width

    def __call__(self) -> Any:
        self.mask.index_fill_(3, self.counter.view(1), 0)
        output = self.model(
            input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions, use_cache=True,
            **{self.argument: self.cache},
        )  # fmt: skip
        self.positions.add_(1)
        return output.logits[:, -1, :].float()

    def rewind(self) -> None:
        """Back to before the first step (after a warm-up run): the cache's counters, the positions and the mask
        past the prompt (the warm-up wrote the first step's keys and values, which the first step writes again)."""
        import torch

        for layer in self.cache.layers:
            layer.cumulative_length.fill_(self.width)
        self.positions.copy_(self.start)
        self.mask[:, :, :, self.width :] = torch.finfo(self.mask.dtype).min


def _compute_dtype(model: Any) -> Any:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_input_embeddings().weight.dtype


class _Graph:
    """The step captured as one CUDA graph (after a warm-up run on a side stream, rewound)."""

    def __init__(self, step: _Step) -> None:
        import torch

        with torch.cuda.device(step.ids.device):  # the model's GPU, whichever is current
            self._capture(step)

    def _capture(self, step: _Step) -> None:
        import torch

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        step.rewind()
        self.graph = torch.cuda.CUDAGraph()
        # Records the step's kernels and runs none of them. thread_local: CUDA calls that other threads of the
        # worker make meanwhile (telemetry, a chat's long poll) neither break the capture nor fail.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.logits = step()

    def __call__(self) -> Any:
        self.graph.replay()
        return self.logits


def decode_rows(
    model: Any,
    rows: list[list[int]],
    columns: int,
    pad_token_id: int,
    sampling: Sampling,
    criteria: list[Criterion],
    cache_length: int,
    graphs: bool,
) -> tuple[list[list[int]], str]:
    """Each row's generated ids (generate()'s output past the prompt: rows finished early padded), and how the
    steps ran ("graph", or "eager" with the reason where a graph was asked for and not captured).

    `rows`: `columns` equal blocks of the same prompts (the stacked layout), each at least two tokens
    (`rows_refusal`); `cache_length`: positions of the static cache, at least the longest row plus new tokens.
    `criteria` are called after every step with every row's ids so far (the hooks of streaming and cancel too)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(r) for r in rows) - 1  # cached prompt positions; the step writes from here
    if cache_length < width + 1 + sampling.max_new_tokens:
        raise ValueError(f"a static cache of {cache_length} positions cannot hold {width + 1} prompt positions "
                         f"and {sampling.max_new_tokens} new tokens")
    with torch.no_grad():
        cache = prefill_by_length(model, rows, columns, pad_token_id, cache_length)
        step = _Step(model, rows, cache, cache_length, width)
        run: Callable[[], Any] = step
        how = "eager"
        if graphs:
            try:
                run, how = _Graph(step), "graph"
            except RuntimeError as exc:  # a capture that fails (an operation CUDA graphs do not allow) costs speed
                warnings.warn(f"The decode step could not be captured as a CUDA graph ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); it runs eagerly", RuntimeWarning, stacklevel=2)
                how = f"eager: {type(exc).__name__}"
                step.rewind()
        padded = [[pad_token_id] * (width + 1 - len(r)) + r + [pad_token_id] * sampling.max_new_tokens for r in rows]
        sequence = torch.tensor(padded, device=device)  # one transfer, not one per row
        eos = torch.tensor(sampling.eos, device=device) if sampling.eos else None
        unfinished = torch.ones(len(rows), dtype=torch.bool, device=device)
        steps = 0
        for t in range(sampling.max_new_tokens):
            logits = run()
            chosen = sampling.choose(logits, t, eos)
            if eos is not None:
                chosen = torch.where(unfinished, chosen, pad_token_id)
            at = width + 1 + t
            sequence[:, at] = chosen
            step.ids.copy_(chosen.view(-1, 1))
            steps = t + 1
            if eos is not None:
                unfinished &= ~torch.isin(chosen, eos)
            for criterion in criteria:
                unfinished &= ~criterion(sequence[:, : at + 1], logits)
            if not bool(unfinished.any()):
                break
    return sequence[:, width + 1 : width + 1 + steps].tolist(), how
