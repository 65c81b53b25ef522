"""Registering base models and datasets: inspection and validation before anything is saved."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from django.conf import settings
from django.db import transaction

from webapp.catalog.models import BaseModel, Dataset
from workers.datasets import DatasetError, suffix_of, validate_bytes
from workers.modelinfo import inspect_model
from workers.store import ArtifactStore


def store() -> ArtifactStore:
    return ArtifactStore(settings.ARTIFACT_STORE)


def register_base_model(name: str, source: str, revision: str = "", user: Any = None, **extra: Any) -> BaseModel:
    info = inspect_model(source, revision)
    return BaseModel.objects.create(
        name=name,
        source=source,
        revision=revision,
        architecture=info.architecture,
        model_type=info.model_type,
        num_parameters=info.num_parameters,
        max_positions=info.max_positions,
        linear_modules=info.linear_modules,
        has_chat_template=info.has_chat_template,
        created_by=user,
        **extra,
    )


def register_dataset(name: str, filename: str, data: bytes, user: Any = None) -> Dataset:
    """Validate the whole file first; store it under a server-made name only if it is clean."""
    suffix_of(filename)  # refuses unknown types with a message naming the file
    report = validate_bytes(data, filename)
    if not report.ok:
        raise DatasetError(report, filename)
    digest = hashlib.sha256(data).hexdigest()
    safe_stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:60] or "dataset"
    uri = ArtifactStore.uri("datasets", f"{digest[:16]}-{safe_stem}{suffix_of(filename)}")
    with transaction.atomic():
        dataset = Dataset.objects.create(
            name=name,
            uri=uri,
            original_filename=filename[:255],
            format=report.format,
            row_count=report.row_count,
            size_bytes=len(data),
            sha256=digest,
            preview=report.preview,
            created_by=user,
        )
        store().write_bytes(uri, data)
    return dataset
