"""A run's trackers' files (workers/training/tracking.py writes them): TensorBoard event files, offline W&B runs and
a local MLflow store, in the run's tracking folder of the artifact store, served as one zip by the run page and
the API."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings

from webapp.training.models import TrainingRun
from workers.contract.store import ArtifactStore

# Each tracker's sub-folder, where the worker writes locally (MLflow and W&B do only without a server).
FOLDERS = {"tensorboard": "tensorboard", "mlflow": "mlruns", "wandb": "wandb"}


def tracking_folder(run: TrainingRun) -> Path:
    return ArtifactStore(settings.ARTIFACT_STORE).path(run.tracking_uri())


def trackers_with_files(run: TrainingRun) -> list[str]:
    """The trackers that wrote files of this run so far (a few stat calls: the status panel asks at each update)."""
    folder = tracking_folder(run)
    return [name for name, sub in FOLDERS.items() if (folder / sub).is_dir()]
