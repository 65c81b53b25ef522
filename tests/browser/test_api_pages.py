"""The API keys page and the API docs in a real Chromium over ASGI: a key is made and shown once, works
against the API, is revoked; the Swagger docs render from local files with no CSP violation."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import expect

from webapp.api.models import ApiKey

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def console_errors(page) -> list[str]:  # type: ignore[no-untyped-def]
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    return errors


def test_a_key_is_made_used_and_revoked_and_the_docs_render(page, asgi_server, screenshot) -> None:  # type: ignore[no-untyped-def]
    errors = console_errors(page)
    page.get_by_role("link", name="API keys").click()
    expect(page.get_by_role("heading", name="API keys", exact=True)).to_be_visible()
    page.get_by_label("Name").fill("laptop")
    page.get_by_role("checkbox", name="write: also create, cancel, retry and delete (implies read)", exact=True).check()
    page.get_by_role("button", name="Make key").click()

    secret = page.locator("#api-key-secret").inner_text().strip()
    assert secret.startswith("tdk_")
    expect(page.locator("#api-key-example")).to_have_text(
        f'curl -H "Authorization: Bearer {secret}" {asgi_server}/api/v1/runs/')
    screenshot(page, "api-key-created")
    api = httpx.get(f"{asgi_server}/api/v1/datasets/", headers={"Authorization": f"Bearer {secret}"}, timeout=15)
    assert api.status_code == 200 and api.json()["results"][0]["name"] == "toy"

    page.goto("/account/api-keys/")
    assert secret not in page.content()
    row = page.locator(f"#api-key-{ApiKey.objects.get(name='laptop').pk}")
    expect(row).to_contain_text("read, write")
    expect(row).to_contain_text("active")
    row.get_by_role("button", name="Revoke").click()
    expect(page.get_by_text("API key laptop")).to_contain_text("revoked")
    refused = httpx.get(f"{asgi_server}/api/v1/datasets/", headers={"Authorization": f"Bearer {secret}"}, timeout=15)
    assert refused.status_code == 401 and "revoked" in refused.json()["detail"]

    page.goto("/api/v1/docs/")
    expect(page.locator(".swagger-ui .information-container")).to_contain_text("Tunedeck API")
    expect(page.locator(".opblock-summary-path", has_text="/api/v1/base-models/").first).to_be_visible()
    screenshot(page, "api-docs")
    assert not [e for e in errors if "Content Security Policy" in e or "Refused" in e], errors
