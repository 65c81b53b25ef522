"""QLoRA DPO throughput: trl's DPOTrainer with its defaults against Tunedeck's DPO runner, side by side.

Same model shape as train_throughput.py (Llama-3.1-8B, random weights, 4-bit NF4 + double quant, bf16 compute),
same LoRA (r16, alpha 32, all 7 projections), same synthetic pairs: prompt and answer lengths lognormal (prompts
median 200, answers median 150, sigma 0.8, each clipped to [8, 1024]; random token ids), max_length 2048, the same
pairs per micro-batch. One process, one GPU, recipes in turn:

  trl       trl's DPOTrainer as its documentation sets it up for QLoRA: the quantized model, a peft_config,
            DPOConfig defaults (batches padded to their longest sequence, gradient checkpointing on, SDPA)
  tunedeck  Tunedeck's runner (workers/training: the plan, the model loading, objectives/dpo.py), throughput mode:
            the padded pairs run padding-free with varlen attention, recomputation only where memory needs it

Prints real tokens/s (every non-padding token of both answers' sequences, the prompt included: what the policy and
the reference forward run), padded tokens/s, peak memory and MFU, and tunedeck / trl.
MFU = (6·N_lora + 6·N_base) per real token / time / peak (policy forward and backward, reference forward).

    python bench/preference_throughput.py              # Llama-3.1-8B shape on the GPU
    python bench/preference_throughput.py --tiny       # a tiny Llama on the CPU, in seconds
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train_throughput import (  # the bench folder is not a package: found through sys.path
    TARGETS,
    Meter,
    Result,
    counting,
    fresh_gpu,
    make_model_dir,
    matmul_params,
    meter_callback,
    print_table,
)
from train_throughput import summarise as shared_summarise


def word_tokenizer(model_dir: Path) -> Any:
    """The bench model's word-level tokenizer, splitting on spaces: the pairs are token names ("t17 t4 …")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2",
                                   unk_token="t3")


def synthetic_pairs(count: int, vocab: int, seed: int = 0, cap: int = 1024) -> list[dict[str, str]]:
    import numpy as np

    rng = np.random.default_rng(seed)

    def lengths(median: float) -> Any:
        return np.clip(rng.lognormal(mean=math.log(median), sigma=0.8, size=count), 8, cap).astype(int)

    def text(n: int, lead: str = "") -> str:
        return lead + " ".join(f"t{i}" for i in rng.integers(4, vocab, size=n))

    prompts, chosen, rejected = lengths(200), lengths(150), lengths(150)
    return [{"prompt": text(p), "chosen": text(c, " "), "rejected": text(r, " ")}
            for p, c, r in zip(prompts, chosen, rejected, strict=True)]


class PairMeter(Meter):
    """Counts the attended tokens of each padded DPO batch (it carries no labels); the positions computed are the
    padded batch's, or the real tokens alone where the runner unpads it."""

    def __init__(self, warmup: int, unpadded: bool = False):
        super().__init__(warmup)
        self.unpadded = unpadded

    def count(self, batch: dict[str, Any]) -> None:
        mask = batch["attention_mask"]
        real = int(mask.sum())
        self._pending_real += real
        self._pending_padded += real if self.unpadded else int(mask.numel())


def summarise(name: str, meter: Meter, n_base: float, n_lora: float, peak_flops: float, plan: str = "") -> Result:
    """MFU counts the policy's forward and backward and the reference's forward: 6·N_lora + 6·N_base a token."""
    return shared_summarise(name, meter, n_base, n_lora, plan, flops_per_token=6 * n_lora + 6 * n_base,
                            peak_flops=peak_flops)


def run_trl(model_dir: Path, pairs: list[dict[str, str]], args: argparse.Namespace) -> Result:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    n_base, n_lora = matmul_params(model_dir)
    meter = PairMeter(args.warmup)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    fresh_gpu()
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cuda:
        kwargs["device_map"] = {"": 0}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    config = DPOConfig(
        output_dir=str(args.out / "trl"), per_device_train_batch_size=args.pairs, max_length=args.max_length,
        max_steps=args.warmup + args.steps, learning_rate=5e-6, logging_steps=10**6, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0, bf16=cuda, use_cpu=not cuda,
    )
    trainer = DPOTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=word_tokenizer(model_dir),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"),
        callbacks=[meter_callback(meter), profile_callback("trl", args)],
    )
    trainer.data_collator = counting(trainer.data_collator, meter)
    fresh_gpu()
    trainer.train()
    res = summarise("trl", meter, n_base, n_lora, args.peak_tflops * 1e12, plan="DPOConfig defaults")
    del trainer, model
    fresh_gpu()
    return res


def profile_callback(name: str, args: argparse.Namespace) -> Any:
    """torch.profiler over two measured steps of the recipe named by --profile: where a step's time goes."""
    from transformers import TrainerCallback

    class _Profile(TrainerCallback):  # type: ignore[misc]
        prof: Any = None

        def on_step_begin(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            import torch
            from torch.profiler import ProfilerActivity, profile

            if name == args.profile and state.global_step == args.warmup and self.prof is None:
                torch.cuda.synchronize()
                self.start = time.perf_counter()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()

        def on_step_end(self, a: Any, state: Any, control: Any, **kw: Any) -> None:
            import torch

            if self.prof is not None and state.global_step == args.warmup + 2:
                torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                events = self.prof.key_averages()
                busy = sum(e.self_device_time_total for e in events) / 1e6
                print(f"\nProfile of {name}, 2 steps: wall {time.perf_counter() - self.start:.2f} s, GPU kernels "
                      f"{busy:.2f} s")
                print(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
                self.prof = None

    return _Profile()


def tunedeck_spec(model_dir: Path, args: argparse.Namespace, **train: Any) -> Any:
    from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainParams, TrainSpec

    return TrainSpec(
        run_id=0, attempt=1, base_model=ModelRef(source=str(model_dir)), dataset=DatasetRef(uri="", format="preference"),
        lora=LoraParams(r=16, alpha=32, dropout=0.0, target_modules=TARGETS,
                        quantization="4bit" if not args.tiny else "none", quant_type="nf4", double_quant=True),
        train=TrainParams(objective="dpo", batch_size=args.pairs, grad_accum=1, max_seq_length=args.max_length,
                          learning_rate=5e-6, warmup_ratio=0.0, save_steps=0, logging_steps=10**6,
                          max_steps=args.warmup + args.steps, **train),
        output_uri="",
    )


def run_tunedeck(name: str, spec: Any, model_dir: Path, pairs: list[dict[str, str]], args: argparse.Namespace) -> Result:
    from datasets import Dataset

    from workers.contract.reporter import MemoryReporter
    from workers.training import train as runner
    from workers.training.device import pick_device
    from workers.training.objectives import objective_for

    n_base, n_lora = matmul_params(model_dir)
    fresh_gpu()
    device = pick_device(spec.lora.compute_dtype)
    plan = runner._plan(spec, device)
    meter = PairMeter(args.warmup, unpadded=plan.batching == "padding_free")
    model = runner._load_model(spec, device, MemoryReporter(), plan)
    fresh_gpu()
    config = objective_for("dpo").config(spec, plan, args.out / name, has_eval=False)
    config.report_to, config.disable_tqdm, config.save_strategy = [], True, "no"
    trainer = runner.make_trainer(spec, plan, model, word_tokenizer(model_dir), Dataset.from_list(pairs), None,
                                  [meter_callback(meter), profile_callback(name, args)], config)
    trainer.data_collator = counting(trainer.data_collator, meter)
    trainer.train()
    res = summarise(name, meter, n_base, n_lora, args.peak_tflops * 1e12, plan=plan.describe())
    res.extra["estimate_bytes"] = plan.estimate_bytes
    del trainer, model
    fresh_gpu()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Llama on the CPU (checks the script runs)")
    parser.add_argument("--recipes", default="trl,tunedeck",
                        help="trl, tunedeck, or tunedeck@key=value+... with TrainParams fields (e.g. batching=pad)")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per recipe")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before measuring")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch (both recipes)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--profile", default="", help="a recipe to profile over two measured steps (CUDA)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/tunedeck-bench"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/tunedeck-bench/out"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # what Tunedeck workers use
    if args.tiny:
        args.max_length, args.steps, args.warmup = min(args.max_length, 128), min(args.steps, 2), min(args.warmup, 1)

    model_dir = make_model_dir(args.model_dir, args.tiny)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    pairs = synthetic_pairs(args.pairs * (args.warmup + args.steps) * 2 + 16, vocab, cap=24 if args.tiny else 1024)

    results: list[Result] = []
    for recipe in [r for r in args.recipes.split(",") if r]:
        print(f"== recipe {recipe}", flush=True)
        t0 = time.perf_counter()
        try:
            if recipe == "trl":
                res = run_trl(model_dir, pairs, args)
            elif recipe.split("@")[0] == "tunedeck":
                options = dict(pair.partition("=")[::2] for pair in filter(None, recipe.partition("@")[2].split("+")))
                extra = {k: int(v) if v.isdigit() else v for k, v in options.items()}
                if args.tiny:
                    extra.setdefault("liger_kernels", "off")
                res = run_tunedeck(recipe, tunedeck_spec(model_dir, args, **extra), model_dir, pairs, args)
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
    by_name = {r.recipe: r for r in results}
    base = by_name.get("trl")
    if base and base.real_tokens_per_s:
        for res in results:
            if res is not base and res.real_tokens_per_s:
                memory = (f", peak reserved {res.peak_reserved / base.peak_reserved:.2f}x trl's"
                          if base.peak_reserved else "")
                print(f"{res.recipe} / trl: {res.real_tokens_per_s / base.real_tokens_per_s:.2f}x real tokens/s{memory}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"results": [r.__dict__ for r in results]}, indent=2))


if __name__ == "__main__":
    main()
