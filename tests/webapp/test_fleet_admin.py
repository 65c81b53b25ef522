"""Admins manage the worker fleet in the browser: register (token shown once), rotate, revoke, drain, resume, edit, delete."""

from __future__ import annotations

import io
import logging
import re
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.utils import timezone

from tests.webapp.team import login, make
from webapp.cli import build_parser
from webapp.fleet.models import Worker, hash_token

pytestmark = pytest.mark.django_db
TOKEN = re.compile(r"tdw_[A-Za-z0-9_-]{20,}")
GIB = 2**30


def staff(team) -> Client:  # type: ignore[no-untyped-def]
    return login(Client(), "staff")


def heartbeat(token: str) -> int:
    response = Client().post("/api/worker/v1/heartbeat", {"inventory": {"hostname": "gpu-box"}},
                             content_type="application/json", headers={"Authorization": f"Bearer {token}"})
    return response.status_code


def register(client: Client, name: str = "gpu-a100-1", **fields: str):  # type: ignore[no-untyped-def]
    """POST the registration form; return (response, token shown on the page or None)."""
    response = client.post("/workers/register/", {"name": name, "labels": "", "max_gpu_gib": "", "max_jobs": "", **fields})
    found = TOKEN.findall(response.content.decode())
    return response, (found[0] if found else None)


def rotate(client: Client, worker: Worker) -> str:
    response = client.post(f"/workers/{worker.pk}/rotate/")
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    (token,) = set(TOKEN.findall(response.content.decode()))
    return token


def test_it_registers_a_worker_and_shows_its_token_once_with_the_command(team) -> None:  # type: ignore[no-untyped-def]
    client = staff(team)
    response, token = register(client, labels="a100, team-nlp,a100", max_gpu_gib="24", max_jobs="2")
    assert response.status_code == 200 and token
    assert "no-store" in response["Cache-Control"]
    body = response.content.decode()
    assert f"TUNEDECK_WORKER_TOKEN={token} tunedeck worker --server http://testserver" in body
    assert "tunedeck worker --server http://testserver --token-file ~/.tunedeck-token" in body
    assert f"echo {token} &gt; ~/.tunedeck-token" in body

    worker = Worker.objects.get(name="gpu-a100-1")
    assert worker.token_hash == hash_token(token)
    assert token not in str(Worker.objects.filter(pk=worker.pk).values().get())  # the database holds only the hash
    assert (worker.labels, worker.max_gpu_bytes, worker.max_jobs) == (["a100", "team-nlp"], 24 * GIB, 2)
    assert worker.token_issued_at is not None and worker.created_by == team[0]["staff"]
    for page in ("/workers/", f"/workers/{worker.pk}/", "/workers/?x=1"):
        again = client.get(page).content.decode()
        assert token not in again and not TOKEN.search(again)
    assert heartbeat(token) == 200


def test_the_command_uses_the_host_the_admin_reached(team, settings) -> None:  # type: ignore[no-untyped-def]
    settings.ALLOWED_HOSTS = ["tunedeck.example.com"]
    response = staff(team).post("/workers/register/", {"name": "w-https", "labels": "a100"},
                                headers={"Host": "tunedeck.example.com"}, secure=True)
    (token,) = set(TOKEN.findall(response.content.decode()))
    assert f"TUNEDECK_WORKER_TOKEN={token} tunedeck worker --server https://tunedeck.example.com" in response.content.decode()


def test_rotation_keeps_the_old_token_for_the_overlap_window_then_refuses_it(team, settings) -> None:  # type: ignore[no-untyped-def]
    settings.TOKEN_OVERLAP = 600
    client = staff(team)
    _, old = register(client)
    worker = Worker.objects.get(name="gpu-a100-1")
    before = timezone.now()
    new = rotate(client, worker)
    after = timezone.now()
    assert new != old
    assert (heartbeat(old), heartbeat(new)) == (200, 200)
    worker.refresh_from_db()
    assert worker.previous_token_hash == hash_token(old) and worker.token_hash == hash_token(new)
    assert before + timedelta(seconds=600) <= worker.previous_token_expires <= after + timedelta(seconds=600)
    assert "old token valid until" in client.get("/workers/").content.decode()

    Worker.objects.filter(pk=worker.pk).update(previous_token_expires=timezone.now() - timedelta(seconds=1))
    assert (heartbeat(old), heartbeat(new)) == (401, 200)
    assert "old token valid until" not in client.get("/workers/").content.decode()


def test_revoking_refuses_the_token_at_once_and_rotating_issues_a_new_one(team) -> None:  # type: ignore[no-untyped-def]
    client = staff(team)
    _, first = register(client)
    worker = Worker.objects.get(name="gpu-a100-1")
    second = rotate(client, worker)
    assert (heartbeat(first), heartbeat(second)) == (200, 200)  # both valid: inside the overlap window

    response = client.post(f"/workers/{worker.pk}/revoke/", follow=True)
    assert "Revoked the token" in response.content.decode() and "revoked" in client.get("/workers/").content.decode()
    assert (heartbeat(first), heartbeat(second)) == (401, 401)
    worker.refresh_from_db()
    assert (worker.token_hash, worker.previous_token_hash, worker.previous_token_expires) == (None, None, None)

    third = rotate(client, worker)
    assert (heartbeat(first), heartbeat(second), heartbeat(third)) == (401, 401, 200)
    worker.refresh_from_db()
    assert worker.previous_token_hash is None  # nothing to overlap with after a revocation


def test_drain_and_resume(team, settings) -> None:  # type: ignore[no-untyped-def]
    client = staff(team)
    _, token = register(client)
    assert heartbeat(token) == 200
    worker = Worker.objects.get(name="gpu-a100-1")
    assert worker.state == "online"

    response = client.post(f"/workers/{worker.pk}/drain/", follow=True)
    assert response.redirect_chain[-1][0] == "/workers/" and "Draining gpu-a100-1" in response.content.decode()
    worker.refresh_from_db()
    assert worker.state == "draining"
    assert heartbeat(token) == 200  # heartbeats keep a drained worker draining
    worker.refresh_from_db()
    assert worker.state == "draining"
    assert "Resume gpu-a100-1" in client.get("/workers/").content.decode()

    response = client.post(f"/workers/{worker.pk}/resume/", {"next": f"/workers/{worker.pk}/"})
    assert response["Location"] == f"/workers/{worker.pk}/"
    worker.refresh_from_db()
    assert worker.state == "online"

    # A worker not heard from lately resumes as offline, until its next heartbeat.
    Worker.objects.filter(pk=worker.pk).update(state="draining",
                                               last_heartbeat=timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER + 5))
    client.post(f"/workers/{worker.pk}/resume/")
    worker.refresh_from_db()
    assert worker.state == "offline"
    response = client.post(f"/workers/{worker.pk}/drain/", {"next": "https://evil.example/"}, follow=True)
    assert "Only an online worker can be drained" in response.content.decode()
    assert response.redirect_chain[-1][0] == "/workers/"  # an outside `next` is ignored
    worker.refresh_from_db()
    assert worker.state == "offline"


@pytest.mark.parametrize("action", ["drain", "resume", "rotate", "revoke", "delete"])
def test_actions_are_for_staff_only(team, action: str) -> None:  # type: ignore[no-untyped-def]
    worker = Worker(name="w", state="draining" if action == "resume" else "online")
    token = worker.set_new_token()
    worker.save()
    url = f"/workers/{worker.pk}/{action}/"
    anonymous = Client().post(url)
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login/")
    assert login(Client(), "mate").post(url).status_code == 403
    worker.refresh_from_db()
    assert worker.state == ("draining" if action == "resume" else "online") and worker.token_hash == hash_token(token)
    if action != "delete":
        assert staff(team).get(url).status_code == 405  # a change only by POST
    csrf_client = Client(enforce_csrf_checks=True)
    csrf_client.force_login(team[0]["staff"])
    assert csrf_client.post(url).status_code == 403
    assert Worker.objects.filter(pk=worker.pk, token_hash=hash_token(token)).exists()


def test_registration_and_edit_pages_are_for_staff_only(team) -> None:  # type: ignore[no-untyped-def]
    worker = Worker.objects.create(name="w")
    for url, data in (("/workers/register/", {"name": "x"}), (f"/workers/{worker.pk}/", {"labels": "b"})):
        assert Client().post(url, data)["Location"].startswith("/login/")
        assert login(Client(), "mate").post(url, data).status_code == 403
    assert login(Client(), "mate").get(f"/workers/{worker.pk}/").status_code == 403
    assert list(Worker.objects.values_list("name", "labels")) == [("w", [])]


def test_bad_input_shows_field_errors_and_registers_nothing(team) -> None:  # type: ignore[no-untyped-def]
    client = staff(team)
    Worker.objects.create(name="taken")
    response, token = register(client, name="taken", labels="A100, ok, bad label!", max_jobs="0", max_gpu_gib="-1")
    body = response.content.decode()
    assert response.status_code == 400 and token is None
    assert "a worker named “taken” already exists" in body
    assert "“A100”, “bad label!”: a label is a lowercase slug" in body
    assert "Ensure this value is greater than or equal to 1" in body  # max jobs
    assert "Ensure this value is greater than or equal to 0.1" in body  # max GPU GiB
    response, _ = register(client, name="not a slug", labels="<script>x</script>")
    body = response.content.decode()
    assert response.status_code == 400 and "Enter a valid “slug”" in body
    assert "&lt;script&gt;x&lt;/script&gt;" in body and "<script>x" not in body
    assert list(Worker.objects.values_list("name", flat=True)) == ["taken"]


def test_labels_and_limits_are_edited_on_the_worker_page(team) -> None:  # type: ignore[no-untyped-def]
    client = staff(team)
    _, token = register(client, labels="a100", max_gpu_gib="24")
    worker = Worker.objects.get(name="gpu-a100-1")
    page = client.get(f"/workers/{worker.pk}/").content.decode()
    assert 'value="a100"' in page and 'value="24"' in page
    bad = client.post(f"/workers/{worker.pk}/", {"labels": "Team NLP", "max_gpu_gib": "40.5", "max_jobs": "3"})
    assert bad.status_code == 400 and "“Team NLP”: a label is a lowercase slug" in bad.content.decode()
    ok = client.post(f"/workers/{worker.pk}/", {"labels": "a100, team-nlp", "max_gpu_gib": "40.5", "max_jobs": "3"})
    assert ok.status_code == 302
    worker.refresh_from_db()
    assert (worker.labels, worker.max_gpu_bytes, worker.max_jobs) == (["a100", "team-nlp"], int(40.5 * GIB), 3)
    assert worker.token_hash == hash_token(token)
    rows = client.get("/workers/").content.decode()
    assert "team-nlp" in rows and "40.5 GiB GPU memory per job" in rows and "3 jobs at once" in rows


def test_a_worker_with_an_active_job_cannot_be_deleted(team) -> None:  # type: ignore[no-untyped-def]
    client = staff(team)
    _, token = register(client)
    worker = Worker.objects.get(name="gpu-a100-1")
    run = make(team, state="running", worker=worker)
    assert "It has an active job" in client.get(f"/workers/{worker.pk}/delete/").content.decode()
    response = client.post(f"/workers/{worker.pk}/delete/", follow=True)
    assert "has an active job" in response.content.decode() and Worker.objects.filter(pk=worker.pk).exists()

    run.state = "succeeded"
    run.save(update_fields=["state"])
    response = client.post(f"/workers/{worker.pk}/delete/", follow=True)
    assert "Deleted worker gpu-a100-1" in response.content.decode()
    assert not Worker.objects.filter(pk=worker.pk).exists() and heartbeat(token) == 401
    run.refresh_from_db()
    assert run.worker is None and run.state == "succeeded"  # past jobs keep their records


def test_no_token_appears_in_any_log(team, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="django")  # Django's own logger stops at INFO by default
    connection.force_debug_cursor = True  # log every SQL statement too: a token stored in clear would show there
    try:
        client = staff(team)
        _, first = register(client, labels="a100")
        worker = Worker.objects.get(name="gpu-a100-1")
        second = rotate(client, worker)
        statuses = [heartbeat(first), heartbeat(second)]
        client.post(f"/workers/{worker.pk}/revoke/")
        statuses += [heartbeat(first), heartbeat(second)]
        call_command("register_worker", "gpu-cli", stdout=(out := io.StringIO()), stderr=io.StringIO())
        third = out.getvalue().strip()
        statuses.append(heartbeat(third))
    finally:
        connection.force_debug_cursor = False
    assert statuses == [200, 200, 401, 401, 200]
    assert "INSERT INTO" in caplog.text and "Unauthorized: /api/worker/v1/heartbeat" in caplog.text  # logs were captured
    for token in (first, second, third):
        assert token not in caplog.text
        assert not any(token in record.getMessage() for record in caplog.records)


def test_register_worker_command_shares_the_checks_and_rotates_an_existing_worker(team) -> None:  # type: ignore[no-untyped-def]
    out, err = io.StringIO(), io.StringIO()
    call_command("register_worker", "cli-1", "--labels", "a100,team-nlp", "--max-gpu-gib", "16", stdout=out, stderr=err)
    first = out.getvalue().strip()
    assert TOKEN.fullmatch(first) and first not in err.getvalue()
    worker = Worker.objects.get(name="cli-1")
    assert worker.token_hash == hash_token(first) and worker.labels == ["a100", "team-nlp"]
    assert worker.max_gpu_bytes == 16 * GIB

    with pytest.raises(CommandError, match="--labels “A100”: a label is a lowercase slug"):
        call_command("register_worker", "cli-2", "--labels", "A100", stdout=io.StringIO(), stderr=io.StringIO())
    assert not Worker.objects.filter(name="cli-2").exists()

    out = io.StringIO()
    call_command("register_worker", "cli-1", stdout=out, stderr=io.StringIO())
    second = out.getvalue().strip()
    worker.refresh_from_db()
    assert second != first and (heartbeat(first), heartbeat(second)) == (200, 200)
    assert worker.labels == ["a100", "team-nlp"] and worker.max_gpu_bytes == 16 * GIB  # kept when not given


def test_the_workers_page_gives_each_sampled_gpu_a_preview_fed_by_its_workers_telemetry(team) -> None:  # type: ignore[no-untyped-def]
    samples = [{"t": 1000 + 10 * i, "gpus": [{"memory_used": used * GIB, "memory_total": 40 * GIB, "utilization": util}]}
               for i, (used, util) in enumerate([(0, 100), (20, 50), (40, 0)])]
    busy = Worker.objects.create(name="busy", state="online", telemetry=[*samples, "junk", {"t": "x", "gpus": []}],
                                 inventory={"gpus": [{"name": "A100", "memory_total": 40 * GIB}]})
    Worker.objects.create(name="quiet", state="online", inventory={"gpus": [{"name": "T4", "memory_total": 16 * GIB}]})
    Worker.objects.create(name="cpu", state="online", telemetry=[{"t": 1000, "gpus": []}])
    body = staff(team).get("/workers/").content.decode()
    assert f'data-gpu-previews data-telemetry-url="/workers/{busy.pk}/telemetry.json"' in body
    assert '<span class="gpu-preview" data-gpu="0" hidden></span>' in body
    assert body.count("data-telemetry-url") == 1  # the quiet worker and the CPU-only one have no GPU samples
    assert body.count('class="gpu-preview"') == 1
    assert 'value="100"' in body and "40.0 GiB / 40.0 GiB" in body  # current figures from the latest sample
    assert "uplot-1.6.32.iife.min.js" in body and "tunedeck/charts.js" in body
    assert "<svg" not in body


def test_worker_command_takes_the_token_from_a_flag_a_file_or_the_environment() -> None:
    parser = build_parser()
    args = parser.parse_args(["worker", "--server", "https://t.example", "--token", "tdw_x"])
    assert (args.server, args.token, args.token_file) == ("https://t.example", "tdw_x", None)
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--token", "tdw_x", "--token-file", "/run/secrets/token"])
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command")  # type: ignore[union-attr]
    help_text = sub.choices["worker"].format_help()
    assert "TUNEDECK_WORKER_TOKEN" in help_text and "TUNEDECK_WORKER_TOKEN_FILE" in help_text
