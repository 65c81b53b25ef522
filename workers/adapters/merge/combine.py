"""Combining adapters into one new LoRA adapter (PEFT's add_weighted_adapter, and an exact weighted sum).

`run_combine(spec, reporter, store)` has the train runner's contract (workers/training/train.py).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.adapters.merge.checkpoint import EXPECTED_ERRORS, output_dir
from workers.adapters.merge.lora import (
    PEFT_PREFIX,
    LoraFile,
    adapter_folder,
    adapter_label,
    read_adapter_config,
    stores_transposed,
)
from workers.adapters.merge.stream import requested_variants
from workers.contract.jobrunner import RunnerError, run_reported
from workers.contract.jobspecs import EQUAL_RANK_COMBINATIONS, SVD_COMBINATIONS, AdapterRef, CombineSpec
from workers.contract.reporter import Reporter
from workers.contract.spec import ModelRef
from workers.contract.store import ArtifactStore, sha256_of, size_of
from workers.training.modelinfo import check_source

# PEFT's combination types that add the adapters' A and B factors entry-wise, so every layer needs one rank.
# Tunedeck's "linear" is not among them: it is the exact weighted sum of the deltas (see combine_adapters).
FACTORWISE_COMBINATIONS = tuple(c for c in EQUAL_RANK_COMBINATIONS if c != "linear")
COMBINE_SEED = 0  # dare drops entries at random: a fixed seed makes a combination reproducible


def run_combine(spec: CombineSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any] | None:
    """Combine spec.adapters into one new LoRA adapter saved at spec.output_uri (see combine_adapters)."""
    return run_reported(reporter, lambda: _combine(spec, reporter, store), expected=EXPECTED_ERRORS)


@dataclass
class _Input:
    ref: AdapterRef
    path: Path
    config: dict[str, Any]
    ranks: dict[str, int]  # module -> r, from the tensors' shapes

    @property
    def label(self) -> str:
        return self.ref.label or self.ref.key


def _combine(spec: CombineSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any]:
    started = time.monotonic()
    problems = spec.validate()
    if not all(math.isfinite(w) for w in spec.weights):
        problems["weights"] = "every weight must be a finite number"
    if problems:
        raise RunnerError("; ".join(f"{name}: {message}" for name, message in problems.items()))
    check_source(spec.base_model.source)
    inputs = [_read_input(ref, store) for ref in spec.adapters]
    check_combinable(spec.combination_type, inputs)
    _log_bases(spec, inputs, reporter)
    out_dir = output_dir(spec.output_uri, store)
    part = out_dir.with_name(out_dir.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    reporter.log(
        f"Combining {', '.join(f'{i.label} (r={max(i.ranks.values())}) × {w:g}' for i, w in zip(inputs, spec.weights, strict=True))}"
        f" with {spec.combination_type}"
        + (" (the exact weighted sum of the deltas, via PEFT's cat)" if spec.combination_type == "linear" else "")
    )
    reporter.flush()
    stats = combine_adapters(
        spec.base_model,
        [i.path for i in inputs],
        spec.weights,
        spec.combination_type,
        part,
        density=spec.density,
        majority_sign_method=spec.majority_sign_method,
        svd_rank=spec.svd_rank,
    )
    tokenizer_source = next((i.path for i in inputs if (i.path / "tokenizer_config.json").exists()), None)
    if tokenizer_source is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(part)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(part, out_dir)
    error = stats["weighted_sum_rel_error"]
    if error is not None:
        what = (
            f"truncation error of the rank-{stats['r']} SVD" if spec.combination_type in SVD_COMBINATIONS else "error"
        )
        reporter.log(f"Against the exact weighted sum of the deltas: relative {what} {error:.3g}")
    reporter.log(f"Combined adapter saved: r={stats['r']}, {stats['trainable_params']:,} parameters")
    return {
        "adapter_uri": spec.output_uri,
        "size_bytes": size_of(out_dir),
        "sha256": sha256_of(out_dir),
        "trainable_params": stats["trainable_params"],
        "total_params": stats["total_params"],
        "r": stats["r"],
        "combination_type": spec.combination_type,
        "peft_combination_type": stats["peft_combination_type"],
        "weights": list(spec.weights),
        "density": spec.density,
        "weighted_sum_rel_error": error,
        "runtime_s": round(time.monotonic() - started, 2),
    }


def _read_input(ref: AdapterRef, store: ArtifactStore) -> _Input:
    from safetensors import safe_open

    path = adapter_folder(ref, store)
    config = read_adapter_config(ref, path)
    ranks: dict[str, int] = {}
    weights = path / "adapter_model.safetensors"
    if config.get("peft_type") == "LORA":
        if not weights.exists():
            raise RunnerError(f"adapter {adapter_label(ref)}: no adapter_model.safetensors in {path}")
        with safe_open(str(weights), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                for suffix in (".lora_A.weight", ".lora_embedding_A"):
                    if key.endswith(suffix):
                        ranks[key.removeprefix(PEFT_PREFIX).removesuffix(suffix)] = handle.get_slice(key).get_shape()[0]
        if not ranks:
            raise RunnerError(f"adapter {adapter_label(ref)}: adapter_model.safetensors holds no LoRA weights")
    return _Input(ref, path, config, ranks)


def check_combinable(combination_type: str, inputs: list[_Input]) -> None:
    """Refuse, naming the adapters and the reason, what add_weighted_adapter would reject or get wrong."""
    problems = []
    for item in inputs:
        config, name = item.config, repr(item.label)
        if config.get("peft_type") != "LORA":
            problems.append(f"{name} is a {config.get('peft_type')} adapter, and only LoRA adapters can be combined")
            continue
        if config.get("use_dora"):
            problems.append(f"{name} is a DoRA adapter: its magnitude vectors cannot be weighted (merge it instead)")
        if config.get("modules_to_save"):
            problems.append(
                f"{name} trains whole modules ({', '.join(config['modules_to_save'])}), which cannot be weighted"
            )
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            problems.append(f"{name} trains biases, which a combination would drop")
        variants = [v for v in requested_variants(config) if v != "use_dora"]
        variants += [o for o in ("use_qalora", "target_parameters", "trainable_token_indices") if config.get(o)]
        if variants:
            problems.append(f"{name} uses {', '.join(variants)}, which add_weighted_adapter does not combine")
    if problems:
        raise RunnerError("; ".join(problems))
    if combination_type in FACTORWISE_COMBINATIONS:
        ranks = {item.label: sorted(set(item.ranks.values())) for item in inputs}
        if len({r for rs in ranks.values() for r in rs}) > 1:
            listed = ", ".join(f"{label!r} r={'/'.join(map(str, rs))}" for label, rs in ranks.items())
            raise RunnerError(
                f"{combination_type} adds the adapters' A and B factors entry-wise, so every layer of every adapter "
                f"needs one rank; got {listed} (linear, cat and the svd types combine mixed ranks)"
            )
    forms = {item.label: isinstance(item.config.get("target_modules"), str) for item in inputs}
    if len(set(forms.values())) > 1:
        by_pattern = ", ".join(repr(label) for label, is_str in forms.items() if is_str)
        by_list = ", ".join(repr(label) for label, is_str in forms.items() if not is_str)
        raise RunnerError(
            f"{by_pattern} name their target modules by a pattern and {by_list} by a list; PEFT cannot combine the "
            "two forms"
        )


def _log_bases(spec: CombineSpec, inputs: list[_Input], reporter: Reporter) -> None:
    bases = {i.label: i.config.get("base_model_name_or_path") or "" for i in inputs}
    if len(set(bases.values())) > 1 or any(b and b != spec.base_model.source for b in bases.values()):
        listed = ", ".join(f"{label!r}: {base or '?'}" for label, base in bases.items())
        reporter.log(
            f"The adapters name different bases ({listed}; this job's base is {spec.base_model.source}); they are "
            "combined on this job's base, and shapes that do not fit fail",
            level="warning",
        )


def combine_adapters(
    base: ModelRef,
    adapter_dirs: Sequence[Path],
    weights: Sequence[float],
    combination_type: str,
    out_dir: Path,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
) -> dict[str, Any]:
    """Combine LoRA adapters with PEFT's add_weighted_adapter and save only the new adapter in out_dir.

    With wᵢ the weights and ΔWᵢ = sᵢ·Bᵢ·Aᵢ each adapter's delta (sᵢ its scaling), per adapted layer:

    - linear: ΔW = Σ wᵢ·ΔWᵢ exactly. PEFT's own "linear" scales each Aᵢ and Bᵢ by √(wᵢsᵢ) and sums them
      separately, so its B·A carries cross terms Bᵢ·Aⱼ and is not the weighted sum; Tunedeck's linear runs PEFT's
      "cat" instead, which stacks the wᵢsᵢ·Aᵢ and the Bᵢ: exact, of rank Σ rᵢ, and mixed ranks are fine.
      (For the rank of one adapter, svd gives the best approximation of that same sum.)
    - cat: the same exact sum, under PEFT's name.
    - svd: the best rank-k approximation (truncated SVD) of Σ wᵢ·ΔWᵢ, k = svd_rank or the largest rᵢ.
    - ties, dare_linear, dare_ties, magnitude_prune: PEFT applies the method to the Aᵢ (weighted by
      sign(wᵢ)·√|wᵢsᵢ|) and to the Bᵢ (by √|wᵢsᵢ|) separately; the result is rank r and, like PEFT's linear, not
      the method applied to the deltas. Equal ranks needed. ties keeps the `density` fraction of largest entries
      of each, elects a sign per entry (by total mass or by count: majority_sign_method) and averages the entries
      that agree; dare drops entries at random with probability 1 - density and rescales the rest by 1/density
      (dare_ties then elects signs like ties); magnitude_prune keeps the largest `density` fraction and sums.
    - ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: the method applied to the deltas wᵢ·ΔWᵢ
      themselves, then the truncated SVD to rank k.

    The base's weights are never read: the adapters only need its architecture, so the model is built from its
    config with uninitialised storage (never touched, so it takes address space, not memory). dare's random drops
    use a fixed seed, so a combination is reproducible.
    """
    import torch
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    model = _empty_model(base)
    base_params = sum(p.numel() for p in model.parameters())
    names = [f"input{i}" for i in range(len(adapter_dirs))]
    peft_model: Any = None
    for name, path in zip(names, adapter_dirs, strict=True):
        config = LoraConfig.from_pretrained(str(path))
        config.init_lora_weights = True  # the saved weights replace the init; other inits would read the base
        config.inference_mode = True
        if peft_model is None:
            peft_model = PeftModel(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        loaded = set_peft_model_state_dict(peft_model, load_peft_weights(str(path), device="cpu"), adapter_name=name)
        unexpected: list[str] = list(getattr(loaded, "unexpected_keys", []))
        if unexpected:
            raise RunnerError(f"{path}: weights the base model has no place for: {', '.join(unexpected[:3])}")

    peft_type = "cat" if combination_type == "linear" else combination_type
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(COMBINE_SEED)
        peft_model.add_weighted_adapter(
            adapters=names,
            weights=list(weights),
            adapter_name="default",
            combination_type=peft_type,
            svd_rank=svd_rank,
            density=density,
            majority_sign_method=majority_sign_method,
        )
    config = peft_model.peft_config["default"]
    # The new A and B already hold the scaling (PEFT sets alpha = r); rsLoRA copied from the first input would
    # scale them again by sqrt(r) when the adapter is loaded.
    config.use_rslora = False
    config.base_model_name_or_path = base.source
    config.revision = base.revision or None
    for module_name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            lora_a: Any = module.lora_A["default"]
            r = int(lora_a.weight.shape[0])
            if r != config.r:  # a layer whose result came out of lower rank (an svd over a small layer)
                config.rank_pattern[module_name] = r
                config.alpha_pattern[module_name] = r
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir), selected_adapters=["default"], save_embedding_layers=False)
    _check_coverage(adapter_dirs, out_dir)
    trainable = sum(t.numel() for t in load_peft_weights(str(out_dir), device="cpu").values())
    error = None
    if peft_type in ("cat", "svd"):
        error = _weighted_sum_error(adapter_dirs, weights, out_dir, peft_model.base_model.model)
        if peft_type == "cat" and error > 1e-5:
            raise RunnerError(f"the combined adapter is off the weighted sum of the deltas by {error:.3g} (relative)")
    return {
        "r": config.r,
        "trainable_params": trainable,
        "total_params": base_params + trainable,
        "peft_combination_type": peft_type,
        "weighted_sum_rel_error": error,
    }


def _empty_model(base: ModelRef) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        base.source, revision=base.revision or None, trust_remote_code=base.trust_remote_code
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=base.trust_remote_code, dtype=torch.float32)
    return model.to_empty(device="cpu")


def _check_coverage(adapter_dirs: Sequence[Path], out_dir: Path) -> None:
    """Every module some input adapts must be adapted by the result (PEFT copies the first input's config)."""
    from safetensors import safe_open

    def modules(path: Path) -> set[str]:
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt", device="cpu") as handle:
            found = (re.fullmatch(r"(.*)\.lora_(?:A\.weight|embedding_A)", key) for key in handle.keys())
            return {match.group(1) for match in found if match}

    missing = set().union(*(modules(Path(p)) for p in adapter_dirs)) - modules(out_dir)
    if missing:
        raise RunnerError(f"the combined adapter lost {len(missing)} adapted module(s), e.g. {sorted(missing)[0]}")


def _weighted_sum_error(adapter_dirs: Sequence[Path], weights: Sequence[float], out_dir: Path, model: Any) -> float:
    """max |ΔW_combined - Σ wᵢ ΔWᵢ| / max |Σ wᵢ ΔWᵢ| over all adapted layers."""
    inputs = [LoraFile.read(Path(p)) for p in adapter_dirs]
    combined = LoraFile.read(out_dir)
    worst, largest = 0.0, 0.0
    for module, lm in combined.modules.items():
        transpose = stores_transposed(model, module)
        expected = sum(
            w * f.modules[module].delta(transpose) for w, f in zip(weights, inputs, strict=True) if module in f.modules
        )
        worst = max(worst, float((lm.delta(transpose) - expected).abs().max()))
        largest = max(largest, float(expected.abs().max()))
    return worst / largest if largest else worst
