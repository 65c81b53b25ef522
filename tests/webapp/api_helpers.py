"""Shared by the API tests of runs, jobs, permissions and the fuzzing: a team on the tiny model, keys, problems."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.cache import cache

from tests.webapp.factories import demo_objects
from webapp.api.models import ApiKey


def bearer(raw: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {raw}"}


def key_for(user: Any, *scopes: str, **kw: Any) -> str:
    return ApiKey.issue(user, "test", list(scopes or ("read", "write")), **kw)[1]


def problem_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, getattr(response, "content", b"")[:2000])
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["detail"]
    return body


class Team:
    """owner, mate (a teammate), boss (staff), with the tiny model, a toy dataset and a LoRA config."""

    def __init__(self, model_dir: Path) -> None:
        self.owner, self.base, self.dataset, self.config = demo_objects(model_dir)
        users = get_user_model().objects
        self.mate = users.create_user("mate", password="pw-mate-123")
        self.boss = users.create_user("boss", password="pw-boss-123", is_staff=True)

    def run_body(self, **overrides: Any) -> dict[str, Any]:
        return {"name": "api run", "base_model": self.base.pk, "dataset": self.dataset.pk,
                "lora_config": self.config.pk, **overrides}


def make_team(model_dir: Path) -> Team:
    cache.clear()  # the rate limiter's counts live in the cache
    return Team(model_dir)
