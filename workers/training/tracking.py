"""The trackers a run also reports to: TensorBoard, MLflow and Weights & Biases (TrainParams.report_to).

transformers' own report_to callbacks log the trainer's figures (loss, learning rate, grad norm, eval results and
what each objective's trainer adds) at each logged step; this module says where they write and opens and closes
each tracker's run around the training, so that a run is one tracker run across its attempts:

- tensorboard: event files in the run's tracking folder (tensorboard/), a new file per attempt; the run page and
  the API serve the folder as a zip.
- mlflow: the server of MLFLOW_TRACKING_URI (its credentials: MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME
  and MLFLOW_TRACKING_PASSWORD), else a file store in the tracking folder (mlruns/). The run holds the trainer's
  arguments and the run's settings as params, per-step metrics, tags (tunedeck.run_id, tunedeck.base_model,
  tunedeck.objective and the run's tracking_tags) and the adapter as an artifact (adapter/).
- wandb: with WANDB_API_KEY, W&B's server (WANDB_BASE_URL, WANDB_ENTITY); without one, offline: its files in the
  tracking folder (wandb/), to `wandb sync` later. WANDB_MODE, where the worker sets it, wins.

Where they write and with which credentials comes from the worker's environment alone, never from the run: the
run names only its trackers, its project (tracking_project), run name and tags. The worker's secrets never reach
the job's log (workers/contract/redaction.py). A later attempt continues the tracker runs of the earlier ones
(their ids are kept in the tracking folder).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workers.contract.jobrunner import Cancelled, Interrupted, RunnerError
from workers.contract.redaction import address_secrets, redact
from workers.contract.reporter import Reporter
from workers.contract.spec import TrainSpec

DEFAULT_PROJECT = "tunedeck"
# The module each tracker's callback imports, and the package that provides it.
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}
INSTALL_HINT = "pip install 'tunedeck[tracking]'"
MLFLOW_RUN_FILE = "mlflow-run-id"
WANDB_RUN_FILE = "wandb-run-id"


def missing_packages(trackers: list[str]) -> dict[str, str]:
    """The trackers this machine cannot report to, each with the package it lacks."""
    return {name: PACKAGES[name] for name in trackers if importlib.util.find_spec(MODULES[name]) is None}


def check_installed(trackers: list[str]) -> None:
    """Refuse a run whose trackers' libraries this worker lacks, naming the packages."""
    missing = missing_packages(trackers)
    if missing:
        needs = ", ".join(f"{name} needs the {package} package" for name, package in missing.items())
        raise RunnerError(f"report_to: {needs}, which this worker does not have ({INSTALL_HINT})")


def run_name(spec: TrainSpec) -> str:
    """The run's name in the trackers: its tracking_run_name, else its Tunedeck name (and number)."""
    if spec.train.tracking_run_name:
        return spec.train.tracking_run_name
    number = f"run {spec.run_id}"
    return f"{spec.run_name} ({number})" if spec.run_name and spec.run_name != number else f"tunedeck-run-{spec.run_id}"


def tags(spec: TrainSpec) -> dict[str, str]:
    """The tags of the run's tracker runs: where it comes from, and the run's own (a key each, set to true)."""
    return {
        "tunedeck.run_id": str(spec.run_id),
        "tunedeck.base_model": spec.base_model.source,
        "tunedeck.objective": spec.train.objective,
        **{tag: "true" for tag in spec.train.tracking_tags},
    }


def wandb_tags(spec: TrainSpec) -> list[str]:
    """W&B's tags are short words (64 characters at most): the run id and objective, and the run's own tags. The
    base model, often a long path, is in the W&B run's config instead."""
    return [f"tunedeck.run_id={spec.run_id}", f"tunedeck.objective={spec.train.objective}", *spec.train.tracking_tags]


def settings_params(spec: TrainSpec) -> dict[str, str]:
    """The run's settings as flat params: tunedeck.<setting> and lora.<setting> (the trainer's own arguments are
    logged beside them by the callback)."""
    params = {f"tunedeck.{k}": v for k, v in dataclasses.asdict(spec.train).items()}
    params.update({f"lora.{k}": v for k, v in dataclasses.asdict(spec.lora).items()})
    params["tunedeck.base_model"] = spec.base_model.source
    return {key: json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            for key, value in params.items() if len(str(value)) <= 250}  # MLflow's limit on a param's value


class Tracking:
    """The run's trackers, open from before its trainer is made until its adapter is saved (see `tracking`)."""

    def __init__(self, spec: TrainSpec, folder: Path, reporter: Reporter, is_main: bool) -> None:
        self.spec, self.folder, self.reporter, self.is_main = spec, folder, reporter, is_main
        self.trackers = spec.train.trackers
        self.worker_mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI", "")  # read before environment() applies
        self.mlflow: Any = None
        self.wandb: Any = None

    @property
    def report_to(self) -> list[str]:
        """The trainer's report_to: the callbacks transformers adds for the run's trackers."""
        return list(self.trackers)

    def environment(self) -> dict[str, str]:
        """What the trackers' callbacks read from the environment while the run trains."""
        env: dict[str, str] = {}
        if "tensorboard" in self.trackers:
            env["TENSORBOARD_LOGGING_DIR"] = str(self.folder / "tensorboard")
        if "mlflow" in self.trackers:
            env["MLFLOW_FLATTEN_PARAMS"] = "TRUE"  # nested arguments as flat params, not dropped as too long
            if not self.worker_mlflow_uri:
                env["MLFLOW_TRACKING_URI"] = (self.folder / "mlruns").as_uri()
                env["MLFLOW_ALLOW_FILE_STORE"] = "true"  # the one store mlflow-skinny has without a server
        if "wandb" in self.trackers:
            env["WANDB_DIR"] = str(self.folder)
            env["WANDB_SILENT"] = "true"
            if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
                env["WANDB_MODE"] = "offline"
        return env

    def start(self) -> None:
        """Open the MLflow and W&B runs (the callbacks then log into them, and leave them open to us)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for line in self.destinations():
            self.reporter.log(line)
        if not self.is_main:
            return
        if "mlflow" in self.trackers:
            self._start_mlflow()
        if "wandb" in self.trackers:
            self._start_wandb()

    def destinations(self) -> list[str]:
        """One log line per tracker: where it writes (an address's credentials left out)."""
        lines = []
        for name in self.trackers:
            if name == "tensorboard":
                lines.append("TensorBoard: event files among the run's tracking files (tensorboard/)")
            elif name == "mlflow":
                uri = self.worker_mlflow_uri
                where = f"the server at {redact(uri, address_secrets(uri))}" if uri else (
                    "a file store among the run's tracking files (mlruns/)")
                lines.append(f"MLflow: run {run_name(self.spec)!r} in experiment {self.project()!r} of {where}")
            elif name == "wandb":
                mode = self.environment().get("WANDB_MODE") or os.environ.get("WANDB_MODE") or "online"
                where = "offline, its files among the run's tracking files (wandb/)" if mode == "offline" else mode
                lines.append(f"W&B: run {run_name(self.spec)!r} in project {self.project()!r}, {where}")
        return lines

    def project(self) -> str:
        own = os.environ.get("WANDB_PROJECT") if "wandb" in self.trackers else None
        return self.spec.train.tracking_project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or own or DEFAULT_PROJECT

    def _kept_id(self, file_name: str) -> str | None:
        path = self.folder / file_name
        return path.read_text(encoding="utf-8").strip() or None if path.exists() else None

    def _start_mlflow(self) -> None:
        import mlflow

        experiment = self.spec.train.tracking_project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        try:
            mlflow.set_experiment(experiment)
            run = self._continue_mlflow(mlflow) or mlflow.start_run(run_name=run_name(self.spec))
            mlflow.set_tags(tags(self.spec))
            mlflow.log_params(settings_params(self.spec))
        except Exception as exc:
            if mlflow.active_run() is not None:
                mlflow.end_run("FAILED")
            raise RunnerError(f"report_to: MLflow could not start the run: {exc}") from exc
        (self.folder / MLFLOW_RUN_FILE).write_text(run.info.run_id, encoding="utf-8")
        self.mlflow = mlflow

    def _continue_mlflow(self, mlflow: Any) -> Any:
        """The MLflow run of an earlier attempt, continued; None when there is none (or its store lost it)."""
        earlier = self._kept_id(MLFLOW_RUN_FILE)
        if not earlier:
            return None
        try:
            return mlflow.start_run(run_id=earlier)
        except Exception as exc:
            self.reporter.log(f"MLflow: the earlier attempts' run {earlier} cannot be continued ({exc}): a new run "
                              "starts", level="warning")
            return None

    def _start_wandb(self) -> None:
        import wandb

        kept = self._kept_id(WANDB_RUN_FILE)
        run_id = kept or secrets.token_hex(6)  # W&B run ids: up to 64 letters and digits
        try:
            wandb.init(
                project=self.project(), name=run_name(self.spec), id=run_id, resume="allow", dir=str(self.folder),
                tags=wandb_tags(self.spec),
                config={"tunedeck": dataclasses.asdict(self.spec.train), "lora": dataclasses.asdict(self.spec.lora),
                        "base_model": self.spec.base_model.source},
                settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
            )
        except Exception as exc:
            raise RunnerError(f"report_to: W&B could not start the run: {exc}") from exc
        (self.folder / WANDB_RUN_FILE).write_text(run_id, encoding="utf-8")
        self.wandb = wandb

    def log_adapter(self, adapter_dir: Path) -> None:
        """The saved adapter as the MLflow run's artifact (adapter/)."""
        if self.mlflow is not None:
            self.mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
            self.reporter.log("MLflow: adapter logged as the run's artifact adapter/")

    def finish(self, state: str) -> None:
        """Close the tracker runs: FINISHED, KILLED (cancelled or handed over) or FAILED."""
        if self.mlflow is not None:
            self.mlflow.end_run(state)
            self.mlflow = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=0 if state == "FINISHED" else 1)
            self.wandb = None


@contextmanager
def tracking(spec: TrainSpec, folder: Path, reporter: Reporter, is_main: bool) -> Iterator[Tracking]:
    """The run's trackers, open while the body trains (and with their environment set); closed however it ends."""
    tracker = Tracking(spec, folder, reporter, is_main)
    if not tracker.trackers:
        yield tracker
        return
    check_installed(tracker.trackers)
    saved = {name: os.environ.get(name) for name in tracker.environment()}
    os.environ.update(tracker.environment())
    state = "FAILED"
    try:
        tracker.start()
        yield tracker
        state = "FINISHED"
    except BaseException as exc:
        state = "KILLED" if isinstance(exc, (Cancelled, Interrupted)) else "FAILED"
        raise
    finally:
        try:
            tracker.finish(state)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
