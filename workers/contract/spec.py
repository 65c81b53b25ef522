"""Job specs: plain dataclasses that travel as JSON between the control plane and workers.

Every field has a default and a one-line help text (shown by the forms); `validate()`
returns field-named errors instead of raising, so callers can show all of them at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

QUANTIZATIONS = ("none", "8bit", "4bit")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
BIASES = ("none", "all", "lora_only")
METHODS = ("lora", "ia3", "prefix_tuning", "prompt_tuning")
PROMPT_LEARNING_METHODS = ("prefix_tuning", "prompt_tuning")  # virtual tokens prepended to every example
# LoRA initialisations (PEFT's init_lora_weights); pissa_fast is PiSSA by fast SVD (16 subspace iterations).
INITS = ("default", "gaussian", "pissa", "pissa_fast", "olora", "orthogonal", "loftq")
# Inits that move part of the base weight into the adapter: saved as a plain LoRA of rank 2r (see peftsetup).
MUTATING_INITS = ("pissa", "pissa_fast", "olora")
PROMPT_INITS = ("random", "sample_vocab", "text")
# Target presets, resolved per architecture family from the model's own module names (workers/training/modelinfo.py).
TARGET_PRESETS = ("all-linear", "attention", "attention+mlp")
# Rows that teach by example (supervised fine-tuning trains on each of these), then preference pairs: a prompt with a
# chosen and a rejected answer (what DPO and ORPO train on), feedback: one answer to a prompt labelled desirable
# or not (unpaired, what KTO trains on), then prompts alone with the fields their graders read (what reinforcement
# objectives such as GRPO sample answers to).
EXAMPLE_FORMATS = ("text", "prompt_completion", "alpaca", "messages", "sharegpt")
DATASET_FORMATS = (*EXAMPLE_FORMATS, "preference", "feedback", "prompt_only")


def help_field(text: str, default: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text})
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class LoraParams:
    method: str = help_field(
        "Adapter method: LoRA (low-rank updates; DoRA, rsLoRA are switches), IA3 (learned scaling vectors), "
        "prefix tuning (trained per-layer key/value prefixes), prompt tuning (trained input tokens).",
        "lora",
    )
    r: int = help_field("LoRA: rank of the low-rank update matrices.", 16)
    alpha: int = help_field("LoRA: scaling numerator; the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA).", 32)
    dropout: float = help_field("LoRA: dropout on the adapter input during training.", 0.05)
    target_modules: list[str] = help_field(
        "LoRA, IA3: modules to adapt, by name (q_proj, attn.c_proj…) or one preset: all-linear, attention "
        "(attention projections only) or attention+mlp, resolved from the model's own modules.",
        ["all-linear"],
    )
    bias: str = help_field("LoRA: which biases to train: none, all, or only those of adapted layers.", "none")
    use_dora: bool = help_field(
        "LoRA: DoRA, which splits each update into magnitude and direction (better at low rank, slower steps).", False
    )
    use_rslora: bool = help_field("LoRA: rsLoRA, scaling by alpha / sqrt(r) so that high ranks keep learning.", False)
    init: str = help_field(
        "LoRA: initialisation: default (B = 0), gaussian, pissa or pissa_fast (principal singular vectors), olora "
        "(QR), orthogonal, loftq (cancels the 4-bit quantization error).",
        "default",
    )
    modules_to_save: list[str] = help_field(
        "Extra modules trained in full and saved with the adapter, e.g. lm_head or embed_tokens.", []
    )
    feedforward_modules: list[str] = help_field(
        "IA3: which targets are feed-forward layers (their input is scaled, not their output); empty picks the "
        "MLP layers among the targets.",
        [],
    )
    num_virtual_tokens: int = help_field("Prefix and prompt tuning: number of trained virtual tokens.", 20)
    prefix_projection: bool = help_field(
        "Prefix tuning: produce the prefixes through a trained two-layer MLP (more parameters, steadier training).",
        False,
    )
    projection_hidden_size: int = help_field("Prefix tuning: hidden size of that MLP; 0 uses the model's hidden size.", 0)
    prompt_init: str = help_field(
        "Prompt tuning: start the virtual tokens random, from sampled vocabulary embeddings, or from a text.",
        "sample_vocab",
    )
    prompt_init_text: str = help_field("Prompt tuning: the text whose token embeddings start the virtual tokens.", "")
    quantization: str = help_field(
        "Load the frozen base unquantized, in 8-bit (bitsandbytes LLM.int8) or in 4-bit (QLoRA).", "none"
    )
    quant_type: str = help_field("4-bit data type: NF4 (normal float, best for weights) or FP4.", "nf4")
    double_quant: bool = help_field("4-bit: quantize the quantization constants too (saves ~0.4 bit/param).", True)
    compute_dtype: str = help_field(
        "Dtype for matmuls: auto picks bf16 where supported, else fp16 on GPU, fp32 on CPU.", "auto"
    )

    @property
    def is_lora(self) -> bool:
        return self.method == "lora"

    @property
    def target_preset(self) -> str | None:
        """The preset named by target_modules, or None for an explicit list."""
        if len(self.target_modules) == 1 and self.target_modules[0] in TARGET_PRESETS:
            return self.target_modules[0]
        return None

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def summary(self) -> str:
        """One line for lists: 'DoRA r=16 alpha=32 on attention, 4-bit NF4'."""
        if self.is_lora:
            name = "+".join(n for n, on in (("DoRA", self.use_dora), ("rsLoRA", self.use_rslora)) if on) or "LoRA"
            text = f"{name} r={self.r} alpha={self.alpha} on {', '.join(self.target_modules)}"
            if self.init != "default":
                text += f", {self.init} init"
        elif self.method == "ia3":
            text = f"IA3 on {', '.join(self.target_modules)}"
        else:
            text = f"{self.method.replace('_', ' ').capitalize()}, {self.num_virtual_tokens} virtual tokens"
        if self.quantization == "4bit":
            text += f", 4-bit {self.quant_type.upper()}"
        elif self.quantization == "8bit":
            text += ", 8-bit"
        return text

    def validate(self, train: TrainParams | None = None) -> dict[str, str]:
        """Field-named errors of the adapter alone (and with the run's TrainParams when given).

        Checks that need the model (target names, presets) are in workers.training.modelinfo.check_adapter.
        """
        errors: dict[str, str] = {}
        for name, allowed in (
            ("method", METHODS),
            ("bias", BIASES),
            ("init", INITS),
            ("prompt_init", PROMPT_INITS),
            ("quantization", QUANTIZATIONS),
            ("quant_type", QUANT_TYPES),
            ("compute_dtype", COMPUTE_DTYPES),
        ):
            if getattr(self, name) not in allowed:
                errors[name] = f"must be one of {', '.join(allowed)}"
        if not 1 <= self.r <= 1024:
            errors["r"] = "must be between 1 and 1024"
        if self.alpha <= 0:
            errors["alpha"] = "must be positive"
        if not 0.0 <= self.dropout < 1.0:
            errors["dropout"] = "must be in [0, 1)"
        if self.method in ("lora", "ia3"):
            self._validate_targets(errors)
        if errors.get("method"):
            return errors
        self._validate_lora_switches(errors)
        self._validate_init(errors)
        if self.feedforward_modules and self.method != "ia3":
            errors["feedforward_modules"] = "applies to IA3 only; leave it empty"
        elif self.feedforward_modules and not self.target_preset:
            outside = [m for m in self.feedforward_modules if m not in self.target_modules]
            if outside:
                errors["feedforward_modules"] = (
                    f"{', '.join(outside)} not among the target modules: IA3 feed-forward modules must be targets too"
                )
        self._validate_prompt_learning(errors, train)
        if train is not None and train.sharded:
            self._validate_sharding(errors)
        return errors

    def _validate_sharding(self, errors: dict[str, str]) -> None:
        """What FSDP cannot shard, refused on the strategy field with the reason (ddp runs all of these)."""
        reason = ""
        if self.quantization == "8bit":
            reason = "FSDP cannot shard 8-bit (LLM.int8) weights, whose row scales live outside the weight tensor"
        elif not self.is_lora:
            reason = f"FSDP runs LoRA adapters only; {self.method} keeps its trained tensors beside the sharded weights"
        elif self.use_dora:
            reason = "DoRA recomputes the norm of each whole base weight every step, which FSDP holds only in shards"
        elif self.init in MUTATING_INITS or self.init == "loftq":
            reason = f"the {self.init} init reads and rewrites whole base weights on one process before sharding"
        if reason and "strategy" not in errors:
            errors["strategy"] = f"{reason}: use ddp (or one GPU)"

    def _validate_targets(self, errors: dict[str, str]) -> None:
        names = [str(m).strip() for m in self.target_modules]
        if not names or any(not n for n in names):
            errors["target_modules"] = f"name at least one module, or one preset ({', '.join(TARGET_PRESETS)})"
        elif len(names) > 1 and set(names) & set(TARGET_PRESETS):
            preset = sorted(set(names) & set(TARGET_PRESETS))[0]
            errors["target_modules"] = f"{preset} is a preset: use it alone, or list module names without it"
        elif len(set(names)) != len(names):
            errors["target_modules"] = "lists a module twice"

    def _validate_lora_switches(self, errors: dict[str, str]) -> None:
        lora_only = {
            "use_dora": self.use_dora,
            "use_rslora": self.use_rslora,
            "init": self.init != "default",
            "bias": self.bias != "none",
        }
        for name, used in lora_only.items():
            if used and not self.is_lora and name not in errors:
                errors[name] = f"applies to LoRA only, not {self.method}"

    def _validate_init(self, errors: dict[str, str]) -> None:
        if not self.is_lora or "init" in errors:
            return
        if self.init == "loftq":
            if self.quantization != "4bit":
                errors["init"] = "loftq initialises the adapter from the 4-bit quantization error: set quantization to 4bit"
            elif self.use_dora:
                errors["init"] = "loftq cannot be combined with DoRA (the magnitude is set before LoftQ runs)"
            elif "alpha" not in errors and abs(self.scaling - 1.0) > 1e-6:
                scale = "alpha / sqrt(r)" if self.use_rslora else "alpha / r"
                errors["alpha"] = (
                    f"loftq sets B·A to the quantization residual unscaled, so {scale} must be 1 "
                    f"(it is {self.scaling:g})"
                )
        elif self.init in MUTATING_INITS:
            if self.quantization != "none":
                errors["init"] = (
                    f"{self.init} moves part of each base weight into the adapter and needs the full-precision "
                    "weights: set quantization to none"
                )
            elif self.use_dora:
                errors["init"] = f"{self.init} cannot be combined with DoRA: the adapter could not be converted back to the original base"
        elif self.init == "orthogonal" and self.r % 2:
            errors["r"] = "the orthogonal init needs an even rank"

    def _validate_prompt_learning(self, errors: dict[str, str], train: TrainParams | None) -> None:
        if self.method not in PROMPT_LEARNING_METHODS:
            return
        if not 1 <= self.num_virtual_tokens <= 1024:
            errors["num_virtual_tokens"] = "must be between 1 and 1024"
        if self.projection_hidden_size < 0:
            errors["projection_hidden_size"] = "must be 0 (the model's hidden size) or positive"
        elif self.projection_hidden_size and not (self.method == "prefix_tuning" and self.prefix_projection):
            errors["projection_hidden_size"] = "applies to prefix tuning with prefix_projection on; set it to 0"
        if self.prefix_projection and self.method != "prefix_tuning":
            errors["prefix_projection"] = "applies to prefix tuning only"
        if self.method == "prompt_tuning" and "prompt_init" not in errors:
            if self.prompt_init == "text" and not self.prompt_init_text.strip():
                errors["prompt_init_text"] = "give the text the virtual tokens start from (prompt_init is text)"
            elif self.prompt_init != "text" and self.prompt_init_text:
                errors["prompt_init_text"] = "is used only when prompt_init is text"
        if train is not None and train.batching in ("pack", "padding_free"):
            errors["batching"] = (
                f"{self.method} prepends virtual tokens to each example, so examples cannot share a row: use pad "
                "(auto pads for this method)"
            )
        if train is not None and self.method == "prefix_tuning" and train.gradient_checkpointing == "on":
            errors["gradient_checkpointing"] = "prefix tuning does not work with gradient checkpointing (PEFT): set it off"


@dataclass
class TrainParams:
    learning_rate: float = help_field("Peak learning rate of the adapter weights.", 2e-4)
    num_epochs: float = help_field("Passes over the training set (ignored when max_steps > 0).", 1.0)
    max_steps: int = help_field("Stop after this many optimizer steps; 0 means use num_epochs.", 0)
    batch_size: int = help_field(
        "Micro-batch per device: examples (pad), rows of max_seq_length tokens (pack) or examples in one row "
        "(padding_free). batch_size x grad_accum rows make an optimizer step; throughput mode may run them in "
        "fewer, larger passes where the GPU has room (the same step).",
        8,
    )
    grad_accum: int = help_field("Micro-batches accumulated per optimizer step.", 1)
    max_seq_length: int = help_field("Longer examples are truncated to this many tokens (also the packed row length).", 512)
    warmup_ratio: float = help_field("Fraction of steps spent warming the learning rate up.", 0.03)
    lr_scheduler: str = help_field("Learning-rate schedule after warmup.", "cosine")
    optimizer: str = help_field(
        "Optimizer: adamw_torch, fused AdamW, 8-bit AdamW (bitsandbytes; paged variants spill to CPU under "
        "memory pressure), Adafactor, SGD, Lion 8-bit.",
        "adamw_torch",
    )
    weight_decay: float = help_field("AdamW weight decay.", 0.0)
    max_grad_norm: float = help_field("Gradient clipping threshold.", 1.0)
    seed: int = help_field("Random seed for initialisation and data order.", 42)
    completion_only_loss: bool = help_field(
        "Train on the answer tokens only (prompt tokens masked); whole text when off.", True
    )
    neftune_noise_alpha: float = help_field("NEFTune: noise added to embeddings during training (5 is typical); 0 is off.", 0.0)
    batching: str = help_field(
        "How examples form batches: pad each micro-batch to its longest example; pack examples into rows of "
        "max_seq_length (each keeps its own positions and attention); padding_free: concatenate a micro-batch "
        "into one row; auto packs on GPUs.",
        "auto",
    )
    mode: str = help_field(
        "Speed/memory trade-off: throughput uses the GPU's memory for speed (less recomputation), memory fits "
        "the smallest GPU (recompute and offload activations); auto picks throughput.",
        "auto",
    )
    gradient_checkpointing: str = help_field(
        "Recompute activations in the backward pass (much less memory, ~25% more compute); auto: on unless "
        "throughput mode estimates that the run fits without.",
        "auto",
    )
    activation_offload: str = help_field(
        "Keep saved activations in pinned CPU memory during the forward pass; auto: on in memory mode.", "auto"
    )
    attention: str = help_field(
        "Attention kernel: varlen (FlashAttention over packed rows, skips cross-example work), flex "
        "(FlexAttention block masks), sdpa, eager; auto picks the fastest available.",
        "auto",
    )
    liger_kernels: str = help_field(
        "Liger Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy without materialised logits); "
        "auto: on CUDA when installed.",
        "auto",
    )
    torch_compile: str = help_field(
        "Compile the model with torch.compile (about a minute to start, then slightly faster steps); auto: on "
        "for throughput-mode fine-tuning runs long enough to win the time back (1,500 steps or more).",
        "auto",
    )
    eval_fraction: float = help_field("Hold out this fraction of the rows for evaluation (0 = no split).", 0.0)
    eval_steps: int = help_field("Evaluate every this many steps; 0 evaluates at the end of each epoch.", 0)
    logging_steps: int = help_field("Report loss and learning rate every this many steps.", 5)
    save_steps: int = help_field("Save a resumable checkpoint every this many steps; 0: none periodically (a worker that "
                                 "shuts down still saves one at the step reached, to hand the run over).", 100)
    keep_checkpoints: int = help_field("How many of the latest checkpoints to keep.", 2)
    early_stopping_patience: int = help_field(
        "Stop when the eval loss has not improved for this many evaluations; 0 is off (needs an eval set).", 0
    )
    num_gpus: int = help_field(
        "GPUs of one worker the run trains on (1-8), one process each; the global batch (batch_size x grad_accum) "
        "and the optimizer steps stay those of one GPU.",
        1,
    )
    strategy: str = help_field(
        "Several GPUs: ddp (every GPU holds the whole model, each trains its share of the batch) or fsdp (base "
        "weights, adapter, gradients and optimizer states sharded across the GPUs, for bases too big for one; a "
        "4-bit base is stored in the compute dtype so it can be sharded). Ignored for one GPU.",
        "ddp",
    )
    objective: str = help_field(
        "What training optimizes: sft (supervised fine-tuning, the loss of the rows' text or, with "
        "completion_only_loss, of their completions), dpo (direct preference optimization on preference rows: "
        "raise the chosen answer's likelihood over the rejected one's, relative to the base), kto (Kahneman-Tversky "
        "optimization on feedback rows: raise desirable answers' likelihood and lower undesirable ones', relative "
        "to the base), orpo (odds ratio preference optimization on preference rows: the chosen answer's loss plus "
        "a penalty on the odds of the rejected one, with no reference model), simpo (simple preference optimization "
        "on preference rows: reference-free, the chosen answer's average log-probability per token over the "
        "rejected one's by a margin, simpo_gamma) or grpo (group relative policy "
        "optimization on prompt_only rows: sample num_generations answers to each prompt, score them with the "
        "graders and raise the likelihood of those that beat their group's mean).",
        "sft",
    )
    beta: float = help_field(
        "DPO and KTO: how far the adapter may move from the base (the reference); higher keeps it closer (for DPO's "
        "ipo loss it is the regularization strength, tau). ORPO: the weight (lambda) of the odds-ratio term added "
        "to the chosen answer's loss; higher weighs the preference more against plain likelihood. SimPO: the scale "
        "of its rewards (average log-probabilities per token); its paper uses 2 to 2.5.",
        0.1,
    )
    desirable_weight: float = help_field(
        "KTO only: the weight of the loss on desirable rows (label true). Raise it, or undesirable_weight, to balance "
        "a skew: with more undesirable than desirable rows, desirable_weight about their ratio (up to 4/3 of it).",
        1.0,
    )
    undesirable_weight: float = help_field(
        "KTO only: the weight of the loss on undesirable rows (label false). Raise it, or desirable_weight, to "
        "balance a skew: with more desirable than undesirable rows, undesirable_weight about their ratio.",
        1.0,
    )
    dpo_loss: str = help_field(
        "DPO only: the preference loss: sigmoid (the DPO paper's), ipo (squared, less prone to overfitting "
        "deterministic preferences), hinge (SLiC), sigmoid_norm (log-ratios normalized by answer length), apo_zero "
        "or apo_down (anchored: push the chosen answer up and the rejected down, or both down), robust (sigmoid "
        "made robust to a share of flipped preferences: label_smoothing), exo_pair (EXO: label_smoothing above 0), "
        "bco_pair (binary classifier of chosen vs rejected), sppo_hard (SPPO), nca_pair (NCA).",
        "sigmoid",
    )
    label_smoothing: float = help_field(
        "DPO's robust and exo_pair losses: the share of preference labels assumed flipped (noisy votes), in "
        "[0, 0.5); robust with 0 is the sigmoid loss, exo_pair needs more than 0 (0.001 is its paper's).",
        0.0,
    )
    simpo_gamma: float = help_field(
        "SimPO only: the target margin between the chosen and the rejected answer's rewards (0.5 to 1.6 in its "
        "paper); 0 asks only that the chosen answer win.",
        0.5,
    )
    graders: dict[str, Any] = help_field(
        "GRPO only: the grader that scores each sampled answer, a JSON object in OpenAI's grader shapes "
        "(string_check, text_similarity, regex, json, numeric, length, score_model, multi, python), e.g. "
        '{"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": '
        '"{{item.answer}}", "operation": "eq"}; {{item.<field>}} reads a field of the prompt\'s row.',
        {},
    )
    num_generations: int = help_field(
        "GRPO only: answers sampled per prompt (the group each answer's reward is compared with); the global "
        "batch of answers (batch_size x grad_accum) must be a multiple of it.",
        8,
    )
    temperature: float = help_field("GRPO only: sampling temperature of the answers (higher: more varied).", 1.0)
    max_completion_length: int = help_field("GRPO only: longest sampled answer, in tokens.", 256)
    kl_coef: float = help_field(
        "GRPO only: weight of the KL penalty that keeps the adapter near the base (trl's beta); 0 leaves it out "
        "and skips the reference forward pass, as trl and recent GRPO practice (DAPO, Dr. GRPO) do.",
        0.0,
    )
    report_to: list[str] = help_field(
        "Trackers that also record this run: tensorboard (event files among the run's files), mlflow, wandb "
        "(offline files among the run's files unless the worker has a W&B key); none for no tracker; empty takes "
        "the site's default.",
        [],
    )
    tracking_project: str = help_field(
        "The MLflow experiment and W&B project of the run; empty: the worker's own (MLFLOW_EXPERIMENT_NAME, "
        "WANDB_PROJECT), else tunedeck.",
        "",
    )
    tracking_run_name: str = help_field("The run's name in the trackers; empty: its Tunedeck name and number.", "")
    tracking_tags: list[str] = help_field("Tags of the run in the trackers (besides its run id, base model and "
                                          "objective).", [])

    def validate(self, max_positions: int | None = None, has_eval_dataset: bool = False) -> dict[str, str]:
        errors: dict[str, str] = {}
        if not 0 < self.learning_rate <= 1:
            errors["learning_rate"] = "must be in (0, 1]"
        if self.max_steps < 0:
            errors["max_steps"] = "must be 0 or more"
        if self.max_steps == 0 and self.num_epochs <= 0:
            errors["num_epochs"] = "must be positive when max_steps is 0"
        for name in ("batch_size", "grad_accum", "logging_steps", "keep_checkpoints"):
            if getattr(self, name) < 1:
                errors[name] = "must be at least 1"
        for name in ("eval_steps", "save_steps", "early_stopping_patience"):
            if getattr(self, name) < 0:
                errors[name] = "must be 0 or more"
        if self.max_seq_length < 8:
            errors["max_seq_length"] = "must be at least 8"
        elif max_positions and self.max_seq_length > max_positions:
            errors["max_seq_length"] = f"must not exceed the model's {max_positions} positions"
        if not 0 <= self.warmup_ratio < 1:
            errors["warmup_ratio"] = "must be in [0, 1)"
        if self.weight_decay < 0:
            errors["weight_decay"] = "must be 0 or more"
        if self.max_grad_norm <= 0:
            errors["max_grad_norm"] = "must be positive"
        if self.neftune_noise_alpha < 0:
            errors["neftune_noise_alpha"] = "must be 0 (off) or positive"
        if not 0 <= self.eval_fraction < 0.5:
            errors["eval_fraction"] = "must be in [0, 0.5)"
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                errors[name] = f"must be one of {', '.join(allowed)}"
        if self.early_stopping_patience and not (self.eval_fraction > 0 or has_eval_dataset):
            errors["early_stopping_patience"] = "needs an eval set: set eval_fraction or an eval dataset"
        self._validate_preference(errors)
        self._validate_reinforcement(errors)
        self._validate_tracking(errors)
        if not 1 <= self.num_gpus <= MAX_GPUS:
            errors["num_gpus"] = f"must be between 1 and {MAX_GPUS}"
        elif "batch_size" not in errors and "grad_accum" not in errors and self.per_rank_batch() is None:
            errors["num_gpus"] = (
                f"the global batch (batch_size {self.batch_size} x grad_accum {self.grad_accum}) must split evenly "
                f"across {self.num_gpus} GPUs: make grad_accum or batch_size a multiple of {self.num_gpus}"
            )
        return errors

    def planned_batching(self, cuda: bool, prompt_method: bool) -> tuple[str, str]:
        """How the runner batches this run's rows on a GPU (`cuda`) or not, and a note when that is not what was
        asked: auto packs supervised rows on GPUs; objectives that pad never pack, and run padding-free where the
        runner can unpad their batches."""
        batching = self.batching
        if self.objective not in PADDED_OBJECTIVES:
            if batching == "auto":
                batching = "pack" if cuda and not prompt_method else "pad"
            return batching, ""
        unpadded = self.objective in UNPADDED_OBJECTIVES and not prompt_method
        if batching == "auto":
            return ("padding_free" if cuda and unpadded else "pad"), ""
        if batching == "pack" or (batching == "padding_free" and not unpadded):
            used = "padding_free" if unpadded else "pad"
            return used, (f"batching {batching} asked, {used} used: {self.objective} trains each sequence in a row "
                          "of its own (its trainer has no packing)")
        return batching, ""

    def _validate_preference(self, errors: dict[str, str]) -> None:
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                errors[name] = "must be positive"
        if not 0 <= self.label_smoothing < 0.5:
            errors["label_smoothing"] = "must be in [0, 0.5)"
        elif self.objective == "dpo" and self.dpo_loss == "exo_pair" and self.label_smoothing == 0:
            errors["label_smoothing"] = "must be above 0 for the exo_pair loss (its log of the flipped share)"
        if not (self.simpo_gamma >= 0 and math.isfinite(self.simpo_gamma)):
            errors["simpo_gamma"] = "must be 0 or more"
        micro_batch = (self.per_rank_batch() or (self.batch_size, 0))[0]
        if self.objective == "kto" and "batch_size" not in errors and micro_batch < 2:
            errors["batch_size"] = ("kto needs at least 2 rows in each process's micro-batch: its KL term pairs each "
                                    "prompt with another row's answer")

    def _validate_reinforcement(self, errors: dict[str, str]) -> None:
        """GRPO's settings; its grader's fields are checked by workers.grading where the rows are known (the run
        service and the train runner): here, only that a GRPO run names one."""
        if not 2 <= self.num_generations <= MAX_GENERATIONS:
            errors["num_generations"] = f"must be between 2 and {MAX_GENERATIONS} (a group needs two answers to compare)"
        elif self.objective == "grpo" and "batch_size" not in errors and "grad_accum" not in errors:
            answers = self.batch_size * self.grad_accum
            if answers % self.num_generations:
                errors["num_generations"] = (
                    f"the global batch of answers (batch_size {self.batch_size} x grad_accum {self.grad_accum} = "
                    f"{answers}) must hold whole groups of num_generations {self.num_generations}: make "
                    "batch_size x grad_accum a multiple of it")
        if not (0 < self.temperature <= 10 and math.isfinite(self.temperature)):
            errors["temperature"] = "must be in (0, 10]"
        if self.max_completion_length < 1:
            errors["max_completion_length"] = "must be at least 1"
        if not (self.kl_coef >= 0 and math.isfinite(self.kl_coef)):
            errors["kl_coef"] = "must be 0 (no KL penalty) or positive"
        if not isinstance(self.graders, dict):
            errors["graders"] = "must be a JSON object (a grader definition)"
        elif self.objective == "grpo" and not self.graders:
            errors["graders"] = ("GRPO scores its sampled answers with a grader: give one, e.g. "
                                 '{"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", '
                                 '"reference": "{{item.answer}}", "operation": "eq"}')
        elif self.objective != "grpo" and self.graders:
            errors["graders"] = "applies to GRPO only: leave it empty"

    def _validate_tracking(self, errors: dict[str, str]) -> None:
        names = [str(name).strip() for name in self.report_to]
        unknown = [name for name in names if name not in (*TRACKERS, NO_TRACKER)]
        if unknown:
            errors["report_to"] = f"{', '.join(unknown)}: not a tracker; name {', '.join(TRACKERS)}, or {NO_TRACKER}"
        elif NO_TRACKER in names and len(names) > 1:
            errors["report_to"] = f"{NO_TRACKER} turns every tracker off: give it alone"
        elif len(set(names)) != len(names):
            errors["report_to"] = "names a tracker twice"
        for name in ("tracking_project", "tracking_run_name"):
            if len(getattr(self, name)) > TRACKING_NAME_MAX:
                errors[name] = f"must be at most {TRACKING_NAME_MAX} characters"
        if len(self.tracking_tags) > MAX_TRACKING_TAGS:
            errors["tracking_tags"] = f"at most {MAX_TRACKING_TAGS} tags"
        elif any(not str(tag).strip() or len(str(tag)) > TRACKING_TAG_MAX for tag in self.tracking_tags):
            errors["tracking_tags"] = f"each tag must be 1 to {TRACKING_TAG_MAX} characters"

    @property
    def trackers(self) -> list[str]:
        """The trackers this run reports to (report_to without none; empty: none)."""
        return [name for name in self.report_to if name != NO_TRACKER]

    def ignored_settings(self) -> list[str]:
        """The settings of other objectives that differ from their defaults (what `for_objective` resets)."""
        defaults = TrainParams()
        return [name for name in OBJECTIVE_SETTINGS
                if not applies_to(name, self.objective) and getattr(self, name) != getattr(defaults, name)]

    def for_objective(self) -> TrainParams:
        """These settings with those of other objectives at their defaults: what a run of this objective keeps."""
        defaults = TrainParams()
        return dataclasses.replace(self, **{name: getattr(defaults, name) for name in self.ignored_settings()})

    @property
    def answers_only(self) -> bool:
        """Whether the loss leaves the prompts out: with completion_only_loss, and always for the preference
        objectives (ANSWER_OBJECTIVES: their loss is the answers')."""
        return self.completion_only_loss or self.objective in ANSWER_OBJECTIVES

    @property
    def distributed(self) -> bool:
        return self.num_gpus > 1

    @property
    def sharded(self) -> bool:
        """FSDP across several GPUs (one GPU has nothing to shard)."""
        return self.distributed and self.strategy == "fsdp"

    def per_rank_batch(self) -> tuple[int, int] | None:
        """(micro-batch, accumulation) of each of the num_gpus processes with the same global batch as one GPU,
        so the optimizer steps and the learning-rate schedule match: the accumulation is divided where it
        can be, else the micro-batch; None when neither divides."""
        n = max(1, self.num_gpus)
        if self.grad_accum % n == 0:
            return self.batch_size, self.grad_accum // n
        if self.batch_size % n == 0:
            return self.batch_size // n, self.grad_accum
        return None


SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
)
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd",
    "lion_8bit", "paged_lion_8bit",
)
BATCHINGS = ("auto", "pad", "pack", "padding_free")
STRATEGIES = ("ddp", "fsdp")
# the training objectives a worker has (workers.training.objectives.OBJECTIVES)
OBJECTIVE_NAMES = ("sft", "dpo", "kto", "orpo", "simpo", "grpo")
# Their trainer pads every micro-batch, each sequence (a pair's chosen or rejected answer, a feedback row's answer, a
# sampled completion) a row of its own: the plan never packs them. Those also in UNPADDED_OBJECTIVES run padding-free
# (batching padding_free, auto on GPUs): the runner takes the padding out of each padded batch in the forward
# (workers/training/unpad.py).
PADDED_OBJECTIVES = ("dpo", "kto", "orpo", "simpo", "grpo")
UNPADDED_OBJECTIVES = ("dpo",)
ANSWER_OBJECTIVES = ("dpo", "kto", "orpo", "simpo")  # their loss is always the answers', never the prompts'
MAX_GENERATIONS = 256
# trl's DPO loss types offered: those that train on pairs against the reference with beta (and label_smoothing for
# robust and exo_pair). aot and aot_unpaired (batch-level alignment), discopop (its own temperature) are not.
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "sigmoid_norm", "apo_zero", "apo_down", "robust", "exo_pair", "bco_pair",
              "sppo_hard", "nca_pair")
# The trackers a run may also report to (TrainParams.report_to; workers/training/tracking.py), through
# transformers' report_to callbacks; none alone turns them off (an empty list takes the site's default).
TRACKERS = ("tensorboard", "mlflow", "wandb")
NO_TRACKER = "none"
TRACKING_NAME_MAX = 128  # W&B's limit on project names
TRACKING_TAG_MAX = 64  # W&B's limit on a tag
MAX_TRACKING_TAGS = 20
MAX_GPUS = 8
MODES = ("auto", "throughput", "memory")
AUTO_ON_OFF = ("auto", "on", "off")
ATTENTIONS = ("auto", "varlen", "flex", "sdpa", "eager")
CHOICES = {
    "lr_scheduler": SCHEDULERS,
    "optimizer": OPTIMIZERS,
    "batching": BATCHINGS,
    "mode": MODES,
    "gradient_checkpointing": AUTO_ON_OFF,
    "activation_offload": AUTO_ON_OFF,
    "attention": ATTENTIONS,
    "liger_kernels": AUTO_ON_OFF,
    "torch_compile": AUTO_ON_OFF,
    "strategy": STRATEGIES,
    "objective": OBJECTIVE_NAMES,
    "dpo_loss": DPO_LOSSES,
}
# Values stored before a field became a choice: read them as the choice they meant.
LEGACY_VALUES = {"gradient_checkpointing": {True: "on", False: "off"}, "torch_compile": {True: "on", False: "off"}}
# Settings that apply to some objectives only, and which (every other TrainParams setting applies to all): the New
# run page shows a setting only under its objectives, and a run keeps the default of each that does not apply.
OBJECTIVE_SETTINGS: dict[str, tuple[str, ...]] = {
    "completion_only_loss": ("sft",),
    "beta": ("dpo", "kto", "orpo", "simpo"),
    "label_smoothing": ("dpo",),
    "simpo_gamma": ("simpo",),
    "dpo_loss": ("dpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "graders": ("grpo",),
    "num_generations": ("grpo",),
    "temperature": ("grpo",),
    "max_completion_length": ("grpo",),
    "kl_coef": ("grpo",),
}


def applies_to(setting: str, objective: str) -> bool:
    """Whether TrainParams `setting` is used when training `objective`."""
    return objective in OBJECTIVE_SETTINGS.get(setting, (objective,))


def suggest_train_params(num_parameters: int | None) -> TrainParams:
    """Defaults by model size: tiny demo models need a far larger step than real LLMs."""
    if num_parameters is not None and num_parameters < 50_000_000:
        return TrainParams(
            learning_rate=5e-3, num_epochs=3, batch_size=16, max_seq_length=64, logging_steps=2,
            gradient_checkpointing="off", save_steps=0,
        )
    if num_parameters is not None and num_parameters > 20_000_000_000:
        return TrainParams(learning_rate=1e-4, batch_size=2, grad_accum=8, max_seq_length=2048)
    return TrainParams()


@dataclass
class ModelRef:
    source: str = help_field("Hugging Face hub id or a local directory.", "")
    revision: str = help_field("Hub revision (branch, tag or commit); empty for the default.", "")
    trust_remote_code: bool = help_field("Run the model's own Python code (admins only).", False)


@dataclass
class DatasetRef:
    uri: str = help_field("Store URI of the dataset file.", "")
    format: str = help_field("Detected row format.", "text")


@dataclass
class TrainSpec:
    run_id: int
    attempt: int
    base_model: ModelRef
    dataset: DatasetRef
    lora: LoraParams
    train: TrainParams
    output_uri: str
    # Resumable checkpoints live per run, not per attempt: a new attempt resumes from the latest.
    checkpoint_uri: str = ""
    eval_dataset: DatasetRef | None = None
    # Warm start: the adapter whose weights the run's adapter starts from (and, for an objective with a reference,
    # the frozen reference); empty for a fresh adapter. A parent deleted since keeps its name with no URI left.
    init_adapter_uri: str = ""
    init_adapter_name: str = ""
    # How people name the run (the trackers' run name when tracking_run_name is empty), and the folder of its
    # trackers' files (TensorBoard event files, offline W&B runs, a local MLflow store), the same for every attempt.
    run_name: str = ""
    tracking_uri: str = ""
    # The memory the run may use of each GPU (its worker's limit, set by an admin for a shared card); 0: all of it.
    # The plan is made for this much, and the allocator is capped there.
    gpu_memory_bytes: int = 0

    @property
    def warm_start(self) -> bool:
        """Whether the run continues an existing adapter rather than initialising a new one."""
        return bool(self.init_adapter_uri or self.init_adapter_name)

    def warm_start_problems(self) -> dict[str, str]:
        """Field-named reasons this warm start cannot run (the control plane checks the same before queueing)."""
        return warm_start_problems(self.train) if self.warm_start else {}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSpec:
        return cls(
            run_id=int(data["run_id"]),
            attempt=int(data["attempt"]),
            base_model=build(ModelRef, data["base_model"]),
            dataset=build(DatasetRef, data["dataset"]),
            lora=build(LoraParams, data["lora"]),
            train=build(TrainParams, data["train"]),
            output_uri=str(data["output_uri"]),
            checkpoint_uri=str(data.get("checkpoint_uri", "")),
            eval_dataset=build(DatasetRef, data["eval_dataset"]) if data.get("eval_dataset") else None,
            init_adapter_uri=str(data.get("init_adapter_uri", "")),
            init_adapter_name=str(data.get("init_adapter_name", "")),
            run_name=str(data.get("run_name", "")),
            tracking_uri=str(data.get("tracking_uri", "")),
            gpu_memory_bytes=int(data.get("gpu_memory_bytes") or 0),
        )

    @classmethod
    def from_json(cls, text: str) -> TrainSpec:
        return cls.from_dict(json.loads(text))


def warm_start_problems(train: TrainParams) -> dict[str, str]:
    """Why a run with these settings cannot start from an existing adapter, by field."""
    if train.sharded:
        # FSDP saves the whole model's adapters, and a warm start's model also holds the reference copy of its parent.
        return {"strategy": "a warm start (init_adapter) trains with ddp or on one GPU; fsdp starts a new adapter"}
    return {}


def build(cls: type[T], data: dict[str, Any]) -> T:
    """Build a flat dataclass from a dict, refusing unknown keys (a typo must not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}")
    data = {k: LEGACY_VALUES.get(k, {}).get(v, v) if isinstance(v, bool) else v for k, v in data.items()}
    return cls(**data)
