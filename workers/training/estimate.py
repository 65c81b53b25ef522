"""Predict the peak GPU memory of a LoRA / QLoRA training run from the model's shape alone.

Pure arithmetic over a `ModelShape` (read once from the model's config and stored as JSON),
so the web form can call it on every keystroke and the scheduler can compare it with a
worker's free memory. Nothing here imports torch.

The estimate models the Tunedeck runner (workers/training/engine.py + trl's SFTTrainer):

- frozen weights stay in the compute dtype (no fp32 upcast of embeddings, norms and head,
  unlike `peft.prepare_model_for_kbit_training`; `upcast_frozen=True` models that recipe);
- LoRA weights in bf16 on a quantized base (trl casts them), fp32 otherwise (peft's
  autocast_adapter_dtype); the DoRA magnitude stays fp32;
- activations are the tensors autograd saves for the backward pass, counted per token and
  per decoder layer for a Llama-style block (see `layer_saved_bytes_per_token`).

A step peaks at one of two moments: as the loss runs (the logits alive, no layer being
recomputed yet) or in a layer's backward (its activations rebuilt, the logits gone). The
estimate is the larger, and its parts are what is on the GPU at that moment (`peak_phase`).

Every tunable number is a module-level constant named in capitals. They were checked against
`torch.cuda.max_memory_reserved()` of QLoRA steps on one H100 (random Llama-3.1-8B-shaped
model, NF4 + double quant, bf16, LoRA r16 on the 7 projections, dropout 0.05, AdamW, 4 x 2048
tokens, gradient checkpointing unless said; "HF" = frozen weights upcast to fp32 as
prepare_model_for_kbit_training does), measured -> predicted GiB:

    padded, SDPA with mask, unfused loss               23.1 -> 23.7
    same, HF (the team measured 29 GiB)                29.8 -> 29.0
    full rows (as varlen), trl's fused head            11.2 -> 11.8
    same + Liger RMSNorm/SwiGLU                        10.5 -> 11.3
    same, HF (the team measured 16 GiB)                16.0 -> 15.7
    Liger, dropout 0                                   10.5 -> 10.6
    Liger, dropout 0, checkpoints offloaded to CPU      8.2 ->  8.7 (team: ~8 GiB Unsloth-like)
    no checkpointing, 1 x 1024 / 1 x 2048 tokens  13.9 / 21.9 -> 14.4 / 22.4
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from workers.contract.spec import PROMPT_LEARNING_METHODS, QUANTIZATIONS
from workers.training.modelshape import HEAD_MODULES, VIRTUAL_TOKENS, ModelShape, adapter_elements

GiB = 2**30
MiB = 2**20

# --- Weights ---------------------------------------------------------------------------------
# bitsandbytes NF4/FP4: two weights a byte, one absmax per block of 64 weights. The absmax is
# fp32, or with double quantization an 8-bit code plus one fp32 scale per 256 absmax values
# (the QLoRA paper's 0.127 bit/param instead of 0.5).
NF4_BYTES_PER_PARAM = 0.5
NF4_BLOCK = 64
NF4_ABSMAX_BYTES = 4
NF4_DQ_ABSMAX_BYTES = 1
NF4_DQ_BLOCK = 256
NF4_DQ_SCALE_BYTES = 4
# LLM.int8: one byte a weight plus an fp32 scale per output row (SCB).
INT8_BYTES_PER_PARAM = 1
INT8_ROW_STAT_BYTES = 4

# --- Adapter -----------------------------------------------------------------------------------
FP32 = 4
QUANTIZED_ADAPTER_BYTES = 2  # trl casts LoRA A/B of a k-bit base to bf16 (QLoRA paper, section 3)
# bitsandbytes 8-bit optimizers: one byte a state, plus an fp32 absmax per block of 256.
BNB_8BIT_STATE_BYTES = 1 + 4 / 256
# Optimizer states per trainable parameter: ("param" = same dtype as the parameter, torch's
# zeros_like; a float = fixed bytes). Adafactor is factored: see `optimizer_state_bytes`.
OPTIMIZER_STATES: dict[str, tuple[int, str | float]] = {
    "adamw_torch": (2, "param"),
    "adamw_torch_fused": (2, "param"),
    "paged_adamw_32bit": (2, float(FP32)),  # bnb keeps 32-bit states in fp32 whatever the param dtype
    "adamw_8bit": (2, BNB_8BIT_STATE_BYTES),
    "paged_adamw_8bit": (2, BNB_8BIT_STATE_BYTES),
    "lion_8bit": (1, BNB_8BIT_STATE_BYTES),
    "paged_lion_8bit": (1, BNB_8BIT_STATE_BYTES),
    "sgd": (0, "param"),  # no momentum by default
    "adafactor": (0, "factored"),
}

# --- Activations (bytes a token, a decoder layer) -------------------------------------------
# Checked on the H100 without checkpointing: 259.7 kB kept a token and a layer, 256.1 predicted.
# HF's RMSNorm upcasts its input to fp32 for the variance; backward keeps that fp32 copy. Liger's
# RMSNorm and a native LayerNorm keep the input in its own dtype (and a per-token statistic).
RMSNORM_SAVED_BYTES = 4
# Dropout before a LoRA A keeps its output (compute dtype, saved by lora_A) and a bool mask.
DROPOUT_MASK_BYTES = 1
# FlashAttention-style kernels keep a fp32 log-sum-exp per head and token.
ATTENTION_LSE_BYTES = 4
# The backward of one layer holds a few gradients beside its saved tensors: the residual
# stream's incoming and outgoing gradients, and two intermediate-sized ones in the MLP (of the
# activation output and the up projection) before the MLP's saved tensors are released.
BACKWARD_HIDDEN_GRADS = 2
BACKWARD_INTERMEDIATE_GRADS = 2
# Eager attention keeps the fp32 softmax output and its compute-dtype copy for the matmul
# with V, per head, per query, per key; the fp32 scores before softmax are a transient.
EAGER_SCORE_SAVED_BYTES = 4  # + compute dtype
EAGER_SCORE_TRANSIENT_BYTES = 4
# SDPA with an explicit mask (padding, or packed examples) cannot use the flash kernel: the
# memory-efficient kernel gets a mask per call, converted from the model's bool mask to the
# compute dtype, and keeps it for backward. The bool mask itself is built once per step.
SDPA_BOOL_MASK_BYTES = 1
# FlexAttention block masks: int32 block indices for 128×128 blocks (kv and q views).
FLEX_BLOCK = 128
FLEX_BLOCK_MASK_BYTES = 16
# With activation offloading the saved tensors go to pinned CPU memory as the forward makes
# them; the one in use and the one being prefetched stay on the GPU.
OFFLOAD_RESIDENT_LAYERS = 2
# Batch tensors of each token: input_ids, labels and position_ids (int64).
BATCH_TENSORS_BYTES = 3 * 8

# --- Logits and loss ---------------------------------------------------------------------------
# Without a fused head: the model's compute-dtype logits, transformers' fp32 upcast for the loss,
# log_softmax's fp32 output (saved) and, in backward, its gradient and the input gradient.
# The peak is three fp32 tensors of tokens × vocab in backward (the compute-dtype logits are gone
# by then) or compute + two fp32 in forward.
LOGITS_FP32_TENSORS = 3
# A fused head (trl's chunked log-prob head, which trl's SFTTrainer always installs, or Liger's
# fused linear cross-entropy) projects tiles of tokens × vocabulary columns; it keeps the hidden
# states of the labelled tokens (compute dtype), accumulates their gradient in fp32 and casts it.
FUSED_TILE_TOKENS = 4096
FUSED_TILE_VOCAB = 32768
FUSED_HIDDEN_BYTES = 4  # + 2 × compute dtype (saved copy and the cast gradient)
FUSED_TOKEN_STATS_BYTES = 8 * 4  # running max, sum of exp, target logit, entropy, ... in fp32

# --- Temporaries --------------------------------------------------------------------------------
# A 4-bit layer dequantizes its weight to the compute dtype for each matmul: one copy in forward,
# and in backward the dequantized weight plus its transposed view made contiguous.
DEQUANT_COPIES = 2
# LLM.int8 matmul: int32 accumulator of tokens × out features and the int8 copy of the input.
INT8_ACCUMULATOR_BYTES = 4
# DoRA's weight norm: the dequantized weight, B @ A and their sum, in fp32, for the largest layer.
DORA_WEIGHT_COPIES = 3

# --- Allocator -------------------------------------------------------------------------------------
# PyTorch's caching allocator reserves more than it hands out. On the H100 runs the gap tracked
# the tensors made and freed within the step (about 30% of the peak phase's working set: 3.6 GiB
# over 11.7 GiB of unfused logits, 0.3 GiB without checkpointing), not the total; cuBLAS
# workspaces and small pools add a fixed amount.
ALLOCATOR_FRACTION = 0.02
ALLOCATOR_FIXED_BYTES = 256 * MiB
FRAGMENTATION = 0.3
# Tunedeck workers run with expandable segments (PYTORCH_CUDA_ALLOC_CONF): blocks grow in place, and
# on the H100 reserved stayed within 0.1-0.4 GiB of allocated (43.3 vs 43.2 GiB, 6.8 vs 6.5 GiB).
EXPANDABLE_FRAGMENTATION = 0.05
# The CUDA context, kernels and libraries: outside the allocator (not in max_memory_reserved)
# but on the card, so compared with a GPU's free memory.
CUDA_CONTEXT_BYTES = 600 * MiB

# --- Several GPUs ------------------------------------------------------------------------------
# FSDP gathers one wrapped decoder layer's weights for its forward/backward and prefetches the next:
# two layers' worth of full weights sit beside each GPU's shard.
FSDP_GATHERED_LAYERS = 2
METHODS = ("lora", "rslora", "dora", "ia3", "prefix_tuning", "prompt_tuning")
BATCHINGS = ("pad", "pack", "padding_free")
ATTENTIONS = ("varlen", "flex", "sdpa", "eager")


def weight_bytes(
    shape: ModelShape, quantization: str, double_quant: bool, dtype_bytes: int, upcast_frozen: bool = False
) -> int:
    """Frozen weights: the decoder blocks' linears quantized, everything else in the compute dtype."""
    linear = 0
    for lin in shape.linears:
        n = lin.in_features * lin.out_features
        if quantization == "4bit":
            blocks = math.ceil(n / NF4_BLOCK)
            if double_quant:
                absmax = blocks * NF4_DQ_ABSMAX_BYTES + math.ceil(blocks / NF4_DQ_BLOCK) * NF4_DQ_SCALE_BYTES
            else:
                absmax = blocks * NF4_ABSMAX_BYTES
            linear += math.ceil(n * NF4_BYTES_PER_PARAM) + absmax
        elif quantization == "8bit":
            linear += n * INT8_BYTES_PER_PARAM + lin.out_features * INT8_ROW_STAT_BYTES
        else:
            linear += n * dtype_bytes
    # prepare_model_for_kbit_training (not used by Tunedeck) upcasts every non-quantized weight to fp32.
    other_bytes = FP32 if upcast_frozen and quantization != "none" else dtype_bytes
    biases = sum(lin.out_features for lin in shape.linears if lin.bias)
    rest = shape.embedding_params + shape.head_params + shape.extra_params
    return shape.num_layers * (linear + (biases + shape.norm_params) * other_bytes) + rest * other_bytes


def optimizer_state_bytes(optimizer: str, elements: int, param_bytes: int, factored_elements: int) -> int:
    """States of `elements` trainable values stored in `param_bytes` each. Adafactor keeps fp32 row
    and column second moments of each matrix instead: `factored_elements` of them."""
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, not {optimizer!r}")
    count, size = OPTIMIZER_STATES[optimizer]
    if size == "factored":
        return factored_elements * FP32
    return int(count * elements * (param_bytes if size == "param" else float(size)))


def _factored_elements(shape: ModelShape, targets: Sequence[str], r: int, method: str, virtual_tokens: int) -> int:
    """Adafactor's second-moment size: rows + columns of every LoRA matrix, the whole of vectors."""
    matrices, vectors = adapter_elements(shape, targets, r, method, virtual_tokens)
    if method not in ("lora", "rslora", "dora"):
        return matrices + vectors
    per_layer = sum(2 * r + lin.in_features + lin.out_features for lin in shape.targeted(targets))
    return shape.num_layers * per_layer + vectors


@dataclass(frozen=True)
class _Run:
    """The options of one estimate, checked by `_validate`."""

    shape: ModelShape
    method: str
    quantization: str
    double_quant: bool
    dtype_bytes: int
    r: int
    targets: tuple[str, ...]
    dropout: float
    seq_len: int
    micro_batch: int
    batching: str
    checkpoint_layers: int
    activation_offload: bool
    optimizer: str
    liger: bool
    fused_lm_head: bool
    attention: str
    upcast_frozen: bool
    virtual_tokens: int = VIRTUAL_TOKENS
    modules_to_save: tuple[str, ...] = ()
    mlp_chunk_tokens: int = 0  # the runner's tiled MLP (memory mode, long rows)

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch

    @property
    def rows(self) -> int:
        """Rows of the attention call: pack and padding_free flatten the micro-batch into one row."""
        return self.micro_batch if self.batching == "pad" else 1

    @property
    def row_len(self) -> int:
        return self.seq_len if self.batching == "pad" else self.tokens

    @property
    def residual_bytes(self) -> int:
        """The residual stream's dtype: fp32 when upcast fp32 norms and embeddings feed it."""
        return FP32 if self.upcast_frozen and self.quantization != "none" else self.dtype_bytes

    @property
    def adapter_param_bytes(self) -> int:
        return QUANTIZED_ADAPTER_BYTES if self.quantization != "none" else FP32

    @property
    def sdpa_masked(self) -> bool:
        """SDPA gets a mask (no flash kernel, no native GQA) unless each row holds one unpadded example."""
        return not (self.micro_batch == 1 and self.batching in ("pad", "padding_free"))

    @property
    def scores_materialised(self) -> bool:
        return self.attention == "eager" or self.shape.alibi


def _validate(run: _Run) -> None:
    for name, value, allowed in (
        ("method", run.method, METHODS),
        ("quantization", run.quantization, QUANTIZATIONS),
        ("batching", run.batching, BATCHINGS),
        ("attention", run.attention, ATTENTIONS),
        ("optimizer", run.optimizer, tuple(OPTIMIZER_STATES)),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    for name, number in (("seq_len", run.seq_len), ("micro_batch", run.micro_batch), ("r", run.r)):
        if number < 1:
            raise ValueError(f"{name} must be at least 1")
    if run.dtype_bytes not in (2, 4):
        raise ValueError("compute_dtype_bytes must be 2 (bf16/fp16) or 4 (fp32)")
    if not 0 <= run.checkpoint_layers <= run.shape.num_layers:
        raise ValueError(f"checkpoint_layers must be between 0 and {run.shape.num_layers}")


# --- Activations --------------------------------------------------------------------------------------


def _norm_saved_bytes(run: _Run, elements: int) -> int:
    if run.shape.norm == "rms" and not run.liger:
        return elements * RMSNORM_SAVED_BYTES
    return elements * run.residual_bytes


def _adapter_input_bytes(run: _Run) -> int:
    """What the adapters keep of their inputs, per token and layer (a quantized or frozen base keeps none)."""
    if run.method in PROMPT_LEARNING_METHODS:
        return 0
    chosen = run.shape.targeted(run.targets)
    b = run.dtype_bytes
    if run.method == "ia3":  # the scaled tensor, for the vector's gradient
        return sum((lin.in_features if lin.input == "mlp_out" else lin.out_features) * b for lin in chosen)
    if run.dropout > 0:
        kept = sum(lin.in_features * (b + DROPOUT_MASK_BYTES) for lin in chosen)
    elif run.adapter_param_bytes == b:  # lora_A reads the very tensor q, k and v share
        kept = sum({lin.input: lin.in_features * b for lin in chosen}.values())
    else:  # peft casts the input to the adapter's dtype, one copy an adapter (autocast keeps it in b)
        kept = sum(lin.in_features * b for lin in chosen)
    if run.method == "dora":  # the base output, for the magnitude's gradient
        kept += sum(lin.out_features * b for lin in chosen)
    return kept


def _attention_saved_bytes(run: _Run) -> int:
    """q (after RoPE), k, v and the output, kept by the attention kernel; k and v at full head count
    when the kernel cannot group query heads (eager, or SDPA given a mask)."""
    s = run.shape
    repeated = run.scores_materialised or (run.attention == "sdpa" and run.sdpa_masked)
    kv = s.q_dim if repeated else s.kv_dim
    return run.dtype_bytes * (2 * s.q_dim + 2 * kv) + s.num_heads * ATTENTION_LSE_BYTES


def _mlp_saved_bytes_per_token(run: _Run) -> int:
    s, b = run.shape, run.dtype_bytes
    if s.gated_mlp:  # act(gate) keeps gate; act * up keeps both (Liger's SwiGLU recomputes act)
        return s.intermediate_size * b * (2 if run.liger else 3)
    return s.intermediate_size * b  # GELU keeps its input


def _layer_saved_bytes_per_token(run: _Run) -> int:
    """Bytes autograd keeps per token for one decoder layer (without the s² terms)."""
    s = run.shape
    return (
        _norm_saved_bytes(run, s.norm_elements) + _adapter_input_bytes(run) + _attention_saved_bytes(run)
        + _mlp_saved_bytes_per_token(run)
    )


def _mlp_tokens(run: _Run) -> int:
    """Tokens whose MLP intermediates are alive at once inside a recomputed layer."""
    return min(run.tokens, run.mlp_chunk_tokens) if run.mlp_chunk_tokens else run.tokens


def _score_bytes_per_layer(run: _Run) -> tuple[int, int]:
    """(saved, transient) bytes of the s² attention terms of one layer, for the whole micro-batch."""
    cells = run.rows * run.row_len**2
    if run.scores_materialised:
        heads = run.shape.num_heads
        return cells * heads * (EAGER_SCORE_SAVED_BYTES + run.dtype_bytes), cells * heads * EAGER_SCORE_TRANSIENT_BYTES
    if run.attention == "sdpa" and run.sdpa_masked:
        return cells * run.dtype_bytes, 0
    return 0, 0


def _mask_bytes(run: _Run) -> int:
    """The attention mask the model builds once per step."""
    cells = run.rows * run.row_len**2
    if run.scores_materialised:
        return cells * run.dtype_bytes
    if run.attention == "sdpa" and run.sdpa_masked:
        return cells * SDPA_BOOL_MASK_BYTES
    if run.attention == "flex":
        return run.rows * math.ceil(run.row_len / FLEX_BLOCK) ** 2 * FLEX_BLOCK_MASK_BYTES
    return 0


def _kept_activation_bytes(run: _Run) -> int:
    """What the forward leaves on the GPU for the backward: every layer's saved tensors, or only the
    inputs of the recomputed layers, plus the final norm, the batch and the attention mask."""
    s, tokens = run.shape, run.tokens
    checkpoint = run.residual_bytes * s.hidden_size * tokens  # a recomputed layer keeps only its input
    k, n = run.checkpoint_layers, s.num_layers
    kept = k * checkpoint + (n - k) * _layer_bytes(run)
    if run.activation_offload:
        kept = min(kept, OFFLOAD_RESIDENT_LAYERS * (checkpoint if k == n else _layer_bytes(run)))
    final_norm = _norm_saved_bytes(run, s.hidden_size)
    batch = BATCH_TENSORS_BYTES + 2 * s.head_dim * run.dtype_bytes
    return kept + (final_norm + batch) * tokens + _mask_bytes(run)


def _backward_working_bytes(run: _Run) -> int:
    """One layer's backward: its activations again if it is recomputed, and the gradients in flight."""
    s = run.shape
    recompute = 0
    if run.checkpoint_layers:  # a tiled MLP keeps one tile's intermediates (and their gradients) at a time
        tiled = (run.tokens - _mlp_tokens(run)) * _mlp_saved_bytes_per_token(run)
        recompute = _layer_bytes(run) - tiled
    grads = BACKWARD_HIDDEN_GRADS * run.residual_bytes * s.hidden_size * run.tokens
    grads += BACKWARD_INTERMEDIATE_GRADS * run.dtype_bytes * s.intermediate_size * (
        _mlp_tokens(run) if run.checkpoint_layers else run.tokens
    )
    return recompute + grads + _score_bytes_per_layer(run)[1]


def _layer_bytes(run: _Run) -> int:
    return _layer_saved_bytes_per_token(run) * run.tokens + _score_bytes_per_layer(run)[0]


# --- Logits, temporaries, adapter ------------------------------------------------------------------------


def _logits_bytes(run: _Run) -> int:
    s, tokens, b = run.shape, run.tokens, run.dtype_bytes
    if run.fused_lm_head:
        tile = min(tokens, FUSED_TILE_TOKENS) * min(s.vocab_size, FUSED_TILE_VOCAB) * b
        return tile + tokens * (s.hidden_size * (FUSED_HIDDEN_BYTES + 2 * b) + FUSED_TOKEN_STATS_BYTES)
    return tokens * s.vocab_size * max(LOGITS_FP32_TENSORS * FP32, b + 2 * FP32)


def _layer_temporary_bytes(run: _Run) -> int:
    """Buffers of the layer computations: dequantized weights, int8 accumulators, DoRA's weight norm."""
    s, b = run.shape, run.dtype_bytes
    largest = max(lin.in_features * lin.out_features for lin in s.linears)
    total = 0
    if run.quantization != "none":
        total += largest * b * DEQUANT_COPIES
    if run.quantization == "8bit":
        widest_out = max(lin.out_features for lin in s.linears)
        widest_in = max(lin.in_features for lin in s.linears)
        total += run.tokens * (widest_out * INT8_ACCUMULATOR_BYTES + widest_in)
    if run.method == "dora":
        chosen = s.targeted(run.targets)
        total += max(lin.in_features * lin.out_features for lin in chosen) * FP32 * DORA_WEIGHT_COPIES
    return total


def _loss_temporary_bytes(run: _Run) -> int:
    """Buffers of the LM head: its fp32 weight cast for the matmul, a trained head's fp32 gradient."""
    s, total = run.shape, 0
    if run.upcast_frozen and run.quantization != "none" and not run.fused_lm_head:
        total += s.vocab_size * s.hidden_size * run.dtype_bytes  # autocast's copy of the fp32 head
    if run.fused_lm_head and any(name in HEAD_MODULES for name in run.modules_to_save):
        total += s.vocab_size * s.hidden_size * FP32  # the fused head accumulates its weight gradient in fp32
    return total


def _adapter_bytes(run: _Run) -> int:
    """Trainable parameters, their gradients (same dtype) and the optimizer's states. Modules trained
    in full (modules_to_save) are copies in the compute dtype."""
    params, states = _adapter_parts(run)
    return 2 * params + states


def _adapter_parts(run: _Run) -> tuple[int, int]:
    """(trainable parameter bytes, optimizer state bytes)."""
    s = run.shape
    matrices, vectors = adapter_elements(s, run.targets, run.r, run.method, run.virtual_tokens)
    full = s.saved_module_parameters(run.modules_to_save)
    params = matrices * run.adapter_param_bytes + vectors * FP32 + full * run.dtype_bytes
    factored = _factored_elements(s, run.targets, run.r, run.method, run.virtual_tokens)
    factored += full // s.hidden_size + s.hidden_size if full else 0
    states = (
        optimizer_state_bytes(run.optimizer, matrices, run.adapter_param_bytes, factored)
        + optimizer_state_bytes(run.optimizer, vectors, FP32, 0)
        + optimizer_state_bytes(run.optimizer, full, run.dtype_bytes, 0)
    )
    return params, states


def _sharded(parts: dict[str, int], run: _Run, num_gpus: int, strategy: str) -> dict[str, int]:
    """One GPU's share. DDP replicates everything and adds its gradient buckets (a second copy of the
    trainable gradients); FSDP divides the weights (4-bit storage included), the adapter, its gradients
    and optimizer states by the number of GPUs and gathers whole layers as it goes. Activations, logits
    and temporaries are those of the GPU's own micro-batch either way."""
    if num_gpus <= 1:
        return parts
    if strategy != "fsdp":
        return {**parts, "adapter": parts["adapter"] + _adapter_parts(run)[0]}
    layer_weights = parts["weights"] // max(1, run.shape.num_layers)
    return {
        **parts,
        "weights": math.ceil(parts["weights"] / num_gpus) + FSDP_GATHERED_LAYERS * layer_weights,
        "adapter": math.ceil(parts["adapter"] / num_gpus),
    }


# --- The estimate ---------------------------------------------------------------------------------------

PARTS = ("weights", "adapter", "activations", "logits", "temporary", "overhead")


@dataclass(frozen=True)
class Estimate:
    """Predicted peak of torch.cuda.max_memory_reserved(), in bytes, by part."""

    weights: int
    adapter: int
    activations: int
    logits: int
    temporary: int
    overhead: int
    trainable_params: int = 0
    tokens: int = 0  # per micro-batch
    num_gpus: int = 1  # the figures are per GPU: each of num_gpus holds this much
    strategy: str = "single"  # single, ddp or fsdp
    cuda_context: int = CUDA_CONTEXT_BYTES  # on the card but outside the allocator: not in total
    peak_phase: str = "backward"  # loss (logits alive) or backward (a layer's backward)

    @property
    def total(self) -> int:
        return sum(self.parts().values())

    @property
    def device_total(self) -> int:
        """What the process takes of the card: compare this with a GPU's free memory."""
        return self.total + self.cuda_context

    def parts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in PARTS}

    def plus(self, added: Mapping[str, int]) -> Estimate:
        """This estimate with bytes added to some of its parts (a training objective's memory_terms)."""
        return replace(self, **{part: getattr(self, part) + value for part, value in added.items()}) if added else self

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "device_total": self.device_total}

    def summary(self) -> str:
        parts = ", ".join(f"{name} {value / GiB:.1f}" for name, value in self.parts().items())
        moment = "while the loss runs" if self.peak_phase == "loss" else "in a layer's backward"
        per_gpu = f" per GPU on {self.num_gpus} ({self.strategy})" if self.num_gpus > 1 else ""
        return f"{self.total / GiB:.1f} GiB{per_gpu}: {parts} (peak {moment})"


def estimate(
    shape: ModelShape,
    *,
    method: str = "lora",
    quantization: str = "4bit",
    double_quant: bool = True,
    compute_dtype_bytes: int = 2,
    r: int = 16,
    targets: Sequence[str] = ("all-linear",),
    dropout: float = 0.05,
    seq_len: int = 512,
    micro_batch: int = 1,
    batching: str = "pack",
    gradient_checkpointing: bool = True,
    checkpoint_layers: int | None = None,
    activation_offload: bool = False,
    optimizer: str = "adamw_torch",
    liger: bool = False,
    fused_lm_head: bool | None = None,
    attention: str = "sdpa",
    upcast_frozen: bool = False,
    num_virtual_tokens: int = VIRTUAL_TOKENS,
    modules_to_save: Sequence[str] = (),
    mlp_chunk_tokens: int = 0,
    expandable_segments: bool = False,
    num_gpus: int = 1,
    strategy: str = "ddp",
) -> Estimate:
    """Peak GPU memory (allocator reserve) of one training step, by part at the peak's moment.

    seq_len * micro_batch tokens make a micro-batch (for padding_free, seq_len is the average
    example length; pack and padding_free rows are flattened into one attention row, as the
    runner does). `liger` switches Liger's RMSNorm/SwiGLU kernels and, unless `fused_lm_head`
    says otherwise, a fused linear cross-entropy. `checkpoint_layers` recomputes only that many
    layers (default: all with gradient_checkpointing, none without). `upcast_frozen` models
    prepare_model_for_kbit_training's fp32 frozen weights, which the Tunedeck runner avoids.
    `modules_to_save` counts trained copies of embeddings and head. With `num_gpus` > 1 the figures are
    one GPU's, `micro_batch` being that GPU's own, under `strategy` ddp (replicated) or fsdp (sharded).
    """
    if checkpoint_layers is None:
        checkpoint_layers = shape.num_layers if gradient_checkpointing else 0
    run = _Run(
        shape=shape, method=method, quantization=quantization, double_quant=double_quant,
        dtype_bytes=compute_dtype_bytes, r=r, targets=tuple(targets), dropout=dropout, seq_len=seq_len,
        micro_batch=micro_batch, batching=batching, checkpoint_layers=checkpoint_layers,
        activation_offload=activation_offload, optimizer=optimizer, liger=liger,
        fused_lm_head=liger if fused_lm_head is None else fused_lm_head, attention=attention,
        upcast_frozen=upcast_frozen, virtual_tokens=num_virtual_tokens, modules_to_save=tuple(modules_to_save),
        mlp_chunk_tokens=mlp_chunk_tokens,
    )
    _validate(run)
    kept = _kept_activation_bytes(run)
    loss = (_logits_bytes(run), _loss_temporary_bytes(run))
    backward = (_backward_working_bytes(run), _layer_temporary_bytes(run))
    # The step peaks either as the loss runs (logits alive, no layer recomputed yet) or in a layer's
    # backward (logits freed): the parts are those on the GPU at the larger of the two moments.
    at_loss = sum(loss) > sum(backward)
    logits, activations, temporary = (loss[0], kept, loss[1]) if at_loss else (0, kept + backward[0], backward[1])
    parts = {
        "weights": weight_bytes(shape, quantization, double_quant, compute_dtype_bytes, upcast_frozen),
        "adapter": _adapter_bytes(run),
        "activations": activations,
        "logits": logits,
        "temporary": temporary,
    }
    parts = _sharded(parts, run, num_gpus, strategy)
    # Tensors made and freed within the step fragment the allocator's cache: reserved memory exceeds
    # the allocated peak by a share of that working set, more than by a share of the whole.
    working = sum(loss) if at_loss else sum(backward)
    fragmentation = EXPANDABLE_FRAGMENTATION if expandable_segments else FRAGMENTATION
    overhead = int(ALLOCATOR_FRACTION * sum(parts.values()) + fragmentation * working) + ALLOCATOR_FIXED_BYTES
    return Estimate(
        **{name: int(value) for name, value in parts.items()}, overhead=overhead,
        trainable_params=shape.adapter_parameters(run.targets, r, method, num_virtual_tokens)
        + shape.saved_module_parameters(run.modules_to_save),
        tokens=run.tokens, peak_phase="loss" if at_loss else "backward",
        num_gpus=max(1, num_gpus), strategy=(strategy if num_gpus > 1 else "single"),
    )
