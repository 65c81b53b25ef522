"""CSRF on htmx posts, the security headers every page sends, and the HTTPS settings of production (TUNEDECK_HTTPS)."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client

from tests.webapp.team import login, make
from webapp.settings import https_settings
from webapp.training.models import TrainingRun
from workers.config import ConfigError

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


# --- production settings: HTTPS (TUNEDECK_HTTPS) ------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/tunedeck", "DEBUG": "0",
              "SECRET_KEY": secrets.token_urlsafe(50), "TUNEDECK_HTTPS": "1"}


def deploy_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`manage.py check --deploy --fail-level WARNING` as CI runs it (no database connection is made), in an
    environment of its own: the browser tests set DJANGO_ALLOW_ASYNC_UNSAFE for Playwright, which the check refuses."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TUNEDECK_", "SECURE", "SECRET_KEY", "DJANGO_"))}
    clean["TUNEDECK_VAR"] = os.environ.get("TUNEDECK_VAR", str(ROOT / "var"))
    return subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                          cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_production_settings_pass_the_deployment_checklist() -> None:
    done = deploy_check(PRODUCTION)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_without_https_the_deployment_checklist_warns() -> None:
    done = deploy_check({k: v for k, v in PRODUCTION.items() if k != "TUNEDECK_HTTPS"})
    assert done.returncode != 0
    for code in ("W004", "W008", "W012", "W016"):
        assert f"security.{code}" in done.stderr, code


@pytest.fixture
def https(settings, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The settings TUNEDECK_HTTPS=1 gives (plus `env`), applied to this test."""
    def apply(**env: str) -> None:
        monkeypatch.setenv("TUNEDECK_HTTPS", "1")
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for name, value in https_settings().items():
            setattr(settings, name, value)
    return apply


def test_with_https_on_plain_http_is_redirected_and_cookies_are_secure(team, https) -> None:  # type: ignore[no-untyped-def]
    https()
    client = Client()
    plain = client.get("/runs/?state=running")
    assert plain.status_code == 301 and plain["Location"] == "https://testserver/runs/?state=running"
    # A client's own X-Forwarded-Proto is not believed unless a proxy is declared to set it.
    assert client.get("/runs/", headers={"X-Forwarded-Proto": "https"}).status_code == 301

    page = client.get("/login/", secure=True)
    assert page.status_code == 200 and page.cookies["csrftoken"]["secure"]
    assert page["Strict-Transport-Security"] == "max-age=31536000"  # no subdomains, no preload unless asked
    logged_in = client.post("/login/", {"username": "owner", "password": "pw-owner-123"}, secure=True)
    assert logged_in.status_code == 302 and logged_in.cookies["sessionid"]["secure"]
    assert client.get("/runs/", secure=True).status_code == 200


def test_workers_and_health_checks_are_not_redirected(team, https, store_dir) -> None:  # type: ignore[no-untyped-def]
    from tests.webapp.factories import make_worker

    https()
    _worker, token = make_worker("w1")
    beat = Client().post("/api/worker/v1/heartbeat", {}, content_type="application/json",
                         headers={"Authorization": f"Bearer {token}"})
    assert beat.status_code == 200, beat.content
    for path in ("/healthz", "/readyz"):
        assert Client().get(path).status_code != 301, path


def test_a_declared_proxy_header_marks_requests_secure(team, https) -> None:  # type: ignore[no-untyped-def]
    https(TUNEDECK_PROXY_SSL_HEADER="X-Forwarded-Proto", TUNEDECK_HSTS_SECONDS="600")
    client = login(Client(), "owner")
    behind = client.get("/runs/", headers={"X-Forwarded-Proto": "https"})
    assert behind.status_code == 200 and behind["Strict-Transport-Security"] == "max-age=600"
    assert client.get("/runs/").status_code == 301  # what did not come through the proxy


@pytest.mark.parametrize(("name", "value"), [("TUNEDECK_HTTPS", "maybe"), ("TUNEDECK_HSTS_SECONDS", "-1"),
                                             ("TUNEDECK_PROXY_SSL_HEADER", "X-Forwarded-Proto: https")])
def test_a_bad_https_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        https_settings()
