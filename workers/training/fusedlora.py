"""LoRA layers whose adapter product is added inside the base matmul's output (training only).

PEFT computes a LoRA layer as `base(x).clone() + lora_B(lora_A(dropout(x))) * scaling`: besides the two
matmuls, every pass writes and re-reads three full (tokens x out_features) tensors (the clone, the B product,
its scaled copy) and the backward pass does the same again for the scaled gradient and the summed input
gradient. For the 8B shape that is several GB of memory traffic per layer and pass, on a memory-bound path.

`fuse_lora(model)` gives each plain LoRA layer a forward through `LoraLinear`, one autograd function that
adds the adapter's product into the base output with `addmm_` (the GEMM's epilogue adds it: beta = 1) and
scales with the GEMM's alpha, in the forward and in the backward (`dx.addmm_(g·B, A)`). It saves exactly
what PEFT's layers save (the adapter input, its dropout mask where there is dropout, and x·Aᵀ of rank r),
so the memory estimate is unchanged; the frozen 4-bit weight is dequantized again in the backward, as
bitsandbytes does. Layers it does not cover (DoRA and other variants, LoRA bias, several active adapters,
8-bit bases, disabled or merged adapters, inference) keep PEFT's forward, chosen per call.
"""

from __future__ import annotations

import types
from typing import Any

import torch

_UNFUSED = "_tunedeck_unfused_forward"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's where it is on (as PEFT's path runs under the Trainer), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _frozen_weight(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's (out x in) weight in the compute dtype: a bitsandbytes 4-bit weight dequantized."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.to(dtype)
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, quant_state).to(dtype)


class LoraLinear(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ with W frozen; gradients for x, A and B."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, base: torch.nn.Module,
                scaling: float, dropout: float) -> torch.Tensor:
        dtype = _compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            weight = _frozen_weight(base, dtype)
            bias = base.bias.to(dtype) if base.bias is not None else None
            out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
            del weight
            mask = None
            if dropout > 0.0:
                mask = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1.0 - dropout)
                x2 = x2 * mask / (1.0 - dropout)
            xa = x2 @ a.t()
            out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, mask, xa, lora_a, lora_b)
        ctx.base, ctx.scaling, ctx.dropout, ctx.dtype, ctx.shape = base, scaling, dropout, dtype, shape
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x2, mask, xa, lora_a, lora_b = ctx.saved_tensors
        dtype, scaling = ctx.dtype, ctx.scaling
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(dtype)
            gb = g @ b  # tokens x r
            grad_b = (g.t() @ xa).mul_(scaling).to(lora_b.dtype) if ctx.needs_input_grad[2] else None
            grad_a = (gb.t() @ x2).mul_(scaling).to(lora_a.dtype) if ctx.needs_input_grad[1] else None
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = g @ _frozen_weight(ctx.base, dtype)
                if mask is None:
                    grad_x.addmm_(gb, a, alpha=scaling)
                else:
                    grad_x.addcmul_(gb @ a, mask, value=scaling / (1.0 - ctx.dropout))
                grad_x = grad_x.reshape(ctx.shape)
        return grad_x, grad_a, grad_b, None, None, None


def _fusable(layer: Any, args: tuple, kwargs: dict) -> str | None:
    """The adapter this call can run fused, or None for PEFT's own forward."""
    if args or kwargs or layer.disable_adapters or layer.merged or not layer.training or not torch.is_grad_enabled():
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or layer.lora_bias.get(name, False):
        return None
    dropout = layer.lora_dropout[name]
    if not isinstance(dropout, torch.nn.Identity | torch.nn.Dropout):
        return None
    return name


@torch.compiler.disable  # run eagerly inside a compiled model: tracing bitsandbytes through it is not verified
def _fused_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _fusable(layer, args, kwargs)
    if name is None:
        return getattr(layer, _UNFUSED)(x, *args, **kwargs)
    dropout = layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
    out = LoraLinear.apply(x, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.get_base_layer(),
                           float(layer.scaling[name]), float(p))
    return out.to(x.dtype)


def fusable_base(base: Any) -> bool:
    """Base layers the fused path computes exactly and faster: torch Linear, and bitsandbytes 4-bit Linear on a
    GPU. On the CPU bitsandbytes multiplies by 4-bit weights without dequantizing them whole, which the fused path
    would do in every pass (3x slower on the tiny model)."""
    if type(base) is torch.nn.Linear:
        return True
    weight = getattr(base, "weight", None)
    return getattr(weight, "quant_state", None) is not None and weight.device.type == "cuda"


def fuse_lora(model: Any) -> int:
    """Route every plain LoRA linear layer of `model` through `LoraLinear`; returns how many layers."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not hasattr(module, "lora_A") or hasattr(module, _UNFUSED):
            continue
        if not fusable_base(module.get_base_layer()):
            continue
        setattr(module, _UNFUSED, module.forward)
        module.forward = types.MethodType(_fused_forward, module)
        count += 1
    return count


def unfuse_lora(model: Any) -> None:
    """PEFT's own forward back on every layer `fuse_lora` changed."""
    for module in model.modules():
        if hasattr(module, _UNFUSED):
            module.forward = getattr(module, _UNFUSED)
            delattr(module, _UNFUSED)
