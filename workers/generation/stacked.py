"""Every adapter of a mixed batch in one pass: LoRA layers compute all columns' updates with two batched matmuls."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from workers.contract.jobspecs import BASE_KEY
from workers.generation.columns import peft_adapter_name


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
        for layer, present in layers:
            layer.forward = _stacked_forward(layer, present, len(columns))
        yield True
    finally:
        for layer, _ in layers:
            layer.__dict__.pop("forward", None)


def can_stack(model: Any, columns: list[str]) -> bool:
    """Whether `stacked_lora(model, columns)` stacks (yields True)."""
    return _stackable_layers(model, columns) is not None


def _stacked_forward(layer: Any, present: list[tuple[int, str]], columns: int) -> _StackedForward:
    """The layer's stacked forward for these columns: the one made last time where the columns and the adapters'
    weights are the same. A compiled decode step guards on the object (torch.compile traces through it, no graph
    break, as tested on the CPU): a new one at every call would compile the step again."""
    weights = tuple((layer.lora_A[n].weight.data_ptr(), layer.lora_B[n].weight.data_ptr()) for _, n in present)
    key = (columns, tuple(present), weights, id(layer.base_layer))
    kept = layer.__dict__.get("_stacked_forward")
    if kept is None or kept[0] != key:
        kept = (key, _StackedForward(layer, _Stack.of(layer, present) if present else None, columns))
        layer.__dict__["_stacked_forward"] = kept
    return kept[1]


def _stackable_layers(model: Any, columns: list[str]) -> list[tuple[Any, list[tuple[int, str]]]] | None:
    """Every LoRA layer and its columns' adapters (column index, PEFT name); None where a layer is not stackable."""
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
    layers: list[tuple[Any, list[tuple[int, str]]]] = []
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
        layers.append((module, present))
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
        # Fixed addresses, like the weights: a compiled step under CUDA graphs would otherwise copy these tensors
        # (attributes of a plain object, not parameters) into its own buffers at every replay.
        for tensor in (self.a_t, self.b_t, self.scale, self.index):
            torch._dynamo.mark_static_address(tensor)

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
        down = torch.bmm(part.to(stack.a_t.dtype), stack.a_t) * stack.scale  # (adapter, rows, r): small
        out = result.view(self.columns, -1, result.shape[-1])
        if stack.span and out.dtype == down.dtype:
            # Accumulated in place by the matmul itself (beta = 1): no (rows, out) delta is written and read back,
            # which at a comparison's prompt pass is most of what the adapters cost beside the base.
            out[stack.span[0] : stack.span[1]].baddbmm_(down, stack.b_t)
        elif stack.span:
            out[stack.span[0] : stack.span[1]] += torch.bmm(down, stack.b_t).to(out.dtype)
        else:
            out.index_add_(0, stack.index, torch.bmm(down, stack.b_t).to(out.dtype))
        return result
