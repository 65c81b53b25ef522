"""What the client commands print for people: figures, counts, sizes and times by the pages' rules
(workers/formatting.py). --json output stays the API's raw values."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tunedeck_cli import adapters, catalog, runs
from tunedeck_cli.output import details, emit_json, table

CREATED = "2026-12-05T07:10:54.003Z"
RAW = ("1.955e-05", "0.000019550323486328125", "301000", "113000", "T07:10", "07:10Z")


def printed(capsys: pytest.CaptureFixture[str], call: Any, *args: Any, **kwargs: Any) -> str:
    call(*args, **kwargs)
    out = capsys.readouterr().out
    for raw in RAW:
        assert raw not in out, (raw, out)
    return out


def test_the_list_tables_write_figures_counts_sizes_and_times_by_one_rule(capsys: pytest.CaptureFixture[str]) -> None:
    run = {"id": 7, "name": "r", "state": "running", "step": 1200, "total_steps": 4000,
           "last_loss": 0.000019550323486328125, "created_at": CREATED}
    out = printed(capsys, table, [run], runs.RUN_COLUMNS)
    assert "1,200/4,000" in out and "1.96e-5" in out and "2026-12-05 07:10 UTC" in out
    dataset = {"id": 1, "name": "d", "format": "text", "row_count": 113_000, "size_bytes": 301_000, "created_at": CREATED}
    out = printed(capsys, table, [dataset], catalog.DATASET_COLUMNS)
    assert "113,000" in out and "293.9 KiB" in out and "SIZE" in out
    model = {"id": 1, "name": "m", "source": "s", "architecture": "LlamaForCausalLM", "num_parameters": 8_030_261_248}
    assert "8.03B" in printed(capsys, table, [model], catalog.MODEL_COLUMNS)
    adapter = {"id": 3, "name": "a", "origin": "run", "final_loss": 0.25, "size_bytes": 301_000, "created_at": CREATED}
    out = printed(capsys, table, [adapter], adapters.ADAPTER_COLUMNS)
    assert "0.25" in out and "293.9 KiB" in out and "2026-12-05 07:10 UTC" in out


def test_a_show_block_and_a_metric_line_use_the_same_rules(capsys: pytest.CaptureFixture[str]) -> None:
    out = printed(capsys, details, {"id": 3, "size_bytes": 301_000, "final_loss": 0.000019550323486328125,
                                    "created_at": CREATED, "hyperparameters": {"learning_rate": 2e-4, "max_steps": 4000}})
    assert "293.9 KiB" in out and "1.96e-5" in out and "2026-12-05 07:10 UTC" in out and "2e-4" in out
    line = runs.format_event({"created_at": CREATED, "kind": "metric", "data": {"step": 10, "loss": 1.955e-05,
                                                                               "tokens_per_s": 19660.4}})
    assert line == "07:10:54 [metric] step=10 loss=1.96e-5 tokens_per_s=19,660"


def test_json_output_keeps_the_raw_values(capsys: pytest.CaptureFixture[str]) -> None:
    emit_json({"last_loss": 0.000019550323486328125, "size_bytes": 301_000, "created_at": CREATED})
    out = capsys.readouterr().out
    assert "1.9550323486328125e-05" in out and "301000" in out and CREATED in out


def test_the_client_commands_import_no_django() -> None:
    code = "import sys, tunedeck_cli.commands; print('django' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_tunedeck_command_loads_what_up_needs_only_for_up() -> None:
    code = ("import sys, webapp.cli; webapp.cli.build_parser(); "
            "print(sorted({'django', 'psutil', 'webapp.embedded'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
