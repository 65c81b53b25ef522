"""QLoRA training throughput: three standard recipes against Tunedeck's runner, side by side.

Same model shape, same synthetic data (random token ids, lengths lognormal with median 300
and sigma 0.8, clipped to [16, 2048], fixed seed), same LoRA (r16, alpha 32, all 7 projections),
same 4-bit NF4 + double-quant base, bf16 compute. One process, one GPU, recipes in turn:

  (a) every sample padded to 2048, batch 4, prepare_model_for_kbit_training, SDPA (transformers Trainer)
  (b) dynamic padding to the batch's longest, batch 8
  (c) first-fit packing into 2048-token rows with per-sample position ids (block-diagonal mask), batch 4,
      Liger kernels incl. fused linear cross-entropy
  (d) Tunedeck's runner (workers/training/engine.py through trl's SFTTrainer), throughput and memory modes
  unsloth (--peer-unsloth, where Unsloth is installed): its loader, kernels and offloaded checkpointing on (c)'s
      packed rows, a step's 4 rows as one padding-free sequence; in a child process, since importing it patches
      transformers, peft and trl

Prints real tokens/s (tokens that carry a label), padded tokens/s (all positions computed),
peak memory allocated/reserved, step time, MFU and the ratios of (d) to (a), (b), (c).

    python bench/train_throughput.py                 # Llama-3.1-8B shape on the GPU
    python bench/train_throughput.py --tiny          # a tiny Llama on the CPU, in seconds
    python bench/train_throughput.py --probe-max-len c,d-throughput   # longest batch-1 sequence
    python bench/train_throughput.py --recipes c,d-throughput,d-memory --peer-unsloth   # Unsloth beside them
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16
LLAMA_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
}
TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 2048, "tie_word_embeddings": False,
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Result:
    recipe: str
    steps: int = 0
    step_time: float = 0.0
    real_tokens_per_s: float = 0.0
    padded_tokens_per_s: float = 0.0
    real_share: float = 0.0
    tokens_per_step: float = 0.0
    peak_allocated: int = 0
    peak_reserved: int = 0
    mfu: float = 0.0
    plan: str = ""
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --- model and data ---------------------------------------------------------------------------


def make_model_dir(root: Path, tiny: bool) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / ("tiny-llama" if tiny else "llama-3.1-8b-shape")
    if (out / "config.json").exists():
        return out
    config = LlamaConfig(**(TINY if tiny else LLAMA_8B), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    _tokenizer(config.vocab_size).save_pretrained(out)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"random-weight model saved to {out} in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def _tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over the id range: the data is token ids already, this only names them."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")


def synthetic_lengths(count: int, seed: int = 0, max_len: int = 2048) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(mean=math.log(300), sigma=0.8, size=count)
    return [int(x) for x in np.clip(lengths, 16, max_len)]


def synthetic_examples(count: int, vocab: int, max_len: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    return [rng.integers(4, vocab, size=n).tolist() for n in synthetic_lengths(count, seed, max_len)]


def first_fit_pack(examples: list[list[int]], row_len: int) -> list[list[list[int]]]:
    """First-fit decreasing: rows of at most row_len tokens, each a list of whole examples."""
    rows: list[list[list[int]]] = []
    space: list[int] = []
    for ex in sorted(examples, key=len, reverse=True):
        for i, free in enumerate(space):
            if len(ex) <= free:
                rows[i].append(ex)
                space[i] -= len(ex)
                break
        else:
            rows.append([ex])
            space.append(row_len - len(ex))
    return rows


# --- measurement --------------------------------------------------------------------------------


class Meter:
    """Step timer (synchronised) that skips warm-up steps and counts the tokens of each step."""

    def __init__(self, warmup: int, last: int = 10**9):
        self.warmup = warmup
        self.last = last  # steps after this one are not measured (the profiled step)
        self.times: list[float] = []
        self.real: list[int] = []
        self.padded: list[int] = []
        self._pending_real = 0
        self._pending_padded = 0
        self._t0 = 0.0
        self.first_step = 0.0  # the first step's time: compiling, kernels' autotuning and the allocator's warm-up

    def count(self, batch: dict[str, Any]) -> None:
        labels = batch["labels"]
        self._pending_real += int((labels != -100).sum())
        self._pending_padded += int(labels.numel())

    def step_begin(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def step_end(self, step: int) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step == 1:
            self.first_step = time.perf_counter() - self._t0
        if self.warmup < step <= self.last:
            self.times.append(time.perf_counter() - self._t0)
            self.real.append(self._pending_real)
            self.padded.append(self._pending_padded)
        self._pending_real = self._pending_padded = 0


def meter_callback(meter: Meter) -> Any:
    from transformers import TrainerCallback

    class _Cb(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            meter.step_begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            meter.step_end(state.global_step)

    return _Cb()


def counting(collator: Any, meter: Meter) -> Any:
    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collator(features)
        meter.count(batch)
        return batch

    return collate


def matmul_params(model_dir: Path) -> tuple[float, float]:
    """(N_base, N_lora): matmul weights of the decoder layers + head, and LoRA parameters (r16, 7 projections)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    h, i, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    lora = 16 * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)
    return float(per_layer * layers + h * c.vocab_size), float(lora * layers)


def summarise(name: str, meter: Meter, n_base: float, n_lora: float, plan: str = "",
              flops_per_token: float | None = None, peak_flops: float = PEAK_BF16_FLOPS) -> Result:
    """The meter's figures; MFU counts `flops_per_token` (default: a LoRA step's forward and backward,
    6·N_lora + 4·N_base) against `peak_flops`."""
    import torch

    total_time = sum(meter.times)
    res = Result(recipe=name, steps=len(meter.times), plan=plan)
    res.extra["first_step_s"] = round(meter.first_step, 2)
    if not total_time:
        res.error = "no measured steps"
        return res
    res.step_time = total_time / len(meter.times)
    res.real_tokens_per_s = sum(meter.real) / total_time
    res.padded_tokens_per_s = sum(meter.padded) / total_time
    res.real_share = sum(meter.real) / max(1, sum(meter.padded))
    res.tokens_per_step = sum(meter.real) / len(meter.times)
    if torch.cuda.is_available():
        res.peak_allocated = torch.cuda.max_memory_allocated()
        res.peak_reserved = torch.cuda.max_memory_reserved()
        per_token = flops_per_token if flops_per_token is not None else 6 * n_lora + 4 * n_base
        res.mfu = per_token * res.real_tokens_per_s / peak_flops
    return res


def fresh_gpu() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --- the standard recipes (a), (b), (c) ----------------------------------------------------------


def _standard_model(model_dir: Path, liger: bool) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if cuda:
        kwargs["device_map"] = {"": 0}
    kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(model=model)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _standard_args(out: Path, batch: int, steps: int) -> Any:
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps, learning_rate=2e-4,
        logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True, bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=False, remove_unused_columns=False, dataloader_num_workers=0, seed=0,
    )


def run_standard(name: str, model_dir: Path, examples: list[list[int]], args: argparse.Namespace) -> Result:
    """(a), (b) or (c); options after `@`: budget (GiB, simulated) and profile (profile the last measured step)."""
    with gpu_budget(float(recipe_options(name).get("budget", 0))):
        return _run_standard(name, model_dir, examples, args)


def _run_standard(name: str, model_dir: Path, examples: list[list[int]], args: argparse.Namespace) -> Result:
    import torch
    from datasets import Dataset
    from transformers import Trainer

    recipe = name.partition("@")[0]
    n_base, n_lora = matmul_params(model_dir)
    meter = Meter(args.warmup, args.warmup + args.steps)
    row_len = args.row_len
    if recipe == "a":
        batch = 4
        rows = [{"input_ids": ex, "labels": ex} for ex in examples]

        def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
            ids = torch.zeros(len(features), row_len, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for k, f in enumerate(features):
                ids[k, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
                mask[k, : len(f["input_ids"])] = 1
            labels = ids.masked_fill(mask == 0, -100)
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    elif recipe == "b":
        batch = 8
        rows = [{"input_ids": ex, "labels": ex} for ex in examples]

        def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
            longest = max(len(f["input_ids"]) for f in features)
            ids = torch.zeros(len(features), longest, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for k, f in enumerate(features):
                ids[k, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
                mask[k, : len(f["input_ids"])] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    else:
        batch = 4
        rows = [{"docs": docs} for docs in first_fit_pack(examples, row_len)]

        def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
            ids = torch.zeros(len(features), row_len, dtype=torch.long)
            pos = torch.zeros_like(ids)
            labels = torch.full_like(ids, -100)
            for k, f in enumerate(features):
                at = 0
                for doc in f["docs"]:
                    n = len(doc)
                    ids[k, at: at + n] = torch.tensor(doc)
                    pos[k, at: at + n] = torch.arange(n)
                    labels[k, at + 1: at + n] = ids[k, at + 1: at + n]  # no label across a boundary
                    at += n
                # the row's tail padding continues the positions as its own "document"
                pos[k, at:] = torch.arange(row_len - at)
            return {"input_ids": ids, "position_ids": pos, "labels": labels}

    fresh_gpu()
    model = _standard_model(model_dir, liger=recipe == "c" and args.liger)
    fresh_gpu()
    trainer = Trainer(
        model=model, args=_standard_args(args.out / recipe, batch, args.warmup + args.steps + profiled(name)),
        train_dataset=Dataset.from_list(rows), data_collator=counting(collate, meter),
        callbacks=[meter_callback(meter), *profiler_callbacks(name, args)],
    )
    trainer.train()
    res = summarise(name, meter, n_base, n_lora)
    del trainer, model
    fresh_gpu()
    return res


# --- the peer: Unsloth, in a process of its own ----------------------------------------------------


UNSLOTH = "unsloth"
UNSLOTH_ROWS = 4  # packed rows of --row-len per step, as (c)


def run_unsloth_peer(args: argparse.Namespace) -> Result:
    """Unsloth on (c)'s packed rows, run in a child process: importing unsloth patches transformers, peft and
    trl for the whole process, which must not change the other recipes. The child writes its Result as JSON."""
    import subprocess

    out = args.out / "unsloth-result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--unsloth-child", "--json-out", str(out),
               "--model-dir", str(args.model_dir), "--out", str(args.out), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--row-len", str(args.row_len), "--d-rows", str(args.d_rows),
               "--d-accum", str(args.d_accum), "--d-memory-rows", str(args.d_memory_rows),
               "--d-memory-accum", str(args.d_memory_accum)]
    command += ["--tiny"] if args.tiny else []
    command += ["--expandable-segments"] if args.expandable_segments else []
    child = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(child.stdout[-4000:], end="", flush=True)
    if not out.exists():
        last = [line for line in child.stdout.splitlines() if line.strip()][-1:] or [f"exit {child.returncode}"]
        return Result(recipe=UNSLOTH, error=last[0][:200])
    return Result(**json.loads(out.read_text()))


def unsloth_rows(examples: list[list[int]], row_len: int) -> list[dict[str, Any]]:
    """(c)'s packed rows, a step's UNSLOTH_ROWS of them as one sequence (trl's padding-free packing, which is how
    Unsloth trains packed data): documents back to back, positions restarting at each, no padding. Unsloth reads
    the documents' bounds from the positions of a batch of one (it then attends within each document)."""
    packed = first_fit_pack(examples, row_len)
    steps = len(packed) // UNSLOTH_ROWS
    return [{"docs": [doc for row in packed[k * UNSLOTH_ROWS : (k + 1) * UNSLOTH_ROWS] for doc in row]}
            for k in range(steps)]


def collate_flat(features: list[dict[str, Any]]) -> dict[str, Any]:
    """One sequence of documents: input ids, positions per document, labels (none across a boundary)."""
    import torch

    (feature,) = features
    docs = feature["docs"]
    ids = torch.tensor([token for doc in docs for token in doc]).unsqueeze(0)
    positions = torch.cat([torch.arange(len(doc)) for doc in docs]).unsqueeze(0)
    labels = ids.clone()
    starts = torch.tensor([0, *[len(doc) for doc in docs[:-1]]]).cumsum(0)
    labels[0, starts] = -100
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def run_unsloth_child(model_dir: Path, examples: list[list[int]], args: argparse.Namespace) -> Result:
    """In the child process, unsloth imported first: its loader (4-bit NF4), LoRA r16 on the 7 projections, its
    offloaded gradient checkpointing, trained by transformers' Trainer as it patches it, on `unsloth_rows`."""
    import torch
    from datasets import Dataset
    from transformers import Trainer
    from unsloth import FastLanguageModel

    n_base, n_lora = matmul_params(model_dir)
    meter = Meter(args.warmup, args.warmup + args.steps)
    fresh_gpu()
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=args.row_len * UNSLOTH_ROWS, dtype=torch.bfloat16, load_in_4bit=True,
        fix_tokenizer=False,  # the bench's word-level tokenizer only names ids: nothing to fix
    )
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none",
        use_gradient_checkpointing="unsloth", random_state=0,
    )
    fresh_gpu()
    trainer = Trainer(
        model=model, args=_standard_args(args.out / UNSLOTH, 1, args.warmup + args.steps),
        train_dataset=Dataset.from_list(unsloth_rows(examples, args.row_len)),
        data_collator=counting(collate_flat, meter), callbacks=[meter_callback(meter)],
    )
    trainer.train()
    import unsloth

    return summarise(UNSLOTH, meter, n_base, n_lora, plan=f"unsloth {getattr(unsloth, '__version__', '?')}, "
                     f"{UNSLOTH_ROWS} x {args.row_len} packed as one sequence, offloaded checkpointing")


# --- Tunedeck's runner (d) ------------------------------------------------------------------------


def tunedeck_spec(model_dir: Path, mode: str, rows: int, row_len: int, grad_accum: int = 1, **train: Any) -> Any:
    from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainParams, TrainSpec

    return TrainSpec(
        run_id=0, attempt=1, base_model=ModelRef(source=str(model_dir)), dataset=DatasetRef(uri="", format="text"),
        lora=LoraParams(r=16, alpha=32, dropout=0.0, target_modules=TARGETS, quantization="4bit", quant_type="nf4",
                        double_quant=True),
        train=TrainParams(mode=mode, batch_size=rows, grad_accum=grad_accum, max_seq_length=row_len,
                          completion_only_loss=False, learning_rate=2e-4, warmup_ratio=0.0, save_steps=0,
                          logging_steps=10**6, **train),
        output_uri="",
    )


def run_tunedeck(name: str, spec: Any, model_dir: Path, examples: list[list[int]], args: argparse.Namespace,
                 budget_gib: float = 0) -> Result:
    """One (d) recipe. `budget_gib`: a smaller GPU, simulated: the allocator is capped there
    (torch.cuda.set_per_process_memory_fraction) and the plan is made for that much memory. Options after `@`
    besides TrainParams fields: pass_tokens (memory mode's tokens per pass), fused=off (PEFT's own LoRA layers
    instead of fusedlora's), offload=prefetch (workers/training/offload.py instead of trl's activation offloading)."""
    from workers.training import engine

    options = recipe_options(name)
    saved = engine.MEMORY_MODE_TOKENS, engine.FUSED_LORA, engine.PREFETCH_OFFLOAD
    engine.MEMORY_MODE_TOKENS = int(options.get("pass_tokens", saved[0]))
    engine.FUSED_LORA = options.get("fused", "on") != "off"
    engine.PREFETCH_OFFLOAD = options.get("offload", "trl") == "prefetch"
    try:
        with gpu_budget(budget_gib):
            return _run_tunedeck(name, spec, model_dir, examples, args, int(budget_gib * 2**30))
    finally:
        engine.MEMORY_MODE_TOKENS, engine.FUSED_LORA, engine.PREFETCH_OFFLOAD = saved


@contextlib.contextmanager
def gpu_budget(gib: float) -> Iterator[None]:
    """Cap the allocator at `gib` GiB (a smaller GPU, simulated); 0 leaves the GPU whole."""
    import torch

    capped = bool(gib) and torch.cuda.is_available()
    if capped:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))
    try:
        yield
    finally:
        if capped:
            torch.cuda.set_per_process_memory_fraction(1.0)


# --- where a step's time goes -----------------------------------------------------------------------


def profiled(name: str) -> int:
    """1 where the recipe asks for a profile (`profile=1`): one step more than measured, under the profiler."""
    return int(recipe_options(name).get("profile", "0") not in ("0", ""))


def profiler_callbacks(name: str, args: argparse.Namespace) -> list[Any]:
    """With `profile=1` among a recipe's options: torch.profiler over one more step after the measured ones (the
    profiler's overhead stays out of the figures), the trace saved under --out and its breakdown printed
    (`trace_breakdown`)."""
    if not profiled(name):
        return []
    import torch
    from transformers import TrainerCallback

    last = args.warmup + args.steps + 1
    path = args.out / f"trace-{name.replace('@', '_').replace('=', '-').replace('+', '_')}.json"

    class _Profile(TrainerCallback):  # type: ignore[misc]
        prof: Any = None

        def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == last - 1:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.start()

        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.prof is not None and state.global_step == last:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.prof.stop()
                path.parent.mkdir(parents=True, exist_ok=True)
                self.prof.export_chrome_trace(str(path))
                self.prof = None
                print_breakdown(name, trace_breakdown(path))

    return [_Profile()]


# Kernel names by what they do (cuBLAS/CUTLASS GEMMs are "nvjet"/"sm90_xmma"/"cutlass"; bitsandbytes'
# dequantisation "kDequantize"; Liger's and Inductor's are Triton kernels named after their function).
KERNEL_KINDS = [
    ("dequantize (bitsandbytes)", r"dequant"),
    ("attention", r"flash|fmha|attention|attn"),
    ("GEMM", r"gemm|nvjet|xmma|cutlass|cublas|s16816|s1688|wgmma|splitk|Kernel2"),
    ("RMSNorm / RoPE / SwiGLU", r"rms|rope|swiglu|silu|geglu|norm"),
    ("LM head and loss", r"cross_entropy|log_softmax|logsumexp|nll"),
    ("optimizer", r"multi_tensor|adam|foreach|fused_adam"),
    ("copy / cast / cat", r"copy|cast|convert|CatArray|cat_|to_copy|index|gather|scatter"),
    ("elementwise / reduce", r"elementwise|vectorized|unrolled|reduce|triton"),
]


def trace_breakdown(path: Path) -> dict[str, Any]:
    """GPU time by kind of kernel, GPU busy share, and how much host<->device copy time ran while a kernel
    computed on another stream (hidden transfers), from a Chrome trace exported by torch.profiler."""
    import re

    events = json.loads(path.read_text()).get("traceEvents", [])
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return {}
    start = min(e["ts"] for e in gpu)
    end = max(e["ts"] + e["dur"] for e in gpu)
    kinds: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for e in gpu:
        if e["cat"] == "kernel":
            kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, e["name"], re.I)), "other")
        else:
            kind = "host<->device copies" if re.search(r"HtoD|DtoH|Pinned|Pageable", e["name"]) else "other copies"
        kinds[kind] = kinds.get(kind, 0.0) + e["dur"]
        by_name[e["name"][:90]] = by_name.get(e["name"][:90], 0.0) + e["dur"]
    kernels = [e for e in gpu if e["cat"] == "kernel"]
    transfers = [e for e in gpu if e["cat"] == "gpu_memcpy" and re.search(r"HtoD|DtoH", e["name"])]
    hidden = 0.0
    for stream in {e["args"].get("stream") for e in transfers}:
        busy = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if e["args"].get("stream") != stream])
        hidden += sum(_overlap((e["ts"], e["ts"] + e["dur"]), busy)
                      for e in transfers if e["args"].get("stream") == stream)
    transfer_total = sum(e["dur"] for e in transfers)
    return {
        "wall_ms": (end - start) / 1e3,
        "busy_ms": sum(b - a for a, b in _union([(e["ts"], e["ts"] + e["dur"]) for e in gpu])) / 1e3,
        "kinds_ms": {k: v / 1e3 for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": {k: v / 1e3 for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:12]},
        "kernel_launches": len(kernels),
        "transfer_ms": transfer_total / 1e3,
        "transfer_hidden_share": hidden / transfer_total if transfer_total else None,
    }


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _overlap(span: tuple[float, float], union: list[tuple[float, float]]) -> float:
    import bisect

    a, b = span
    i = max(0, bisect.bisect_right(union, (a, float("inf"))) - 1)
    total = 0.0
    while i < len(union) and union[i][0] < b:
        total += max(0.0, min(b, union[i][1]) - max(a, union[i][0]))
        i += 1
    return total


def print_breakdown(name: str, info: dict[str, Any]) -> None:
    if not info:
        print(f"profile {name}: no GPU events", flush=True)
        return
    gpu_total = sum(info["kinds_ms"].values())
    print(f"profile {name}: one optimizer step {info['wall_ms']:.0f} ms, GPU busy {info['busy_ms']:.0f} ms "
          f"({info['busy_ms'] / info['wall_ms']:.0%}), {info['kernel_launches']:,} kernels", flush=True)
    for kind, ms in info["kinds_ms"].items():
        print(f"  {kind:<28} {ms:9.1f} ms  {ms / gpu_total:6.1%}", flush=True)
    if info["transfer_ms"]:
        print(f"  host<->device transfers {info['transfer_ms']:.1f} ms, {info['transfer_hidden_share']:.0%} of it "
              f"while another stream computed", flush=True)
    print("  top kernels: " + "; ".join(f"{k} {v:.1f}" for k, v in info["top_kernels_ms"].items()), flush=True)


def recipe_options(recipe: str) -> dict[str, str]:
    """The `key=value` options after a recipe's `@`, joined by `+`."""
    return dict(p.partition("=")[::2] for p in recipe.partition("@")[2].split("+") if p)


def _run_tunedeck(name: str, spec: Any, model_dir: Path, examples: list[list[int]], args: argparse.Namespace,
                  gpu_bytes: int) -> Result:
    from datasets import Dataset

    from workers.contract.reporter import MemoryReporter
    from workers.training import train as runner
    from workers.training.device import pick_device
    from workers.training.engine import sft_arguments

    n_base, n_lora = matmul_params(model_dir)
    meter = Meter(args.warmup, args.warmup + args.steps)
    fresh_gpu()
    device = pick_device(spec.lora.compute_dtype)
    plan = runner._plan(spec, device, steps=args.run_steps, gpu_bytes=gpu_bytes)
    options = recipe_options(name)
    if "recompute" in options or "pass_rows" in options:  # a hand-set split, to weigh against the plan's choice
        from transformers import AutoConfig

        rows = plan.micro_batch * plan.grad_accum
        plan.micro_batch = int(options.get("pass_rows", plan.micro_batch))
        plan.grad_accum = rows // plan.micro_batch
        plan.checkpoint_layers = int(options.get("recompute", plan.checkpoint_layers))
        plan.estimate_bytes = runner._estimator(AutoConfig.from_pretrained(model_dir), spec)(plan)
    reporter = MemoryReporter()
    model = runner._load_model(spec, device, reporter, plan)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fresh_gpu()
    spec.train.max_steps = args.warmup + args.steps + profiled(name)
    from trl import SFTConfig

    sft_args = SFTConfig(
        output_dir=str(args.out / name), max_steps=spec.train.max_steps,
        max_length=spec.train.max_seq_length, learning_rate=2e-4, logging_steps=10**6, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0, completion_only_loss=False,
        dataset_num_proc=None, **sft_arguments(plan, spec.train),
    )
    trainer = runner.make_trainer(
        spec, plan, model, tokenizer, Dataset.from_list([{"input_ids": ex} for ex in examples]), None,
        [meter_callback(meter), *profiler_callbacks(name, args)], sft_args,
    )
    trainer.data_collator = counting(trainer.data_collator, meter)
    trainer.train()
    res = summarise(name, meter, n_base, n_lora, plan=plan.describe())
    res.extra["estimate_bytes"] = plan.estimate_bytes
    res.extra["micro_batch"], res.extra["grad_accum"] = plan.micro_batch, plan.grad_accum
    del trainer, model
    fresh_gpu()
    return res


def d_spec(recipe: str, model_dir: Path, args: argparse.Namespace, extra: dict[str, Any], rows: int = 0) -> Any:
    """`d-<mode>[@key=value+...]`: rows, accum and any TrainParams field (e.g. gradient_checkpointing=off); budget
    (GiB of a smaller GPU, simulated) and pass_tokens (memory mode's tokens per pass)."""
    name, _, options = recipe.partition("@")
    mode = name.split("-", 1)[1]
    memory = mode == "memory"
    settings: dict[str, Any] = dict(extra)
    settings["rows"] = args.d_memory_rows if memory else args.d_rows
    settings["accum"] = args.d_memory_accum if memory else args.d_accum
    for pair in filter(None, options.split("+")):
        key, _, value = pair.partition("=")
        settings[key] = int(value) if value.isdigit() else value
    settings.pop("budget", None)  # run_tunedeck's: the GPU memory the plan is made for
    for key in ("pass_tokens", "fused", "offload", "profile", "check", "recompute", "pass_rows"):  # run_tunedeck's switches, not TrainParams
        settings.pop(key, None)
    default_rows, accum = int(settings.pop("rows")), int(settings.pop("accum"))
    if rows:  # the length probe: one sequence, one pass
        accum = 1
    rows = rows or default_rows
    return tunedeck_spec(model_dir, mode, rows, args.row_len, accum, **settings)


# --- longest batch-1 sequence ------------------------------------------------------------------------


def probe_max_len(recipe: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one batch-1 step at a few lengths, extrapolated (it grows linearly: attention is
    FlashAttention-style in every recipe) to the GPU's capacity, or to `budget` GiB where the recipe names one
    (`c@budget=24`); then one real step at each length of `check=L1/L2/...` (fits, with its peak, or out of
    memory), so that the longest sequence is shown, not only extrapolated."""
    import torch

    options = recipe_options(recipe)
    budget = float(options.get("budget", 0))

    def one_step(length: int) -> int:
        examples = [[4 + (i % 1000) for i in range(length)]]
        sub = argparse.Namespace(**{**vars(args), "warmup": 0, "steps": 1, "row_len": length})
        if recipe.startswith("d"):
            res = run_tunedeck(recipe, d_spec(recipe, model_dir, sub, {}, rows=1), model_dir, examples, sub, budget)
        else:
            res = run_standard(recipe, model_dir, examples, sub)
        print(f"  {recipe}: {length:,} tokens, peak reserved {res.peak_reserved / 2**30:.1f} GiB, "
              f"step {res.step_time:.1f}s", flush=True)
        return res.peak_reserved

    lengths = [int(x) for x in args.probe_lengths.split(",")]
    peaks = [one_step(n) for n in lengths]
    slope = (peaks[-1] - peaks[0]) / (lengths[-1] - lengths[0])
    capacity = budget * 2**30 if budget else torch.cuda.get_device_properties(0).total_memory
    out: dict[str, Any] = {
        "points": dict(zip(lengths, peaks, strict=True)),
        "bytes_per_token": slope,
        "extrapolated_max": int(lengths[0] + (capacity - peaks[0]) / slope),
        "checked": {},
    }
    for length in [int(x) for x in options.get("check", "").split("/") if x]:
        try:
            peak = one_step(length)
            out["checked"][length] = f"trained one step, peak reserved {peak / 2**30:.1f} GiB"
        except torch.OutOfMemoryError:
            out["checked"][length] = "out of memory"
            fresh_gpu()
        print(f"  {recipe}: {length:,} tokens: {out['checked'][length]}", flush=True)
    return out


# --- report --------------------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    gib = 2**30
    print()
    print("| recipe | real tok/s | padded tok/s | real share | tokens/step | step s | first step s | alloc GiB | "
          "reserved GiB | estimate GiB | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r.error:
            print(f"| {r.recipe} | failed: {r.error} |||||||||||")
            continue
        print(
            f"| {r.recipe} | {r.real_tokens_per_s:,.0f} | {r.padded_tokens_per_s:,.0f} | {r.real_share:.0%} | "
            f"{r.tokens_per_step:,.0f} | {r.step_time:.3f} | {r.extra.get('first_step_s', 0):.1f} | "
            f"{r.peak_allocated / gib:.1f} | {r.peak_reserved / gib:.1f} | "
            f"{(r.extra.get('estimate_bytes') or 0) / gib:.1f} | {r.mfu:.1%} |"
        )
    base = {r.recipe: r for r in results if r.recipe.partition("@")[0] in ("a", "b", "c", UNSLOTH) and not r.error}
    for r in results:
        if (r.recipe.startswith("d") or r.recipe == UNSLOTH) and not r.error:
            ratios = ", ".join(
                f"({r.recipe})/({k}) = {r.real_tokens_per_s / b.real_tokens_per_s:.2f}x"
                for k, b in base.items() if k != r.recipe
            )
            print(f"{r.recipe}: {ratios}   [{r.plan}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Llama on the CPU (checks the script runs)")
    parser.add_argument("--recipes", default="a,b,c,d-throughput,d-memory")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per recipe")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before measuring")
    parser.add_argument("--row-len", type=int, default=2048)
    parser.add_argument("--d-rows", type=int, default=4, help="packed rows per micro-batch in throughput mode")
    parser.add_argument("--d-accum", type=int, default=4,
                        help="micro-batches per optimizer step in throughput mode, as a run sets them: the plan may "
                             "run the step's rows (rows x accum) in fewer, larger passes")
    parser.add_argument("--run-steps", type=int, default=1000,
                        help="the length of the run the plan is made for (whether torch.compile pays); the bench "
                             "itself measures --steps")
    parser.add_argument("--d-memory-rows", type=int, default=2, help="rows per micro-batch in memory mode")
    parser.add_argument("--d-memory-accum", type=int, default=2, help="micro-batches per step in memory mode")
    parser.add_argument("--d-extra", default="{}", help="JSON of extra TrainParams for (d), e.g. '{\"attention\": \"flex\"}'")
    parser.add_argument("--no-liger", dest="liger", action="store_false", help="recipe (c) without Liger")
    parser.add_argument("--probe-max-len", default="",
                        help="recipes to probe for the longest batch-1 sequence, with options: budget=GiB (a smaller "
                             "GPU, simulated), check=L1/L2 (one real step at each length)")
    parser.add_argument("--probe-lengths", default="16384,32768", help="batch-1 lengths measured for the probe")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/tunedeck-bench"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/tunedeck-bench/out"))
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--expandable-segments", action="store_true",
                        help="PyTorch's expandable-segments allocator (what Tunedeck workers use) for every recipe")
    parser.add_argument("--peer-unsloth", action="store_true",
                        help="also run Unsloth (where it is installed) on (c)'s packed rows, in a process of its own")
    parser.add_argument("--unsloth-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.unsloth_child:
        try:
            import unsloth  # noqa: F401  (first: it patches transformers, peft and trl as they are imported)
        except Exception as exc:  # not installed, or no GPU it can use (it refuses a CPU-only machine)
            raise SystemExit(f"Unsloth cannot run here: {type(exc).__name__}: {str(exc)[:160]}") from None
    # As on a worker (workers/runtime/hubkernels.py): no kernels fetched from the Hub by transformers' `kernels`
    # integration, for every recipe (a fetch needs the network and a trust decision; the recipes compare local code).
    os.environ.setdefault("USE_HUB_KERNELS", "NO")
    if args.expandable_segments:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if args.tiny:
        args.row_len = min(args.row_len, 256)
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.liger = False

    model_dir = make_model_dir(args.model_dir, args.tiny)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    per_step = max(args.d_rows * args.d_accum, args.d_memory_rows * args.d_memory_accum, 4) * args.row_len
    count = int((args.warmup + args.steps + 2) * per_step / 300) + 64
    examples = synthetic_examples(count, vocab, args.row_len)
    extra = json.loads(args.d_extra)
    if args.tiny:
        extra.setdefault("liger_kernels", "off")

    if args.unsloth_child:
        result = run_unsloth_child(model_dir, examples, args)
        args.json_out.write_text(json.dumps(result.__dict__))
        return
    recipes = [r for r in args.recipes.split(",") if r]
    if args.peer_unsloth and UNSLOTH not in recipes:
        recipes.append(UNSLOTH)
    results: list[Result] = []
    for recipe in recipes:
        print(f"== recipe {recipe}", flush=True)
        t0 = time.perf_counter()
        try:
            if recipe.partition("@")[0] in ("a", "b", "c"):
                res = run_standard(recipe, model_dir, examples, args)
            elif recipe == UNSLOTH:
                res = run_unsloth_peer(args)
            elif recipe.startswith("d-"):
                budget = float(recipe_options(recipe).get("budget", 0))
                res = run_tunedeck(recipe, d_spec(recipe, model_dir, args, extra), model_dir, examples, args, budget)
            else:
                raise SystemExit(f"unknown recipe {recipe!r}")
        except Exception as exc:  # a recipe that fails (e.g. out of memory) is reported, the others still run
            import traceback

            traceback.print_exc()
            res = Result(recipe=recipe, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            fresh_gpu()
        print(f"   {recipe}: {res.real_tokens_per_s:,.0f} real tok/s ({time.perf_counter() - t0:.0f}s)", flush=True)
        results.append(res)
    print_table(results)

    probes = {}
    for recipe in [r for r in args.probe_max_len.split(",") if r]:
        probes[recipe] = probe_max_len(recipe, model_dir, args)
        print(f"longest batch-1 sequence, {recipe}: ~{probes[recipe]['extrapolated_max']:,} tokens "
              f"({probes[recipe]['bytes_per_token'] / 1024:.0f} KiB/token) {probes[recipe]['checked']}", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"results": [r.__dict__ for r in results], "max_len": probes}, indent=2))


if __name__ == "__main__":
    main()
