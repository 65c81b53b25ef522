"""No code from the Hub runs in a job unless an admin allows it (TUNEDECK_ALLOW_HUB_KERNELS).

bitsandbytes asks the Hub for `kernels-community/quantization-bitsandbytes` when it is imported on a CPU with
AVX512-BF16, and transformers kernelizes every model it loads with kernels from the Hub by default. Each test
imports the runner's quantization path and loads a model in 4-bit in a fresh process, as a job does, with the
Hub reachable (a local fake that records every request) and HF_HUB_OFFLINE unset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fakehub import FakeHub

ROOT = Path(__file__).resolve().parents[2]
KERNEL_REPO = "kernels-community"
NOTICE = "gemm_4bit_forward"

# A job's view: the ML libraries' warnings go to the job's log (run_reported), imports happen inside the job.
JOB = """
import json
import sys
from workers.contract.jobrunner import run_reported
from workers.contract.reporter import MemoryReporter

reporter = MemoryReporter()

def body():
    import torch
    from bitsandbytes.functional import has_avx512bf16
    from transformers import AutoModelForCausalLM
    from workers.training.peftsetup import quantization_config
    from workers.contract.spec import LoraParams
    from workers.training.train import run_training  # noqa: F401  (the runner's own imports: peft, trl, bitsandbytes)

    config = quantization_config(LoraParams(quantization="4bit"), torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=config)
    assert model.model.layers[0].self_attn.q_proj.weight.__class__.__name__ == "Params4bit"
    return {"asks_for_the_kernel": has_avx512bf16()}

result = run_reported(reporter, body)
print("RESULT " + json.dumps({"result": result, "job_log": reporter.logs}))
"""


def run_job(hub: FakeHub, tmp_path: Path, model: Path, **env: str) -> tuple[dict[str, Any], str]:
    """The job's result and log, and what the process printed besides."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TUNEDECK_ALLOW_HUB_KERNELS")}
    clean.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), **env)
    done = subprocess.run([sys.executable, "-c", JOB, str(model)], cwd=ROOT, env=clean, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), done.stdout.replace(line, "") + done.stderr


def kernel_requests(hub: FakeHub) -> list[str]:
    return [f"{r.method} {r.path}" for r in hub.requests if KERNEL_REPO in r.path]


def test_a_job_fetches_no_kernel_from_the_hub_and_its_log_says_nothing_of_it(tmp_path: Path,
                                                                            tiny_model_dir: Path) -> None:
    with FakeHub("hf_unused") as hub:
        job, printed = run_job(hub, tmp_path, tiny_model_dir)
    assert job["result"] is not None, job["job_log"]
    assert [f"{r.method} {r.path}" for r in hub.requests] == []  # nothing at all asked of the Hub
    assert not [line for line in job["job_log"] if NOTICE in line or KERNEL_REPO in line]
    assert NOTICE not in printed and KERNEL_REPO not in printed


def test_an_admin_may_allow_hub_kernels(tmp_path: Path, tiny_model_dir: Path) -> None:
    with FakeHub("hf_unused") as hub:
        job, _printed = run_job(hub, tmp_path, tiny_model_dir, TUNEDECK_ALLOW_HUB_KERNELS="1")
    if not job["result"]["asks_for_the_kernel"]:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes asks the Hub for no kernel here")
    assert kernel_requests(hub), "with the setting on, bitsandbytes' request must reach the Hub"
