"""A run's trackers (TrainParams.report_to) on the tiny random Llama: TensorBoard event files, an MLflow file store
and W&B offline files written by the real libraries and read back, and the worker's secrets kept out of the log."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from workers.contract.redaction import REDACTED, secret_values
from workers.contract.reporter import MemoryReporter
from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainParams, TrainSpec, suggest_train_params
from workers.contract.store import ArtifactStore
from workers.training import tracking
from workers.training.demo import write_toy_dataset
from workers.training.objectives import OBJECTIVES, objective_for

STEPS = 4


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    store = ArtifactStore(tmp_path / "store")
    write_toy_dataset(store.path("store://datasets/toy.jsonl"), count=64)
    return store


@pytest.fixture(autouse=True)
def worker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker with no tracker configured: every test sets what it needs."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT",
                 "TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def make_spec(model_dir: Path, **train: object) -> TrainSpec:
    params = dataclasses.replace(suggest_train_params(100_000),
                                 **{"max_steps": STEPS, "logging_steps": 1, "batch_size": 8, **train})
    return TrainSpec(
        run_id=7, attempt=1, base_model=ModelRef(source=str(model_dir)),
        dataset=DatasetRef(uri="store://datasets/toy.jsonl", format="alpaca"), lora=LoraParams(dropout=0.0),
        train=params, output_uri="store://runs/7/attempt-1/adapter", run_name="arithmetic",
        tracking_uri="store://runs/7/tracking",
    )


def test_every_tracker_records_the_run_where_the_worker_says(tiny_model_dir: Path, store: ArtifactStore,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from workers.training.train import run_training

    spec = make_spec(tiny_model_dir, report_to=["tensorboard", "mlflow", "wandb"], tracking_project="arith",
                     tracking_tags=["nightly"], eval_fraction=0.25, eval_steps=2)
    reporter = MemoryReporter()
    result = run_training(spec, reporter, store)
    assert result is not None, reporter.states[-1]
    folder = store.path(spec.tracking_uri)
    logged = {m["step"]: m["loss"] for m in reporter.metrics if "loss" in m}
    assert sorted(logged) == list(range(1, STEPS + 1))

    # TensorBoard: the loss at each logged step, read back with tensorboard's own reader.
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(losses) == sorted(logged)
    assert all(losses[step] == pytest.approx(logged[step], rel=1e-5) for step in logged)
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]

    # MLflow: a file store in the run's tracking folder (no MLFLOW_TRACKING_URI on this worker).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(folder / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("arith")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "arithmetic (run 7)" and run.info.status == "FINISHED"
    assert run.data.tags["tunedeck.run_id"] == "7" and run.data.tags["tunedeck.objective"] == "sft"
    assert run.data.tags["tunedeck.base_model"] == str(tiny_model_dir) and run.data.tags["nightly"] == "true"
    assert run.data.params["tunedeck.max_steps"] == str(STEPS) and run.data.params["lora.r"] == "16"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert {m.step: m.value for m in history} == pytest.approx(logged, rel=1e-5)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts and "adapter/adapter_config.json" in artifacts

    # W&B: offline (no key on this worker), its run log in the run's tracking folder, read back record by record.
    (run_log,) = (folder / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_log)
    (header,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (header.display_name, header.project) == ("arithmetic (run 7)", "arith")
    assert {"nightly", "tunedeck.run_id=7", "tunedeck.objective=sft"} <= set(header.tags)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    wandb_losses = {int(h["train/global_step"]): h["train/loss"] for h in history if "train/loss" in h}
    assert wandb_losses == pytest.approx(logged, rel=1e-5)
    assert [int(h["train/global_step"]) for h in history if "eval/loss" in h] == [2, 4]
    assert any("W&B: run 'arithmetic (run 7)' in project 'arith', offline" in line for line in reporter.logs)


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run log (run-<id>.wandb): a 7-byte file header, then LevelDB's log format (32 KiB
    blocks of chunks, each with a 7-byte header: checksum, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, head = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    position, pending, records = head, b"", []
    while position + head <= len(data):
        if block - position % block < head:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + head])
        if kind == 0:
            break
        chunk = data[position + head:position + head + length]
        position += head + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_a_second_attempt_continues_the_trackers_runs(tiny_model_dir: Path, store: ArtifactStore,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from workers.training.train import run_training

    spec = make_spec(tiny_model_dir, report_to=["mlflow"], max_steps=2)
    assert run_training(spec, MemoryReporter(), store) is not None
    again = dataclasses.replace(spec, attempt=2, output_uri="store://runs/7/attempt-2/adapter")
    assert run_training(again, MemoryReporter(), store) is not None
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(store.path(spec.tracking_uri) / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("tunedeck").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_the_workers_secrets_never_reach_the_log(tiny_model_dir: Path, store: ArtifactStore,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.training.train import run_training

    key, password = "wandb-key-0123456789abcdef0123456789abcdef", "s3cr3t-tracking-password"
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the worker's choice wins over its key
    # A tracking server that is not there: MLflow's error names its address, credentials and all.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://tunedeck:{password}@127.0.0.1:9/")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    reporter = MemoryReporter()
    reporter.log(f"a library that prints its settings: api_key={key}")
    assert run_training(make_spec(tiny_model_dir, report_to=["wandb", "mlflow"]), reporter, store) is None
    state, _, error = reporter.states[-1]
    assert state == "failed" and "MLflow could not start the run" in error
    text = "\n".join([*reporter.logs, error])
    assert key not in text and password not in text
    assert f"api_key={REDACTED}" in text and f"http://tunedeck:{REDACTED}@127.0.0.1:9/" in text


def test_secret_values_come_from_keys_tokens_and_addresses() -> None:
    found = secret_values({
        "WANDB_API_KEY": "abcdef123456", "MLFLOW_TRACKING_URI": "https://me:pa55word99@mlflow.example/?token=tok-987654",
        "HOME": "/home/worker", "WANDB_PROJECT": "arith", "DEBUG_TOKEN": "1",
    })
    assert set(found) == {"abcdef123456", "pa55word99", "tok-987654"}


def test_a_worker_without_a_trackers_library_refuses_the_run_naming_the_package(
        tiny_model_dir: Path, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.training.train import run_training

    monkeypatch.setitem(tracking.MODULES, "wandb", "wandb_absent_from_this_worker")
    reporter = MemoryReporter()
    assert run_training(make_spec(tiny_model_dir, report_to=["tensorboard", "wandb"]), reporter, store) is None
    error = reporter.states[-1][2]
    assert "report_to: wandb needs the wandb package" in error and "tunedeck[tracking]" in error
    assert "tensorboard" not in error.split("(")[0]


@pytest.mark.parametrize(("report_to", "message"), [
    (["tensorboard", "comet"], "comet: not a tracker"),
    (["none", "mlflow"], "give it alone"),
    (["mlflow", "mlflow"], "names a tracker twice"),
])
def test_report_to_names_known_trackers(report_to: list[str], message: str) -> None:
    assert message in TrainParams(report_to=report_to).validate()["report_to"]
    assert "report_to" not in TrainParams(report_to=["none"]).validate()
    assert TrainParams(report_to=["none"]).trackers == []


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objectives_trl_config_reports_to_the_runs_trackers(objective: str, tmp_path: Path) -> None:
    from workers.training.engine import resolve_plan

    grpo = {"graders": {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                        "reference": "{{item.answer}}", "operation": "eq"}, "num_generations": 2,
            "batch_size": 2} if objective == "grpo" else {}
    spec = make_spec(tmp_path, objective=objective, report_to=["tensorboard", "wandb"], **grpo)
    plan = resolve_plan(spec.train, spec.lora, device="cpu", dtype="float32", num_layers=2)
    args = objective_for(objective).config(spec, plan, tmp_path / "trainer", has_eval=False)
    assert args.report_to == ["tensorboard", "wandb"] and args.run_name == "arithmetic (run 7)"
    quiet = objective_for(objective).config(dataclasses.replace(spec, train=dataclasses.replace(
        spec.train, report_to=["none"])), plan, tmp_path / "trainer", has_eval=False)
    assert quiet.report_to == []
