"""Check that the train runner does a QLoRA run on CUDA, and measure it against bf16 LoRA.

Builds a random-weight Llama-architecture model (no download), writes the toy addition
dataset into a scratch artifact store, then calls `workers.train.run_training` exactly as a
worker would, once per mode:

  qlora  4-bit NF4 base, double quant, bf16 compute
  lora   unquantized bf16 base (the side-by-side baseline)

For each run it prints the final state, steps/s and tokens/s (from the reporter's metric
event timestamps, warm-up steps excluded), peak GPU memory, and the first and last loss;
then the QLoRA/LoRA ratios. On a machine without CUDA it runs too (use tiny sizes), so it
can be smoke-tested anywhere:

    python bench/gpu_train_check.py --hidden 64 --layers 2 --steps 10
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from workers.demo import build_tokenizer, write_toy_dataset
from workers.reporter import MemoryReporter
from workers.spec import DatasetRef, LoraParams, ModelRef, TrainParams, TrainSpec
from workers.store import ArtifactStore

MODES = {
    "qlora": {"quantization": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
    "lora": {"quantization": "none", "compute_dtype": "bfloat16"},
}
LABELS = {"qlora": "QLoRA (4-bit NF4, double quant, bf16 compute)", "lora": "LoRA (bf16 base)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    p.add_argument("--heads", type=int, default=16, help="attention heads (default 16)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default 4)")
    p.add_argument("--intermediate", type=int, default=0, help="MLP size (default 2.75 x hidden)")
    p.add_argument("--rows", type=int, default=4096, help="toy dataset rows (default 4096)")
    p.add_argument(
        "--pack", type=int, default=1,
        help="join this many toy questions into one row (longer sequences; default 1 = plain toy rows)",
    )
    p.add_argument("--steps", type=int, default=60, help="max_steps of each run (default 60)")
    p.add_argument("--batch", type=int, default=16, help="per-device batch size (default 16)")
    p.add_argument("--seq", type=int, default=128, help="max_seq_length (default 128)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (default 5)")
    p.add_argument(
        "--no-grad-ckpt", action="store_true", help="turn gradient checkpointing off (on by default, as in TrainParams)"
    )
    p.add_argument("--modes", default="qlora,lora", help="comma-separated, from: " + ", ".join(MODES))
    p.add_argument("--json-out", type=Path, help="also write the summary as JSON here")
    p.add_argument("--keep", type=Path, help="keep the model, store and adapters in this directory")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}")
    return args


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "accelerate", "peft", "trl", "bitsandbytes", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    import torch

    out["cuda"] = str(torch.version.cuda)
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor()})"
    return out


def build_model(out_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Save a random-weight Llama (bf16 safetensors) with the demo tokenizer into out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    return {
        "params": params,
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
    }


def write_dataset(store: ArtifactStore, args: argparse.Namespace) -> str:
    uri = store.uri("datasets", "toy.jsonl")
    path = write_toy_dataset(store.path(uri), count=args.rows * args.pack, seed=0)
    if args.pack > 1:  # several questions per row, their answers in order
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        packed = []
        for i in range(0, len(rows) - args.pack + 1, args.pack):
            group = rows[i : i + args.pack]
            packed.append(
                {
                    "instruction": " ".join(r["instruction"] for r in group),
                    "output": " ".join(r["output"] for r in group),
                }
            )
        path.write_text("".join(json.dumps(r) + "\n" for r in packed), encoding="utf-8")
    return uri


def timing(metrics: list[dict[str, Any]], times: list[float], warmup: int) -> dict[str, Any]:
    """steps/s and tokens/s between the metric event at step `warmup` and the last one."""
    points = [(m, t) for m, t in zip(metrics, times, strict=True) if m.get("loss") is not None]
    if len(points) < 2:
        return {}
    start = min(max(warmup, 1), len(points) - 2) if len(points) > 2 else 0
    window = points[start:]
    (m0, t0), (m1, t1) = window[0], window[-1]
    steps, seconds = m1["step"] - m0["step"], t1 - t0
    tokens = 0.0
    for (_, ta), (mb, tb) in itertools.pairwise(window):
        tokens += (mb.get("tokens_per_s") or 0.0) * (tb - ta)
    return {
        "timed_steps": steps,
        "timed_from_step": m0["step"],
        "timed_s": round(seconds, 3),
        "steps_per_s": round(steps / seconds, 3) if seconds > 0 else None,
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 and tokens else None,
    }


class LoadProbe:
    """Wraps AutoModelForCausalLM.from_pretrained while a run loads, to record what the runner got.

    Read-only instrumentation of the bench: the runner itself is called unchanged.
    """

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def __enter__(self):  # type: ignore[no-untyped-def]
        from transformers import AutoModelForCausalLM

        self._cls = AutoModelForCausalLM
        self._orig = AutoModelForCausalLM.__dict__["from_pretrained"]
        orig_fn = AutoModelForCausalLM.from_pretrained

        def wrapped(*a: Any, **kw: Any) -> Any:
            model = orig_fn(*a, **kw)
            self.seen = describe_model(model)
            return model

        AutoModelForCausalLM.from_pretrained = wrapped  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        self._cls.from_pretrained = self._orig  # type: ignore[method-assign]


def describe_model(model: Any) -> dict[str, Any]:
    import torch

    linear4 = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    plain = [m for m in model.modules() if type(m) is torch.nn.Linear]
    out: dict[str, Any] = {
        "linear4bit": len(linear4),
        "plain_linear": len(plain),
        "param_device": str(next(model.parameters()).device),
        "is_loaded_in_4bit": bool(getattr(model, "is_loaded_in_4bit", False)),
    }
    if linear4:
        w = linear4[0].weight
        qs = getattr(w, "quant_state", None)
        out["weight_dtype"] = str(w.dtype)
        out["quant_type"] = getattr(qs, "quant_type", None)
        out["double_quant"] = bool(getattr(qs, "nested", False))
        out["compute_dtype"] = str(getattr(linear4[0], "compute_dtype", None))
    elif plain:
        out["weight_dtype"] = str(plain[0].weight.dtype)
    return out


def run_one(mode: str, model_dir: Path, store: ArtifactStore, dataset_uri: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from workers.train import run_training

    cuda = torch.cuda.is_available()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    spec = TrainSpec(
        run_id=1,
        attempt=1,
        base_model=ModelRef(source=str(model_dir)),
        dataset=DatasetRef(uri=dataset_uri, format="alpaca"),
        lora=LoraParams(r=args.r, alpha=2 * args.r, **MODES[mode]),
        train=TrainParams(
            learning_rate=args.lr,
            max_steps=args.steps,
            batch_size=args.batch,
            max_seq_length=args.seq,
            logging_steps=1,  # one metric event per step: the timing reads their timestamps
            gradient_checkpointing=not args.no_grad_ckpt,
        ),
        output_uri=store.uri("runs", mode, "adapter"),
    )
    reporter = MemoryReporter()
    wall = time.monotonic()
    with LoadProbe() as probe:
        result = run_training(spec, reporter, store)
    wall = time.monotonic() - wall
    if cuda:
        torch.cuda.synchronize()
    state, final, error = reporter.states[-1]
    pairs = [(e["data"], e["time"]) for e in reporter.events if e["kind"] == "metric"]
    losses = [m["loss"] for m, _ in pairs if m.get("loss") is not None]
    out: dict[str, Any] = {
        "mode": mode,
        "state": state,
        "error": error or None,
        "wall_s": round(wall, 2),
        "steps": final.get("steps"),
        "device": final.get("device"),
        "dtype": final.get("dtype"),
        "trainable_params": final.get("trainable_params"),
        "total_params": final.get("total_params"),
        "adapter_bytes": final.get("size_bytes"),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "logged_steps": len(losses),
        "loaded": probe.seen,
    }
    out.update(timing([m for m, _ in pairs], [t for _, t in pairs], args.warmup))
    if cuda:
        out["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    out["after_load"] = next((line for line in reporter.logs if line.startswith("GPU memory after load")), None)
    out["warnings"] = [e["message"][:300] for e in reporter.events if e["kind"] == "log" and e["level"] == "warning"]
    if state != "succeeded":
        out["log_tail"] = reporter.logs[-3:]
    del result, reporter
    gc.collect()
    return out


def show(run: dict[str, Any]) -> None:
    print(f"\n== {LABELS[run['mode']]}")
    print(f"state            {run['state']}" + (f"  error: {run['error']}" if run["error"] else ""))
    if run.get("log_tail"):
        print("last log lines:\n" + "\n".join(run["log_tail"]))
    print(f"device/dtype     {run['device']} / {run['dtype']}")
    print(f"steps            {run['steps']} (wall {run['wall_s']} s, load and save included)")
    if run.get("trainable_params"):
        print(f"params           {run['trainable_params']:,} trainable of {run['total_params']:,}")
    if run.get("steps_per_s"):
        print(
            f"speed            {run['steps_per_s']} steps/s, {run.get('tokens_per_s')} tokens/s "
            f"(steps {run['timed_from_step']}..{run['timed_from_step'] + run['timed_steps']}, {run['timed_s']} s)"
        )
    if "peak_alloc_gib" in run:
        print(f"peak GPU memory  {run['peak_alloc_gib']} GiB allocated, {run['peak_reserved_gib']} GiB reserved")
    if run.get("loaded"):
        print(f"loaded base      {json.dumps(run['loaded'])}")
    if run.get("after_load"):
        print(f"                 {run['after_load']}")
    if run["loss_first"] is not None:
        print(f"loss             {run['loss_first']:.4f} -> {run['loss_last']:.4f} ({run['logged_steps']} logged steps)")
    for w in run["warnings"]:
        print(f"warning          {w}")


def ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if a and b else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    scratch = tempfile.TemporaryDirectory(prefix="gpu-train-check-") if args.keep is None else None
    base = Path(scratch.name) if scratch else args.keep
    try:
        model = build_model(base / "model", args)
        print(f"model: random Llama {json.dumps(model)}", flush=True)
        store = ArtifactStore(base / "store")
        dataset_uri = write_dataset(store, args)
        print(
            f"data: {args.rows} rows (pack {args.pack}); steps {args.steps}, batch {args.batch}, seq {args.seq}, "
            f"lr {args.lr}, r {args.r}, grad ckpt {not args.no_grad_ckpt}",
            flush=True,
        )
        runs = []
        for mode in args.modes:
            print(f"\nrunning {mode} ...", flush=True)
            runs.append(run_one(mode, base / "model", store, dataset_uri, args))
            show(runs[-1])
    finally:
        if scratch:
            scratch.cleanup()

    by_mode = {r["mode"]: r for r in runs}
    summary: dict[str, Any] = {"versions": info, "model": model, "args": {k: str(v) for k, v in vars(args).items()}}
    summary["runs"] = runs
    if "qlora" in by_mode and "lora" in by_mode:
        q, lo = by_mode["qlora"], by_mode["lora"]
        summary["qlora_over_lora"] = {
            "time_per_step": ratio(lo.get("steps_per_s"), q.get("steps_per_s")),
            "peak_alloc": ratio(q.get("peak_alloc_gib"), lo.get("peak_alloc_gib")),
        }
        print("\n== QLoRA / LoRA")
        print(f"time per step    {summary['qlora_over_lora']['time_per_step']}")
        print(f"peak memory      {summary['qlora_over_lora']['peak_alloc']}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print("\nSUMMARY " + json.dumps(summary))
    return 0 if all(r["state"] == "succeeded" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
