"""FSDP-QLoRA across GPUs through the production launcher: real tokens/s on 1 and 2 GPUs, peak memory per GPU.

A random-weight Llama-3.1-8B-shaped model (or 70B-shaped with `--shape 70b`), a synthetic text dataset
(random token words, lognormal lengths, median 300) packed into 2048-token rows, 4-bit NF4 + double quant,
LoRA r16 on the 7 projections. Each GPU count is one attempt of `workers.runtime.launch.run_training_job`, the
code path of a real run (torchrun for 2 GPUs, strategy fsdp: the 4-bit weights stored in bf16 and
sharded). The global batch is the same for every count (rows x accumulation x GPUs), so 1 GPU runs
`--accum` micro-batches a step and 2 GPUs half as many each. Real tokens/s is the mean of the runner's
own per-step figure (tokens trained / wall time, all ranks) over the steps after `--warmup`.

The model is written once to `--model-dir` and reused. It is built shard by shard, one decoder layer at a
time, never whole: the 8B in bf16 (16 GB, quantized at load like any base), the 70B straight into 4-bit
NF4 safetensors with bf16 storage (~40 GB; 140 GB of bf16 would not fit the disk or host memory
comfortably), which transformers loads as a pre-quantized checkpoint.

    python bench/multi_gpu.py                      # 8B shape, 1 and 2 GPUs
    python bench/multi_gpu.py --shape 70b          # 70B shape in 4-bit, 2 GPUs, a few steps
    python bench/multi_gpu.py --shape tiny --device cpu --prequantize   # the logic, on the CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
COMMON = {"max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": ROPE, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
SHAPES: dict[str, dict[str, Any]] = {
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, **COMMON},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 128256, **COMMON},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096,
             "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GiB = 2**30


# --- the model, written a layer at a time ----------------------------------------------------------------

def write_model(out: Path, shape: str, device: str, prequantize: bool) -> Path:
    """Random weights (std 0.02, norms 1) as safetensors shards, one per decoder layer; reused if present."""
    import torch
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        print(f"reusing the model at {out}", flush=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config = LlamaConfig(**SHAPES[shape])
    with torch.device("meta"):
        names = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).state_dict().items()}
    groups: dict[int, list[str]] = {}
    for name in names:
        layer = int(name.split(".")[2]) + 1 if name.startswith("model.layers.") else 0
        groups.setdefault(layer, []).append(name)
    storage = torch.bfloat16 if device == "cuda" else torch.float32  # the runner's compute dtype there
    generator = torch.Generator(device=device).manual_seed(0)
    weight_map: dict[str, str] = {}
    for index, members in sorted(groups.items()):
        tensors: dict[str, Any] = {}
        for name in members:
            tensors.update(_random_tensor(name, names[name], device, generator, prequantize, storage))
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.dtype = torch.bfloat16
    if prequantize:
        config.quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=storage, bnb_4bit_quant_storage=storage,
        ).to_dict()
    config.save_pretrained(out)
    tokenizer(config.vocab_size).save_pretrained(out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"random-weight {shape} model ({'4-bit NF4' if prequantize else 'bf16'}, {size / GiB:.1f} GiB) "
          f"written to {out} in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def _random_tensor(name: str, shape: tuple[int, ...], device: str, generator: Any, prequantize: bool, storage: Any) -> dict[str, Any]:
    import torch

    if name.endswith("norm.weight"):
        return {name: torch.ones(shape, dtype=torch.bfloat16)}
    weight = torch.randn(shape, device=device, generator=generator, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
    if not (prequantize and name.startswith("model.layers.") and name.endswith("proj.weight")):
        return {name: weight.cpu()}
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.to(storage), blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=storage
    )
    # The layout bitsandbytes' Linear4bit writes (weight + weight.absmax, .quant_map, .nested_*, .quant_state...).
    return {name: packed.cpu(), **{f"{name}.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()}}


def tokenizer(vocab_size: int) -> Any:
    """Word-level: the dataset's words t4..tN are token ids 4..N."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")


def write_dataset(path: Path, vocab: int, rows: int, max_len: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=math.log(300), sigma=0.8, size=rows), 16, max_len).astype(int)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for n in lengths:
            fh.write(json.dumps({"text": " ".join(f"t{i}" for i in rng.integers(4, vocab, size=n))}) + "\n")


# --- one attempt per GPU count, through the launcher ----------------------------------------------------

def run(model_dir: Path, store_root: Path, gpus: int, args: argparse.Namespace) -> dict[str, Any]:
    from workers.contract.reporter import MemoryReporter
    from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainParams, TrainSpec
    from workers.contract.store import ArtifactStore
    from workers.runtime.launch import run_training_job

    store = ArtifactStore(store_root)
    spec = TrainSpec(
        run_id=gpus, attempt=1, base_model=ModelRef(source=str(model_dir)),
        dataset=DatasetRef(uri="store://datasets/synthetic.jsonl", format="text"),
        lora=LoraParams(r=16, alpha=32, dropout=0.0, target_modules=TARGETS, quantization="4bit", quant_type="nf4",
                        double_quant=True),
        train=TrainParams(
            learning_rate=2e-4, max_steps=args.warmup + args.steps, batch_size=args.rows, grad_accum=args.accum,
            max_seq_length=args.row_len, warmup_ratio=0.0, logging_steps=1, save_steps=0,
            completion_only_loss=False, num_gpus=gpus, strategy=args.strategy, mode=args.mode,
            batching="pack" if args.device == "cuda" else "auto",
        ),
        output_uri=f"store://runs/{args.shape}-{gpus}gpu/adapter",
    )
    reporter = MemoryReporter()
    t0 = time.perf_counter()
    result = run_training_job(spec, lambda: reporter, store)
    wall = time.perf_counter() - t0
    state, _, error = reporter.states[-1]
    if result is None:
        tail = "\n".join(reporter.logs[-15:])
        return {"gpus": gpus, "error": error or state, "log_tail": tail}
    speeds = [m["tokens_per_s"] for m in reporter.metrics if m.get("tokens_per_s") and m["step"] > args.warmup]
    peaks = result.get("peak_memory_reserved_per_rank") or [result.get("peak_memory_reserved")]
    plan = next((line[len("Plan: "):] for line in reporter.logs if line.startswith("Plan: ")), "")
    return {
        "gpus": gpus, "error": "", "steps": result["steps"], "tokens_per_s": sum(speeds) / len(speeds) if speeds else 0.0,
        "peak_reserved_per_gpu": [p or 0 for p in peaks],
        "peak_allocated_per_gpu": result.get("peak_memory_allocated_per_rank") or [result.get("peak_memory_allocated") or 0],
        "final_loss": result["final_loss"], "wall_s": round(wall, 1), "plan": plan,
    }


def print_report(shape: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    print("\n| shape | GPUs | real tokens/s | peak reserved per GPU (GiB) | final loss | wall s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if r["error"]:
            print(f"| {shape} | {r['gpus']} | failed: {r['error'][:200]} | | | |")
            continue
        peaks = ", ".join(f"{p / GiB:.1f}" for p in r["peak_reserved_per_gpu"])
        print(f"| {shape} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {peaks} | {r['final_loss']:.3f} | {r['wall_s']} |")
    by = {r["gpus"]: r for r in results if not r["error"]}
    summary: dict[str, Any] = {}
    if 1 in by and 2 in by and by[1]["tokens_per_s"]:
        summary["scaling_efficiency"] = by[2]["tokens_per_s"] / (2 * by[1]["tokens_per_s"])
        print(f"\nScaling efficiency (tokens/s on 2 / (2 x tokens/s on 1)): {summary['scaling_efficiency']:.3f} (goal >= 0.85)")
    for r in results:
        if r.get("plan"):
            print(f"plan on {r['gpus']} GPU(s): {r['plan']}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--gpus", default="", help="GPU counts to run, e.g. 1,2 (default: 1,2; 2 for 70b)")
    parser.add_argument("--strategy", choices=("fsdp", "ddp"), default="fsdp")
    parser.add_argument("--steps", type=int, default=0, help="measured steps (default 12; 3 for 70b)")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring")
    parser.add_argument("--rows", type=int, default=0, help="packed rows per micro-batch (default 4; 1 for 70b)")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per step on 1 GPU (divided across GPUs)")
    parser.add_argument("--row-len", type=int, default=0, help="tokens per packed row (default 2048; 256 for tiny)")
    parser.add_argument("--mode", choices=("auto", "throughput", "memory"), default="auto")
    parser.add_argument("--prequantize", action="store_true", help="write the model in 4-bit (always for 70b)")
    parser.add_argument("--fsdp-version", choices=("1", "2"), default="", help="FSDP1 or FSDP2 (default: the runner's)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/tunedeck-multi-gpu"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    big = args.shape == "70b"
    args.steps = args.steps or (3 if big else 12)
    args.rows = args.rows or (1 if big else 4)
    args.row_len = args.row_len or (256 if args.shape == "tiny" else 2048)
    gpus = [int(g) for g in (args.gpus or ("2" if big else "1,2")).split(",")]
    prequantize = args.prequantize or big
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the ranks too: gloo on the CPU
    if args.fsdp_version:
        from workers.training.trainargs import FSDP_VERSION_ENV

        os.environ[FSDP_VERSION_ENV] = args.fsdp_version
    os.environ.setdefault("OMP_NUM_THREADS", "1" if args.device == "cpu" else "8")

    root = args.model_dir
    model_dir = write_model(root / f"llama-{args.shape}{'-nf4' if prequantize else ''}", args.shape, args.device, prequantize)
    rows_needed = max(64, 8 * args.rows * args.accum * (args.warmup + args.steps) * args.row_len // 300)
    store_root = root / f"store-{args.shape}"
    write_dataset(store_root / "datasets" / "synthetic.jsonl", SHAPES[args.shape]["vocab_size"], rows_needed, args.row_len)
    results = []
    for count in gpus:
        print(f"\n{args.shape}: {count} GPU(s), {args.strategy}, {args.rows} x {args.row_len} tokens per micro-batch, "
              f"global batch {args.rows * args.accum} rows", flush=True)
        results.append(run(model_dir, store_root, count, args))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "log_tail"}), flush=True)
        if results[-1].get("log_tail"):
            print(results[-1]["log_tail"], flush=True)
    summary = print_report(args.shape, results)
    if args.json_out:
        args.json_out.write_text(json.dumps({"shape": args.shape, "results": results, **summary}, indent=1))


if __name__ == "__main__":
    main()
