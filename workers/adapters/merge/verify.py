"""Checking a merge: the merged model's logits against the adapter applied to its unquantized base.

A bfloat16 or float16 merge is held to that dtype's own rounding noise, measured against the same reference run in
float32 (`Tolerance`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.adapters.merge.checkpoint import FLOAT_DTYPES, StreamingUnsupported, checkpoint_index
from workers.adapters.merge.memory import available_host_bytes, readable_size, release_memory
from workers.adapters.merge.tolerance import TOLERANCES, Tolerance
from workers.contract.reporter import Reporter
from workers.contract.spec import ModelRef

# Prompts of varied content (prose, code, arithmetic, structured data, other languages) that probe a merged model.
PROBE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "What is 17 + 25?",
    "Once upon a time, in a small village by the sea,",
    '{"name": "Ada Lovelace", "born": 1815, "known_for": ',
    "Der schnelle braune Fuchs springt über",
)
GREEDY_TOKENS = 16
MAX_PROBE_TOKENS = 48  # prompt tokens kept per probe: the reference logits of every probe are held in memory
FLOAT32_HEADROOM = 1.2  # the float32 reference is run when its weights times this fit in the free memory


@dataclass
class _Probe:
    ids: Any  # (1, n) prompt token ids
    continuation: Any = None  # (1, GREEDY_TOKENS) the first reference run's greedy tokens: every model scores these
    greedy: Any = None  # (1, GREEDY_TOKENS) the greedy tokens of the reference in the merge dtype
    logits: Any = None  # the merge-dtype reference's logits over ids + continuation, kept in the dtype they come in
    exact: Any = None  # float32 logits of the float32 reference (bfloat16 and float16 merges only)


def verify_merge(
    base: ModelRef | str | Path,
    adapter_dir: Path,
    merged_dir: Path,
    dtype: str,
    prompts: Sequence[str] = (),
    quantization: str = "none",
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> dict[str, Any]:
    """Compare a merged model with the adapter applied to its unquantized base (PeftModel), on probe prompts.

    Every model scores the same token sequences: each prompt followed by GREEDY_TOKENS greedy tokens of the first
    reference run. The models are loaded one after the other, each freed before the next, and only the reference
    logits are kept. For a bfloat16 or float16 merge the first is the reference in float32 (the exact result), then
    the reference in the merge dtype, then the merged model; both of the latter are scored against the exact result
    and the merge is verified by Tolerance's noise-floor rule. For float32, or when the float32 reference cannot be
    run (it would not fit in memory, or loading it failed), the merged model is held to TOLERANCES[dtype]'s fixed
    bounds against the reference in the merge dtype.

    Returns, against the reference in the merge dtype: max/mean |Δlogit|, the fraction of positions whose argmax
    agrees (token_agreement) and of probes whose own greedy continuation is identical (greedy_agreement); the same
    figures of the merged model and of the merge-dtype reference against the float32 one (exact_reference, None for
    float32 merges); the adapter's own effect on the logits (adapter on vs off, for scale); `tolerance`, the rule
    applied and its bounds; and `verified`. With quantization "4bit <type>" or "8bit" it also records, for
    information, how far the adapter on the quantized base it was trained on is from the merged model.
    """
    import torch
    from transformers import AutoTokenizer

    ref = base if isinstance(base, ModelRef) else ModelRef(source=str(base))
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    probes = [_Probe(ids) for ids in _probe_ids(tokenizer, list(prompts) or list(PROBE_PROMPTS))]
    tolerance = TOLERANCES[dtype]
    torch_dtype = getattr(torch, dtype)

    effect: dict[str, float | None] | None = None
    exact_error: str | None = None
    if tolerance.noise_floor:
        effect, exact_error = _run_exact_reference(ref, adapter_dir, probes, tokenizer)

    reference = _load_with_adapter(ref, adapter_dir, torch_dtype)
    low_vs_exact = _Scores()
    with torch.no_grad():
        for probe, greedy in zip(probes, _greedy(reference, probes, tokenizer), strict=True):
            probe.greedy = greedy
            if probe.continuation is None:
                probe.continuation = greedy
            probe.logits = _logits(reference, probe)
            if probe.exact is not None:
                low_vs_exact.add(probe.logits, probe.exact, probe.greedy, probe.continuation)
        if effect is None:
            effect = _adapter_effect(reference, probes)
    del reference
    release_memory()
    if any(p.exact is not None and not bool(p.exact.isfinite().all()) for p in probes):
        exact_error = "the float32 reference's logits are not finite"
        for probe in probes:
            probe.exact = None

    merged = _load_plain(merged_dir, torch_dtype)
    figures, merged_vs_exact = _compare(merged, probes, tokenizer)
    del merged
    release_memory()
    scale = max(float(p.logits.abs().max()) for p in probes)
    exact = None
    if merged_vs_exact is not None:
        exact = {
            "dtype": "float32",
            "merged": merged_vs_exact.figures(),
            "low_precision_reference": low_vs_exact.figures(),
            "error": None,
        }
    elif tolerance.noise_floor:
        exact = {"dtype": "float32", "merged": None, "low_precision_reference": None, "error": exact_error}
    verified, bounds = _judge(tolerance, dtype, figures, exact, scale)
    result: dict[str, Any] = {
        "verified": verified,
        **figures,
        "logit_scale": scale,
        "tolerance": bounds,
        "exact_reference": exact,
        "probes": len(probes),
        "greedy_tokens": GREEDY_TOKENS,
        "adapter_effect": effect,
        "quantized_gap": None,
    }
    for probe in probes:
        probe.exact = None
    if quantization != "none":
        result["quantized_gap"] = _quantized_gap(
            ref, adapter_dir, torch_dtype, quantization, quant_type, double_quant, probes, tokenizer
        )
    return result


def _judge(
    tolerance: Tolerance, dtype: str, figures: dict[str, Any], exact: dict[str, Any] | None, scale: float
) -> tuple[bool, dict[str, Any]]:
    """Whether the merge is verified, and the rule applied with the bounds it gave (see Tolerance)."""
    finite_scale = math.isfinite(scale)
    merged = exact["merged"] if exact else None
    low = exact["low_precision_reference"] if exact else None
    if merged and low and low["max_abs_logit_diff"] is not None and finite_scale:
        floor_max, floor_mean = tolerance.floor_max_rel * scale, tolerance.floor_mean_rel * scale
        max_abs = tolerance.max_margin * low["max_abs_logit_diff"] + floor_max
        mean_abs = tolerance.mean_margin * low["mean_abs_logit_diff"] + floor_mean
        verified = (
            merged["max_abs_logit_diff"] is not None
            and merged["max_abs_logit_diff"] <= max_abs
            and merged["mean_abs_logit_diff"] <= mean_abs
        )
        return verified, {
            "dtype": dtype,
            "rule": "noise_floor",
            "description": (
                f"against the float32 reference, the merged model's max |Δlogit| may be at most "
                f"{tolerance.max_margin:g}x the {dtype} reference's plus {tolerance.floor_max_rel:g} of the logit "
                f"scale, and its mean {tolerance.mean_margin:g}x plus {tolerance.floor_mean_rel:g}"
            ),
            "max_abs": max_abs,
            "mean_abs": mean_abs,
            "max_margin": tolerance.max_margin,
            "mean_margin": tolerance.mean_margin,
            "floor_max_abs": floor_max,
            "floor_mean_abs": floor_mean,
            "merged_to_reference_max": _ratio(merged["max_abs_logit_diff"], low["max_abs_logit_diff"]),
            "merged_to_reference_mean": _ratio(merged["mean_abs_logit_diff"], low["mean_abs_logit_diff"]),
        }
    bounds: dict[str, Any] = {
        "dtype": dtype,
        "rule": "fixed",
        "description": (
            f"against the {dtype} reference, max |Δlogit| at most {tolerance.max_rel:g} and mean at most "
            f"{tolerance.mean_rel:g} of the logit scale"
        ),
        "max_abs": tolerance.max_rel * scale,
        "mean_abs": tolerance.mean_rel * scale,
        "max_rel": tolerance.max_rel,
        "mean_rel": tolerance.mean_rel,
    }
    if exact is not None:
        bounds["fallback_reason"] = exact["error"] or f"the {dtype} reference's logits are not finite"
    verified = (
        figures["max_abs_logit_diff"] is not None
        and finite_scale
        and figures["max_abs_logit_diff"] <= bounds["max_abs"]
        and figures["mean_abs_logit_diff"] <= bounds["mean_abs"]
    )
    return verified, bounds


def _ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def _run_exact_reference(
    ref: ModelRef, adapter_dir: Path, probes: list[_Probe], tokenizer: Any
) -> tuple[dict[str, float | None] | None, str | None]:
    """The adapter on its base in float32: sets each probe's continuation and exact logits.

    Returns (the adapter's effect on the logits, None), or (None, why) when the float32 model does not fit in memory
    or could not be run; the probes are then left as they were.
    """
    import torch

    too_big = _float32_shortfall(ref)
    if too_big:
        return None, too_big
    model: Any = None
    try:
        model = _load_with_adapter(ref, adapter_dir, torch.float32)
        with torch.no_grad():
            for probe, continuation in zip(probes, _greedy(model, probes, tokenizer), strict=True):
                probe.continuation = continuation
                probe.exact = _logits(model, probe).float()
            effect = _adapter_effect(model, probes)
    except Exception as exc:  # out of memory above all: the check goes on with the fixed tolerance
        for probe in probes:
            probe.continuation = probe.exact = None
        first_line = next(iter(str(exc).splitlines()), "")[:300]  # CUDA's out-of-memory advice runs long
        return None, f"the float32 reference could not be run: {type(exc).__name__}: {first_line}"
    finally:
        del model
        release_memory()
    return effect, None


def _float32_shortfall(ref: ModelRef) -> str | None:
    """Why the float32 reference would not fit in the free GPU memory (or the available host memory without a GPU);
    None when it fits or its size cannot be told from a local checkpoint."""
    import torch

    source = Path(ref.source)
    try:
        index = checkpoint_index(source) if source.is_dir() else {}
    except (StreamingUnsupported, OSError, ValueError):
        index = {}
    needed = sum(4 * math.prod(shape) for _, st_dtype, shape in index.values() if st_dtype in FLOAT_DTYPES)
    if not needed:
        return None
    if torch.cuda.is_available():
        free, where = int(torch.cuda.mem_get_info()[0]), "free GPU memory"
    else:
        free, where = available_host_bytes(), "available host memory"
    if free and needed * FLOAT32_HEADROOM > free:
        return f"the float32 reference needs about {readable_size(needed)} for its weights and the {where} is {readable_size(free)}"
    return None


def _adapter_effect(model: Any, probes: list[_Probe]) -> dict[str, float | None]:
    """The adapter on vs off, on the probes' sequences, against the logits just taken with it on."""
    effect = _Diffs()
    with model.disable_adapter():
        for probe in probes:
            effect.add(_logits(model, probe), probe.exact if probe.exact is not None else probe.logits)
    return effect.figures()


def _quantized_gap(
    ref: ModelRef,
    adapter_dir: Path,
    dtype: Any,
    quantization: str,
    quant_type: str,
    double_quant: bool,
    probes: list[_Probe],
    tokenizer: Any,
) -> dict[str, Any]:
    """The adapter on the quantized base it was trained on, against the probes: for information only."""
    try:
        quantized = _load_with_adapter(ref, adapter_dir, dtype, quantization, quant_type, double_quant)
    except Exception as exc:  # bitsandbytes missing or without this platform: the figure is optional
        return {"quantization": quantization, "error": f"{type(exc).__name__}: {exc}"}
    gap = {"quantization": quantization, **_compare(quantized, probes, tokenizer)[0]}
    del quantized
    release_memory()
    return gap


def _probe_ids(tokenizer: Any, prompts: list[str]) -> list[Any]:
    """Each prompt as plain text, and also as a user turn when the tokenizer has a chat template."""
    texts = list(prompts)
    if getattr(tokenizer, "chat_template", None):
        texts += [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    ids = []
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=True)["input_ids"][:, :MAX_PROBE_TOKENS]
        if encoded.shape[1]:
            ids.append(encoded)
    return ids


def _device() -> Any:
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _load_plain(
    path: Path | str, dtype: Any, revision: str = "", trust_remote_code: bool = False, **kwargs: Any
) -> Any:
    from transformers import AutoModelForCausalLM

    device = _device()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        revision=revision or None,
        trust_remote_code=trust_remote_code,
        device_map={"": device.index or 0} if device.type == "cuda" else None,
        **kwargs,
    )
    return model.eval()


def _load_with_adapter(
    ref: ModelRef,
    adapter_dir: Path,
    dtype: Any,
    quantization: str = "none",
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> Any:
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    kwargs: dict[str, Any] = {}
    if quantization.startswith("4bit"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
    elif quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    base = _load_plain(ref.source, dtype, ref.revision, ref.trust_remote_code, **kwargs)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def _greedy(model: Any, probes: list[_Probe], tokenizer: Any) -> list[Any]:
    """GREEDY_TOKENS greedy tokens after each prompt, all probes in one left-padded batch; the end-of-text token
    is held back so that every probe yields the same count."""
    import torch
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    width = max(p.ids.shape[1] for p in probes)
    ids = torch.full((len(probes), width), pad, dtype=torch.long)
    mask = torch.zeros((len(probes), width), dtype=torch.long)
    for row, probe in enumerate(probes):
        ids[row, width - probe.ids.shape[1] :] = probe.ids[0]
        mask[row, width - probe.ids.shape[1] :] = 1
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=GREEDY_TOKENS,
        min_new_tokens=GREEDY_TOKENS if eos is not None else 0,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    return [out[row : row + 1, width:].cpu() for row in range(len(probes))]


def _logits(model: Any, probe: _Probe) -> Any:
    """The model's logits over the probe's prompt and continuation, on the CPU, in the dtype the model gives."""
    import torch

    device = next(model.parameters()).device
    sequence = torch.cat([probe.ids, probe.continuation], dim=1).to(device)
    return model(input_ids=sequence).logits[0].cpu()


@dataclass
class _Diffs:
    """Running max and mean of |a - b| over logits, without keeping them; None where a logit is not finite."""

    largest: float = 0.0
    total: float = 0.0
    count: int = 0

    def add(self, a: Any, b: Any) -> None:
        diff = (a.float() - b.float()).abs()
        largest = float(diff.max())
        self.largest = max(self.largest, largest) if math.isfinite(largest) else math.inf
        self.total += float(diff.sum())
        self.count += diff.numel()

    def figures(self) -> dict[str, float | None]:
        if not math.isfinite(self.largest):
            return {"max_abs_logit_diff": None, "mean_abs_logit_diff": None}
        return {"max_abs_logit_diff": self.largest, "mean_abs_logit_diff": self.total / max(self.count, 1)}


@dataclass
class _Scores:
    """One model's logits and greedy continuations against another's, accumulated probe by probe."""

    diffs: _Diffs = field(default_factory=_Diffs)
    agree: int = 0
    positions: int = 0
    same_greedy: int = 0
    probes: int = 0

    def add(self, logits: Any, reference: Any, greedy: Any, reference_greedy: Any) -> None:
        import torch

        self.diffs.add(logits, reference)
        self.agree += int((logits.float().argmax(-1) == reference.float().argmax(-1)).sum())
        self.positions += logits.shape[0]
        self.same_greedy += int(torch.equal(greedy, reference_greedy))
        self.probes += 1

    def figures(self) -> dict[str, float | None]:
        return {
            **self.diffs.figures(),
            "token_agreement": self.agree / max(self.positions, 1),
            "greedy_agreement": self.same_greedy / max(self.probes, 1),
        }


def _compare(model: Any, probes: list[_Probe], tokenizer: Any) -> tuple[dict[str, Any], _Scores | None]:
    """The model's logits on the probes' sequences and its own greedy continuations against the merge-dtype
    reference's, and against the float32 reference's where the probes hold its logits (else None)."""
    import torch

    scores = _Scores()
    exact = _Scores() if all(p.exact is not None for p in probes) else None
    with torch.no_grad():
        continuations = _greedy(model, probes, tokenizer)
        for probe, greedy in zip(probes, continuations, strict=True):
            logits = _logits(model, probe)
            scores.add(logits, probe.logits, greedy, probe.greedy)
            if exact is not None:
                exact.add(logits, probe.exact, greedy, probe.continuation)
    return scores.figures(), exact


def log_check(check: dict[str, Any], reporter: Reporter) -> None:
    tol = check["tolerance"]
    dtype = tol["dtype"]
    effect = f"the adapter itself moves the logits by {_fmt(check['adapter_effect']['mean_abs_logit_diff'])} on average"
    agreement = (
        f"argmax agreement {100 * check['token_agreement']:.1f}%, identical {check['greedy_tokens']}-token greedy "
        f"continuations {100 * check['greedy_agreement']:.0f}% over {check['probes']} probes"
    )
    if tol["rule"] == "noise_floor":
        merged, low = check["exact_reference"]["merged"], check["exact_reference"]["low_precision_reference"]
        figures = (
            f"against the adapter on its base in float32, the merged model is off by max |Δlogit| "
            f"{_fmt(merged['max_abs_logit_diff'])} (allowed {tol['max_abs']:.3g}) and mean "
            f"{_fmt(merged['mean_abs_logit_diff'])} (allowed {tol['mean_abs']:.3g}), the adapter on its base in "
            f"{dtype} by max {_fmt(low['max_abs_logit_diff'])} and mean {_fmt(low['mean_abs_logit_diff'])} (allowed: "
            f"{tol['max_margin']:g}x and {tol['mean_margin']:g}x these, plus {tol['floor_max_abs']:.3g} and "
            f"{tol['floor_mean_abs']:.3g}). Against the adapter on its base in {dtype}: max |Δlogit| "
            f"{_fmt(check['max_abs_logit_diff'])}, mean {_fmt(check['mean_abs_logit_diff'])}, {agreement} (for "
            f"information: rounding flips near-tied tokens); {effect}"
        )
        if check["verified"]:
            reporter.log(f"Check passed: merging added no error beyond {dtype}'s own rounding: {figures}")
        else:
            reporter.log(
                f"Check FAILED: the merged model is further from the exact result than {dtype} rounding explains: "
                f"{figures}. The merged model is kept but flagged unverified.",
                level="warning",
            )
    else:
        if "fallback_reason" in tol:
            reporter.log(
                f"The float32 reference was not run ({tol['fallback_reason']}), so {dtype}'s own rounding noise is "
                f"not measured: the merge is held to the fixed {dtype} tolerance instead ({tol['max_rel']:g} and "
                f"{tol['mean_rel']:g} of the logit scale), which deep, wide models can exceed",
                level="warning",
            )
        figures = (
            f"max |Δlogit| {_fmt(check['max_abs_logit_diff'])} (tolerance {tol['max_abs']:.3g}), mean "
            f"{_fmt(check['mean_abs_logit_diff'])} (tolerance {tol['mean_abs']:.3g}), {agreement}; {effect}"
        )
        if check["verified"]:
            reporter.log(f"Check passed: the merged model matches the adapter on its base in {dtype}: {figures}")
        else:
            reporter.log(
                f"Check FAILED: the merged model differs from the adapter on its base by more than the {dtype} "
                f"tolerance: {figures}. The merged model is kept but flagged unverified.",
                level="warning",
            )
    gap = check.get("quantized_gap")
    if gap and "error" in gap:
        reporter.log(f"The {gap['quantization']} base could not be loaded for comparison: {gap['error']}")
    elif gap:
        reporter.log(
            f"For information, the adapter on the {gap['quantization']} base it was trained on differs from the "
            f"merged model by max |Δlogit| {_fmt(gap['max_abs_logit_diff'])}, mean {_fmt(gap['mean_abs_logit_diff'])}; "
            f"argmax agreement {100 * gap['token_agreement']:.1f}%, identical greedy continuations "
            f"{100 * gap['greedy_agreement']:.0f}%"
        )


def _fmt(value: float | None) -> str:
    return "not finite (NaN or infinite logits)" if value is None else f"{value:.3g}"
