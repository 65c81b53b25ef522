"""Host memory and time of merging a LoRA adapter into a Llama-3.1-8B-shaped base: Tunedeck's streamed merge
against PEFT's merge_and_unload, each in its own process so their peak RSS do not mix; then the merge check.

A random Llama-3.1-8B-shaped model is built on the GPU in bfloat16 and saved as safetensors (5 GB shards), with a
random LoRA adapter (r 16 on all 7 projections, non-zero B). Both merges write bfloat16 shards of 2 GB; the streamed
merge computes each delta in float32 on the GPU. Peak RSS is the process's maxrss (resource.getrusage), less the
RSS before the merge started (imports, CUDA context).

    python bench/merge_memory.py                 # Llama-3.1-8B shape, needs a GPU and ~50 GB of disk
    python bench/merge_memory.py --tiny          # a tiny Llama on the CPU, in seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(folder: Path, tiny: bool) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare_adapters import LLAMA_8B, TINY

    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    config = LlamaConfig(**(TINY if tiny else LLAMA_8B))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    base_dir, adapter_dir = folder / "base", folder / "adapter"
    model.save_pretrained(base_dir, max_shard_size="5GB")
    from workers.training.demo import build_tokenizer

    build_tokenizer(base_dir)  # the check tokenizes its probe prompts (ids below 320: any vocabulary fits)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)  # a visible change: the check must find the merge right, not trivially equal
    peft_model.save_pretrained(str(adapter_dir))
    del model, peft_model
    if device == "cuda":
        torch.cuda.empty_cache()
    return base_dir, adapter_dir


def child(kind: str, base_dir: str, adapter_dir: str, out_dir: str) -> None:
    """One merge in this process; prints a JSON line with seconds and peak RSS above the starting RSS."""
    import torch  # imports and the CUDA context are not counted

    from workers.adapters.merge.stream import peft_merge, stream_merge

    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")
    start_rss = _rss_now()
    _reset_peak()
    started = time.perf_counter()
    merge = stream_merge if kind == "streamed" else peft_merge
    merge(Path(base_dir), Path(adapter_dir), Path(out_dir), "bfloat16", max_shard_size="2GB")
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"kind": kind, "seconds": seconds, "peak_bytes": peak - start_rss, "start_bytes": start_rss}))


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        import os

        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    try:  # Linux: writing 5 to clear_refs resets the peak RSS the kernel reports
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def run_child(kind: str, base_dir: Path, adapter_dir: Path, out_dir: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(base_dir), str(adapter_dir), str(out_dir)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=None, help="folder for the checkpoints (default: a temporary one)")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import torch

    from workers.adapters.merge.verify import verify_merge

    scratch = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.scratch))
    try:
        started = time.perf_counter()
        base_dir, adapter_dir = build(scratch, args.tiny)
        size = sum(f.stat().st_size for f in base_dir.glob("*.safetensors"))
        print(f"{'tiny Llama' if args.tiny else 'Llama-3.1-8B shape'}: base {size / 2**30:.2f} GiB of bfloat16 "
              f"safetensors, adapter r16 x 7 projections; built in {time.perf_counter() - started:.0f} s")  # fmt: skip
        rows = {"peft": run_child("peft", base_dir, adapter_dir, scratch / "peft")}
        shutil.rmtree(scratch / "peft")  # two merged copies and the base would need ~50 GB of disk at 8B
        rows["streamed"] = run_child("streamed", base_dir, adapter_dir, scratch / "streamed")
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base_dir).save_pretrained(scratch / "streamed")  # as run_merge does
        check_started = time.perf_counter()
        check = verify_merge(str(base_dir), adapter_dir, scratch / "streamed", "bfloat16")
        check_s = time.perf_counter() - check_started
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print("| merge | seconds | peak host RSS above start | of the model's size |")
    print("|---|---|---|---|")
    for kind, row in sorted(rows.items(), reverse=True):
        print(
            f"| {kind} | {row['seconds']:.1f} | {row['peak_bytes'] / 2**30:.2f} GiB | {row['peak_bytes'] / size:.2f}x |"
        )
    streamed, peft = rows["streamed"], rows["peft"]
    print()
    print(f"streamed / PEFT: time {streamed['seconds'] / peft['seconds']:.2f}x, "
          f"peak RSS {streamed['peak_bytes'] / peft['peak_bytes']:.3f}x")  # fmt: skip
    where = "the GPU" if torch.cuda.is_available() else "the CPU"
    print()
    print_check(check, f"check of the streamed merge ({check_s:.0f} s, on {where})")


def print_check(check: dict, title: str) -> None:
    """The check's figures: the merged model and the bfloat16 reference against the float32 reference, the bounds,
    and the figures against the bfloat16 reference (for information where the noise-floor rule applies)."""
    tol, exact = check["tolerance"], check.get("exact_reference") or {}
    print(f"{title}: {'VERIFIED' if check['verified'] else 'NOT VERIFIED'}, {tol['dtype']} rule {tol['rule']!r} "
          f"({tol['description']}); logit scale S {check['logit_scale']:.4g}")  # fmt: skip
    if tol.get("fallback_reason"):
        print(f"fixed bound used because {tol['fallback_reason']}")

    def row(name: str, figures: dict | None, note: str = "") -> None:
        if not figures or figures.get("max_abs_logit_diff") is None:
            print(f"| {name} | not finite | | | | |")
            return
        print(f"| {name} | {figures['max_abs_logit_diff']:.4g} | {figures['mean_abs_logit_diff']:.4g} | "
              f"{100 * figures['token_agreement']:.1f}% | {100 * figures['greedy_agreement']:.0f}% | {note} |")  # fmt: skip

    print()
    print("| against | max abs dlogit | mean abs dlogit | argmax agreement | greedy agreement | |")
    print("|---|---|---|---|---|---|")
    if tol["rule"] == "noise_floor":
        row("merged vs float32 reference (exact)", exact["merged"], "judged")
        row(f"{tol['dtype']} reference vs float32 reference", exact["low_precision_reference"], "the noise floor")
        print(f"| bound: {tol['max_margin']:g}x / {tol['mean_margin']:g}x the noise floor, plus the floor | "
              f"{tol['max_abs']:.4g} | {tol['mean_abs']:.4g} | | | |")  # fmt: skip
        row(f"merged vs {tol['dtype']} reference", check, "for information")
        ratios = [tol[f"merged_to_reference_{k}"] for k in ("max", "mean")]
        max_ratio, mean_ratio = ("n/a" if r is None else f"{r:.3g}x" for r in ratios)
        print()
        print(f"error against float32, merged / {tol['dtype']} reference: max {max_ratio}, mean {mean_ratio} "
              f"(allowed {tol['max_margin']:g}x and {tol['mean_margin']:g}x, plus the floor)")  # fmt: skip
    else:
        row(f"merged vs {tol['dtype']} reference", check, "judged")
        print(f"| bound: fixed {tol['max_rel']:g} / {tol['mean_rel']:g} of S | {tol['max_abs']:.4g} | "
              f"{tol['mean_abs']:.4g} | | | |")  # fmt: skip


if __name__ == "__main__":
    main()
