"""The REST API's common ground: keys and scopes, problems, cursor pages, ETags, rates, idempotency,
the schema and its docs page, and the API keys page."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.hashers import MD5PasswordHasher
from django.core.cache import cache
from django.core.management import CommandError, call_command
from django.test import AsyncClient, Client
from django.urls import include, path
from django.utils import timezone
from django.views.debug import ExceptionReporter
from rest_framework.response import Response
from rest_framework.views import APIView

from tests.webapp.factories import make_worker
from tests.webapp.team import login
from webapp.api.models import ApiKey, IdempotencyRecord
from webapp.catalog.models import LoraConfig


class AdminOnly(APIView):
    admin_scope = True

    def get(self, request: Any) -> Response:
        return Response({"ok": True})


class Broken(APIView):
    permission_classes: list[Any] = []

    def get(self, request: Any) -> Response:
        raise RuntimeError("a bug in a DRF view")


def broken_plain_view(request: Any) -> Any:
    raise RuntimeError("a bug in a plain view")


async def broken_async_view(request: Any) -> Any:
    raise RuntimeError("a bug in an async (SSE) view")


# This module is also the URLconf of the tests marked below: the site's URLs plus a staff-only view and views
# with a bug in them (what an unhandled exception turns into).
urlpatterns = [
    path("api/v1/test-admin/", AdminOnly.as_view()),
    path("api/v1/test-broken/", Broken.as_view()),
    path("api/worker/v1/test-broken", broken_plain_view),
    path("api/v1/test-broken-stream/", broken_async_view),
    path("", include("webapp.urls")),
]
handler500 = "webapp.errors.server_error"


def bearer(raw: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {raw}"}


def key_for(user: Any, *scopes: str, **kw: Any) -> str:
    return ApiKey.issue(user, "test", list(scopes or ("read", "write")), **kw)[1]


@pytest.fixture(autouse=True)
def _fresh_rates() -> None:
    cache.clear()  # request counts of the rate limiter live in the cache


def problem_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"] == "about:blank"
    assert body["instance"] == response.wsgi_request.path
    return body


# --- authentication and scopes -----------------------------------------------------------------------------


def test_it_refuses_missing_invalid_revoked_and_expired_keys(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    users = team[0]
    body = problem_of(client.get("/api/v1/lora-configs/"), 401)
    assert "credentials were not provided" in body["detail"]
    assert client.get("/api/v1/lora-configs/")["WWW-Authenticate"].startswith("Bearer")

    assert problem_of(client.get("/api/v1/lora-configs/", **bearer("tdk_not-a-key")), 401)["detail"] == "invalid API key"

    key, raw = ApiKey.issue(users["owner"], "old", ["read"])
    assert client.get("/api/v1/lora-configs/", **bearer(raw)).status_code == 200
    key.revoked_at = timezone.now()
    key.save()
    assert "revoked" in problem_of(client.get("/api/v1/lora-configs/", **bearer(raw)), 401)["detail"]

    raw = key_for(users["owner"], "read", expires_at=timezone.now() - timedelta(minutes=1))
    assert "expired" in problem_of(client.get("/api/v1/lora-configs/", **bearer(raw)), 401)["detail"]


def test_it_refuses_a_worker_token_with_a_message(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    _worker, token = make_worker()
    body = problem_of(client.get("/api/v1/lora-configs/", **bearer(token)), 401)
    assert "worker token" in body["detail"] and "/api/worker/" in body["detail"]


def test_it_marks_when_a_key_was_last_used(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    key, raw = ApiKey.issue(team[0]["owner"], "k", ["read"])
    assert key.last_used_at is None
    client.get("/api/v1/lora-configs/", **bearer(raw))
    key.refresh_from_db()
    assert key.last_used_at is not None


def test_me_names_the_user_and_the_key(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    raw = key_for(team[0]["owner"], "read", expires_at=timezone.now() + timedelta(days=3))
    me = client.get("/api/v1/me/", **bearer(raw)).json()
    assert (me["username"], me["is_staff"], me["auth"], me["key_name"], me["scopes"]) == ("owner", False, "api_key", "test", ["read"])
    assert me["key_prefix"] == raw[:12] and me["expires_at"].endswith("Z")
    problem_of(client.get("/api/v1/me/"), 401)


def test_a_read_only_key_cannot_write(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    raw = key_for(team[0]["owner"], "read")
    response = client.post("/api/v1/lora-configs/", {"name": "x"}, content_type="application/json", **bearer(raw))
    assert "lacks the 'write' scope" in problem_of(response, 403)["detail"]
    assert not LoraConfig.objects.filter(name="x").exists()


@pytest.mark.urls("tests.webapp.test_api_core")
def test_admin_endpoints_need_staff_and_the_admin_scope(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    users = team[0]
    assert "for staff" in problem_of(client.get("/api/v1/test-admin/", **bearer(key_for(users["owner"], "admin"))),
                                     403)["detail"]
    assert "'admin' scope" in problem_of(client.get("/api/v1/test-admin/", **bearer(key_for(users["staff"], "write"))),
                                         403)["detail"]
    assert client.get("/api/v1/test-admin/", **bearer(key_for(users["staff"], "admin"))).json() == {"ok": True}
    login(client, "mate")
    assert problem_of(client.get("/api/v1/test-admin/"), 403)
    login(client, "staff")  # a staff session has every scope
    assert client.get("/api/v1/test-admin/").status_code == 200


def test_a_session_post_needs_the_csrf_token(team) -> None:  # type: ignore[no-untyped-def]
    client = login(Client(enforce_csrf_checks=True), "owner")
    response = client.post("/api/v1/lora-configs/", {"name": "x"}, content_type="application/json")
    assert "CSRF" in problem_of(response, 403)["detail"]


# --- problems, pages, ETags, rates --------------------------------------------------------------------------


def test_errors_are_problems_naming_each_field(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    raw = key_for(team[0]["owner"])
    response = client.post("/api/v1/lora-configs/", {"params": {"r": 0, "dropout": 2}},
                           content_type="application/json", **bearer(raw))
    body = problem_of(response, 400)
    assert body["errors"]["name"] == ["This field is required."]
    assert "name: This field is required." in body["detail"]

    body = problem_of(client.post("/api/v1/lora-configs/", {"name": "bad", "params": {"r": 0, "dropout": 2}},
                                  content_type="application/json", **bearer(raw)), 400)
    assert set(body["errors"]) == {"params.r", "params.dropout"}, body
    body = problem_of(client.get("/api/v1/lora-configs/999999/", **bearer(raw)), 404)
    assert body["detail"]


def test_timestamps_are_iso_8601_utc(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    item = client.get(f"/api/v1/lora-configs/{team[3].pk}/", **bearer(key_for(team[0]["owner"]))).json()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", item["created_at"]), item["created_at"]


def test_lists_are_cursor_pages_newest_first(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    for i in range(4):
        LoraConfig.objects.create(name=f"c{i}", params={"r": 4})
    auth = bearer(key_for(team[0]["owner"]))
    first = client.get("/api/v1/lora-configs/?page_size=3", **auth).json()
    assert set(first) == {"next", "previous", "results"} and first["previous"] is None
    second = client.get(first["next"], **auth).json()
    ids = [r["id"] for r in first["results"]] + [r["id"] for r in second["results"]]
    assert len(first["results"]) == 3 and len(second["results"]) == 2 and second["next"] is None
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 5 == LoraConfig.objects.count()
    assert len(client.get("/api/v1/lora-configs/?page_size=1000", **auth).json()["results"]) == 5  # capped at 200


def test_reads_carry_an_etag_and_answer_304(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    auth = bearer(key_for(team[0]["owner"]))
    first = client.get("/api/v1/lora-configs/", **auth)
    etag = first["ETag"]
    assert etag.startswith('W/"')
    again = client.get("/api/v1/lora-configs/", HTTP_IF_NONE_MATCH=etag, **auth)
    assert again.status_code == 304 and again.content == b"" and again["ETag"] == etag
    LoraConfig.objects.create(name="newer", params={})
    changed = client.get("/api/v1/lora-configs/", HTTP_IF_NONE_MATCH=etag, **auth)
    assert changed.status_code == 200 and changed["ETag"] != etag
    assert client.get("/lora-configs/").get("ETag") is None  # pages are not the API


def test_too_many_requests_get_429_with_retry_after(client: Client, team, settings) -> None:  # type: ignore[no-untyped-def]
    settings.TUNEDECK_API_RATE = "2/minute"
    auth = bearer(key_for(team[0]["owner"]))
    assert [client.get("/api/v1/lora-configs/", **auth).status_code for _ in range(2)] == [200, 200]
    response = client.get("/api/v1/lora-configs/", **auth)
    problem_of(response, 429)
    assert 1 <= int(response["Retry-After"]) <= 60
    other = bearer(key_for(team[0]["mate"]))  # per user: a teammate is not held back
    assert client.get("/api/v1/lora-configs/", **other).status_code == 200


def test_anonymous_calls_have_their_own_rate(client: Client, db, settings) -> None:  # type: ignore[no-untyped-def]
    settings.TUNEDECK_API_ANON_RATE = "1/minute"  # what anonymous callers reach: the schema and the docs
    assert client.get("/api/v1/schema/").status_code == 200
    assert client.get("/api/v1/schema/")["Retry-After"]
    assert client.get("/api/v1/schema/").status_code == 429


# --- idempotency -------------------------------------------------------------------------------------------


def test_a_retried_post_replays_the_first_answer(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    auth = {**bearer(key_for(team[0]["owner"])), "HTTP_IDEMPOTENCY_KEY": "abc-1"}
    body = {"name": "once", "params": {"r": 4}}
    first = client.post("/api/v1/lora-configs/", body, content_type="application/json", **auth)
    again = client.post("/api/v1/lora-configs/", body, content_type="application/json", **auth)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again["Location"] == first["Location"]
    assert again["Idempotent-Replayed"] == "true" and not first.has_header("Idempotent-Replayed")
    assert LoraConfig.objects.filter(name="once").count() == 1

    other = client.post("/api/v1/lora-configs/", {**body, "name": "twice"}, content_type="application/json", **auth)
    assert "another request" in problem_of(other, 422)["detail"]
    assert not LoraConfig.objects.filter(name="twice").exists()

    # Keys are per user: a teammate's same key is a new request.
    mate = {**bearer(key_for(team[0]["mate"])), "HTTP_IDEMPOTENCY_KEY": "abc-1"}
    assert client.post("/api/v1/lora-configs/", {"name": "mate"}, content_type="application/json", **mate).status_code == 201


def test_a_failed_first_attempt_does_not_hold_the_key(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    auth = {**bearer(key_for(team[0]["owner"])), "HTTP_IDEMPOTENCY_KEY": "k2"}
    bad = client.post("/api/v1/lora-configs/", {"name": "x", "params": {"r": -1}}, content_type="application/json", **auth)
    problem_of(bad, 400)
    assert not IdempotencyRecord.objects.exists()
    good = client.post("/api/v1/lora-configs/", {"name": "x", "params": {"r": 2}}, content_type="application/json", **auth)
    assert good.status_code == 201


def test_a_retry_while_the_first_is_running_gets_409(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    from rest_framework.parsers import JSONParser
    from rest_framework.request import Request
    from rest_framework.test import APIRequestFactory

    from webapp.api.idempotency import fingerprint  # the in-flight record is what a running first attempt leaves

    body = {"name": "slow", "params": {}}
    raw = APIRequestFactory().post("/api/v1/lora-configs/", body, format="json")
    IdempotencyRecord.objects.create(user=team[0]["owner"], key="k3", method="POST", path="/api/v1/lora-configs/",
                                     request_hash=fingerprint(Request(raw, parsers=[JSONParser()])))
    response = client.post("/api/v1/lora-configs/", body, content_type="application/json",
                           HTTP_IDEMPOTENCY_KEY="k3", **bearer(key_for(team[0]["owner"])))
    assert "still in progress" in problem_of(response, 409)["detail"]
    assert not LoraConfig.objects.filter(name="slow").exists()


# --- schema and docs ---------------------------------------------------------------------------------------


def test_the_schema_generates_without_warnings(tmp_path: Path, db) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    text = out.read_text()
    for endpoint in ("/api/v1/base-models/", "/api/v1/datasets/", "/api/v1/lora-configs/{id}/"):
        assert f"{endpoint}:" in text, endpoint
    assert "scheme: bearer" in text


def test_the_docs_page_uses_only_same_origin_files(client: Client, db) -> None:  # type: ignore[no-untyped-def]
    page = client.get("/api/v1/docs/")
    assert page.status_code == 200
    assert "script-src 'self'" in page["Content-Security-Policy"]
    html = page.content.decode()
    scripts = re.findall(r"<script([^>]*)>", html)
    assert len(scripts) == 3
    for attrs in scripts:
        src = re.search(r'src="([^"]+)"', attrs)
        assert src and src.group(1).startswith("/") and not src.group(1).startswith("//"), attrs
        served = client.get(src.group(1))
        assert served.status_code == 200 and "javascript" in served["Content-Type"], src.group(1)
    assert "<style" not in html and " style=" not in html
    for href in re.findall(r'<link rel="stylesheet" href="([^"]+)"', html):
        assert href.startswith("/static/") and client.get(href).status_code == 200, href
    schema = client.get("/api/v1/schema/", HTTP_ACCEPT="application/json")
    assert schema.status_code == 200 and schema.json()["openapi"].startswith("3.")


# --- a key for a user name and password (tunedeck login) ---------------------------------------------------


def password_login(client: Client, **fields: Any) -> Any:
    """POST the login; upper-case arguments are request headers (REMOTE_ADDR, HTTP_…), the rest the body."""
    meta = {k: v for k, v in fields.items() if k.isupper()}
    body = {k: v for k, v in fields.items() if not k.isupper()}
    return client.post("/api/v1/login/", body, content_type="application/json", **meta)


def test_a_password_login_makes_a_read_write_key_and_logs_no_password(client: Client, team, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level("DEBUG")
    response = password_login(client, username="owner", password="pw-owner-123", name="cli on laptop",
                              HTTP_AUTHORIZATION="Bearer tdk_stale")
    assert response.status_code == 201, response.content
    assert "no-store" in response["Cache-Control"] or "no-cache" in response["Cache-Control"]
    body = response.json()
    key = ApiKey.objects.get(user=team[0]["owner"])
    assert (key.name, key.scopes, key.expires_at) == ("cli on laptop", ["read", "write"], None)
    assert body["key"].startswith("tdk_") and body["prefix"] == key.prefix == body["key"][:12]
    assert (body["username"], body["name"], body["scopes"]) == ("owner", "cli on laptop", ["read", "write"])
    me = client.get("/api/v1/me/", **bearer(body["key"])).json()
    assert (me["username"], me["key_name"]) == ("owner", "cli on laptop")

    staff = password_login(client, username="boss", password="pw-boss-123", scopes=["admin"], expires_days=30)
    assert staff.status_code == 201 and staff.json()["scopes"] == ["admin"] and staff.json()["expires_at"]
    assert password_login(client, username="owner", password="pw-owner-123", name="x").json()["name"] == "x"
    admin = password_login(client, username="owner", password="pw-owner-123", scopes=["admin"])
    assert "staff" in problem_of(admin, 403)["detail"]  # as on the keys page: admin keys are for staff
    assert ApiKey.objects.filter(user=team[0]["owner"]).count() == 2

    password_login(client, username="owner", password="wrong-password-9")
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "pw-owner-123" not in logged and "wrong-password-9" not in logged


def test_a_wrong_password_and_an_unknown_user_get_the_same_401(client: Client, team, django_user_model) -> None:  # type: ignore[no-untyped-def]
    wrong = problem_of(password_login(client, username="owner", password="nope-nope-1"), 401)
    unknown = problem_of(password_login(client, username="nobody", password="nope-nope-1"), 401)
    assert wrong["detail"] == unknown["detail"] == "wrong user name or password"
    django_user_model.objects.create_user("gone", password="pw-gone-123", is_active=False)
    inactive_wrong = problem_of(password_login(client, username="gone", password="nope-nope-1"), 401)
    assert inactive_wrong["detail"] == wrong["detail"]  # nothing said about the account without its password
    inactive = problem_of(password_login(client, username="gone", password="pw-gone-123"), 403)
    assert "inactive" in inactive["detail"]
    missing = problem_of(password_login(client, username="owner"), 400)
    assert set(missing["errors"]) == {"password"}
    assert not ApiKey.objects.exists()


def test_an_error_report_of_a_login_shows_neither_the_password_nor_the_new_key(client: Client, team, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """A report of an exception (Django's error e-mails) shows each frame's local variables, but not these."""
    made: list[str] = []
    issue = ApiKey.issue

    def issue_and_note(*args: Any, **kwargs: Any) -> tuple[ApiKey, str]:
        key, raw = issue(*args, **kwargs)
        made.append(raw)
        return key, raw

    def broken(response: Any) -> None:
        raise RuntimeError("a bug after the key was made")

    monkeypatch.setattr(ApiKey, "issue", issue_and_note)
    monkeypatch.setattr("webapp.api.login.add_never_cache_headers", broken)
    assert password_login(client, username="owner", password="pw-owner-123").status_code == 500
    exc_type, exc, tb = next(r.exc_info for r in caplog.records if r.exc_info)
    frames = ExceptionReporter(None, exc_type, exc, tb).get_traceback_frames()
    shown = {frame["function"]: "\n".join(f"{name} = {value!r}" for name, value in frame["vars"]) for frame in frames}
    assert "payload = " in shown["post"] and made
    assert not any("pw-owner-123" in text or made[0] in text for text in shown.values()), shown["post"]


class CountingHasher(MD5PasswordHasher):
    """A fast hasher that counts the hashes it computes (its verify() hashes through encode())."""

    computed = 0

    def encode(self, password: str, salt: str) -> str:
        CountingHasher.computed += 1
        return super().encode(password, salt)


def test_every_refused_login_computes_as_many_password_hashes(client: Client, settings, django_user_model) -> None:  # type: ignore[no-untyped-def]
    """The time a refusal takes says nothing about the account: an unknown user, a wrong password and an
    inactive account with a wrong password each cost the same number of hashes."""
    settings.PASSWORD_HASHERS = ["tests.webapp.test_api_core.CountingHasher"]
    django_user_model.objects.create_user("alive", password="pw-alive-123")
    django_user_model.objects.create_user("gone", password="pw-gone-123", is_active=False)
    hashes = {}
    for username in ("nobody", "alive", "gone"):
        CountingHasher.computed = 0
        problem_of(password_login(client, username=username, password="nope-nope-1"), 401)
        hashes[username] = CountingHasher.computed
    assert hashes["nobody"] == hashes["alive"] == hashes["gone"] >= 1, hashes


def test_failed_logins_are_counted_per_user_name_and_per_address(client: Client, team, settings) -> None:  # type: ignore[no-untyped-def]
    settings.TUNEDECK_LOGIN_FAILURE_RATE = "3/hour"
    for _ in range(2):
        problem_of(password_login(client, username="owner", password="guess-1234"), 401)
    assert password_login(client, username="owner", password="pw-owner-123").status_code == 201  # not counted
    problem_of(password_login(client, username="owner", password="guess-1234", REMOTE_ADDR="10.0.0.9"), 401)
    # Three failures for this user name: refused from any address, the right password included.
    for address in ("127.0.0.1", "10.0.0.7"):
        refused = password_login(client, username="owner", password="pw-owner-123", REMOTE_ADDR=address)
        problem_of(refused, 429)
        assert 1 <= int(refused["Retry-After"]) <= 3600
    # And three from one address: every user name refused from there, not elsewhere.
    for name in ("mate", "boss", "x"):
        problem_of(password_login(client, username=name, password="guess-1234", REMOTE_ADDR="10.0.0.8"), 401)
    problem_of(password_login(client, username="mate", password="pw-mate-123", REMOTE_ADDR="10.0.0.8"), 429)
    assert password_login(client, username="mate", password="pw-mate-123", REMOTE_ADDR="10.0.0.6").status_code == 201
    assert ApiKey.objects.count() == 2


def test_create_api_key_prints_only_the_secret(team, django_user_model, capsys) -> None:  # type: ignore[no-untyped-def]
    call_command("create_api_key", "owner", "--name", "ci", "--scopes", "read,write", "--expires", "7")
    out, err = capsys.readouterr()
    secret = out.strip()
    assert out == secret + "\n" and secret.startswith("tdk_") and "owner" in err
    key = ApiKey.objects.get(name="ci")
    assert key.user == team[0]["owner"] and key.scopes == ["read", "write"]
    assert timedelta(days=6, hours=23) < key.expires_at - timezone.now() <= timedelta(days=7)
    assert Client().get("/api/v1/me/", **bearer(secret)).json()["key_name"] == "ci"

    call_command("create_api_key", "robot", "--create-user")  # automation that starts from nothing
    robot = django_user_model.objects.get(username="robot")
    assert not robot.has_usable_password() and ApiKey.objects.get(user=robot).scopes == ["read", "write"]
    assert capsys.readouterr().out.startswith("tdk_")

    for argv, words in ((["nobody"], "--create-user"), (["owner", "--scopes", "read,root"], "root"),
                        (["owner", "--scopes", "admin"], "staff"), (["owner", "--expires", "0"], "--expires")):
        with pytest.raises(CommandError, match=re.escape(words)):
            call_command("create_api_key", *argv)
    django_user_model.objects.filter(username="mate").update(is_active=False)
    with pytest.raises(CommandError, match="inactive"):
        call_command("create_api_key", "mate")
    assert ApiKey.objects.count() == 2 and capsys.readouterr().out == ""


# --- the API keys page -------------------------------------------------------------------------------------


def test_a_new_key_is_shown_once_and_works(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    login(client, "owner")
    page = client.get("/account/api-keys/")
    assert page.status_code == 200 and b'value="admin"' not in page.content  # admin scope: staff only
    assert b'href="/account/api-keys/"' in page.content  # the nav link
    response = client.post("/account/api-keys/", {"name": "laptop <b>", "scopes": ["read"]})
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"] or "no-cache" in response["Cache-Control"]
    html = response.content.decode()
    secret = re.search(r'id="api-key-secret">(tdk_[^<]+)<', html).group(1)  # type: ignore[union-attr]
    assert f'curl -H &quot;Authorization: Bearer {secret}&quot; http://testserver/api/v1/runs/' in html
    assert "laptop &lt;b&gt;" in html and "laptop <b>" not in html
    assert client.get("/api/v1/lora-configs/", **bearer(secret)).status_code == 200
    later = client.get("/account/api-keys/").content.decode()
    assert secret not in later and secret[:12] in later and "active" in later


def test_admin_scope_is_refused_to_non_staff(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    login(client, "owner")
    response = client.post("/account/api-keys/", {"name": "k", "scopes": ["admin"]})
    assert response.status_code == 400 and not ApiKey.objects.exists()
    login(client, "staff")
    assert b'value="admin"' in client.get("/account/api-keys/").content
    assert client.post("/account/api-keys/", {"name": "k", "scopes": ["admin"]}).status_code == 200
    assert ApiKey.objects.get().scopes == ["admin"]


def test_an_expiry_date_in_the_past_is_refused(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    login(client, "owner")
    yesterday = (timezone.now() - timedelta(days=1)).date().isoformat()
    response = client.post("/account/api-keys/", {"name": "k", "scopes": ["read"], "expires": yesterday})
    assert response.status_code == 400 and b"is in the past" in response.content
    today = timezone.now().date()
    client.post("/account/api-keys/", {"name": "k", "scopes": ["read"], "expires": today.isoformat()})
    key = ApiKey.objects.get()
    assert key.expires_at is not None and key.expires_at.date() == today + timedelta(days=1)


def test_revoking_a_key_refuses_it_and_others_keys_are_invisible(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    users = team[0]
    key, raw = ApiKey.issue(users["owner"], "mine", ["read"])
    theirs, _ = ApiKey.issue(users["mate"], "mate's key", ["read"])
    login(client, "owner")
    assert b"mate&#x27;s key" not in client.get("/account/api-keys/").content
    assert client.post(f"/account/api-keys/{theirs.pk}/revoke/").status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None
    assert client.get(f"/account/api-keys/{key.pk}/revoke/").status_code == 405
    assert client.post(f"/account/api-keys/{key.pk}/revoke/").status_code == 302
    assert "revoked" in problem_of(client.get("/api/v1/lora-configs/", **bearer(raw)), 401)["detail"]
    assert "revoked" in client.get("/account/api-keys/").content.decode()


def test_revoking_needs_the_csrf_token(team) -> None:  # type: ignore[no-untyped-def]
    key, _ = ApiKey.issue(team[0]["owner"], "mine", ["read"])
    client = login(Client(enforce_csrf_checks=True), "owner")
    assert client.post(f"/account/api-keys/{key.pk}/revoke/").status_code == 403
    key.refresh_from_db()
    assert key.revoked_at is None


def test_an_unknown_api_path_is_a_problem(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    auth = bearer(key_for(team[0]["owner"]))
    assert problem_of(client.get("/api/v1/nothing-here/", **auth), 404)["detail"] == "no API endpoint at /api/v1/nothing-here/"
    body = problem_of(client.get("/api/v1/lora-configs", **auth), 404)
    assert "did you mean /api/v1/lora-configs/" in body["detail"]


def test_errors_outside_drf_views_are_problems_too(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    auth = bearer(key_for(team[0]["owner"]))
    assert problem_of(client.get("/api/nowhere/", **auth), 404)["detail"] == "nothing at /api/nowhere/"
    # The worker API: an unknown token, a refused method (Django's empty 405), a malformed body.
    assert problem_of(client.post("/api/worker/v1/heartbeat", {}, content_type="application/json",
                                  headers={"Authorization": "Bearer tdw_unknown"}), 401)["detail"] == "invalid worker token"
    refused = client.get("/api/worker/v1/heartbeat")
    assert "GET is not allowed here" in problem_of(refused, 405)["detail"] and refused["Allow"] == "POST"
    # Middleware: a Host the site does not answer is refused before any view runs.
    problem_of(client.get("/api/v1/runs/", headers={"Host": "evil.example"}, **auth), 400)


def test_a_browser_gets_the_browsable_apis_own_error_page_and_djangos_errors_stay_problems(client: Client, team) -> None:  # type: ignore[no-untyped-def]
    html = {"HTTP_ACCEPT": "text/html", **bearer(key_for(team[0]["owner"]))}
    missing = client.get("/api/v1/runs/99999/", **html)
    assert missing.status_code == 404 and missing["Content-Type"].startswith("text/html")
    assert "no run with id 99999" in missing.content.decode() and "not_found" in missing.content.decode()
    bogus = client.get("/api/v1/runs/?state=bogus", **html)
    assert bogus.status_code == 400 and bogus["Content-Type"].startswith("text/html")
    assert "errors" in bogus.content.decode() and "bogus" in bogus.content.decode()
    # What no DRF view rendered (Django's own 404 and 405 pages) is still the API's problem, whatever was asked.
    assert problem_of(client.get("/api/nowhere/", **html), 404)["detail"] == "nothing at /api/nowhere/"
    refused = problem_of(client.get("/api/worker/v1/heartbeat", HTTP_ACCEPT="text/html"), 405)
    assert "GET is not allowed here" in refused["detail"]


@pytest.mark.urls("tests.webapp.test_api_core")
def test_an_unhandled_exception_under_the_api_is_a_500_problem(caplog) -> None:  # type: ignore[no-untyped-def]
    for path_ in ("/api/v1/test-broken/", "/api/worker/v1/test-broken", "/api/v1/test-broken-stream/"):
        # Through Django's sync handler and through its ASGI handler (what uvicorn serves).
        sync_response = Client(raise_request_exception=False).get(path_)
        # In a thread of its own: an earlier test (Playwright's sync API) may leave an event loop in this one.
        with ThreadPoolExecutor(1) as pool:
            async_response = pool.submit(async_to_sync(AsyncClient(raise_request_exception=False).get), path_).result()
        for response in (sync_response, async_response):
            assert response.status_code == 500 and response["Content-Type"] == "application/problem+json", path_
            body = response.json()
            assert body["status"] == 500 and "internal server error" in body["detail"] and "a bug" not in body["detail"]
    assert "a bug in an async (SSE) view" in caplog.text  # logged, with its traceback, not shown
