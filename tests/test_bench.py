"""The throughput benchmark runs end to end on the CPU (`--tiny`); its speed is not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_train_throughput_tiny_runs_every_recipe(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--tiny", "--steps", "1", "--warmup", "1",
         "--recipes", "a,b,c,d-throughput,d-memory@rows=1+accum=2", "--model-dir", str(tmp_path / "models"),
         "--out", str(tmp_path / "out"), "--json-out", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=600,
    )
    results = {r["recipe"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"a", "b", "c", "d-throughput", "d-memory@rows=1+accum=2"}
    for name, result in results.items():
        assert not result["error"], (name, result["error"])
        assert result["steps"] == 1 and result["real_tokens_per_s"] > 0
        assert 0 < result["real_share"] <= 1
    assert results["a"]["real_share"] < results["c"]["real_share"]  # padding to the row length wastes tokens
    assert "micro-batch 1 x 2" in results["d-memory@rows=1+accum=2"]["plan"]


def test_a_profiled_step_stays_out_of_the_figures_and_d_switches_apply(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--tiny", "--steps", "1", "--warmup", "1",
         "--recipes", "c@profile=1,d-throughput@fused=off+profile=1,d-throughput@pass_rows=2+recompute=1",
         "--model-dir", str(tmp_path / "models"), "--out", str(tmp_path / "out"), "--json-out", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=600,
    )
    results = {r["recipe"]: r for r in json.loads(out.read_text())["results"]}
    assert all(r["steps"] == 1 and not r["error"] for r in results.values()), results  # the profiled step is extra
    assert (tmp_path / "out" / "trace-c_profile-1.json").exists()
    assert "LoRA fused" not in results["d-throughput@fused=off+profile=1"]["plan"]
    forced = results["d-throughput@pass_rows=2+recompute=1"]
    assert "LoRA fused" in forced["plan"] and "micro-batch 2 x 8" in forced["plan"] and "1/2 layers" in forced["plan"]


def test_trace_breakdown_counts_copies_hidden_behind_another_stream_s_kernels(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import trace_breakdown

    def event(cat: str, name: str, ts: float, dur: float, stream: int) -> dict:  # type: ignore[type-arg]
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}

    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [
        event("kernel", "nvjet_tst_128x256_gemm", 0, 100, 7),
        event("kernel", "kDequantizeBlockwise", 100, 20, 7),
        event("kernel", "_rms_norm_forward_kernel", 150, 50, 7),
        event("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 80, 40, 20),  # under the GEMM, then the dequantize
        event("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 130, 10, 20),  # in the gap: not hidden
        event("kernel", "nvjet_tst_128x256_gemm", 130, 5, 20),  # the copies' own stream does not hide them
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},
    ]}))
    info = trace_breakdown(trace)
    assert info["kinds_ms"]["GEMM"] == pytest.approx(0.105)
    assert info["kinds_ms"]["dequantize (bitsandbytes)"] == pytest.approx(0.02)
    assert info["kinds_ms"]["RMSNorm / RoPE / SwiGLU"] == pytest.approx(0.05)
    assert info["transfer_ms"] == pytest.approx(0.05)
    assert info["transfer_hidden_share"] == pytest.approx(40 / 50)  # all of the DtoH, none of the HtoD
    assert info["wall_ms"] == pytest.approx(0.2) and info["busy_ms"] == pytest.approx(0.18)  # idle 120..130, 140..150


def test_compare_adapters_tiny_prints_every_mode_and_same_answers() -> None:
    run = subprocess.run(
        [sys.executable, "bench/compare_adapters.py", "--tiny", "--k", "2", "--prompts", "8", "--new-tokens", "4"],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
    )
    row = next(line for line in run.stdout.splitlines() if line.startswith("| 2 |"))
    assert row.rstrip().endswith("| 100% |"), row  # float32: batched and loop give the same greedy answers
    assert "Goal at k = 2" in run.stdout


def test_chat_latency_tiny_answers_every_turn_with_every_column() -> None:
    run = subprocess.run(
        [sys.executable, "bench/chat_latency.py", "--tiny", "--adapters", "2", "--turns", "3", "--new-tokens", "8"],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
    )
    assert "3 columns (__base__, a0, a1)" in run.stdout
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "3"]
    # Each turn's prompt holds the conversation so far: it grows from turn to turn.
    prompts = [int(row.split("|")[2].replace(",", "")) for row in rows]
    assert prompts == sorted(prompts) and len(set(prompts)) == 3
    assert "time to first token after the first message" in run.stdout


def test_merge_memory_tiny_merges_both_ways_and_checks() -> None:
    run = subprocess.run(
        [sys.executable, "bench/merge_memory.py", "--tiny"], cwd=ROOT, check=True, capture_output=True, text=True,
        timeout=600,
    )
    assert "| streamed |" in run.stdout and "| peft |" in run.stdout and "streamed / PEFT" in run.stdout


def test_multi_gpu_tiny_trains_through_the_launcher_on_one_and_two_processes(tmp_path: Path) -> None:
    """The 70B path on a tiny shape: written layer by layer straight into 4-bit, FSDP over 2 CPU processes."""
    out = tmp_path / "multi.json"
    subprocess.run(
        [sys.executable, "bench/multi_gpu.py", "--shape", "tiny", "--device", "cpu", "--prequantize", "--steps", "2",
         "--warmup", "1", "--model-dir", str(tmp_path / "models"), "--json-out", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=600,
    )
    report = json.loads(out.read_text())
    one, two = report["results"]
    assert not one["error"] and not two["error"], (one, two)
    assert one["steps"] == two["steps"] == 3 and one["tokens_per_s"] > 0 and two["tokens_per_s"] > 0
    assert "micro-batch 4 x 2" in one["plan"] and "micro-batch 4 x 1" in two["plan"]  # the same global batch
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-3)
    assert report["scaling_efficiency"] > 0
    assert list((tmp_path / "models" / "llama-tiny-nf4").glob("*.safetensors"))


def test_hostile_uploads_tiny_runs_against_a_live_server() -> None:
    run = subprocess.run([sys.executable, "bench/hostile_uploads.py", "--tiny"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=600)
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 8, run.stdout  # the header, seven uploads, the list
    assert "| JSON nested 200,000 deep |" in run.stdout and "nested deeper than 32 levels" in run.stdout


def test_preference_throughput_tiny_runs_trl_and_tunedeck(tmp_path: Path) -> None:
    out = tmp_path / "dpo.json"
    run = subprocess.run(
        [sys.executable, "bench/preference_throughput.py", "--tiny", "--steps", "1", "--warmup", "1",
         "--recipes", "trl,tunedeck,tunedeck@batching=padding_free", "--model-dir", str(tmp_path / "models"),
         "--out", str(tmp_path / "out"), "--json-out", str(out)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
    )
    results = {r["recipe"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"trl", "tunedeck", "tunedeck@batching=padding_free"}
    for name, result in results.items():
        assert not result["error"], (name, result["error"])
        assert result["steps"] == 1 and result["real_tokens_per_s"] > 0
    assert results["trl"]["real_share"] < 1  # the pairs' lengths differ: padded batches
    unpadded = results["tunedeck@batching=padding_free"]
    assert "batching padding_free" in unpadded["plan"] and unpadded["real_share"] == 1
    assert "tunedeck / trl:" in run.stdout


def test_grpo_step_tiny_splits_each_recipes_step(tmp_path: Path) -> None:
    out = tmp_path / "grpo.json"
    subprocess.run(
        [sys.executable, "bench/grpo_step.py", "--tiny", "--model-dir", str(tmp_path / "models"),
         "--out", str(tmp_path / "out"), "--json-out", str(out)],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=600,
    )
    results = {r["recipe"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"trl", "tunedeck"}
    for name, result in results.items():
        assert "error" not in result, (name, result)
        assert result["steps"] == 1 and result["generation_s"] > 0 and result["generated_tok_per_s"] > 0
        assert result["generation_s"] + result["rewards_s"] <= result["step_s"]


def test_page_speed_measures_the_experiments_pages_on_sqlite(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "bench/page_speed.py", "--compare-only", "--database-url",
         f"sqlite:///{tmp_path / 'bench.sqlite3'}", "--compare-events", "5000", "--requests", "2", "--warmup", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TUNEDECK_VAR": str(tmp_path / "var")},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for page in ("compare page (10 runs x 5k events)", "compare curves JSON", "sweep page (100 trials)"):
        assert page in run.stdout, run.stdout


def test_the_unsloth_peer_trains_c_s_documents_padding_free_and_says_where_it_cannot_run(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import UNSLOTH_ROWS, collate_flat, first_fit_pack, synthetic_examples, unsloth_rows

    examples = synthetic_examples(300, 512, 256)
    packed, rows = first_fit_pack(examples, 256), unsloth_rows(examples, 256)
    assert len(rows) == len(packed) // UNSLOTH_ROWS
    assert rows[1]["docs"] == [doc for row in packed[UNSLOTH_ROWS : 2 * UNSLOTH_ROWS] for doc in row]  # (c)'s step 2
    batch = collate_flat([rows[1]])
    docs = rows[1]["docs"]
    assert batch["input_ids"].shape == (1, sum(len(d) for d in docs))
    starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0]
    assert len(starts) == len(docs) and [batch["labels"][0, i].item() for i in starts] == [-100] * len(docs)
    # The tokens that carry a label are (c)'s: every document's but its first.
    assert int((batch["labels"] != -100).sum()) == sum(len(d) - 1 for d in docs)

    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--tiny", "--steps", "1", "--warmup", "1", "--recipes", "c",
         "--peer-unsloth", "--model-dir", str(tmp_path / "models"), "--out", str(tmp_path / "out"),
         "--json-out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = {r["recipe"]: r for r in json.loads(out.read_text())["results"]}
    assert not results["c"]["error"] and results["c"]["steps"] == 1
    import importlib.util

    import torch

    if importlib.util.find_spec("unsloth") is None or not torch.cuda.is_available():
        # Not installed, or no GPU (it refuses a CPU-only machine): the row says why, the other recipes' rows stand.
        assert results["unsloth"]["error"].startswith("Unsloth cannot run here"), results["unsloth"]
        assert "| unsloth | failed: Unsloth cannot run here" in run.stdout
    else:
        assert not results["unsloth"]["error"] and results["unsloth"]["steps"] == 1
