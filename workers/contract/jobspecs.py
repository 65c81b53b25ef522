"""Specs of the jobs that work with finished adapters: compare, chat, merge, export, combine, evaluate, push.

Like `TrainSpec`, each is a plain dataclass that travels as JSON from the control plane to a
worker; `validate()` returns field-named problems instead of raising. Every runner has the
same contract as the train runner: `run_x(spec, reporter, store) -> result | None`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

from workers.contract.hubids import repo_id_problem
from workers.contract.spec import COMPUTE_DTYPES, QUANTIZATIONS, DatasetRef, ModelRef, help_field

T = TypeVar("T")

MAX_ADAPTERS = 8
BASE_KEY = "__base__"  # PEFT's name for "no adapter" in mixed-adapter batches, and our column key for the base
# Every combination type of PEFT's add_weighted_adapter. linear is the exact weighted sum of the deltas
# (through PEFT's cat), not PEFT's factor-wise linear (see workers/adapters/merge/combine.py).
COMBINATIONS = (
    "linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
    "magnitude_prune", "magnitude_prune_svd",
)
DENSITY_COMBINATIONS = tuple(c for c in COMBINATIONS if c.startswith(("ties", "dare", "magnitude")))
SVD_COMBINATIONS = tuple(c for c in COMBINATIONS if c == "svd" or c.endswith("_svd"))
# Types that combine the adapters' A and B factors entry-wise (not the deltas): equal ranks needed.
EQUAL_RANK_COMBINATIONS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
MERGE_DTYPES = ("auto", "bfloat16", "float16", "float32")
EXPORT_TARGETS = ("ollama", "vllm")
# What a vLLM check generates from when it is given no prompts of its own.
VLLM_CHECK_PROMPTS = ("Say hello in one short sentence.", "What is 2 + 3?", "Name three colours.")
VLLM_MAX_PROMPTS = 32
EXPORT_FORMS = ("merged", "adapter")
OLLAMA_QUANTIZE = ("q8_0", "q4_K_S", "q4_K_M")  # what `ollama create --quantize` takes for a safetensors import
# Ollama's model names: [namespace/]name[:tag] of letters, digits, - _ .
OLLAMA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,79})?(:[A-Za-z0-9][A-Za-z0-9_.-]{0,79})?$")
# What a comparison or an evaluation loads its base in (see base_load).
BASE_PRECISIONS = ("auto", "4bit", "8bit", "bfloat16", "float16", "float32")
TRAINED_ON = {"none": "unquantized", "8bit": "8-bit", "4bit": "4-bit"}
BASE_PRECISION_HELP = (
    "How the base is loaded. auto: as the adapters were trained when they agree (all QLoRA: the 4-bit base; all "
    "8-bit: 8-bit), else unquantized in the compute dtype (bfloat16 on GPUs that have it, float16 on others, "
    "float32 on the CPU). 4bit (NF4, double quant) or 8bit (LLM.int8): quantized, whatever the adapters were "
    "trained on. bfloat16, float16, float32: unquantized in that dtype."
)


@dataclass
class AdapterRef:
    key: str = help_field("Short unique name of the adapter inside the job (a PEFT adapter name and a column key).", "")
    label: str = help_field("Human name shown in results.", "")
    uri: str = help_field("Store URI of the adapter folder (adapter_config.json + adapter_model.safetensors).", "")
    method: str = help_field("The adapter's method (lora, ia3, prefix_tuning, prompt_tuning).", "lora")
    r: int = help_field("LoRA rank (0 when not a LoRA).", 0)
    quantization: str = help_field("Quantization of the base the adapter was trained on: none, 8bit or 4bit (QLoRA).", "none")
    quant_type: str = help_field("4-bit type it was trained with (nf4 or fp4).", "nf4")


@dataclass
class GenerationParams:
    max_new_tokens: int = help_field("Most tokens generated per answer.", 128)
    temperature: float = help_field("Sampling temperature; 0 is greedy decoding (deterministic).", 0.0)
    top_p: float = help_field("Nucleus sampling: keep the smallest token set whose probability reaches top-p.", 1.0)
    seed: int = help_field("Random seed of sampling (same seed, same settings: same outputs).", 0)
    chat_template: bool = help_field(
        "Wrap each prompt in the tokenizer's chat template as a user turn, as training wraps instruction and chat "
        "rows. Off sends the prompt raw: adapters trained on such rows may then answer with nothing at all.",
        True,
    )

    def validate(self) -> dict[str, str]:
        errors: dict[str, str] = {}
        if not 1 <= self.max_new_tokens <= 4096:
            errors["max_new_tokens"] = "must be between 1 and 4096"
        if not 0.0 <= self.temperature <= 5.0:
            errors["temperature"] = "must be between 0 and 5"
        if not 0.0 < self.top_p <= 1.0:
            errors["top_p"] = "must be above 0 and at most 1"
        return errors


@dataclass
class PromptRow:
    prompt: str = help_field(
        "The prompt as people read it: typed text (a user turn when the chat template is on), or a conversation's "
        "turns one per line with their roles.",
        "",
    )
    reference: str = help_field("Reference answer, if known (shown beside the outputs; scored by evaluations).", "")
    turns: list[dict[str, str]] = help_field(
        "A dataset row's conversation before its answer (system prompt and earlier turns included), each turn a "
        "role and its content: what the model is given through the chat template. Empty for typed prompts.",
        [],
    )

    @property
    def conversational(self) -> bool:
        return bool(self.turns)


@dataclass
class LoadParams:
    """How the base is loaded for inference: the quantization the adapters were trained on by default."""

    quantization: str = help_field("none, 8bit or 4bit (NF4, double quant).", "none")
    compute_dtype: str = help_field("auto: bfloat16 on GPUs that have it, float16 on others, float32 on the CPU.", "auto")

    def validate(self) -> dict[str, str]:
        errors: dict[str, str] = {}
        if self.quantization not in QUANTIZATIONS:
            errors["quantization"] = f"must be one of {', '.join(QUANTIZATIONS)}"
        if self.compute_dtype not in COMPUTE_DTYPES:
            errors["compute_dtype"] = f"must be one of {', '.join(COMPUTE_DTYPES)}"
        return errors


def base_load(precision: str, trained_on: list[str]) -> tuple[LoadParams, str]:
    """How to load the base for a BASE_PRECISIONS choice, given the quantization each adapter was trained on
    ("none", "8bit", "4bit"), and a line that says what and why.

    auto: the quantization the adapters were trained on when they all agree on one (every adapter QLoRA: the
    4-bit base they were trained on; every one 8-bit: 8-bit), else unquantized in the compute dtype (bfloat16
    on GPUs that have it, float16 on other GPUs, float32 on the CPU). 4bit (NF4, double quant) and 8bit
    (LLM.int8) quantize the base whatever the adapters were trained on, computing in the compute dtype;
    bfloat16, float16 and float32 load it unquantized in that dtype."""
    if precision not in BASE_PRECISIONS:
        raise ValueError(f"must be one of {', '.join(BASE_PRECISIONS)}")
    if precision in ("4bit", "8bit"):
        return LoadParams(quantization=precision), f"Base precision {precision} (quantized), as chosen"
    if precision != "auto":
        return LoadParams(compute_dtype=precision), f"Base precision {precision} (unquantized), as chosen"
    kinds = sorted(set(trained_on))
    if len(kinds) == 1 and kinds[0] != "none":
        return LoadParams(quantization=kinds[0]), f"Base precision auto: {kinds[0]}, the base every adapter was trained on"
    trained = " and ".join(TRAINED_ON.get(kind, kind) for kind in kinds)
    return LoadParams(), f"Base precision auto: unquantized in the compute dtype (the adapters were trained on {trained} bases)"


def _validate_adapters(adapters: list[AdapterRef], include_base: bool, errors: dict[str, str]) -> None:
    if not adapters and not include_base:
        errors["adapters"] = "pick at least one adapter (or the base)"
    if len(adapters) > MAX_ADAPTERS:
        errors["adapters"] = f"at most {MAX_ADAPTERS} adapters, got {len(adapters)}"
    keys = [a.key for a in adapters]
    if len(set(keys)) != len(keys) or BASE_KEY in keys or not all(keys):
        errors["adapters"] = f"adapter keys must be unique, non-empty and not {BASE_KEY!r}"


@dataclass
class CompareSpec:
    job_id: int
    attempt: int
    base_model: ModelRef
    adapters: list[AdapterRef]
    prompts: list[PromptRow]
    generation: GenerationParams = field(default_factory=GenerationParams)
    load: LoadParams = field(default_factory=LoadParams)
    include_base: bool = True
    batch_size: int = 64  # prompts per generate() call; every column of a prompt goes in the same call

    def validate(self) -> dict[str, str]:
        errors = {**self.generation.validate(), **self.load.validate()}
        _validate_adapters(self.adapters, self.include_base, errors)
        if not self.prompts:
            errors["prompts"] = "the prompt set is empty"
        return errors


MAX_CHAT_COLUMNS = 5  # the base and up to four adapters, side by side


@dataclass
class ChatSpec:
    """An interactive session: the base and its adapters loaded once, then each message the control plane hands
    over (`Reporter.next_turn`) answered by every column, token by token, until the session is closed or idle."""

    job_id: int
    attempt: int
    base_model: ModelRef
    adapters: list[AdapterRef]
    load: LoadParams = field(default_factory=LoadParams)
    include_base: bool = True
    idle_timeout_s: int = 600  # the model is released (the job ends) after this long without a message

    def validate(self) -> dict[str, str]:
        errors = self.load.validate()
        _validate_adapters(self.adapters, self.include_base, errors)
        if len(self.adapters) + int(self.include_base) > MAX_CHAT_COLUMNS:
            errors["adapters"] = f"at most {MAX_CHAT_COLUMNS} columns: the base and up to {MAX_CHAT_COLUMNS - 1} adapters"
        if not 1 <= self.idle_timeout_s <= 86400:
            errors["idle_timeout_s"] = "must be between 1 second and a day"
        return errors


@dataclass
class MergeSpec:
    """Merge one adapter into its base and save a full model; then check the merge."""

    job_id: int
    attempt: int
    base_model: ModelRef
    adapter: AdapterRef
    output_uri: str
    dtype: str = "auto"  # dtype of the merged weights; auto: the base checkpoint's own dtype (float32 if it names none)
    max_shard_size: str = "2GB"
    probe_prompts: list[str] = field(default_factory=list)  # empty: a fixed built-in probe set

    def validate(self) -> dict[str, str]:
        errors: dict[str, str] = {}
        if self.dtype not in MERGE_DTYPES:
            errors["dtype"] = f"must be one of {', '.join(MERGE_DTYPES)}"
        if self.adapter.method != "lora":
            errors["adapter"] = f"only LoRA adapters merge into the base weights ({self.adapter.method} does not)"
        return errors


@dataclass
class ExportSpec:
    """Write what a runtime elsewhere needs to import the adapter: for Ollama, a folder with a Modelfile."""

    job_id: int
    attempt: int
    base_model: ModelRef
    adapter: AdapterRef
    output_uri: str
    # ollama: a folder with a Modelfile. vllm: the folder vLLM serves (the adapter, or the merged model), checked on
    # a worker that has vLLM: vLLM loads it and answers `check_prompts`, beside Tunedeck's own answers.
    target: str = "ollama"
    # merged: the base with the adapter merged, in safetensors (FROM .); adapter: FROM the base, ADAPTER ./adapter.
    form: str = "merged"
    name: str = "tunedeck-model"  # the model's name in the README's `ollama create` and `ollama run`
    base_name: str = ""  # the adapter form's FROM: the name Ollama knows the base by (default: its source)
    quantize: str = ""  # passed to `ollama create --quantize` in the README (merged form only)
    system: str = ""  # a default system prompt (SYSTEM)
    temperature: float | None = None  # PARAMETER temperature, only if set
    top_p: float | None = None  # PARAMETER top_p, only if set
    dtype: str = "auto"  # as a merge's
    max_shard_size: str = "2GB"
    check_prompts: list[str] = field(default_factory=list)  # vllm: the check's prompts (default VLLM_CHECK_PROMPTS)
    max_new_tokens: int = 32  # vllm: tokens per check answer

    def prompts_to_check(self) -> list[str]:
        return list(self.check_prompts) or list(VLLM_CHECK_PROMPTS)

    def validate(self) -> dict[str, str]:
        errors: dict[str, str] = {}
        if self.target == "vllm":
            if self.quantize:
                errors["quantize"] = "only an Ollama export is quantized (vLLM serves the folder as it is)"
            if len(self.check_prompts) > VLLM_MAX_PROMPTS:
                errors["check_prompts"] = f"at most {VLLM_MAX_PROMPTS} prompts ({len(self.check_prompts)} given)"
            elif (empty := next((i for i, p in enumerate(self.check_prompts)
                                 if not isinstance(p, str) or not p.strip()), None)) is not None:
                errors["check_prompts"] = f"prompt {empty + 1} is empty"
            if not 1 <= self.max_new_tokens <= 512:
                errors["max_new_tokens"] = "must be between 1 and 512"
        if self.target not in EXPORT_TARGETS:
            errors["target"] = f"must be one of {', '.join(EXPORT_TARGETS)}"
        if self.form not in EXPORT_FORMS:
            errors["form"] = f"must be one of {', '.join(EXPORT_FORMS)}"
        if not OLLAMA_NAME.match(self.name):
            errors["name"] = f"{self.name[:100]!r} is no Ollama name: use [namespace/]name[:tag] of letters, digits, - _ ."
        if self.quantize and self.quantize not in OLLAMA_QUANTIZE:
            errors["quantize"] = f"must be empty or one of {', '.join(OLLAMA_QUANTIZE)}"
        elif self.quantize and self.form != "merged":
            errors["quantize"] = "only a merged model is quantized as Ollama imports it"
        if '"""' in self.system:
            errors["system"] = 'must not hold """ (the Modelfile quotes it with them)'
        if any(c in self.base_name for c in "\r\n"):
            errors["base_name"] = "must be one line"
        if self.temperature is not None and not 0.0 <= self.temperature <= 5.0:
            errors["temperature"] = "must be between 0 and 5"
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            errors["top_p"] = "must be above 0 and at most 1"
        if self.dtype not in MERGE_DTYPES:
            errors["dtype"] = f"must be one of {', '.join(MERGE_DTYPES)}"
        if self.adapter.method != "lora":
            runtime = "vLLM serves" if self.target == "vllm" else "Ollama imports"
            errors["adapter"] = f"{runtime} LoRA adapters only ({self.adapter.method} is not one)"
        return errors


@dataclass
class CombineSpec:
    """A new adapter from weighted adapters of one base (PEFT add_weighted_adapter)."""

    job_id: int
    attempt: int
    base_model: ModelRef
    adapters: list[AdapterRef]
    weights: list[float]
    combination_type: str
    output_uri: str
    density: float | None = None  # ties / dare / magnitude_prune: fraction of entries kept
    majority_sign_method: str = "total"  # ties: "total" or "frequency"
    svd_rank: int | None = None  # svd types: rank of the result (default: the largest input rank)

    def validate(self) -> dict[str, str]:
        errors: dict[str, str] = {}
        if len(self.adapters) < 2:
            errors["adapters"] = "pick at least two adapters to combine"
        if len(self.adapters) > MAX_ADAPTERS:
            errors["adapters"] = f"at most {MAX_ADAPTERS} adapters, got {len(self.adapters)}"
        if len(self.weights) != len(self.adapters):
            errors["weights"] = f"one weight per adapter: {len(self.adapters)} adapters, {len(self.weights)} weights"
        if self.combination_type not in COMBINATIONS:
            errors["combination_type"] = f"must be one of {', '.join(COMBINATIONS)}"
        non_lora = [a.label or a.key for a in self.adapters if a.method != "lora"]
        if non_lora:
            errors["adapters"] = f"only LoRA adapters can be combined; not: {', '.join(non_lora)}"
        ranks = {a.r for a in self.adapters}
        if self.combination_type in EQUAL_RANK_COMBINATIONS and len(ranks) > 1:
            errors["adapters"] = (
                f"{self.combination_type} adds the adapters entry-wise and needs equal ranks; got ranks "
                f"{', '.join(str(a.r) for a in self.adapters)} (use linear, cat or an svd type for mixed ranks)"
            )
        if self.combination_type in DENSITY_COMBINATIONS:
            if self.density is None or not 0.0 < self.density <= 1.0:
                errors["density"] = f"{self.combination_type} needs a density above 0 and at most 1"
        elif self.density is not None:
            errors["density"] = f"{self.combination_type} takes no density"
        if self.majority_sign_method not in ("total", "frequency"):
            errors["majority_sign_method"] = "must be total or frequency"
        if self.svd_rank is not None and (self.combination_type not in SVD_COMBINATIONS or self.svd_rank < 1):
            errors["svd_rank"] = "a positive rank, for the svd types only"
        return errors


@dataclass
class EvaluateSpec:
    """Score adapters (and the base) on a dataset with reference answers."""

    job_id: int
    attempt: int
    base_model: ModelRef
    adapters: list[AdapterRef]
    dataset: DatasetRef
    include_base: bool = True
    max_rows: int = 200  # rows scored (the first ones of the split); 0 for all
    generation: GenerationParams = field(default_factory=lambda: GenerationParams(max_new_tokens=64))
    load: LoadParams = field(default_factory=LoadParams)
    # "all" rows of the dataset, or the "held_out" split of a run (same fraction and seed as its training).
    split: str = "all"
    eval_fraction: float = 0.0
    seed: int = 42

    def validate(self) -> dict[str, str]:
        errors = {**self.generation.validate(), **self.load.validate()}
        _validate_adapters(self.adapters, self.include_base, errors)
        if self.max_rows < 0:
            errors["max_rows"] = "must be 0 (all) or more"
        if self.split not in ("all", "held_out"):
            errors["split"] = "must be all or held_out"
        if self.split == "held_out" and not 0.0 < self.eval_fraction < 1.0:
            errors["eval_fraction"] = "the held-out split needs the run's eval_fraction (between 0 and 1)"
        return errors


@dataclass
class PushSpec:
    """Upload an adapter or a merged model folder to a Hugging Face Hub repository."""

    job_id: int
    attempt: int
    source_uri: str
    repo_id: str
    private: bool = True
    commit_message: str = "Upload from Tunedeck"
    endpoint: str = "https://huggingface.co"
    token: str = ""  # added by the control plane when the worker claims the job; never stored with the job

    def __repr__(self) -> str:  # never show the token
        return f"PushSpec(job_id={self.job_id}, source_uri={self.source_uri!r}, repo_id={self.repo_id!r})"

    def validate(self) -> dict[str, str]:
        errors: dict[str, str] = {}
        if not self.token:
            errors["token"] = "no Hugging Face token is configured (TUNEDECK_HF_TOKEN on the control plane)"
        problem = repo_id_problem(self.repo_id)
        if problem:
            errors["repo_id"] = problem
        return errors


def spec_to_json(spec: Any) -> str:
    return json.dumps(dataclasses.asdict(spec))
