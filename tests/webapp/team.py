"""A small team for page tests: an owner, a teammate and a staff member, with catalog rows to run on."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.training.models import TrainingRun


@pytest.fixture
def team(django_user_model):  # type: ignore[no-untyped-def]
    users = {
        "owner": django_user_model.objects.create_user("owner", password="pw-owner-123"),
        "mate": django_user_model.objects.create_user("mate", password="pw-mate-123"),
        "staff": django_user_model.objects.create_user("boss", password="pw-boss-123", is_staff=True),
    }
    bases = [BaseModel.objects.create(name=f"base-{i}", source=f"/models/{i}") for i in range(2)]
    datasets = [Dataset.objects.create(name=f"data-{i}", uri=f"file:///d{i}", original_filename="d.jsonl", format="text",
                                       row_count=10, size_bytes=100, sha256="0" * 64) for i in range(2)]
    config = LoraConfig.objects.create(name="cfg", params={"r": 8, "alpha": 16})
    return users, bases, datasets, config


def make(team: Any, owner: str = "owner", base: int = 0, data: int = 0, **fields: Any) -> TrainingRun:
    users, bases, datasets, config = team
    return TrainingRun.objects.create(owner=users[owner], base_model=bases[base], dataset=datasets[data],
                                      lora_config=config, hyperparameters={"learning_rate": 2e-4, "num_epochs": 1}, **fields)


def login(client: Client, who: str) -> Client:
    assert client.login(username={"owner": "owner", "mate": "mate", "staff": "boss"}[who],
                        password={"owner": "pw-owner-123", "mate": "pw-mate-123", "staff": "pw-boss-123"}[who])
    return client
