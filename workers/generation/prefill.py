"""The prompts' pass without padding: prompts of different lengths fill the KV cache in buckets of like length."""

from __future__ import annotations

from functools import cache
from typing import Any

BUCKET_COST = 1024  # what one more forward call costs, in padded token positions (launches, a pass over weights)


def can_prefill(model: Any, rows: list[list[int]]) -> bool:
    """Whether the prompts' pass goes by length buckets: prompts of several lengths, each of two tokens or more,
    and a model that allows it (`prefill_refusal`)."""
    if len({len(r) for r in rows}) < 2 or min(len(r) for r in rows) < 2:
        return False
    return not prefill_refusal(model)


def prefill_refusal(model: Any) -> str:
    """Why `prefill_by_length` cannot fill this model's cache (empty where it can): it needs a plain KV cache with
    full attention in every layer (no sliding windows, no recurrent state) and no adapter of virtual tokens
    (prompt or prefix tuning, whose tokens go before the prompt, in the cache too)."""
    if any(getattr(c, "is_prompt_learning", False) for c in getattr(model, "peft_config", {}).values()):
        return "virtual tokens of a prompt-learning adapter"
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is None or getattr(text, "is_encoder_decoder", False):
        return "this model keeps no plain KV cache"
    if getattr(text, "sliding_window", None) or not all(
        kind == "full_attention" for kind in getattr(text, "layer_types", None) or ["full_attention"]
    ):
        return "this model has layers of sliding-window or linear attention"
    return ""


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


def prefill_by_length(
    model: Any, rows: list[list[int]], columns: int, pad_token_id: int, max_cache_len: int | None = None
) -> Any:
    """The KV cache of every row's prompt but its last token, laid out as generate() expects for the rows
    left-padded to the longest (padding positions stay zero and are masked), computed a length bucket at a time.

    The rows are `columns` equal blocks of the same prompts; a bucket takes its prompts in every block, in block
    order, so that a stacked LoRA layer still finds its columns as equal slices of the batch.

    `max_cache_len`: a StaticCache of that many positions (the compiled decode step's fixed shapes), the buckets
    written straight into its buffers (no second copy of the cache); None: a DynamicCache.
    """
    import torch
    from transformers import DynamicCache, StaticCache

    device = next(model.parameters()).device
    prompts = len(rows) // columns
    width = max(len(r) for r in rows) - 1  # the cached positions: every prompt token but the last
    static: Any = StaticCache(config=model.config, max_cache_len=max_cache_len) if max_cache_len is not None else None
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
        bucket_layers: list[Any] = cache.layers  # full-attention layers (can_prefill): keys and values
        for layer, cached in enumerate(bucket_layers):
            if layer == len(keys):
                if static is not None:  # its buffers: every row, max_cache_len positions, zeros
                    target = static.layers[layer]
                    target.lazy_initialization(_rows_like(cached.keys, len(rows)), _rows_like(cached.values, len(rows)))
                    keys.append(target.keys)
                    values.append(target.values)
                else:
                    keys.append(cached.keys.new_zeros((len(rows), cached.keys.shape[1], width, cached.keys.shape[-1])))
                    values.append(cached.values.new_zeros((*keys[-1].shape[:3], cached.values.shape[-1])))
            keys[layer][rows_at, :, width - span : width] = cached.keys
            values[layer][rows_at, :, width - span : width] = cached.values
    if static is not None:
        for target in static.layers:
            target.cumulative_length.fill_(width)  # in place: the compiled step reads it at a fixed address
        return static
    full = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        full.update(k, v, layer)
    return full


def _rows_like(states: Any, rows: int) -> Any:
    """A (rows, heads, 1, head dim) view of a bucket's states: the shape, dtype and device a static layer takes."""
    return states[:1, :, :1].expand(rows, -1, -1, -1)
