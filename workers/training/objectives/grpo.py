"""Group relative policy optimization: reinforcement fine-tuning from graders' rewards, with trl's GRPOTrainer.

For each prompt (a prompt_only row) the policy samples `num_generations` answers; the run's grader
(TrainParams.graders, see workers.grading) scores each in [0, 1]; an answer's advantage is its reward against its
group's mean, and the loss raises the likelihood of the answers that beat it. `kl_coef` (trl's beta) adds a KL
penalty towards a reference: the same base with the adapter switched off (trl skips a reference model for a PEFT
policy), so no second copy of the base is ever loaded.

A `multi` grader whose formula is a weighted sum of its graders (`0.7 * accuracy + 0.3 * format`; weights of 0 or
more adding up to at most 1, so that the multi's clipping to [0, 1] never acts) becomes one reward function per
grader, weighted as the formula says (trl's reward_weights): the total is the formula's value, and trl reports each
grader's mean and spread (`rewards/<name>/mean`). Any other formula (a product, a grader divided by another, a
constant term, weights the clipping would cut) is one reward function, the whole multi grader, since no weighting of
its parts gives its value; its graders' scores still show in the run's samples.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from workers.config import env_bool
from workers.contract.jobrunner import RunnerError
from workers.contract.spec import TrainParams, TrainSpec
from workers.grading import Grader, GraderError, build_grader, grader_problems
from workers.grading.formula import parse_formula
from workers.training.engine import Plan
from workers.training.objectives.base import trainer_inputs
from workers.training.trainargs import one_gpu_per_process, training_arguments

if TYPE_CHECKING:
    from workers.training.modelshape import ModelShape

# A worker runs `python` graders (user code, in a sandboxed subprocess) only where its own environment allows it,
# whatever the control plane allowed.
ALLOW_PYTHON_ENV = "TUNEDECK_ALLOW_PYTHON_GRADERS"
SAMPLES_KEY = "samples"  # the log entry's key of the sampled answers (workers.training.train.ReporterCallback)
SAMPLE_ROWS = 4  # answers a run's samples event shows at each logging step
SAMPLE_CHARS = 500  # of each prompt and answer shown
SAMPLE_ERRORS = 5  # graders' problems shown with them (a grader that crashed or timed out, a judge's unreadable reply)


def python_graders_allowed() -> bool:
    return env_bool(ALLOW_PYTHON_ENV, False)


class GroupRelativePolicy:
    name: str = "grpo"
    label: str = "Group relative policy optimization"
    row_formats: tuple[str, ...] = ("prompt_only",)

    def config(self, spec: TrainSpec, plan: Plan, output_dir: Path, has_eval: bool) -> Any:
        from trl import GRPOConfig

        hp = spec.train
        arguments = training_arguments(spec, plan, output_dir, has_eval)
        arguments.pop("activation_offloading", None)  # GRPOConfig has no such switch: generation needs the layers
        if has_eval:  # an evaluation batch holds whole groups too
            arguments["per_device_eval_batch_size"] = hp.num_generations
        config = GRPOConfig(
            num_generations=hp.num_generations,
            temperature=hp.temperature,
            max_completion_length=hp.max_completion_length,
            beta=hp.kl_coef,
            reward_weights=reward_plan(hp.graders, run_grader(hp.graders)).weights,
            **arguments,
        )
        return one_gpu_per_process(config, hp)

    def trainer(
        self, spec: TrainSpec, plan: Plan, model: Any, tokenizer: Any, train_dataset: Any, eval_dataset: Any,
        callbacks: list[Any], args: Any,
    ) -> Any:
        definition = spec.train.graders
        rewards = reward_plan(definition, run_grader(definition, row_fields(train_dataset)))
        # First, so that the runner's callbacks find the samples in the logs of the same step.
        callbacks = [SampleCallback(rewards), *callbacks]
        reward_funcs: list[Any] = list(rewards.functions)  # trl's type names no callable class
        return sampling_trainer()(
            reward_funcs=reward_funcs,
            **trainer_inputs(spec, model, tokenizer, train_dataset, eval_dataset, callbacks, args),
        )

    def memory_terms(self, parts: Mapping[str, int], shape: ModelShape, train: TrainParams,
                     dtype_bytes: int) -> dict[str, int]:
        """Sampling, then training on what was sampled. Each process first generates its share of the global batch
        (batch_size x grad_accum answers, trl's generation batch) with a KV cache of prompt (max_seq_length) and
        answer (max_completion_length) tokens; the cache's blocks stay in the allocator's reserve, counted under
        `temporary`. Then every micro-batch row is a prompt and its answer: the supervised pass's activations grow
        by the answer's share, its logits are the answer's alone (trl keeps no prompt logits), and a KL penalty
        adds the reference's logits, computed without gradients."""
        prompt, answer = train.max_seq_length, train.max_completion_length
        per_process = math.ceil(train.batch_size * train.grad_accum / max(1, train.num_gpus))
        kv_per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * dtype_bytes
        answer_logits = parts.get("logits", 0) * answer // prompt
        return {
            "temporary": per_process * (prompt + answer) * kv_per_token,
            "activations": parts.get("activations", 0) * answer // prompt,
            "logits": answer_logits - parts.get("logits", 0) + (answer_logits if train.kl_coef > 0 else 0),
        }


def sampling_trainer() -> type:
    """trl's GRPOTrainer whose sampling runs through the generation engine of compare and evaluate jobs
    (workers.generation: the prompts' pass by length buckets, then the decode loop, each step one CUDA graph replay
    on a GPU), where trl would call generate() on the policy itself. Sampling is trl's: temperature, top-k and
    top-p as its generation config sets them, drawn from the same generator in the same order, answers cut after
    their first EOS. vLLM, continuous batching, images and the settings the loop does not apply (min_p, a
    repetition penalty, extra generation_kwargs) stay on trl's path."""
    from trl import GRPOTrainer

    class SamplingTrainer(GRPOTrainer):  # type: ignore[misc]  # trl is untyped
        def _generate_single_turn(self, prompt_ids: Any, images: Any, multimodal_fields: Any, num_generations: int,
                                  has_tool_images: bool = False) -> tuple[list[list[int]], Any]:  # fmt: skip
            if engine_refusal(self, images, multimodal_fields):
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)  # fmt: skip
            return engine_samples(self, prompt_ids), None

    return SamplingTrainer


def engine_refusal(trainer: Any, images: Any, multimodal_fields: Any) -> str:
    """Why this sampling stays on trl's path (empty where the engine samples)."""
    args = trainer.args
    if trainer.use_vllm or getattr(trainer, "use_transformers_continuous_batching", False):
        return "vLLM or continuous batching"
    if trainer._is_vlm or multimodal_fields or (images is not None and any(i is not None for i in images)):
        return "images"
    if trainer.min_p is not None or trainer.repetition_penalty != 1.0 or args.generation_kwargs:
        return "a sampling setting the decode loop does not apply"
    return ""


def engine_samples(trainer: Any, prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each prompt's sampled completion ids (up to and including its first EOS) from the policy as trl unwraps it
    for generation (gradient checkpointing off, DeepSpeed/FSDP parameters gathered)."""
    import torch
    from trl.models import unwrap_model_for_generation

    from workers.generation.engine import generate_rows, plan_decoding

    args = trainer.args
    eos = [int(i) for i in trainer.eos_token_ids]
    options = {"max_new_tokens": trainer.max_completion_length, "min_new_tokens": 0, "do_sample": True,
               "temperature": trainer.temperature, "top_k": trainer.top_k or 0, "top_p": trainer.top_p,
               "eos_token_id": eos}  # fmt: skip
    rows = [[int(i) for i in ids] for ids in prompt_ids]
    with (
        unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=args.ds3_gather_for_generation,
            generation_kwargs=trainer.generation_kwargs,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        ) as model,
        torch.no_grad(),
        trainer._dist.summon_full_params(trainer.model_wrapped, recurse=False),
    ):  # fmt: skip
        decoding = plan_decoding(model, [], "auto", batched=False)  # the policy's own adapter, one column
        generated = generate_rows(model, rows, [(i, "policy") for i in range(len(rows))],
                                  trainer._tokenizer.pad_token_id, options, None, None, None, [], columns=1,
                                  decoding=decoding)  # fmt: skip
    stop = set(eos)
    return [ids[: next((n + 1 for n, t in enumerate(ids) if t in stop), len(ids))] for ids in generated]


def run_grader(definition: dict[str, Any], fields: set[str] | None = None) -> Grader:
    """The run's grader, built as this worker allows; RunnerError naming every problem of the definition (and each
    `{{item.<field>}}` that names no field of the rows, when `fields` are given)."""
    allowed = python_graders_allowed()
    problems = grader_problems(definition, fields, allow_python=allowed, path="graders")
    if problems:
        listed = "; ".join(f"{path}: {message}" for path, message in problems.items())
        if definition.get("type") == "python" and not allowed:
            listed += f" (this worker runs python graders only with {ALLOW_PYTHON_ENV}=1)"
        raise RunnerError(listed)
    try:
        return build_grader(definition, allow_python=allowed)
    except GraderError as exc:
        raise RunnerError("; ".join(f"{path}: {message}" for path, message in exc.problems.items())) from exc


def row_fields(dataset: Any) -> set[str]:
    """The fields every prompt_only row has (workers.data.datasets.prompt_only_row keeps each row in `item`)."""
    common: set[str] | None = None
    for item in dataset["item"]:
        keys = set(json.loads(item))
        common = keys if common is None else common & keys
    return common or set()


@dataclass
class Samples:
    """The last scored batch, for the run's page: its prompts and answers, each reward function's scores (and,
    where one function is a whole multi grader, each of its graders'), and what the graders could not score."""

    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    rewards: dict[str, list[float]] = field(default_factory=dict)
    graders: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def record(self, name: str, prompts: Sequence[Any], completions: list[str], scores: list[float],
               grader: Grader) -> None:
        if completions != self.completions:  # a new batch: the first reward function to score it
            self.prompts, self.completions = [as_text(p) for p in prompts], completions
            self.rewards, self.graders, self.errors = {}, {}, []
        self.rewards[name] = scores
        self.graders.update(getattr(grader, "part_scores", None) or {name: scores})
        self.errors += [f"{name}: {error}" for error in grader.errors]

    def rows(self, weights: Sequence[float], count: int = SAMPLE_ROWS) -> list[dict[str, Any]]:
        """Up to `count` answers, spread over the batch (so over its groups), with each grader's score and the
        total reward (the reward functions' weighted sum)."""
        if not self.completions:
            return []
        stride = max(1, len(self.completions) // count)
        rows = []
        for i in range(0, len(self.completions), stride)[:count]:
            total = sum(w * values[i] for w, values in zip(weights, self.rewards.values(), strict=False))
            rows.append({"prompt": self.prompts[i][:SAMPLE_CHARS], "completion": self.completions[i][:SAMPLE_CHARS],
                         "rewards": {name: round(values[i], 4) for name, values in self.graders.items()},
                         "total": round(total, 4)})
        return rows


class GraderReward:
    """One trl reward function: a grader's scores of a batch of answers, each against its own row (`item`)."""

    def __init__(self, grader: Grader, samples: Samples) -> None:
        self.grader, self.samples = grader, samples
        self.__name__ = grader.name  # what trl names its metrics by: rewards/<name>/mean

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], item: Sequence[str],
                 **_: Any) -> list[float | None]:
        texts = [as_text(c) for c in completions]
        scores = self.grader.score_batch(texts, [json.loads(i) for i in item])
        self.samples.record(self.__name__, prompts, texts, scores, self.grader)
        return list[float | None](scores)


@dataclass
class RewardPlan:
    """The reward functions trl sums, with their weights, and the batch they scored last."""

    functions: list[GraderReward]
    weights: list[float]
    samples: Samples


def reward_plan(definition: Mapping[str, Any], grader: Grader) -> RewardPlan:
    """The reward functions of `grader` (built from `definition`): one per grader of a multi grader whose formula is
    a weighted sum of them, else one."""
    samples = Samples()
    parts = grader.parts()
    weights = linear_weights(definition) if definition.get("type") == "multi" else None
    if weights is None or len(weights) != len(parts):
        return RewardPlan([GraderReward(grader, samples)], [1.0], samples)
    return RewardPlan([GraderReward(part, samples) for part in parts], weights, samples)


def linear_weights(definition: Mapping[str, Any]) -> list[float] | None:
    """The weight of each of a multi grader's graders (in their order) when its `calculate_output` is a weighted
    sum of their names with no constant term, weights of 0 or more adding up to at most 1 (the multi's value, clipped
    to [0, 1], is then that sum); None for any other formula."""
    names = list(definition.get("graders") or {})
    try:
        terms = _linear_terms(parse_formula(str(definition.get("calculate_output", "")), set(names)), set(names))
    except (ValueError, ZeroDivisionError):  # FormulaError is a ValueError
        return None
    if terms is None or terms.get("", 0.0) != 0.0:
        return None
    weights = [terms.get(name, 0.0) for name in names]
    return weights if min(weights) >= 0 and sum(weights) <= 1 + 1e-9 else None


def _linear_terms(node: ast.AST, names: set[str]) -> dict[str, float] | None:
    """{name: coefficient, "": constant} of a formula over `names`, None where it is not linear in them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return {"": float(node.value)}
    if isinstance(node, ast.Name) and node.id in names:
        return {node.id: 1.0}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        inner = _linear_terms(node.operand, names)
        sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
        return None if inner is None else {k: sign * v for k, v in inner.items()}
    if not isinstance(node, ast.BinOp):
        return None
    left, right = _linear_terms(node.left, names), _linear_terms(node.right, names)
    if left is None or right is None:
        return None
    if isinstance(node.op, ast.Add | ast.Sub):
        sign = 1.0 if isinstance(node.op, ast.Add) else -1.0
        return {k: left.get(k, 0.0) + sign * right.get(k, 0.0) for k in {*left, *right}}
    if isinstance(node.op, ast.Mult) and (set(left) == {""} or set(right) == {""}):
        factor, terms = (left[""], right) if set(left) == {""} else (right[""], left)
        return {k: factor * v for k, v in terms.items()}
    if isinstance(node.op, ast.Div) and set(right) == {""}:
        return {k: v / right[""] for k, v in left.items()}
    return None


def as_text(value: Any) -> str:
    """A prompt or answer as people read it: a text as it is, turns as their last turn's content."""
    if isinstance(value, list):
        return str(value[-1].get("content", "")) if value and isinstance(value[-1], dict) else ""
    return str(value)


class SampleCallback(TrainerCallback):  # type: ignore[misc]
    """Adds a few answers of the last scored batch, with their rewards, to each training log entry (as `samples`),
    where the runner's ReporterCallback reports them."""

    def __init__(self, rewards: RewardPlan) -> None:
        self.rewards = rewards

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is not None and "loss" in logs:
            logs[SAMPLES_KEY] = {"rows": self.rewards.samples.rows(self.rewards.weights),
                                 "errors": self.rewards.samples.errors[:SAMPLE_ERRORS]}
