"""Evaluation records as a succeeded evaluate job leaves them (playground.services.start_evaluate's params, the
evaluate runner's result), for tests that judge adapters by their scores without running a model."""

from __future__ import annotations

import dataclasses
from typing import Any

from webapp.catalog.models import Dataset
from webapp.playground.models import AdapterJob
from webapp.training.models import Adapter


def record_evaluation(owner: Any, dataset: Dataset, scores: dict[Adapter, dict[str, float]],
                      split: str = "all") -> AdapterJob:
    """A succeeded evaluate job of `dataset` that scored each adapter as given (e.g. {"rouge_l": 0.4})."""
    adapters = list(scores)
    job = AdapterJob.objects.create(
        kind="evaluate", owner=owner, base_model=adapters[0].base_model, state="succeeded", attempt=1,
        params={"adapters": [dataclasses.asdict(a.ref()) for a in adapters], "include_base": True, "max_rows": 200,
                "split": split, "dataset": {"uri": dataset.uri, "format": dataset.format},
                "dataset_id": dataset.pk, "dataset_name": str(dataset)},
        result={"columns": [a.key for a in adapters], "labels": {a.key: str(a) for a in adapters}, "rows": 10,
                "scores": {a.key: {"loss": 1.0, "perplexity": 2.7, "exact_match": 0.0, "rouge_l": 0.0,
                                   "rows": 10, "reference_tokens": 40, **figures}
                           for a, figures in scores.items()}},
    )
    job.adapters.set(adapters)
    return job
