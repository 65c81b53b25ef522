"""Registering base models and datasets: inspection and validation before anything is saved."""

from __future__ import annotations

import functools
import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from django.conf import settings
from django.db import transaction

from webapp.catalog.models import BaseModel, Dataset, DatasetPreview
from workers.contract import spec
from workers.contract.store import ArtifactStore, sha256_stream
from workers.data.datasets import (
    DatasetError,
    numbered_records,
    suffix_of,
    to_trl_row,
    unit_of,
    validate_stream,
)
from workers.training.modelinfo import ModelInfo, ModelNotFound, inspect_model, local_model_folder, looks_like_path
from workers.training.modelshape import ModelShape
from workers.training.preview import (
    LENGTH_CHECK_ROWS,
    Example,
    LengthStats,
    UntrainedRow,
    length_stats,
    prepare_examples,
    rows_cut_before_training,
)

log = logging.getLogger(__name__)


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


def register_dataset(name: str, filename: str, data: bytes | BinaryIO, user: Any = None) -> Dataset:
    """Validate the whole file first, as a stream within settings.DATASET_LIMITS; store it under a server-made
    name only if it is clean. `data` is the file's bytes or a binary file object (an upload), read from its start."""
    suffix_of(filename)  # refuses unknown types with a message naming the file
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    report = validate_stream(source, filename, settings.DATASET_LIMITS)
    if not report.ok:
        raise DatasetError(report, filename)
    digest, size = _digest(source)
    safe_stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:60] or "dataset"
    uri = ArtifactStore.uri("datasets", f"{digest[:16]}-{safe_stem}{suffix_of(filename)}")
    with transaction.atomic():
        dataset = Dataset.objects.create(
            name=name,
            uri=uri,
            original_filename=filename[:255],
            format=report.format,
            row_count=report.row_count,
            size_bytes=size,
            sha256=digest,
            created_by=user,
        )
        DatasetPreview.objects.create(dataset=dataset, rows=report.preview)
        store().write_stream(uri, source)
    return dataset


def _digest(source: BinaryIO) -> tuple[str, int]:
    """sha256 and size of the file object, read once from its start (the size is where the read ends)."""
    source.seek(0)
    digest = sha256_stream(source).hexdigest()
    return digest, source.tell()


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


def sample_indices(count: int, limit: int = STATS_SAMPLE_ROWS) -> list[int]:
    """At most `limit` row indices spread evenly over `count` rows (deterministic: the same rows every time)."""
    if count <= limit:
        return list(range(count))
    step = count / limit
    return [int(i * step) for i in range(limit)]


def _rows_at(uri: str, fmt: str, indices: Sequence[int]) -> list[dict[str, Any]]:
    """The rows at these indices (0-based, ascending) of a stored dataset, as trl rows, read as a stream: the
    file is never held whole, nor are the rows not asked for."""
    wanted, rows = set(indices), []
    last = max(indices, default=-1)
    for index, (_, record) in enumerate(numbered_records(store().path(uri))):
        if index in wanted:
            rows.append(to_trl_row(fmt, record))
        if index >= last:
            break
    return rows


@functools.lru_cache(maxsize=4)
def _sample_rows(uri: str, sha256: str, fmt: str, row_count: int) -> tuple[dict[str, Any], ...]:
    return tuple(_rows_at(uri, fmt, sample_indices(row_count)))


def dataset_row(dataset: Dataset, number: int) -> dict[str, Any]:
    """Row `number` (1-based, within the dataset's row count: the caller clamps it) of a stored dataset, as a trl
    row. ValueError when the stored file holds fewer rows than were counted at registration."""
    rows = _rows_at(dataset.uri, dataset.format, [number - 1]) if number >= 1 else []
    if not rows:
        raise ValueError(f"{dataset.name}: row {number} is missing from the stored file")
    return rows[0]


@functools.lru_cache(maxsize=8)
def _examples(uri: str, sha256: str, fmt: str, row_count: int, source: str, revision: str,
              completion_only_loss: bool) -> tuple[Example, ...]:
    rows = _sample_rows(uri, sha256, fmt, row_count)
    return tuple(prepare_examples(_tokenizer(source, revision), rows, completion_only_loss))


def length_stats_for(dataset: Dataset, base: BaseModel, max_length: int | None, batching: str,
                     completion_only_loss: bool = True) -> LengthStats:
    """Token-length statistics over a sample of the dataset, tokenized as the trainer would for `base`."""
    tokenizer_for(base)  # load errors as ModelNotFound
    examples = _examples(dataset.uri, dataset.sha256, dataset.format, dataset.row_count, base.source, base.revision,
                         completion_only_loss)
    return length_stats(examples, max_length, batching)


# --- Rows that max_seq_length leaves with nothing to train on (checked before a run is queued) -----------------

PROMPTLESS_FORMATS = ("text",)  # every token is trained: truncation keeps some


@functools.lru_cache(maxsize=64)
def _rows_cut(uri: str, sha256: str, source: str, revision: str, max_length: int) -> tuple[UntrainedRow, ...]:
    path = store().path(uri)
    return tuple(rows_cut_before_training(_tokenizer(source, revision), numbered_records(path), max_length,
                                          unit=unit_of(path.name)))


def rows_cut_by_truncation(dataset: Dataset, base: BaseModel, params: spec.TrainParams) -> tuple[UntrainedRow, ...]:
    """Rows of `dataset` that truncation to params.max_seq_length leaves with nothing to train on, among the
    LENGTH_CHECK_ROWS with the longest prompts, tokenized with the base's tokenizer (cached per file content,
    tokenizer and length: about a second the first time for a large file, nothing after).

    None are found where the check cannot run here (the tokenizer or the file out of this machine's reach): the
    runner names such rows too, and fails when they are every row. Such a failure is not cached: the next check
    tries again."""
    if not params.answers_only or dataset.format in PROMPTLESS_FORMATS:
        return ()
    try:
        tokenizer_for(base)  # load errors as ModelNotFound, named by the base
        return _rows_cut(dataset.uri, dataset.sha256, base.source, base.revision, params.max_seq_length)
    except (ModelNotFound, OSError, ValueError) as exc:  # ValueError: a file no longer valid, a bad uri
        log.warning("cannot check the row lengths of dataset %s for %s: %s", dataset.name, base.name, exc)
        return ()


def truncation_problem(dataset: Dataset, base: BaseModel, params: spec.TrainParams) -> str | None:
    """Why some rows of `dataset` would train on nothing once cut to params.max_seq_length, or None."""
    cut = rows_cut_by_truncation(dataset, base, params)
    if not cut:
        return None
    shown = ", ".join(str(row) for row in cut[:5]) + (f" and {len(cut) - 5} more" if len(cut) > 5 else "")
    count = f"at least {len(cut)}" if len(cut) >= LENGTH_CHECK_ROWS else str(len(cut))
    need = max(row.prompt_tokens for row in cut) + 1
    reach = f"Raise max_seq_length to at least {need:,}"
    if base.max_positions and need > base.max_positions:
        reach += f" (more than the {base.max_positions:,} positions of {base.name}: shorten those prompts)"
    return (f"{dataset.name}: {count} of its {dataset.row_count:,} rows would train on nothing: cut to "
            f"max_seq_length {params.max_seq_length}, their prompts leave no room for the answer ({shown}). "
            f"{reach}{_other_remedies(params)}")


def _other_remedies(params: spec.TrainParams) -> str:
    if params.objective in spec.ANSWER_OBJECTIVES:  # their loss is always the answers'
        return " or shorten those prompts"
    return ", shorten those prompts, or turn off completion_only_loss to train on the prompts too"
