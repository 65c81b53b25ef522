"""The export job: a folder that Ollama imports with `ollama create <name> -f Modelfile`, or one that vLLM serves,
checked in vLLM (workers.adapters.vllm_check).

`run_export(spec, reporter, store)` has the merge runner's contract. The merged form is a merge job's output
(workers.adapters.merge.job, checked as a merge is) with a Modelfile that says `FROM .`; the adapter form copies
the adapter's safetensors into `adapter/`, under a Modelfile that names the base (`FROM`) and the adapter
(`ADAPTER ./adapter`). The chat template is recognised and written as Ollama's Go template (workers.adapters.ollama)
before anything is written, so a base whose template has no Ollama counterpart fails at once. No GGUF file is made:
Ollama converts safetensors itself as it imports them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from workers.adapters import ollama, vllm_check
from workers.adapters.merge.checkpoint import EXPECTED_ERRORS, output_dir
from workers.adapters.merge.job import check_cancel, merge_and_check
from workers.adapters.merge.lora import adapter_folder, adapter_label
from workers.contract.jobrunner import RunnerError, run_reported
from workers.contract.jobspecs import ExportSpec, MergeSpec
from workers.contract.reporter import Reporter
from workers.contract.store import ArtifactStore, sha256_of, size_of
from workers.training.modelinfo import check_source

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER_SUBFOLDER = "adapter"
ADAPTER_MODEL_TYPES = ("llama", "mistral", "mixtral", "gemma", "gemma2")  # config.model_type of ADAPTER_BASES


def run_export(spec: ExportSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any] | None:
    """Write spec.adapter on spec.base_model as an Ollama import folder (or a checked vLLM folder) at spec.output_uri."""
    return run_reported(reporter, lambda: _export(spec, reporter, store), expected=(*EXPECTED_ERRORS, ollama.UnknownTemplate))


def _export(spec: ExportSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any]:
    started = time.monotonic()
    problems = spec.validate()
    if problems:
        raise RunnerError("; ".join(f"{name}: {message}" for name, message in problems.items()))
    check_source(spec.base_model.source)
    adapter_dir = adapter_folder(spec.adapter, store)
    if spec.target == "vllm":
        return vllm_check.export_for_vllm(spec, reporter, store, adapter_dir, _merge_spec(spec), copy_adapter)
    tokenizer = load_tokenizer(spec, adapter_dir)
    detected = ollama.detect_family(tokenizer)
    log_template(detected, reporter)
    check_cancel(reporter)

    out_dir = output_dir(spec.output_uri, store)
    if spec.form == "merged":
        merged = merge_and_check(_merge_spec(spec), reporter, store)
        source, adapter = ".", None
    else:
        merged = {}
        copy_adapter(adapter_dir, out_dir)
        source, adapter = spec.base_name or spec.base_model.source, f"./{ADAPTER_SUBFOLDER}"
        reporter.log(f"Copied {adapter_label(spec.adapter)} into {ADAPTER_SUBFOLDER}/ (FROM {source})")
        warn_unsupported_adapter_base(spec, reporter)
    family = detected.family if detected else None
    stops = ollama.stop_strings(tokenizer, load_generation_config(spec), family)
    reporter.log("Stops: " + (", ".join(repr(s) for s in stops) or "none"))
    system = spec.system or _template_system(tokenizer, family, reporter)
    text = ollama.modelfile(source, adapter, family, stops, system, spec.temperature, spec.top_p)
    (out_dir / "Modelfile").write_text(text)
    description = (
        f"{adapter_label(spec.adapter)} on {spec.base_model.source}, "
        + ("merged into the base's weights." if spec.form == "merged" else "as a LoRA adapter beside its base.")
    )
    (out_dir / "README.md").write_text(
        ollama.readme(spec.name, spec.form, source, family, spec.quantize, description)
    )
    reporter.log(f"Wrote Modelfile and README.md: ollama create {spec.name} -f Modelfile")
    return {
        **merged,
        "output_uri": spec.output_uri,
        "target": spec.target,
        "form": spec.form,
        "name": spec.name,
        "family": family.name if family else "",
        "stops": stops,
        "size_bytes": size_of(out_dir),
        "sha256": sha256_of(out_dir),
        "runtime_s": round(time.monotonic() - started, 2),
    }


def _template_system(tokenizer: Any, family: ollama.Family | None, reporter: Reporter) -> str:
    """The base template's own default system prompt, as the Modelfile's SYSTEM (Ollama's template writes none)."""
    default = ollama.default_system(tokenizer, family) if family else None
    if not default:
        return ""
    if '"""' in default:
        reporter.log("The base's template writes a default system prompt that a Modelfile cannot quote", level="warning")
        return ""
    reporter.log(f"SYSTEM: the default system prompt the base's template writes, {default[:80]!r}")
    return default


def warn_unsupported_adapter_base(spec: ExportSpec, reporter: Reporter) -> None:
    """Ollama applies safetensors adapters to a few architectures only: say so where the base is of another."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec.base_model.source, revision=spec.base_model.revision or None,
                                            trust_remote_code=spec.base_model.trust_remote_code)
    except Exception:  # the hub client raises many kinds: the README says which bases Ollama takes
        return
    if config.model_type not in ADAPTER_MODEL_TYPES:
        reporter.log(
            f"Ollama takes safetensors adapters for {ollama.ADAPTER_BASES} bases; this base is a {config.model_type}: "
            "export the merged form instead if `ollama create` refuses the adapter",
            level="warning",
        )


def _merge_spec(spec: ExportSpec) -> MergeSpec:
    return MergeSpec(
        job_id=spec.job_id, attempt=spec.attempt, base_model=spec.base_model, adapter=spec.adapter,
        output_uri=spec.output_uri, dtype=spec.dtype, max_shard_size=spec.max_shard_size,
    )


def load_tokenizer(spec: ExportSpec, adapter_dir: Path) -> Any:
    """The tokenizer the model is used with: the adapter's own if it has one (as a merge writes), else the base's."""
    from transformers import AutoTokenizer

    has_tokenizer = any((adapter_dir / name).exists() for name in ("tokenizer_config.json", "tokenizer.json"))
    source = str(adapter_dir) if has_tokenizer else spec.base_model.source
    try:
        return AutoTokenizer.from_pretrained(
            source, revision=None if has_tokenizer else (spec.base_model.revision or None),
            trust_remote_code=spec.base_model.trust_remote_code,
        )
    except Exception as exc:  # the hub client and the tokenizer classes raise many kinds
        raise RunnerError(f"the tokenizer of {source!r} could not be loaded: {exc}") from exc


def load_generation_config(spec: ExportSpec) -> Any:
    """The base's generation config (its EOS ids), or None where it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(spec.base_model.source, revision=spec.base_model.revision or "main")
    except Exception:  # no generation_config.json: the tokenizer's EOS alone
        return None


def log_template(detected: ollama.Detected | None, reporter: Reporter) -> None:
    if detected is None:
        reporter.log("The base has no chat template: the Modelfile sets no TEMPLATE (plain completion)")
        return
    reporter.log(f"Chat template: the {detected.family.name} family; the Modelfile carries Ollama's {detected.family.name} template")
    if len(detected.probe) < len(ollama.PROBE):
        reporter.log("The base's template refuses a system message; Ollama's puts one where the family does")
    mismatch = detected.mismatch()
    if mismatch:
        reporter.log(f"The base's template and Ollama's render a probe conversation differently, {mismatch}", level="warning")


def copy_adapter(adapter_dir: Path, out_dir: Path) -> None:
    """The adapter's config and safetensors into out_dir/adapter (a fresh folder)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    target = out_dir / ADAPTER_SUBFOLDER
    target.mkdir(parents=True)
    for name in ADAPTER_FILES:
        if not (adapter_dir / name).is_file():
            raise RunnerError(f"the adapter folder has no {name}: Ollama imports safetensors adapters only")
        shutil.copy2(adapter_dir / name, target / name)
