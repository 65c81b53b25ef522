from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model

from webapp.catalog.models import LoraConfig
from webapp.catalog.services import register_base_model, register_dataset
from webapp.fleet.models import Worker
from webapp.training.models import TrainingRun
from workers.contract.spec import suggest_train_params
from workers.training.demo import toy_rows


def demo_objects(model_dir: Path, quantization: str = "none"):  # type: ignore[no-untyped-def]
    user = get_user_model().objects.create_user("owner", password="owner-pass-123")
    base = register_base_model("tiny", str(model_dir))
    data = "".join(json.dumps(r) + "\n" for r in toy_rows(512, 0)).encode()
    dataset = register_dataset("toy", "toy.jsonl", data)
    config = LoraConfig.objects.create(name="cfg", params={"r": 16, "alpha": 32, "dropout": 0.0,
                                                           "target_modules": ["all-linear"], "quantization": quantization})
    return user, base, dataset, config


def make_run(user, base, dataset, config, **hp) -> TrainingRun:  # type: ignore[no-untyped-def]
    params = dataclasses.asdict(suggest_train_params(base.num_parameters))
    return TrainingRun.objects.create(owner=user, base_model=base, dataset=dataset, lora_config=config,
                                      hyperparameters={**params, **hp})


def make_worker(name: str = "w1", token: str | None = None) -> tuple[Worker, str]:
    from django.utils import timezone

    worker = Worker(name=name, state="online", last_heartbeat=timezone.now())  # the scheduler wants a recent heartbeat
    fresh = worker.set_new_token()
    if token:
        from webapp.fleet.models import hash_token

        worker.token_hash, fresh = hash_token(token), token
    worker.save()
    return worker, fresh


class RunWorld:
    """A finished run with everything that can hang off it, files included (see `run_world`)."""

    def __init__(self, **parts: Any) -> None:
        self.__dict__.update(parts)


def _write(path: Path, size: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return size


def run_world(store: Path, owner: Any, base: Any, dataset: Any, config: Any) -> RunWorld:
    """A succeeded run whose adapter has checkpoints and a zip on disk, a verified merge, a place in a comparison
    and an evaluation (beside another run's adapter) and a child combined from both; a file outside the store,
    linked from inside the run's folder. Nothing is generated: rows and files are written as the jobs leave them."""
    from webapp.playground import services
    from webapp.playground.models import AdapterJob, MergedModel, PromptSet
    from webapp.training.models import Adapter, AdapterOrigin, AdapterParent, RunEvent
    from workers.contract import jobspecs

    def trained(name: str) -> tuple[TrainingRun, Adapter, int]:
        run = TrainingRun.objects.create(owner=owner, base_model=base, dataset=dataset, lora_config=config, name=name,
                                         hyperparameters={}, state="succeeded", attempt=1)
        folder = store / "runs" / str(run.pk)
        size = _write(folder / "attempt-1" / "adapter" / "adapter_model.safetensors", 4096)
        size += _write(folder / "attempt-1" / "adapter" / "adapter_config.json", 100)
        size += _write(folder / "attempt-1" / "adapter.zip", 1000)
        for step in (10, 20):
            size += _write(folder / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors", 4096)
            size += _write(folder / "checkpoints" / f"checkpoint-{step}" / "optimizer.pt", 8192)
            RunEvent.objects.create(run=run, attempt=1, seq=step, kind="checkpoint", message=f"Checkpoint saved at step {step}",
                                    data={"step": step})
        adapter = Adapter.objects.create(run=run, name=name, owner=owner, base_model=base, rank=8, size_bytes=4196,
                                         uri=f"store://runs/{run.pk}/attempt-1/adapter", sha256="0" * 64,
                                         trainable_params=1, total_params=2)
        return run, adapter, size

    run, adapter, run_bytes = trained("doomed")
    _other_run, other, _ = trained("survivor")
    outside = store.parent / "outside.bin"
    outside.write_bytes(b"not the store's")
    (store / "runs" / str(run.pk) / "checkpoints" / "link-out").symlink_to(outside)

    merge = services.start_merge(owner, adapter, "float32")
    AdapterJob.objects.filter(pk=merge.pk).update(state="succeeded", attempt=1)
    merge_bytes = _write(store / "jobs" / str(merge.pk) / "output" / "model.safetensors", 16384)
    merge_bytes += _write(store / "jobs" / str(merge.pk) / "output" / "config.json", 200)
    merged = MergedModel.objects.create(adapter=adapter, job=merge, uri=f"store://jobs/{merge.pk}/output", dtype="float32",
                                        size_bytes=merge_bytes, sha256="0" * 64, verified=True)

    prompts = PromptSet.objects.create(name="two", owner=owner, rows=[{"prompt": "2 + 3?", "reference": "5"}, {"prompt": "4 + 4?"}])
    comparison = services.start_compare(owner, prompts, [adapter, other], jobspecs.GenerationParams(max_new_tokens=8),
                                        name="doomed vs survivor")
    AdapterJob.objects.filter(pk=comparison.job_id).update(state="succeeded", attempt=1)
    comparison.store_outputs([{"row": r, "column": k, "text": f"{k} says {r}"} for r in range(2) for k, _ in comparison.columns()])

    evaluation = AdapterJob.objects.create(kind="evaluate", owner=owner, base_model=base, state="succeeded", attempt=1,
                                           params={"adapters": [dataclasses.asdict(a.ref()) for a in (adapter, other)],
                                                   "held_out_of": run.pk, "split": "held_out", "dataset_name": "toy"},
                                           result={"scores": {a.key: {"loss": 1.0} for a in (adapter, other)}})
    evaluation.adapters.set([adapter, other])

    combine = services.start_combine(owner, [adapter, other], [0.5, 0.5], "linear", name="blend")
    AdapterJob.objects.filter(pk=combine.pk).update(state="succeeded", attempt=1)
    _write(store / "jobs" / str(combine.pk) / "output" / "adapter_model.safetensors", 4096)
    blend = Adapter.objects.create(name="blend", owner=owner, base_model=base, origin=AdapterOrigin.COMBINED, rank=16,
                                   uri=f"store://jobs/{combine.pk}/output", size_bytes=4096, sha256="0" * 64,
                                   trainable_params=1, total_params=2, metrics={"job_id": combine.pk})
    for parent in (adapter, other):
        AdapterParent.objects.create(child=blend, parent=parent, parent_name=str(parent), weight=0.5)
    return RunWorld(run=run, adapter=adapter, other=other, merge=merge, merged=merged, comparison=comparison,
                    evaluation=evaluation, combine=combine, blend=blend, outside=outside, store=store,
                    run_folder=store / "runs" / str(run.pk), merge_folder=store / "jobs" / str(merge.pk),
                    freed_bytes=run_bytes + merge_bytes)
