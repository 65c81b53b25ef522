"""A model's shape as the memory estimate reads it: layers, widths, linear layers, from its config alone.

`ModelShape.from_config` reads the families the estimate knows (Llama-like, GPT-2, BLOOM, Falcon); others are
refused with `UnsupportedModel`. The shape is stored as JSON with the base model, so estimating needs no download.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

# Prompt-learning methods train virtual tokens, not per-layer matrices; peft's usual count.
VIRTUAL_TOKENS = 20
# Decoder-only families whose blocks are Llama's: q/k/v/o projections, a gated MLP, RMSNorm.
LLAMA_LIKE = {
    "llama": 2, "mistral": 2, "qwen2": 2, "qwen3": 2, "gemma": 2, "gemma2": 4, "gemma3_text": 4,
    "olmo2": 2, "granite": 2, "smollm3": 2,
}  # model type -> norms over the hidden state per layer
QK_NORM_TYPES = ("qwen3", "gemma3_text", "olmo2")
QKV_BIAS_TYPES = ("qwen2",)
SUPPORTED_TYPES = (*sorted(LLAMA_LIKE), "gpt2", "bloom", "falcon")
ATTENTION_MODULES = ("self_attn", "attn", "self_attention")  # first part of an attention linear's path
EMBEDDING_MODULES = ("embed_tokens", "wte", "word_embeddings")
HEAD_MODULES = ("lm_head",)


class UnsupportedModel(ValueError):
    """The config describes a model whose block this estimator does not know."""


@dataclass(frozen=True)
class LinearShape:
    """A linear layer of one decoder block. `path` is its name inside the block
    (self_attn.q_proj); `input` names the tensor it reads, shared by q, k and v."""

    path: str
    in_features: int
    out_features: int
    bias: bool = False
    input: str = ""

    @property
    def name(self) -> str:
        return self.path.rsplit(".", 1)[-1]

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    def matches(self, target: str) -> bool:
        """peft's rule: the module's name equals the target or ends with '.' + target."""
        return self.path == target or self.path.endswith("." + target)


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    linears: tuple[LinearShape, ...]  # one decoder block's
    norm: str = "rms"  # rms | layer
    gated_mlp: bool = True
    norm_elements: int = 0  # elements a token passes through norms in one layer
    norm_params: int = 0  # norm weights (and biases) of one layer
    extra_params: int = 0  # outside the layers: final norm, position embeddings, embedding norm
    alibi: bool = False  # ALiBi biases: the scores are materialised whatever the kernel

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read a transformers config (or any object with its attributes)."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        model_type = str(getattr(config, "model_type", "") or "")
        if model_type in LLAMA_LIKE:
            return _llama_like(config, model_type)
        if model_type == "gpt2":
            return _gpt2(config)
        if model_type == "bloom":
            return _bloom(config)
        if model_type == "falcon":
            return _falcon(config)
        raise UnsupportedModel(
            f"cannot estimate memory for model type {model_type or '(none)'!r}: "
            f"supported are {', '.join(SUPPORTED_TYPES)}"
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelShape:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"ModelShape: unknown field(s) {', '.join(sorted(unknown))}")
        values = dict(data)
        values["linears"] = tuple(LinearShape(**item) for item in values["linears"])
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def num_parameters(self) -> int:
        layer = sum(lin.params for lin in self.linears) + self.norm_params
        return self.num_layers * layer + self.embedding_params + self.head_params + self.extra_params

    def linear_module_names(self) -> list[str]:
        """Leaf names LoRA can target, as `workers.training.modelinfo.linear_module_names` lists them."""
        return sorted({lin.name for lin in self.linears})

    def targeted(self, targets: Sequence[str]) -> list[LinearShape]:
        """The block's linears a LoRA target list (names or one preset) adapts; unknown names raise ValueError."""
        if list(targets) in (["all-linear"], ["attention+mlp"]):
            return list(self.linears)
        if list(targets) == ["attention"]:
            return [lin for lin in self.linears if lin.path.split(".")[0] in ATTENTION_MODULES]
        unknown = [t for t in targets if not any(lin.matches(t) for lin in self.linears)]
        if unknown:
            raise ValueError(
                f"unknown target module(s) {', '.join(unknown)}; this model's linear modules are "
                f"{', '.join(self.linear_module_names())}"
            )
        return [lin for lin in self.linears if any(lin.matches(t) for t in targets)]

    def adapter_parameters(
        self, targets: Sequence[str], r: int, method: str = "lora", virtual_tokens: int = VIRTUAL_TOKENS
    ) -> int:
        """Trainable parameters, as peft's get_nb_trainable_parameters counts them (bias='none')."""
        return sum(adapter_elements(self, targets, r, method, virtual_tokens))

    def saved_module_parameters(self, modules_to_save: Sequence[str]) -> int:
        """Parameters of the modules trained in full (peft's modules_to_save, each a trainable copy).
        Only the embeddings and the head count; any other module (a norm) is small."""
        total = 0
        for name in set(modules_to_save):
            if name in EMBEDDING_MODULES or (name in HEAD_MODULES and self.tie_word_embeddings):
                total += self.embedding_params
            elif name in HEAD_MODULES:
                total += self.head_params
        return total


def _get(config: Any, name: str, default: Any = None) -> Any:
    value = getattr(config, name, None)
    return default if value is None else value


def _need(config: Any, model_type: str, *names: str) -> list[int]:
    missing = [n for n in names if getattr(config, n, None) is None]
    if missing:
        raise UnsupportedModel(f"{model_type} config lacks {', '.join(missing)}: cannot estimate its memory")
    return [int(getattr(config, n)) for n in names]


def _llama_like(config: Any, model_type: str) -> ModelShape:
    hidden, inter, layers, heads, vocab = _need(
        config, model_type, "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "vocab_size",
    )
    kv_heads = int(_get(config, "num_key_value_heads", heads))
    head_dim = int(_get(config, "head_dim", hidden // heads))
    q, kv = heads * head_dim, kv_heads * head_dim
    qkv_bias = model_type in QKV_BIAS_TYPES or bool(_get(config, "attention_bias", False))
    mlp_bias = bool(_get(config, "mlp_bias", False))
    linears = (
        LinearShape("self_attn.q_proj", hidden, q, qkv_bias, "attn_in"),
        LinearShape("self_attn.k_proj", hidden, kv, qkv_bias, "attn_in"),
        LinearShape("self_attn.v_proj", hidden, kv, qkv_bias, "attn_in"),
        LinearShape("self_attn.o_proj", q, hidden, qkv_bias and model_type not in QKV_BIAS_TYPES, "attn_out"),
        LinearShape("mlp.gate_proj", hidden, inter, mlp_bias, "mlp_in"),
        LinearShape("mlp.up_proj", hidden, inter, mlp_bias, "mlp_in"),
        LinearShape("mlp.down_proj", inter, hidden, mlp_bias, "mlp_out"),
    )
    norms = LLAMA_LIKE[model_type]
    norm_elements, norm_params = norms * hidden, norms * hidden
    if model_type in QK_NORM_TYPES:
        norm_elements += q + kv
        norm_params += q + kv if model_type == "olmo2" else 2 * head_dim
    return ModelShape(
        model_type=model_type, hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", False)), linears=linears,
        norm_elements=norm_elements, norm_params=norm_params, extra_params=hidden,
    )


def _gpt2(config: Any) -> ModelShape:
    hidden, layers, heads, vocab, positions = _need(config, "gpt2", "n_embd", "n_layer", "n_head", "vocab_size", "n_positions")
    inter = int(_get(config, "n_inner", 4 * hidden))
    linears = (
        LinearShape("attn.c_attn", hidden, 3 * hidden, True, "attn_in"),
        LinearShape("attn.c_proj", hidden, hidden, True, "attn_out"),
        LinearShape("mlp.c_fc", hidden, inter, True, "mlp_in"),
        LinearShape("mlp.c_proj", inter, hidden, True, "mlp_out"),
    )
    return ModelShape(
        model_type="gpt2", hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, vocab_size=vocab,
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", True)), linears=linears, norm="layer",
        gated_mlp=False, norm_elements=2 * hidden, norm_params=4 * hidden, extra_params=positions * hidden + 2 * hidden,
    )


def _bloom(config: Any) -> ModelShape:
    hidden, layers, heads, vocab = _need(config, "bloom", "hidden_size", "n_layer", "n_head", "vocab_size")
    linears = (
        LinearShape("self_attention.query_key_value", hidden, 3 * hidden, True, "attn_in"),
        LinearShape("self_attention.dense", hidden, hidden, True, "attn_out"),
        LinearShape("mlp.dense_h_to_4h", hidden, 4 * hidden, True, "mlp_in"),
        LinearShape("mlp.dense_4h_to_h", 4 * hidden, hidden, True, "mlp_out"),
    )
    return ModelShape(
        model_type="bloom", hidden_size=hidden, intermediate_size=4 * hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, vocab_size=vocab,
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", True)), linears=linears, norm="layer",
        gated_mlp=False, norm_elements=2 * hidden, norm_params=4 * hidden, extra_params=4 * hidden, alibi=True,
    )


def _falcon(config: Any) -> ModelShape:
    hidden, layers, heads, vocab = _need(config, "falcon", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    head_dim = hidden // heads
    new_arch = bool(_get(config, "new_decoder_architecture", False))
    if new_arch:
        kv_heads = int(_get(config, "num_kv_heads", heads))
    else:
        kv_heads = 1 if _get(config, "multi_query", True) else heads
    inter = int(_get(config, "ffn_hidden_size", 4 * hidden))
    bias = bool(_get(config, "bias", False))
    parallel = bool(_get(config, "parallel_attn", True))
    norms = 2 if not parallel else int(_get(config, "num_ln_in_parallel_attn", 2 if new_arch else 1))
    mlp_input = "attn_in" if parallel and norms == 1 else "mlp_in"  # one LayerNorm feeds both branches
    linears = (
        LinearShape("self_attention.query_key_value", hidden, (heads + 2 * kv_heads) * head_dim, bias, "attn_in"),
        LinearShape("self_attention.dense", hidden, hidden, bias, "attn_out"),
        LinearShape("mlp.dense_h_to_4h", hidden, inter, bias, mlp_input),
        LinearShape("mlp.dense_4h_to_h", inter, hidden, bias, "mlp_out"),
    )
    return ModelShape(
        model_type="falcon", hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
        tie_word_embeddings=bool(_get(config, "tie_word_embeddings", True)), linears=linears, norm="layer",
        gated_mlp=False, norm_elements=norms * hidden, norm_params=2 * norms * hidden, extra_params=2 * hidden,
        alibi=bool(_get(config, "alibi", False)),
    )


def adapter_elements(
    shape: ModelShape, targets: Sequence[str], r: int, method: str, virtual_tokens: int = VIRTUAL_TOKENS
) -> tuple[int, int]:
    """(matrix elements, fp32 vector elements) of the adapter over all layers."""
    if method == "prompt_tuning":
        return virtual_tokens * shape.hidden_size, 0
    if method == "prefix_tuning":
        return virtual_tokens * shape.num_layers * 2 * shape.kv_dim, 0
    chosen = shape.targeted(targets)
    if method == "ia3":  # a scaling vector: on the input of the MLP's output layer, else on the output
        per_layer = sum(lin.in_features if lin.input == "mlp_out" else lin.out_features for lin in chosen)
        return shape.num_layers * per_layer, 0
    matrices = sum(r * (lin.in_features + lin.out_features) for lin in chosen)
    magnitudes = sum(lin.out_features for lin in chosen) if method == "dora" else 0
    return shape.num_layers * matrices, shape.num_layers * magnitudes
