"""QLoRA GRPO: where a step's time goes (generation, rewards, training) and generated tokens/s, trl's GRPOTrainer
with its defaults beside Tunedeck's GRPO runner.

Same model shape as train_throughput.py (Llama-3.1-8B, random weights, 4-bit NF4 + double quant, bf16 compute),
same LoRA (r16, all 7 projections), same prompts (random token ids, lognormal lengths, median 120, clipped to
[8, 512]) and the same grader (a string_check against each row's answer: a random model's answers never match, so
the reward is 0; what is measured is the time). Both sample `--generations` answers of exactly `--new-tokens` tokens
(no stop token in a random vocabulary) to `--prompts` prompts per optimizer step.

  trl       GRPOTrainer as its documentation sets up QLoRA: the quantized model, a peft_config, GRPOConfig defaults
            (transformers' generate, gradient checkpointing, no KL term)
  tunedeck  Tunedeck's runner (workers/training: the plan, the model loading, objectives/grpo.py, the grader)

Time per optimizer step is split by timing trl's own methods: generation (`_generate`), rewards
(`_calculate_rewards`), and the rest (the policy's log-probabilities and the backward pass: training).

    python bench/grpo_step.py               # Llama-3.1-8B shape on the GPU
    python bench/grpo_step.py --tiny        # a tiny Llama on the CPU, in seconds
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

from preference_throughput import word_tokenizer  # the bench folder is not a package: found through sys.path
from train_throughput import TARGETS, fresh_gpu, make_model_dir

GRADER = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
          "operation": "eq"}


def synthetic_prompts(count: int, vocab: int, seed: int = 0, cap: int = 512) -> list[dict[str, str]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=math.log(120), sigma=0.6, size=count), 8, cap).astype(int)
    return [{"prompt": " ".join(f"t{i}" for i in rng.integers(4, vocab, size=n)), "answer": "t5 t6"} for n in lengths]


class Split:
    """Seconds spent in generation and in rewards, over the measured steps, by wrapping the trainer's methods."""

    def __init__(self, trainer: Any, warmup: int):
        self.trainer, self.warmup = trainer, warmup
        self.seconds = {"generation": 0.0, "rewards": 0.0}
        self.generated_tokens = 0
        self.step_times: list[float] = []
        for method, part in (("_generate", "generation"), ("_calculate_rewards", "rewards")):
            setattr(trainer, method, self._timed(getattr(trainer, method), part))

    def measuring(self) -> bool:
        return self.trainer.state.global_step >= self.warmup

    def _timed(self, inner: Any, part: str) -> Any:
        import torch

        def call(*args: Any, **kwargs: Any) -> Any:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if self.measuring():
                self.seconds[part] += time.perf_counter() - start
                if part == "generation":
                    self.generated_tokens += sum(len(ids) for ids in out[1])  # (prompt_ids, completion_ids, ...)
            return out

        return call

    def callback(self) -> Any:
        import torch
        from transformers import TrainerCallback

        split = self

        class _Steps(TrainerCallback):  # type: ignore[misc]
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if state.global_step > split.warmup:
                    split.step_times.append(time.perf_counter() - self.start)

        return _Steps()

    def summary(self, name: str, plan: str) -> dict[str, Any]:
        import torch

        steps = len(self.step_times)
        total = sum(self.step_times)
        generation, rewards = self.seconds["generation"], self.seconds["rewards"]
        return {
            "recipe": name, "plan": plan, "steps": steps, "step_s": total / steps if steps else 0.0,
            "generation_s": generation / steps if steps else 0.0, "rewards_s": rewards / steps if steps else 0.0,
            "training_s": (total - generation - rewards) / steps if steps else 0.0,
            "generated_tok_per_s": self.generated_tokens / generation if generation else 0.0,
            "peak_reserved": torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0,
        }


def grpo_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What both recipes share: prompts per step (as a batch of answers), group size, lengths."""
    return {"per_device_train_batch_size": args.prompts * args.generations, "num_generations": args.generations,
            "max_completion_length": args.new_tokens, "learning_rate": 1e-6, "logging_steps": 10**6,
            "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "seed": 0,
            "max_steps": args.warmup + args.steps}


def run_trl(model_dir: Path, prompts: list[dict[str, str]], args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import GRPOConfig, GRPOTrainer

    from workers.grading import build_grader

    cuda = torch.cuda.is_available()
    fresh_gpu()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if cuda:
        kwargs["device_map"] = {"": 0}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    grader = build_grader(GRADER)

    def exact(completions: list[str], answer: list[str], **_: Any) -> list[float]:
        return grader.score_batch(completions, [{"answer": a} for a in answer])

    config = GRPOConfig(output_dir=str(args.out / "trl"), bf16=cuda, use_cpu=not cuda, **grpo_settings(args))
    trainer = GRPOTrainer(
        model=model, reward_funcs=[exact], args=config, train_dataset=Dataset.from_list(prompts),
        processing_class=word_tokenizer(model_dir),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    split = Split(trainer, args.warmup)
    trainer.add_callback(split.callback())
    fresh_gpu()
    trainer.train()
    result = split.summary("trl", "GRPOConfig defaults")
    del trainer, model
    fresh_gpu()
    return result


def run_tunedeck(model_dir: Path, prompts: list[dict[str, str]], args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset

    from workers.contract.reporter import MemoryReporter
    from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainParams, TrainSpec
    from workers.data.datasets import prompt_only_row
    from workers.training import train as runner
    from workers.training.device import pick_device
    from workers.training.objectives import objective_for

    spec = TrainSpec(
        run_id=0, attempt=1, base_model=ModelRef(source=str(model_dir)), dataset=DatasetRef(uri="", format="prompt_only"),
        lora=LoraParams(r=16, alpha=32, dropout=0.0, target_modules=TARGETS,
                        quantization="none" if args.tiny else "4bit", quant_type="nf4", double_quant=True),
        train=TrainParams(objective="grpo", graders=GRADER, batch_size=args.prompts * args.generations, grad_accum=1,
                          num_generations=args.generations, max_completion_length=args.new_tokens,
                          max_seq_length=args.max_prompt, learning_rate=1e-6, warmup_ratio=0.0, save_steps=0,
                          logging_steps=10**6, max_steps=args.warmup + args.steps,
                          liger_kernels="off" if args.tiny else "auto"),
        output_uri="",
    )
    fresh_gpu()
    device = pick_device(spec.lora.compute_dtype)
    plan = runner._plan(spec, device)
    model = runner._load_model(spec, device, MemoryReporter(), plan)
    fresh_gpu()
    config = objective_for("grpo").config(spec, plan, args.out / "tunedeck", has_eval=False)
    config.report_to, config.disable_tqdm, config.save_strategy = [], True, "no"
    rows = Dataset.from_list([prompt_only_row(p) for p in prompts])  # as the runner reads a prompt_only dataset
    trainer = runner.make_trainer(spec, plan, model, word_tokenizer(model_dir), rows, None, [], config)
    split = Split(trainer, args.warmup)
    trainer.add_callback(split.callback())
    trainer.train()
    result = split.summary("tunedeck", plan.describe())
    del trainer, model
    fresh_gpu()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Llama on the CPU (checks the script runs)")
    parser.add_argument("--recipes", default="trl,tunedeck")
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps per recipe")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    parser.add_argument("--generations", type=int, default=8, help="answers sampled per prompt (the group)")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens of each answer")
    parser.add_argument("--max-prompt", type=int, default=1024)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/tunedeck-bench"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/tunedeck-bench/out"))
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.tiny:
        args.steps, args.warmup, args.prompts, args.generations, args.new_tokens = 1, 1, 2, 2, 8
        args.max_prompt = 64
    model_dir = make_model_dir(args.model_dir, args.tiny)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    prompts = synthetic_prompts(args.prompts * (args.warmup + args.steps) + 8, vocab, cap=32 if args.tiny else 512)

    results = []
    for recipe in [r for r in args.recipes.split(",") if r]:
        print(f"== recipe {recipe}", flush=True)
        try:
            results.append({"trl": run_trl, "tunedeck": run_tunedeck}[recipe](model_dir, prompts, args))
        except Exception as exc:  # a recipe that fails is reported, the others still run
            import traceback

            traceback.print_exc()
            results.append({"recipe": recipe, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            fresh_gpu()
    print()
    print("| recipe | step s | generation s | rewards s | training s | generated tok/s | reserved GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['recipe']} | failed: {r['error']} ||||||")
            continue
        print(f"| {r['recipe']} | {r['step_s']:.2f} | {r['generation_s']:.2f} ({r['generation_s'] / r['step_s']:.0%}) | "
              f"{r['rewards_s']:.3f} | {r['training_s']:.2f} ({r['training_s'] / r['step_s']:.0%}) | "
              f"{r['generated_tok_per_s']:,.0f} | {r['peak_reserved'] / 2**30:.1f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
