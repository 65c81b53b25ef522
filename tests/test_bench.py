"""The throughput benchmark runs end to end on the CPU (`--tiny`); its speed is not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
