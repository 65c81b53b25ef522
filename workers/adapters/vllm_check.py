"""The vLLM export: the folder vLLM serves, checked by vLLM itself on a worker that has it installed.

An adapter-form export copies the adapter's config and safetensors into `adapter/` (what `vllm serve --enable-lora
--lora-modules NAME=./adapter` takes, as the adapter zip is); a merged export is a merge job's output (checked as a
merge is), which `vllm serve ./folder` takes. Then the check: Tunedeck's generation engine answers the check's
prompts (`check_prompts`) greedily with the adapter on its base; vLLM, in a process of its own
(workers.adapters.vllm_child), loads the folder (the base with the adapter as a LoRA request, or the merged model)
and answers the same prompt tokens greedily, stopping on the same tokens; the job reports how many answers agree
token for token and where the others part. A folder vLLM cannot load fails the job with vLLM's
error; answers that part do not (two engines' kernels round differently in bfloat16) but the log says so.

The control plane places these jobs only on workers whose inventory reports vLLM (`webapp.fleet.placement`).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from workers.adapters.inference import load_for_inference
from workers.adapters.merge.checkpoint import output_dir
from workers.adapters.merge.job import check_cancel, merge_and_check
from workers.adapters.merge.lora import adapter_label, read_adapter_config
from workers.contract.jobrunner import RunnerError
from workers.contract.jobspecs import ExportSpec, GenerationParams, LoadParams, MergeSpec
from workers.contract.reporter import Reporter
from workers.contract.store import ArtifactStore, sha256_of, size_of
from workers.formatting import plural
from workers.generation.engine import encode_prompts, generate_text_grid
from workers.generation.stops import Stops, stop_tokens

REPORT = "vllm-check.json"
# The LoRA ranks vLLM's max_lora_rank takes.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_version() -> str | None:
    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


def max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM takes that holds an adapter of `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise RunnerError(f"the adapter's rank {rank} is above the largest vLLM serves ({VLLM_LORA_RANKS[-1]})")


def export_for_vllm(
    spec: ExportSpec, reporter: Reporter, store: ArtifactStore, adapter_dir: Path, merge: MergeSpec,
    copy_adapter: Any,
) -> dict[str, Any]:
    """Write the folder (`copy_adapter(adapter_dir, out_dir)` for the adapter form, `merge` for the merged one), then
    check it in vLLM. Raises RunnerError where vLLM is missing or cannot load what was written."""
    started = time.monotonic()
    version = vllm_version()
    if version is None:
        raise RunnerError("vLLM is not installed on this worker: a vLLM export runs on a worker that has it "
                          "(pip install vllm), which its inventory then reports")
    reporter.log(f"vLLM {version} on this worker")
    config = read_adapter_config(spec.adapter, adapter_dir)
    rank = max([int(config.get("r") or 8), *[int(r) for r in (config.get("rank_pattern") or {}).values()]])
    out_dir = output_dir(spec.output_uri, store)
    if spec.form == "merged":
        merged = merge_and_check(merge, reporter, store)
        lora_path = None
    else:
        merged = {}
        copy_adapter(adapter_dir, out_dir)
        lora_path = out_dir / "adapter"
        reporter.log(f"Copied {adapter_label(spec.adapter)} into adapter/")
    check_cancel(reporter)

    prompts = spec.prompts_to_check()
    answers, prompt_ids, stops, dtype = tunedeck_answers(spec, prompts, store, reporter)
    check_cancel(reporter)
    reporter.log(f"vLLM: loading {'the merged folder' if lora_path is None else spec.base_model.source + ' with the adapter'} "
                 f"in {dtype}")
    lora_rank = max_lora_rank(rank)
    served = vllm_answers(spec, out_dir, lora_path, lora_rank, prompt_ids, stops, dtype, reporter)
    rows = [compare_answers(prompt, ours, theirs, stops) for prompt, ours, theirs in zip(prompts, answers, served, strict=True)]
    agree = sum(row["agree"] for row in rows)
    line = f"vLLM answered {plural(len(rows), 'check prompt')}: {agree} of {len(rows)} equal Tunedeck's token for token"
    reporter.log(line, level="info" if agree == len(rows) else "warning")
    for row in rows:
        if not row["agree"]:
            reporter.log(f"  {row['prompt'][:60]!r} parts at token {row['first_difference']}: "
                         f"vLLM {row['vllm'][:80]!r}, Tunedeck {row['tunedeck'][:80]!r}")
    report = {"vllm_version": version, "form": spec.form, "dtype": dtype, "max_new_tokens": spec.max_new_tokens,
              "agree": agree, "total": len(rows), "answers": rows}
    (out_dir / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "README.md").write_text(readme(spec, version, agree, len(rows), lora_rank))
    return {
        **merged,
        "output_uri": spec.output_uri,
        "target": spec.target,
        "form": spec.form,
        "name": spec.name,
        "vllm": {key: report[key] for key in ("vllm_version", "dtype", "agree", "total")},
        "stops": [stop.text for stop in stops.stops],
        "size_bytes": size_of(out_dir),
        "sha256": sha256_of(out_dir),
        "runtime_s": round(time.monotonic() - started, 2),
    }


def tunedeck_answers(
    spec: ExportSpec, prompts: list[str], store: ArtifactStore, reporter: Reporter
) -> tuple[list[list[int]], list[list[int]], Stops, str]:
    """The adapter's greedy answers by Tunedeck's engine (the base unquantized in the device's compute dtype, as
    vLLM loads it), with the prompts' token ids, the stops, and the dtype. The model is freed before returning."""
    import torch

    model, tokenizer, device = load_for_inference(spec.base_model, [spec.adapter], LoadParams(), store, reporter)
    try:
        stops = stop_tokens(tokenizer, model)
        params = GenerationParams(max_new_tokens=spec.max_new_tokens, temperature=0.0)
        _, ids = generate_text_grid(model, tokenizer, prompts, [spec.adapter.key], params, stops=stops, batched=False)
        prompt_ids = encode_prompts(tokenizer, prompts, chat_template=True)
        answers = [ids[(row, spec.adapter.key)] for row in range(len(prompts))]
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    reporter.log(f"Tunedeck answered {plural(len(prompts), 'check prompt')} ({device.dtype_name}, greedy)")
    return answers, prompt_ids, stops, device.dtype_name


def vllm_answers(
    spec: ExportSpec, out_dir: Path, lora_path: Path | None, lora_rank: int, prompt_ids: list[list[int]],
    stops: Stops, dtype: str, reporter: Reporter,
) -> list[list[int]]:
    """vLLM's greedy answers to the same prompt tokens, stopping on the same tokens, from a process of its own
    (workers.adapters.vllm_child: vLLM wants most of the GPU free at its start, and its exit gives it all back).
    A cancel stops it; its failure is the job's, in vLLM's words."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what Tunedeck's own model left in this process's cache goes back first
    longest = max(len(ids) for ids in prompt_ids) + spec.max_new_tokens
    options: dict[str, Any] = {"dtype": dtype, "seed": 0, "max_model_len": longest + 8,
                               "trust_remote_code": spec.base_model.trust_remote_code}
    if lora_path is None:
        model = str(out_dir)
    else:
        model = spec.base_model.source
        options.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
        if spec.base_model.revision:
            options["revision"] = spec.base_model.revision
    request = {"model": model, "options": options, "prompts": prompt_ids, "max_tokens": spec.max_new_tokens,
               "stop_token_ids": list(stops.token_ids),
               "lora": None if lora_path is None else {"name": spec.name, "path": str(lora_path)}}
    with tempfile.TemporaryDirectory(prefix="vllm-check-") as folder:
        request_path, answers_path, log_path = (Path(folder) / name for name in ("request.json", "answers.json", "log"))
        request_path.write_text(json.dumps(request))
        with log_path.open("wb") as log:
            child = subprocess.Popen([sys.executable, "-m", "workers.adapters.vllm_child", str(request_path),
                                      str(answers_path)], stdout=log, stderr=subprocess.STDOUT)
            try:
                while child.poll() is None:
                    check_cancel(reporter)
                    time.sleep(0.5)
            finally:
                if child.poll() is None:  # cancelled, or this process interrupted: vLLM goes with it
                    child.kill()
                    child.wait()
        if child.returncode != 0 or not answers_path.exists():
            lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
            raise RunnerError(lines[-1][:2000] if lines else f"vLLM's process ended with status {child.returncode}")
        return [list(map(int, ids)) for ids in json.loads(answers_path.read_text())]


def compare_answers(prompt: str, our_ids: list[int], their_ids: list[int], stops: Stops) -> dict[str, Any]:
    """One check prompt's row of the report: both answers' text, whether their own tokens (the stop left out)
    agree, and at which token they part."""
    ours, theirs = our_ids[: stops.answer_tokens(our_ids)], their_ids[: stops.answer_tokens(their_ids)]
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
    agree = ours == theirs
    return {"prompt": prompt, "tunedeck": stops.text(our_ids), "vllm": stops.text(their_ids), "agree": agree,
            "first_difference": None if agree else first}


def readme(spec: ExportSpec, version: str, agree: int, total: int, lora_rank: int) -> str:
    checked = f"Checked with vLLM {version}: {agree} of {total} greedy answers equal Tunedeck's token for token ({REPORT})."
    if spec.form == "merged":
        serve = "vllm serve ./  # from this folder"
    else:
        serve = (f"vllm serve {spec.base_model.source} --enable-lora --max-lora-rank {lora_rank} \\\n"
                 f"    --lora-modules {spec.name}=./adapter")
    return f"# {spec.name}\n\n{checked}\n\n```\n{serve}\n```\n"
