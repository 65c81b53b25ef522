"""How a run trains fast: the execution plan and the pieces that carry it out.

The train runner (workers/training/train.py) and the throughput benchmark (bench/train_throughput.py)
share this module, so the benchmark measures exactly what users run.

The plan resolves every "auto" switch of TrainParams from the device it runs on:

- batching: examples packed (best-fit decreasing) into rows of max_seq_length, each keeping
  its own position ids; the micro-batch is flattened into one padding-free row.
- attention: varlen FlashAttention from PyTorch (`torch.nn.attention.varlen`) over those
  rows, so no work is spent across example boundaries or on padding; FlexAttention block
  masks or SDPA where it is not available.
- frozen weights stay in the compute dtype (no fp32 upcast of embeddings, norms and head),
  Liger Triton kernels for RMSNorm, SwiGLU and RoPE, and trl's fused LM head, which projects
  only the positions that carry a label, in tiles, without materialising the logits.
- LoRA layers as one autograd function each (fusedlora.py): the adapter's product is added inside the
  base matmul's output instead of through three extra full-size tensors per layer and pass.
- gradient checkpointing only on as many decoder layers as memory needs (throughput mode; where only
  small passes would fit without it, larger passes with every layer recomputed), or on every layer with
  the checkpoints offloaded to CPU (memory mode).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from workers.contract.spec import (
    PADDED_OBJECTIVES,
    PROMPT_LEARNING_METHODS,
    UNPADDED_OBJECTIVES,
    LoraParams,
    TrainParams,
)

log = logging.getLogger(__name__)

VARLEN_ATTENTION = "tunedeck_varlen"
MAX_FLASH_HEAD_DIM = 256  # FlashAttention's kernels (varlen included) handle head dimensions up to this


class PlanError(ValueError):
    """A switch that cannot work on this device or with this method, with the field that asks for it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass
class Plan:
    device: str  # cuda | cpu
    dtype: str  # bfloat16 | float16 | float32
    mode: str  # throughput | memory
    batching: str  # pad | pack | padding_free
    attention: str  # varlen | flex | sdpa | eager
    checkpoint_layers: int  # decoder layers recomputed in the backward pass (0 = none)
    num_layers: int
    activation_offload: bool
    liger: bool
    compile: bool
    fused_lora: bool = False  # LoRA's product added inside the base matmul (workers/training/fusedlora.py)
    micro_batch: int = 1  # what one forward pass takes (rows or examples)
    mlp_chunk_tokens: int = 0  # memory mode, long rows: the MLP runs (and is recomputed) this many tokens at a time
    grad_accum: int = 1  # micro-batches per optimizer step
    gpu_total_bytes: int = 0
    estimate_bytes: int | None = None
    notes: list[str] = field(default_factory=list)  # where the plan departs from what the run asked, and why

    @property
    def attn_implementation(self) -> str:
        return {"varlen": VARLEN_ATTENTION, "flex": "flex_attention"}.get(self.attention, self.attention)

    def describe(self) -> str:
        ckpt = (
            "off" if not self.checkpoint_layers
            else f"{self.checkpoint_layers}/{self.num_layers} layers" + (" offloaded to CPU" if self.activation_offload else "")
        )
        parts = [
            f"mode {self.mode}", f"batching {self.batching}", f"micro-batch {self.micro_batch} x {self.grad_accum}",
            f"attention {self.attention}",
            f"gradient checkpointing {ckpt}", f"Liger kernels {'on' if self.liger else 'off'}",
        ]
        if self.mlp_chunk_tokens:
            parts.append(f"MLP in {self.mlp_chunk_tokens}-token tiles")
        if self.fused_lora:
            parts.append("LoRA fused into the base matmuls")
        if self.compile:
            parts.append("torch.compile")
        if self.estimate_bytes:
            parts.append(f"estimated peak {self.estimate_bytes / 2**30:.1f} GiB")
        return ", ".join(parts) + "".join(f" ({note})" for note in self.notes)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def varlen_available() -> bool:
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return False
    return torch.cuda.get_device_capability()[0] >= 8


def liger_available() -> bool:
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def _switch(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "on"


def check_switches(train: TrainParams, lora: LoraParams) -> dict[str, str]:
    """Combinations refused on any device: checked before a run is queued, and again by the plan."""
    errors: dict[str, str] = {}
    method = lora.method
    if method in PROMPT_LEARNING_METHODS and train.batching in ("pack", "padding_free"):
        errors["batching"] = f"{method} prepends virtual tokens to each example: use pad (or auto)"
    if train.attention == "varlen" and train.batching == "pad":
        errors["attention"] = "varlen attention works on packed or padding-free rows, not padded batches"
    elif train.attention == "varlen" and train.objective in set(PADDED_OBJECTIVES) - set(UNPADDED_OBJECTIVES):
        errors["attention"] = (f"varlen attention works on packed or padding-free rows, and {train.objective} pads "
                               "its batches: use sdpa (or auto)")
    if train.activation_offload == "on" and train.gradient_checkpointing == "off":
        errors["activation_offload"] = "offloading moves the checkpointed layer inputs to CPU: it needs gradient checkpointing"
    return errors


def resolve_plan(
    train: TrainParams,
    lora: LoraParams,
    *,
    device: str,
    dtype: str,
    num_layers: int,
    gpu_total_bytes: int = 0,
    estimator: Any = None,
    head_dim: int = 0,
    steps: int = 0,
    kernels: tuple[bool, bool] | None = None,
) -> Plan:
    """Turn the run's switches into a plan for this device; refuse combinations that cannot work.

    `estimator(plan) -> bytes` predicts the peak for a candidate plan; with it, throughput mode splits each
    optimizer step's rows into as few passes as fit under 90% of the GPU, and recomputes only as many layers as
    needed. `steps`: the optimizer steps the run is expected to take (0: unknown), for whether compiling pays.
    `kernels`: whether (varlen attention, Liger) are available, where the plan is made for a GPU elsewhere (the
    control plane's estimate); by default, what this machine has.
    """
    varlen_ok, liger_ok = kernels if kernels is not None else (varlen_available(), liger_available())
    for name, message in check_switches(train, lora).items():
        raise PlanError(name, message)
    cuda = device == "cuda"
    prompt_method = lora.method in PROMPT_LEARNING_METHODS
    mode = "throughput" if train.mode == "auto" else train.mode

    batching, note = train.planned_batching(cuda, prompt_method)
    notes: list[str] = [note] if note else []

    attention = train.attention
    flash_head = head_dim <= MAX_FLASH_HEAD_DIM  # 0: unknown, taken as fitting
    if attention == "auto":
        if batching != "pad" and varlen_ok and flash_head:
            attention = "varlen"
        else:
            attention = "sdpa"
    if attention == "varlen":
        if not varlen_ok:
            raise PlanError("attention", "varlen needs a CUDA GPU of compute capability 8.0+ and PyTorch >= 2.10")
        if not flash_head:
            raise PlanError("attention", f"varlen FlashAttention takes heads of at most {MAX_FLASH_HEAD_DIM} dimensions; "
                            f"this model's have {head_dim}: use sdpa")
    if attention == "flex" and not cuda:
        raise PlanError("attention", "FlexAttention training needs a CUDA GPU")

    liger = _switch(train.liger_kernels, liger_ok)
    if liger and not liger_ok:
        raise PlanError("liger_kernels", "Liger kernels need a CUDA GPU and the liger-kernel package")

    if mode == "memory":
        offload = _switch(train.activation_offload, cuda)
    else:
        offload = _switch(train.activation_offload, False)
    if offload and not cuda:
        raise PlanError("activation_offload", "offloading activations needs a CUDA GPU")

    fused = FUSED_LORA and lora.method == "lora" and not lora.use_dora and not train.sharded
    compile_auto = cuda and mode == "throughput" and train.objective in COMPILED_OBJECTIVES and not train.distributed \
        and not prompt_method
    # Compiling paid 2% a step with PEFT's LoRA layers, the fused ones 12% on their own: "auto" keeps the fused
    # layers and leaves compiling off. Compiling asked for trains through PEFT's layers: a compiled model's
    # backward failed around the fused layers on an H100 ("wrong number of dimensions" in Inductor's code).
    long_enough = steps >= COMPILE_MIN_STEPS
    compile_ = _switch(train.torch_compile, compile_auto and long_enough and not fused)
    if compile_ and fused:
        fused = False
        notes.append("LoRA layers: PEFT's (the fused ones do not compile)")
    if train.torch_compile == "auto" and compile_auto and steps:
        notes.append(f"compile {'on' if compile_ else 'off'}: " + (
            f"{steps} steps" if compile_ else
            "not measured to pay with fused LoRA layers" if long_enough else
            f"{steps} steps do not pay for compiling (from {COMPILE_MIN_STEPS})"))
    plan = Plan(
        device=device, dtype=dtype, mode=mode, batching=batching, attention=attention,
        checkpoint_layers=num_layers, num_layers=num_layers, activation_offload=offload, liger=liger,
        compile=compile_, fused_lora=fused, micro_batch=train.batch_size, grad_accum=train.grad_accum,
        gpu_total_bytes=gpu_total_bytes, notes=notes,
    )
    if mode == "memory" and cuda and batching != "pad" and train.gradient_checkpointing != "off":
        _split_micro_batch(plan, max(1, MEMORY_MODE_TOKENS // train.max_seq_length))
        if train.max_seq_length > MLP_CHUNK_TOKENS:
            plan.mlp_chunk_tokens = MLP_CHUNK_TOKENS
    prefix = lora.method == "prefix_tuning"  # PEFT's prefix tuning cannot recompute
    if train.gradient_checkpointing == "off" or (prefix and train.gradient_checkpointing == "auto"):
        plan.checkpoint_layers = 0
        plan.activation_offload = False
    elif train.gradient_checkpointing == "auto":
        if not cuda:
            plan.checkpoint_layers = 0
        elif mode == "throughput" and estimator is not None and gpu_total_bytes and not offload:
            grow = train.objective not in FIXED_SPLIT_OBJECTIVES
            smallest = min(plan.micro_batch, MIN_MICRO_BATCH.get(train.objective, 1))
            _choose_split(plan, estimator, int(gpu_total_bytes * THROUGHPUT_BUDGET), train.max_seq_length, grow,
                          smallest)
    if plan.activation_offload and not plan.checkpoint_layers:
        plan.activation_offload = False  # auto chose recompute-free: nothing is left to offload
    if estimator is not None:
        plan.estimate_bytes = estimator(plan)
    return plan


# Plain LoRA layers train through fusedlora.LoraLinear (the benchmark turns it off to measure PEFT's own path).
FUSED_LORA = True
# Memory mode offloads through trl's context, which copies each activation back when the backward pass reaches it.
# offload.ActivationOffload copies them back a layer ahead; on an H100 it hid more of the transfer time (21% against
# 9%) but ran 15% slower (5,536 against 6,484 tokens/s, bench/README.md), so it is the benchmark's alternative
# (`offload=prefetch`) until that is understood.
PREFETCH_OFFLOAD = False
# Memory mode runs at most this many tokens per forward pass (more accumulation, same optimizer step).
MEMORY_MODE_TOKENS = 4096
# ...and runs the MLP of longer rows in tiles of this many tokens (its intermediates are 3x the hidden size).
MLP_CHUNK_TOKENS = 8192


def _split_micro_batch(plan: Plan, rows: int) -> None:
    """Smaller micro-batches, more of them: the same examples per optimizer step."""
    while plan.micro_batch > rows and plan.micro_batch % 2 == 0:
        plan.micro_batch //= 2
        plan.grad_accum *= 2


# Throughput mode plans within this share of the GPU: the estimator is within about 10% of the measured peak, and
# the allocator needs headroom.
THROUGHPUT_BUDGET = 0.9
# ...and puts at most this many tokens in one forward pass (more than the run's own micro-batch only up to here):
# past it a pass already keeps the GPU busy, and memory is better left to the allocator.
MAX_PASS_TOKENS = 32_768
# Objectives whose micro-batch the plan keeps as asked (GRPO's generation groups are sized by it).
FIXED_SPLIT_OBJECTIVES = ("grpo",)
# torch.compile on "auto": throughput-mode supervised runs of at least this many optimizer steps. On an H200 (Llama-3.1-8B
# shape, 4-bit, 8 rows of 2048 a pass) compiling cost ~50 s and saved 2% of a 2.2 s step: it pays back after ~1,100
# steps (bench/README.md).
COMPILE_MIN_STEPS = 1500
COMPILED_OBJECTIVES = ("sft",)
# The fewest rows a pass may hold, by objective: KTO's KL term pairs each row with another row of its pass.
MIN_MICRO_BATCH = {"kto": 2}


def _choose_split(plan: Plan, estimator: Any, budget: int, seq_len: int, grow: bool, smallest: int = 1) -> None:
    """Throughput mode: the rows of one optimizer step (micro-batch x accumulation, as the run asked: the same
    examples per step and the same schedule) run in as few passes as fit without recomputation, which costs more
    than smaller passes (measured on an H100: 8k tokens per pass without checkpointing ran 1.3x faster than 14k
    with half the layers recomputed). With `grow`, a pass may take more rows than the run's micro-batch, up to
    MAX_PASS_TOKENS. When even one row per pass needs recomputation, as few layers as fit are recomputed at the
    run's own split. A pass holds at least `smallest` rows."""
    rows = plan.micro_batch * plan.grad_accum
    largest = max(plan.micro_batch, MAX_PASS_TOKENS // max(seq_len, 1)) if grow else plan.micro_batch
    for micro in (m for m in range(min(rows, largest), smallest - 1, -1) if rows % m == 0):
        candidate = dataclasses.replace(plan, micro_batch=micro, grad_accum=rows // micro, checkpoint_layers=0)
        fits = estimator(candidate)
        if fits is not None and fits <= budget:
            if micro * seq_len < SMALL_PASS_TOKENS and _recompute_for_larger_passes(
                    plan, estimator, budget, seq_len, rows, micro, largest):
                return
            if (micro, rows // micro) != (plan.micro_batch, plan.grad_accum):
                plan.notes.append(f"micro-batch {micro} x {rows // micro} for the {rows} rows per optimizer step "
                                  f"asked as {plan.micro_batch} x {plan.grad_accum}")
            plan.notes.append(f"{micro} {'row' if micro == 1 else 'rows'} per pass fit in {fits / 2**30:.0f} GiB of "
                              f"{plan.gpu_total_bytes / 2**30:.0f} without recomputation")
            plan.micro_batch, plan.grad_accum, plan.checkpoint_layers = micro, rows // micro, 0
            return
    plan.checkpoint_layers = _fewest_checkpointed_layers(plan, estimator, budget)


# Small passes leave the GPU waiting on the host: measured on an H100 (Llama-3.1-8B shape, 4-bit, fused LoRA, 16 rows
# of 2,048 tokens per optimizer step under a 24 GB budget), a pass costs about as much as PASS_OVERHEAD_TOKENS more
# tokens would, and recomputing every layer multiplies a pass's time by 1 + RECOMPUTE_COST: 1 row a pass without
# recomputation ran 5.35 s a step, 4 rows with every layer recomputed 3.40 s (bench/README.md).
PASS_OVERHEAD_TOKENS = 6_600
RECOMPUTE_COST = 0.49
# Where the passes that fit without recomputation hold fewer tokens than this, larger passes with every layer
# recomputed are weighed (up to RECOMPUTE_PASS_TOKENS: the size measured, not extrapolated).
SMALL_PASS_TOKENS = 4_096
RECOMPUTE_PASS_TOKENS = 8_192


def pass_cost(passes: int, tokens_per_pass: int, recomputed_share: float) -> float:
    """An optimizer step's time, in tokens' worth: each pass's tokens plus its overhead, more where recomputed."""
    return passes * (tokens_per_pass + PASS_OVERHEAD_TOKENS) * (1 + RECOMPUTE_COST * recomputed_share)


def _recompute_for_larger_passes(plan: Plan, estimator: Any, budget: int, seq_len: int, rows: int, micro: int,
                                 largest: int) -> bool:
    """Where `micro` rows a pass fit without recomputation but make small passes: take the cheapest larger pass
    (by `pass_cost`) that fits with every layer recomputed, if it is cheaper. Returns whether the plan changed."""
    best, best_cost = 0, pass_cost(rows // micro, micro * seq_len, 0.0)
    for m in (m for m in range(micro + 1, min(rows, largest) + 1) if rows % m == 0):
        if m * seq_len > RECOMPUTE_PASS_TOKENS:
            break
        cost = pass_cost(rows // m, m * seq_len, 1.0)
        candidate = dataclasses.replace(plan, micro_batch=m, grad_accum=rows // m, checkpoint_layers=plan.num_layers)
        fits = estimator(candidate)
        if cost < best_cost and fits is not None and fits <= budget:
            best, best_cost = m, cost
    if not best:
        return False
    plan.notes.append(
        f"micro-batch {best} x {rows // best} with every layer recomputed for the {rows} rows per optimizer step "
        f"asked as {plan.micro_batch} x {plan.grad_accum}: {micro} {'row' if micro == 1 else 'rows'} per pass would "
        f"fit without recomputation, but passes of {micro * seq_len:,} tokens leave the GPU waiting"
    )
    plan.micro_batch, plan.grad_accum, plan.checkpoint_layers = best, rows // best, plan.num_layers
    return True


def _fewest_checkpointed_layers(plan: Plan, estimator: Any, budget: int) -> int:
    """Each recomputed layer trades its saved activations for one extra forward: do as few as fit."""
    none = estimator(dataclasses.replace(plan, checkpoint_layers=0))
    if none is None:
        return plan.num_layers
    if none <= budget:
        return 0
    every = estimator(dataclasses.replace(plan, checkpoint_layers=plan.num_layers))
    if every is None or every >= budget:
        return plan.num_layers
    saving_per_layer = (none - every) / plan.num_layers
    return min(plan.num_layers, math.ceil((none - budget) / saving_per_layer))


# --- attention over packed rows ------------------------------------------------------------


def _varlen_attention_forward(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
    scaling: float | None = None, **kwargs: Any,
) -> tuple[Any, None]:
    """Causal attention per example of a packed row: (b, h, s, d) in, (b, s, h, d) out."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    cu_seq = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu_seq is None:
        if attention_mask is not None and batch > 1:
            raise ValueError("varlen attention got a padded batch; use batching=pack or padding_free")
        # One row per batch item, each a single example.
        cu_seq = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=query.device)
        max_len = seq
    if isinstance(max_len, torch.Tensor):
        max_len = int(max_len)
    q = query.transpose(1, 2).reshape(batch * seq, heads, dim)
    k = key.transpose(1, 2).reshape(batch * seq, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * seq, kv_heads, dim)
    if kv_heads != heads and "enable_gqa" not in _VARLEN_PARAMS:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    extra: dict[str, Any] = {"scale": scaling}
    if "is_causal" in _VARLEN_PARAMS:
        extra["is_causal"] = True
    else:
        extra["window_size"] = (-1, 0)  # PyTorch 2.11: causal is a window reaching 0 tokens to the right
    if kv_heads != heads and "enable_gqa" in _VARLEN_PARAMS:
        extra["enable_gqa"] = True
    cu_seq = cu_seq.to(torch.int32)
    out = varlen_attn(q, k, v, cu_seq, cu_seq, max_len, max_len, **extra)
    return out.view(batch, seq, heads, dim), None


_VARLEN_PARAMS: frozenset[str] = frozenset()


def register_varlen_attention() -> None:
    global _VARLEN_PARAMS
    from torch.nn.attention.varlen import varlen_attn
    from transformers import AttentionInterface

    _VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters)
    AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention_forward)


# --- model preparation ---------------------------------------------------------------------


def prepare_model(model: Any, plan: Plan) -> Any:
    """Kernels and checkpointing on the base model, before PEFT wraps it."""
    if plan.liger:
        apply_liger(model)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        for param in model.parameters():
            param.requires_grad_(False)  # frozen, and left in the compute dtype: no fp32 upcast
    if plan.checkpoint_layers:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        limit_checkpointed_layers(model, plan.checkpoint_layers)
    if plan.mlp_chunk_tokens:
        tile_mlp(model, plan.mlp_chunk_tokens)
    return model


_LIGER_PATCHED: dict[Any, dict[str, Any]] = {}


def apply_liger(model: Any) -> None:
    """Liger's per-layer kernels on this model. Liger also rebinds names in the model's modeling module
    (RoPE, norm and MLP classes) for every later model of that type; `restore_kernels()` puts them back
    once the run is over, so a later job in the same worker (on CPU, or without Liger) is unaffected."""
    import importlib

    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    module = importlib.import_module(type(model).__module__)
    _LIGER_PATCHED.setdefault(module, dict(vars(module)))
    # trl's fused LM head already avoids the logits: only the per-layer kernels here.
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, geglu=True,
        cross_entropy=False, fused_linear_cross_entropy=False,
    )


def restore_kernels() -> None:
    for module, saved in _LIGER_PATCHED.items():
        for name in [n for n in vars(module) if n not in saved]:
            delattr(module, name)
        for name, value in saved.items():
            if getattr(module, name, None) is not value:
                setattr(module, name, value)
    _LIGER_PATCHED.clear()


def tile_mlp(model: Any, chunk_tokens: int) -> None:
    """Run each decoder layer's MLP over the sequence in tiles, each its own checkpoint: inside the
    recomputed layer only one tile's intermediates are alive (for very long rows in memory mode)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        inner = mlp.forward

        def forward(x: Any, _inner: Any = inner) -> Any:
            if x.shape[1] <= chunk_tokens or not torch.is_grad_enabled():
                return _inner(x)
            tiles = [checkpoint(_inner, t, use_reentrant=False) for t in x.split(chunk_tokens, dim=1)]
            return torch.cat(tiles, dim=1)

        mlp.forward = forward


def decoder_layers(model: Any) -> list[Any]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def limit_checkpointed_layers(model: Any, count: int) -> None:
    """Recompute only `count` decoder layers, spread evenly (the rest keep their activations)."""
    layers = decoder_layers(model)
    if not layers or count >= len(layers):
        return
    chosen = {round(i * len(layers) / count) for i in range(count)} if count else set()
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index in chosen


def sft_arguments(plan: Plan, train: TrainParams) -> dict[str, Any]:
    """The SFTConfig keywords that carry the plan out (the caller adds the rest)."""
    args: dict[str, Any] = {
        "per_device_train_batch_size": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "activation_offloading": plan.activation_offload,
        "torch_compile": plan.compile,
        "gradient_checkpointing": False,  # enabled per layer in prepare_model
        "bf16": plan.device == "cuda" and plan.dtype == "bfloat16",
        "fp16": plan.device == "cuda" and plan.dtype == "float16",
        "use_cpu": plan.device == "cpu",
    }
    if plan.batching == "pack":  # SFTConfig's own keywords, only where the plan packs (other configs lack them)
        args.update(packing=True, packing_strategy="bfd", padding_free=True)
    return args


def padding_free_collator(tokenizer: Any) -> Any:
    """Flatten a micro-batch of (already truncated) examples into one row with per-example positions."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)


def plan_estimator(config: Any, spec: Any, memory_terms: Any = None) -> Any:
    """`plan -> predicted peak bytes` for this model and run, or None when the shape is not understood.
    `memory_terms`: the run's objective's (objectives/base.Objective), what it adds to a supervised pass."""
    from workers.training.modelshape import ModelShape

    try:
        shape = ModelShape.from_config(config)
    except ValueError:
        return None
    estimate_plan = plan_estimates(shape, spec.lora, spec.train, memory_terms)
    return lambda plan: int(estimate_plan(plan).total)


def plan_estimates(shape: Any, lora: LoraParams, train: TrainParams, memory_terms: Any = None,
                   seq_len: int = 0) -> Any:
    """`plan -> Estimate` (workers.training.estimate) for a model of this shape and this run. `seq_len`: the
    tokens of one row, where they are fewer than max_seq_length (padding-free rows of short examples)."""
    from workers.training import estimate as est

    method = lora.method
    if method == "lora" and lora.use_dora:
        method = "dora"

    def estimator(plan: Plan) -> Any:
        result = est.estimate(
            shape,
            method=method,
            quantization=lora.quantization,
            double_quant=lora.double_quant,
            compute_dtype_bytes=4 if plan.dtype == "float32" else 2,
            r=lora.r,
            targets=lora.target_modules,
            dropout=lora.dropout,
            seq_len=seq_len or train.max_seq_length,
            micro_batch=plan.micro_batch,
            batching=plan.batching,
            checkpoint_layers=plan.checkpoint_layers,
            activation_offload=plan.activation_offload and plan.checkpoint_layers > 0,
            optimizer=train.optimizer,
            liger=plan.liger,
            fused_lm_head=True,  # trl's SFTTrainer always projects through its tiled LM head
            attention=plan.attention,
            num_virtual_tokens=lora.num_virtual_tokens,
            modules_to_save=lora.modules_to_save,
            mlp_chunk_tokens=plan.mlp_chunk_tokens,
            expandable_segments="expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            num_gpus=train.num_gpus,  # one GPU's share: DDP replicates, FSDP shards
            strategy=train.strategy,
        )
        if memory_terms is None:
            return result
        dtype_bytes = 4 if plan.dtype == "float32" else 2
        return result.plus(memory_terms(result.parts(), shape, train, dtype_bytes))

    return estimator


def rank_train_params(train: TrainParams) -> TrainParams:
    """The TrainParams one process runs: the global batch split across num_gpus processes."""
    if not train.distributed:
        return train
    micro, accum = train.per_rank_batch() or (train.batch_size, train.grad_accum)
    return dataclasses.replace(train, batch_size=micro, grad_accum=accum)
