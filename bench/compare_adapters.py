"""Side-by-side generation from k adapters: PEFT mixed-adapter batches against the base alone and a set_adapter loop.

A Llama-shaped model with random weights is built in memory (Llama-3.1-8B shape in bf16 on the GPU; `--tiny` for
a small one on the CPU), k random LoRA adapters are added (r 16 on all 7 projections, random B so they differ),
and the same prompts (random token ids, lengths lognormal with median 80 and sigma 0.6, clipped to [16, 384],
seed 0, left-padded) are answered three ways, through the engine a compare job runs (workers/generation/engine.py):

  base alone   the prompts once, on the model without adapters                  (prompts rows per call)
  batched      every adapter's answer to a prompt in the same generate() call   (prompts x k rows per call),
               the adapters stacked per layer (stacked_lora), and again through PEFT's adapter_names
  loop         one adapter after another, set_adapter between calls             (k calls of prompts rows)

Greedy decoding of exactly --new-tokens tokens per answer (min_new_tokens = max_new_tokens, so no EOS ends a
row early). Each mode is warmed up with a full run, then timed twice: with 1 new token (the prompts' forward pass) and in full.
Goal: k = 8 batched in at most 1.5x the base-alone time, and at least 5x faster than the loop.

--cache and --dequantize (comma-separated) run the old path and new ones side by side: the first value of each
is the old path (the table above); every other combination measures base alone and batched again, and a second
table gives its speed-up over the old path and how many greedy answers are identical to the old path's.
cache: dynamic (a DynamicCache grown by concatenation), static (a StaticCache, its decode step compiled on CUDA),
auto (what a job picks); dequantize: off (4-bit weights dequantized at every step) or on (once, before the runs).

    python bench/compare_adapters.py                  # Llama-3.1-8B shape, bf16, on the GPU
    python bench/compare_adapters.py --tiny           # a tiny Llama on the CPU, in seconds
    python bench/compare_adapters.py --k 8 --prompts 32 --new-tokens 128 --prompt-median 40
    python bench/compare_adapters.py --k 8 --quantization 4bit --cache dynamic,static --dequantize off,on
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# fmt: off
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
# fmt: on
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD, BOS, EOS = 0, 1, 2
GOAL_BATCHED_OVER_BASE, GOAL_LOOP_OVER_BATCHED = 1.5, 5.0


def build_model(tiny: bool, device: str, dtype: Any) -> Any:
    """Random weights created directly on the device in the target dtype (no fp32 copy, nothing on disk)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(TINY if tiny else LLAMA_8B), pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def quantize_4bit(model: Any, dtype: Any) -> Any:
    """The same random model reloaded in 4-bit NF4 with double quant (saved to a scratch folder first), as a
    comparison of QLoRA adapters loads its base."""
    import tempfile

    import torch
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="compare-bench-") as folder:
        model.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        return LlamaForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype, device_map="cuda").eval()


def add_adapters(model: Any, count: int) -> tuple[Any, list[str]]:
    """`count` random LoRA adapters under the keys a0, a1, ... (non-zero B, so every adapter changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from workers.generation.columns import peft_adapter_name

    keys = [f"a{i}" for i in range(count)]
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    # Adapter weights in the base's dtype, as workers.adapters.inference.load_for_inference loads them.
    peft_model = get_peft_model(model, config, adapter_name=peft_adapter_name(keys[0]), autocast_adapter_dtype=False)
    for key in keys[1:]:
        peft_model.add_adapter(peft_adapter_name(key), config, autocast_adapter_dtype=False)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)
    return peft_model.eval(), keys


def make_prompts(count: int, vocab: int, median: int, seed: int = 0) -> list[list[int]]:
    """Token ids of chat-sized prompts: lengths lognormal (sigma 0.6) around `median`, clipped to [median/5, 4.8x]."""
    rng = random.Random(seed)
    low, high = max(2, median // 5), round(4.8 * median)
    lengths = [min(max(round(rng.lognormvariate(math.log(median), 0.6)), low), high) for _ in range(count)]
    return [[BOS] + [rng.randrange(EOS + 1, vocab) for _ in range(n - 1)] for n in lengths]


@dataclass
class Timing:
    seconds: float  # the whole run (median of the repeats)
    prefill: float  # a run of 1 new token: the prompts' forward pass and one step
    output: dict[tuple[int, str], list[int]]


def measure(model: Any, prompts: list[list[int]], columns: list[str], batched: bool, args: argparse.Namespace,
            stacked: bool = True, cache: str = "dynamic") -> Timing:  # fmt: skip
    from workers.contract.jobspecs import GenerationParams
    from workers.generation.engine import generate_token_grid
    from workers.generation.stops import stop_tokens

    def run(tokens: int) -> dict[tuple[int, str], list[int]]:
        return generate_token_grid(
            model, prompts, columns, GenerationParams(max_new_tokens=tokens, temperature=0.0), pad_token_id=PAD,
            stops=stop_tokens(None, model), batched=batched, batch_size=args.batch_size or len(prompts), min_new_tokens=tokens, stacked=stacked,
            prefill=not args.no_prefill, cache=cache,
        )  # fmt: skip

    run(tokens=args.new_tokens)  # warm-up at full length: kernels, allocator, attention plans of every cache length
    prefill, _ = timed(lambda: run(1), args.device, args.repeats)
    seconds, output = timed(lambda: run(args.new_tokens), args.device, args.repeats)
    return Timing(seconds, prefill, output)


def timed(run: Callable[[], Any], device: str, repeats: int) -> tuple[float, Any]:
    """Median seconds of `repeats` runs and the last run's output."""
    import torch

    times, output = [], None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), output


def peak_gib(device: str) -> str:
    """Peak GPU memory allocated since the last call."""
    import torch

    if device != "cuda":
        return "-"
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return f"{peak:.1f}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", default="1,2,4,8", help="adapter counts to measure, comma-separated")
    parser.add_argument("--prompts", type=int, default=64, help="prompts per run")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per answer, exactly (default 64; --tiny 16)")
    parser.add_argument("--prompt-median", type=int, help="median prompt length in tokens (default 80; --tiny 12)")
    parser.add_argument("--batch-size", type=int, default=0, help="prompts per generate() call (default: all)")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU (checks the script runs)")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
        help="auto: bfloat16 on the GPU, float32 on the CPU",
    )  # fmt: skip
    parser.add_argument(
        "--quantization", default="none", choices=("none", "4bit"),
        help="4bit: the base in NF4 with double quant (GPU only), as a comparison of QLoRA adapters loads it",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per mode (the median is shown)")
    parser.add_argument(
        "--no-prefill", action="store_true",
        help="every mode leaves the prompts' pass to generate(), over the padding (before prefill_by_length)",
    )  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="after the table: torch.profiler over a run of 8 new tokens of base alone and batched at "
                             "the largest k, on the last --cache path (GPU busy time against wall time, top "
                             "kernels)")  # fmt: skip
    parser.add_argument("--cache", default="dynamic",
                        help="KV caches to measure, comma-separated (dynamic, static, graph, auto); the first is the "
                             "old path")
    parser.add_argument("--dequantize", default="off",
                        help="4-bit weights dequantized once before the runs: off, on, or both comma-separated "
                             "(the first is the old path); on has no effect without --quantization 4bit")
    parser.add_argument("--skip-loop", action="store_true", help="leave out the set_adapter loop")
    parser.add_argument("--skip-peft", action="store_true", help="leave out the PEFT adapter_names mode (slowest)")
    args = parser.parse_args()
    args.ks = sorted({int(k) for k in args.k.split(",")})
    args.caches = _choices(parser, "--cache", args.cache, ("dynamic", "static", "graph", "auto"))
    args.dequantize_modes = _choices(parser, "--dequantize", args.dequantize, ("off", "on"))
    args.new_tokens = args.new_tokens or (16 if args.tiny else 64)
    args.prompt_median = args.prompt_median or (12 if args.tiny else 80)
    return args


def _choices(parser: argparse.ArgumentParser, option: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not chosen or any(v not in allowed for v in chosen):
        parser.error(f"{option}: comma-separated values of {', '.join(allowed)}")
    return chosen


def main() -> None:
    import torch

    args = parse_args()
    args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cpu":
        # Random weights feed denormal floats to CPU matmuls, which crawl on them; flushing them to zero is a
        # per-thread setting, so the work stays on this thread.
        torch.set_flush_denormal(True)
        torch.set_num_threads(1)

    old = (args.caches[0], args.dequantize_modes[0])
    runs: dict[tuple[str, str], PathRun] = {}
    for dequantize in args.dequantize_modes:
        # Each dequantize value builds its own copy of the same random base (same seeds), after the last is freed.
        runs.update({(cache, dequantize): run for cache, run in run_paths(args, dtype, dequantize, old).items()})
    base, base_peak, rows = runs[old].base, runs[old].base_peak, runs[old].rows
    print_table(args, base, base_peak, rows)
    if len(runs) > 1:
        print_paths(args, old, runs)


@dataclass
class PathRun:
    """One path's figures: base alone and batched per k (the PEFT and loop modes on the old path only)."""

    base: Timing
    base_peak: str
    rows: list[tuple]  # (k, batched, peft, loop, batched peak, share of answers batched = loop)
    decoding: str  # workers.generation.engine.plan_decoding's description
    weights: str  # what became of the 4-bit weights


def run_paths(args: argparse.Namespace, dtype: Any, dequantize: str, old: tuple[str, str]) -> dict[str, PathRun]:
    """Build the base (4-bit per --quantization, dequantized once for dequantize=on), then every cache path on it:
    base alone, the adapters attached, batched per k. The first path of all also runs the PEFT and loop modes
    (and the profile)."""
    import gc

    import torch

    from workers.adapters.inference import dequantize_for_generation
    from workers.contract.jobspecs import BASE_KEY
    from workers.generation.engine import plan_decoding

    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    model = build_model(args.tiny, args.device, dtype)
    size = sum(p.numel() for p in model.parameters()) / 1e9
    if args.quantization == "4bit":
        if args.device != "cuda":
            raise SystemExit("--quantization 4bit needs a GPU")
        model = quantize_4bit(model, dtype)
    prompts = make_prompts(args.prompts, model.config.vocab_size, args.prompt_median)
    if dequantize == old[1]:
        print_header(args, dtype, size, prompts)
    weights = "4-bit weights dequantized at every step" if args.quantization == "4bit" else "no 4-bit weights"
    if dequantize == "on":  # before the adapters are attached (a job does it after: the layers compute the same)
        weights = dequantize_for_generation(model, force=True) or weights
    bases = {cache: (measure(model, prompts, [BASE_KEY], True, args, cache=cache), peak_gib(args.device))
             for cache in args.caches}  # fmt: skip
    peft_model, keys = add_adapters(model, max(args.ks))
    runs = {
        cache: PathRun(*bases[cache], rows=[], decoding=plan_decoding(peft_model, keys, cache).describe(), weights=weights)
        for cache in args.caches
    }
    for k in args.ks:
        for cache in args.caches:
            first = (cache, dequantize) == old
            batched = measure(peft_model, prompts, keys[:k], True, args, cache=cache)
            batched_peak = peak_gib(args.device)
            peft = measure(peft_model, prompts, keys[:k], True, args, stacked=False, cache=cache) if first and not args.skip_peft else None
            loop = measure(peft_model, prompts, keys[:k], False, args, cache=cache) if first and not args.skip_loop else None
            same = sum(batched.output[cell] == loop.output[cell] for cell in batched.output) / len(batched.output) if loop else 0
            runs[cache].rows.append((k, batched, peft, loop, batched_peak, same))
    if args.profile and dequantize == old[1]:
        profile(model, prompts, [BASE_KEY], args, f"base alone, cache={args.caches[-1]}", args.caches[-1])
        profile(peft_model, prompts, keys[: max(args.ks)], args, f"batched, k = {max(args.ks)}, cache={args.caches[-1]}",
                args.caches[-1])
    return runs


def print_header(args: argparse.Namespace, dtype: Any, size: float, prompts: list[list[int]]) -> None:
    import torch

    lengths = sorted(len(p) for p in prompts)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "the CPU"
    shape = "tiny Llama" if args.tiny else "Llama-3.1-8B shape"
    print(f"{shape} ({size:.2f}B parameters, random), {str(dtype).removeprefix('torch.')}"
          f"{' over a 4-bit NF4 base' if args.quantization == '4bit' else ''} on {where}; "
          f"torch {torch.__version__}")  # fmt: skip
    print(f"{args.prompts} prompts of {lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}), "
          f"left-padded; {args.new_tokens} new tokens per answer, greedy; LoRA r=16 on {', '.join(TARGETS)}")  # fmt: skip


def print_paths(args: argparse.Namespace, old: tuple[str, str], runs: dict[tuple[str, str], PathRun]) -> None:
    """Every other path against the old one: speed-up (old seconds / this path's) and identical greedy answers."""

    def identical(a: Timing, b: Timing) -> str:
        return f"{sum(a.output[cell] == b.output[cell] for cell in a.output)}/{len(a.output)}"

    reference = runs[old]
    print()
    print(f"Paths against the old one (cache={old[0]}, dequantize={old[1]}):")
    for (cache, dequantize), run in runs.items():
        print(f"- cache={cache}, dequantize={dequantize}: {run.decoding}; {run.weights}")
    print()
    print("| cache | dequantize | k | base alone s | batched s | base alone: old / this | batched: old / this "
          "| peak GiB base / batched | identical answers to the old path: base, batched |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for (cache, dequantize), run in runs.items():
        if (cache, dequantize) == old:
            continue
        for (k, batched, _, _, peak, _), (_, old_batched, *_) in zip(run.rows, reference.rows, strict=True):
            print(f"| {cache} | {dequantize} | {k} | {run.base.seconds:.2f} ({run.base.prefill:.2f}) "
                  f"| {batched.seconds:.2f} ({batched.prefill:.2f}) | {reference.base.seconds / run.base.seconds:.2f}x "
                  f"| {old_batched.seconds / batched.seconds:.2f}x | {run.base_peak} / {peak} "
                  f"| {identical(run.base, reference.base)}, {identical(batched, old_batched)} |")  # fmt: skip
    print()
    print("old / this: the old path's seconds over this one's (above 1: this path is faster). Identical answers: "
          "greedy token ids equal to the old path's, cell by cell (float32 gives all of them; bf16 kernels of "
          "another shape or a compiled graph may round differently and flip near-ties of random weights).")  # fmt: skip


def profile(model: Any, prompts: list[list[int]], columns: list[str], args: argparse.Namespace, title: str,
            cache: str) -> None:  # fmt: skip
    """Where a run of 8 new tokens spends its time: wall, GPU kernels, and the ops that take longest."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from workers.contract.jobspecs import GenerationParams
    from workers.generation.engine import generate_token_grid
    from workers.generation.stops import stop_tokens

    def run() -> None:
        generate_token_grid(
            model, prompts, columns, GenerationParams(max_new_tokens=8), pad_token_id=PAD, stops=stop_tokens(None, model),
            batched=True, batch_size=args.batch_size or len(prompts), min_new_tokens=8, prefill=not args.no_prefill,
            cache=cache,
        )  # fmt: skip

    run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    torch.cuda.synchronize() if args.device == "cuda" else None
    start = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        run()
        torch.cuda.synchronize() if args.device == "cuda" else None
    wall = time.perf_counter() - start
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) if args.device == "cuda" else 0
    print(f"\nProfile, {title}, 8 new tokens: wall {wall:.2f} s (profiled), GPU kernels {device_us / 1e6:.2f} s, "
          f"{sum(e.count for e in events if e.device_time_total and not e.cpu_children):,} kernel launches")  # fmt: skip
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=12, max_name_column_width=60))


def print_table(args: argparse.Namespace, base: Timing, base_peak: str, rows: list[tuple]) -> None:
    tokens = args.prompts * args.new_tokens
    print()
    print(
        "| k | base alone s | batched s | batched, PEFT adapter_names s | loop s | batched / base "
        "| loop / batched | tok/s base / batched / loop | peak GiB base / batched | same answers batched, loop |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    def timing(t: Timing | None) -> str:
        return f"{t.seconds:.2f} ({t.prefill:.2f})" if t else "-"

    for k, batched, peft, loop, batched_peak, same in rows:
        loop_rate = f"{k * tokens / loop.seconds:,.0f}" if loop else "-"
        print(
            f"| {k} | {timing(base)} | {timing(batched)} | {timing(peft)} | {timing(loop)} "
            f"| {batched.seconds / base.seconds:.2f}x | {f'{loop.seconds / batched.seconds:.2f}x' if loop else '-'} "
            f"| {tokens / base.seconds:,.0f} / {k * tokens / batched.seconds:,.0f} / {loop_rate} "
            f"| {base_peak} / {batched_peak} | {f'{100 * same:.0f}%' if loop else '-'} |"
        )
    print()
    print("base alone: the prompts on the model without adapters. batched: prompts x k rows in one generate() call, "
          "the adapters stacked per layer (workers.generation.stacked.stacked_lora, what a compare job uses); the same through "
          "PEFT's adapter_names for reference. loop: k calls, set_adapter between them. In brackets: seconds of a "
          "run of 1 new token (the prompts' forward pass). tok/s: answer tokens of all rows per second. Same "
          "answers: greedy token ids equal (float32 gives 100%; bf16 kernels may round differently by batch shape).")  # fmt: skip
    k, batched, _, loop, _, _ = rows[-1]
    over_base = batched.seconds / base.seconds
    verdict = {True: "met", False: "not met"}
    print(f"Goal at k = {k}: batched <= {GOAL_BATCHED_OVER_BASE}x base alone: {over_base:.2f}x "
          f"({verdict[over_base <= GOAL_BATCHED_OVER_BASE]})", end="")  # fmt: skip
    if loop:
        speedup = loop.seconds / batched.seconds
        print(f"; loop / batched >= {GOAL_LOOP_OVER_BATCHED}x: {speedup:.2f}x "
              f"({verdict[speedup >= GOAL_LOOP_OVER_BATCHED]})", end="")  # fmt: skip
    print()


if __name__ == "__main__":
    main()
