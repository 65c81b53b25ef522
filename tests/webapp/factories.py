from __future__ import annotations

import json
from pathlib import Path

from django.contrib.auth import get_user_model

from webapp.catalog.models import LoraConfig
from webapp.catalog.services import register_base_model, register_dataset
from webapp.fleet.models import Worker
from webapp.training.models import TrainingRun
from workers.demo import toy_rows
from workers.spec import suggest_train_params


def demo_objects(model_dir: Path, quantization: str = "none"):  # type: ignore[no-untyped-def]
    user = get_user_model().objects.create_user("owner", password="owner-pass-123")
    base = register_base_model("tiny", str(model_dir))
    data = "".join(json.dumps(r) + "\n" for r in toy_rows(512, 0)).encode()
    dataset = register_dataset("toy", "toy.jsonl", data)
    config = LoraConfig.objects.create(name="cfg", params={"r": 16, "alpha": 32, "dropout": 0.0,
                                                           "target_modules": ["all-linear"], "quantization": quantization})
    return user, base, dataset, config


def make_run(user, base, dataset, config, **hp) -> TrainingRun:  # type: ignore[no-untyped-def]
    import dataclasses

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
