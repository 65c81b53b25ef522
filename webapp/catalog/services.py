"""Registering base models and datasets: inspection and validation before anything is saved."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from webapp.catalog.models import BaseModel, Dataset
from workers.datasets import DatasetError, load_trl_rows, suffix_of, validate_bytes
from workers.estimate import ModelShape
from workers.modelinfo import ModelInfo, ModelNotFound, inspect_model, local_model_folder, looks_like_path
from workers.preview import Example, LengthStats, length_stats, prepare_examples
from workers.store import ArtifactStore


def store() -> ArtifactStore:
    return ArtifactStore(settings.ARTIFACT_STORE)


def local_model_roots() -> list[Path]:
    """Where base models given by local path may live: the artifact store's models folder, which holds the
    models Tunedeck builds itself (the demo model), and the folders of TUNEDECK_MODEL_ROOTS."""
    return [Path(settings.ARTIFACT_STORE) / "models", *settings.MODEL_ROOTS]


def register_base_model(name: str, source: str, revision: str = "", user: Any = None, **extra: Any) -> BaseModel:
    """Every way in (page, REST, OpenAI, CLI, demo) registers through here, inspected by inspect_source first."""
    source = source.strip()
    info = inspect_source(source, revision)
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


# --- Inspection, estimates and previews for the catalog pages -------------------------------------------

HUB_TIMEOUT_S = 5.0
STATS_SAMPLE_ROWS = 2000


def inspect_source(source: str, revision: str = "") -> ModelInfo:
    """inspect_model with quick, readable failures: a bad hub id or an unreachable hub is told in one
    line at once, instead of after transformers' retries (half a minute offline). A local path is read only
    under the model roots (local_model_roots)."""
    source = source.strip()
    if looks_like_path(source):
        local_model_folder(source, local_model_roots())
    else:
        _check_hub_id(source, revision)
    try:
        return inspect_model(source, revision)
    except ModelNotFound:
        raise
    except (OSError, ValueError, ImportError, KeyError) as exc:  # a config transformers cannot build a model from
        raise ModelNotFound(f"cannot inspect {source!r}: {exc}") from exc


def _check_hub_id(source: str, revision: str) -> None:
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise ModelNotFound(f"{source!r} is neither a hub id (owner/name) nor an absolute path to a local model "
                            f"folder") from None
    try:
        model_info(source, revision=revision or None, timeout=HUB_TIMEOUT_S)
    except RevisionNotFoundError:
        raise ModelNotFound(f"the hub model {source!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"no model {source!r} on the Hugging Face hub (or it is private)") from None
    except Exception as exc:  # network errors come from several libraries (httpx, ssl, os)
        if isinstance(try_to_load_from_cache(source, "config.json", revision=revision or None), str):
            return  # cached earlier: transformers can read it offline
        raise ModelNotFound(f"cannot reach the Hugging Face hub to look up {source!r}: {exc}") from None


def validate_repo_id(source: str) -> None:
    from huggingface_hub.utils import validate_repo_id as validate

    if source.count("/") > 1 or not source:
        from huggingface_hub.errors import HFValidationError

        raise HFValidationError(source)
    validate(source)


@functools.lru_cache(maxsize=32)
def _model_shape(source: str, revision: str) -> ModelShape:
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    try:  # registered hub models have their config in the local cache
        config = AutoConfig.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError:
        config = AutoConfig.from_pretrained(source, **kwargs)
    return ModelShape.from_config(config)


def model_shape(base: BaseModel) -> ModelShape:
    """The base model's shape for memory estimates, read from its config (cached per process)."""
    try:
        return _model_shape(base.source, base.revision)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"cannot read the config of {base.name}: {exc}") from exc


@functools.lru_cache(maxsize=8)
def _tokenizer(source: str, revision: str) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError:
        return AutoTokenizer.from_pretrained(source, **kwargs)


def tokenizer_for(base: BaseModel) -> Any:
    try:
        return _tokenizer(base.source, base.revision)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"cannot load the tokenizer of {base.name}: {exc}") from exc


@functools.lru_cache(maxsize=4)
def _dataset_rows(uri: str, sha256: str) -> tuple[dict[str, Any], ...]:
    _, rows = load_trl_rows(store().path(uri))
    return tuple(rows)


def dataset_rows(dataset: Dataset) -> tuple[dict[str, Any], ...]:
    """Every row of a stored dataset, as trl rows (cached per file content)."""
    return _dataset_rows(dataset.uri, dataset.sha256)


def sample(rows: Sequence[Any], limit: int = STATS_SAMPLE_ROWS) -> list[Any]:
    """At most `limit` rows spread evenly over the dataset (deterministic: the same rows every time)."""
    if len(rows) <= limit:
        return list(rows)
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit)]


@functools.lru_cache(maxsize=8)
def _examples(uri: str, sha256: str, source: str, revision: str, completion_only_loss: bool) -> tuple[Example, ...]:
    rows = sample(_dataset_rows(uri, sha256))
    return tuple(prepare_examples(_tokenizer(source, revision), rows, completion_only_loss))


def length_stats_for(dataset: Dataset, base: BaseModel, max_length: int | None, batching: str,
                     completion_only_loss: bool = True) -> LengthStats:
    """Token-length statistics over a sample of the dataset, tokenized as the trainer would for `base`."""
    tokenizer_for(base)  # load errors as ModelNotFound
    examples = _examples(dataset.uri, dataset.sha256, base.source, base.revision, completion_only_loss)
    return length_stats(examples, max_length, batching)
