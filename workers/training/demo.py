"""Demo content that needs no download: a tiny random-weight Llama, its tokenizer, a toy task.

The toy task is two-digit addition written as an instruction/response pair. A LoRA on a
random base cannot learn arithmetic in a minute, but it quickly learns the answer format
and the digit statistics, so the held-out completion loss drops far below the base's: a
visible, testable sign that training worked. Its preference pairs (`preference_rows`) teach
DPO and ORPO to answer in even digits, and its feedback rows (`feedback_rows`) teach KTO the same.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def toy_rows(count: int, seed: int) -> list[dict[str, str]]:
    """Instruction/response rows: 'What is 23 + 41?' -> '64'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        rows.append({"instruction": f"What is {a} + {b}?", "output": str(a + b)})
    return rows


def double_rows(count: int, seed: int) -> list[dict[str, str]]:
    """A second toy task with its own prompt form, for tests of several adapters: 'Double 17' -> '34'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a = rng.randint(0, 49)
        rows.append({"instruction": f"Double {a}", "output": str(2 * a)})
    return rows


def preference_rows(count: int, seed: int) -> list[dict[str, str]]:
    """Preference pairs for DPO: to 'What is 23 + 41?', a chosen answer written with even digits only ('86')
    and a rejected one with odd digits only ('57'). A random base prefers either about as often; the rule is
    learnt in a minute on the CPU and carries over to pairs never trained on."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        rows.append({
            "prompt": f"What is {a} + {b}?\n",
            "chosen": "".join(rng.choice("02468") for _ in range(2)),
            "rejected": "".join(rng.choice("13579") for _ in range(2)),
        })
    return rows


def feedback_rows(count: int, seed: int) -> list[dict[str, str | bool]]:
    """Feedback rows for KTO: to 'What is 23 + 41?', one answer, labelled true when written with even digits only
    ('86') and false when with odd digits only ('57'), about half of each, mixed. The same rule as
    `preference_rows`, unpaired: no row shows both answers to one prompt."""
    rng = random.Random(seed)
    rows: list[dict[str, str | bool]] = []
    for _ in range(count):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        desirable = rng.random() < 0.5
        digits = "02468" if desirable else "13579"
        rows.append({"prompt": f"What is {a} + {b}?\n", "completion": "".join(rng.choice(digits) for _ in range(2)),
                     "label": desirable})
    return rows


TOY_TASKS = {"add": toy_rows, "double": double_rows}


def write_toy_dataset(path: Path, count: int = 512, seed: int = 0, task: str = "add") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in TOY_TASKS[task](count, seed):
            fh.write(json.dumps(row) + "\n")
    return path


def _tokenizer_corpus() -> list[str]:
    rows = toy_rows(2000, seed=12345)
    words = "the a is of and to in what plus sum answer question reverse text model".split()
    return [f"{r['instruction']} {r['output']}" for r in rows] + words * 20


def build_tokenizer(  # type: ignore[no-untyped-def]
    out_dir: Path, vocab_size: int = 320, chat_template: str | None = CHAT_TEMPLATE, extra_special_tokens: Sequence[str] = ()
):
    """Train a byte-level BPE tokenizer on the toy corpus and wrap it for transformers.

    `chat_template` None saves it without one (training and inference then use workers.training.train's fallback);
    `extra_special_tokens` become single tokens of the vocabulary (e.g. ChatML's <|im_start|> and <|im_end|>)."""
    specials = [*SPECIAL_TOKENS, *extra_special_tokens]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[4:],
    )
    fast.chat_template = chat_template
    fast.model_max_length = 256
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_llama(
    out_dir: Path,
    hidden_size: int = 64,
    layers: int = 2,
    seed: int = 0,
    init_std: float = 0.1,
    chat_template: str | None = CHAT_TEMPLATE,
    extra_special_tokens: Sequence[str] = (),
) -> Path:
    """Save a random-weight Llama-architecture model (safetensors) and its tokenizer (see build_tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, chat_template=chat_template, extra_special_tokens=extra_special_tokens)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_gpt2(out_dir: Path, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Save a random-weight GPT-2 (Conv1D layers: c_attn, c_proj, c_fc) and the toy tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden_size,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
