"""CSRF on htmx posts and the security headers every page sends."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from tests.webapp.team import login, make
from webapp.training.models import TrainingRun

pytestmark = pytest.mark.django_db


def test_an_htmx_post_needs_the_csrf_token_the_page_carries(team) -> None:  # type: ignore[no-untyped-def]
    run = make(team, state="running", attempt=1)
    client = login(Client(enforce_csrf_checks=True), "owner")
    page = client.get(f"/runs/{run.pk}/").content.decode()
    token = re.search(r'hx-headers=\'\{"X-CSRFToken": "([^"]+)"\}\'', page)
    assert token, "the page must hand htmx its CSRF token"

    forged = client.post(f"/runs/{run.pk}/cancel/", headers={"HX-Request": "true"})
    assert forged.status_code == 403
    assert not TrainingRun.objects.get(pk=run.pk).cancel_requested

    sent = client.post(f"/runs/{run.pk}/cancel/", headers={"HX-Request": "true", "X-CSRFToken": token.group(1)})
    assert sent.status_code in (200, 204, 302)
    assert TrainingRun.objects.get(pk=run.pk).cancel_requested


def test_pages_forbid_inline_script_and_framing(team, client) -> None:  # type: ignore[no-untyped-def]
    login(client, "mate")
    for url in ("/", "/runs/", "/datasets/", "/base-models/", "/lora-configs/", "/adapters/"):
        response = client.get(url)
        assert response.status_code == 200, url
        policy = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy and "frame-ancestors 'none'" in policy
        assert "<script>" not in response.content.decode(), url  # no inline script anywhere
