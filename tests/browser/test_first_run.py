"""The README's first step in a real Chromium: on what `tunedeck up` creates, New run and Train, touching nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import expect

from tests.browser.conftest import log_in
from webapp.catalog.demo import DEMO_CONFIG, DEMO_DATASET, DEMO_MODEL, ensure_demo_content
from webapp.training.models import TrainingRun

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_train_on_the_demo_content_works_without_choosing_anything(  # type: ignore[no-untyped-def]
        transactional_db, context, shared_store: Path, settings, screenshot) -> None:
    settings.ARTIFACT_STORE = shared_store
    ensure_demo_content()  # what `tunedeck up` creates on its first start: one model, three datasets, four configs
    get_user_model().objects.create_superuser("admin", password="admin-pass-123", email="")
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    log_in(page, "admin", "admin-pass-123")

    page.get_by_role("link", name="New run").first.click()
    expect(page.get_by_role("heading", name="New training run")).to_be_visible()
    screenshot(page, "first-run-form")
    page.get_by_role("button", name="Train").click()
    page.wait_for_url(re.compile(r"/runs/\d+/$"))

    run = TrainingRun.objects.get()
    assert (run.base_model.name, run.dataset.name, run.lora_config.name) == (DEMO_MODEL, DEMO_DATASET, DEMO_CONFIG)
    assert run.state == "queued" and not dialogs
