"""Pause and resume of a training run: the ledger's moves, what a worker is told, the run page's buttons and the
REST API. The run through a real worker, checkpointed at the step it reached and resumed to the uninterrupted
step count, is in test_pause_resume_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.webapp.api_helpers import Team, bearer, key_for, make_team, problem_of
from tests.webapp.factories import make_run, make_worker
from webapp.fleet.scheduler import schedule_once
from webapp.jobs import ledger
from webapp.training.models import TrainingRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def api_team(tiny_model_dir: Path, store_dir: Path, db: Any) -> Team:
    return make_team(tiny_model_dir)


def worker_post(token: str, path: str, payload: dict[str, Any]) -> Any:
    return Client().post(f"/api/worker/v1{path}", payload, content_type="application/json",
                         HTTP_AUTHORIZATION=f"Bearer {token}")


def api_post(client: Client, path: str, raw: str) -> Any:
    return client.post(path, json.dumps({}), content_type="application/json", **bearer(raw))


def running_run(t: Team) -> tuple[TrainingRun, str, int]:
    """A run placed on a worker that has claimed it and reported it running: the run, the worker's token, the attempt."""
    run = make_run(t.owner, t.base, t.dataset, t.config)
    worker, token = make_worker("w-pause")
    attempt = ledger.dispatch(run, worker)
    assert attempt is not None
    assert worker_post(token, f"/jobs/{run.pk}/claim", {"attempt": attempt}).status_code == 200
    assert worker_post(token, f"/jobs/{run.pk}/status", {"attempt": attempt, "state": "running"}).status_code == 200
    return run, token, attempt


def test_it_pauses_a_running_run_through_its_workers_handover_and_resumes_it_in_its_place(api_team: Team) -> None:
    t = api_team
    run, token, attempt = running_run(t)
    events = {"attempt": attempt, "events": [{"seq": 1, "kind": "metric", "data": {"step": 4, "total_steps": 9}}]}
    assert worker_post(token, f"/jobs/{run.pk}/events", events).json()["interrupt"] == ""

    assert ledger.request_pause(run, t.owner) == "requested"
    run.refresh_from_db()
    assert (run.state, run.pause_requested, run.worker.name) == ("running", True, "w-pause")  # until the worker stops
    # The worker learns it from the reply to its next post, as a handover: it checkpoints and reports interrupted.
    reply = worker_post(token, f"/jobs/{run.pk}/events", {**events, "events": []}).json()
    assert reply == {"cancel": False, "interrupt": ledger.PAUSE_REASON, "stored": 0}
    stopped = worker_post(token, f"/jobs/{run.pk}/status",
                          {"attempt": attempt, "state": "interrupted", "error": reply["interrupt"]})
    assert stopped.status_code == 200, stopped.content
    run.refresh_from_db()
    assert (run.state, run.worker, run.gpu_indices, run.pause_requested, run.failures) == ("paused", None, [], False, 0)
    assert (run.step, run.attempt_log[-1]["outcome"], run.attempt_log[-1]["worker"]) == (4, "paused", "w-pause")
    messages = list(run.events.values_list("message", flat=True))
    assert "Pause requested by owner: the worker saves a checkpoint at its next step and stops" in messages

    # Paused: not placed while the scheduler ticks, and the worker holds nothing of it.
    make_worker("w-idle")
    schedule_once()
    run.refresh_from_db()
    assert (run.state, run.attempt) == ("paused", attempt)

    place = run.queue_order
    assert ledger.resume(run, t.mate) is True  # (the ledger does not check who: the views do)
    run.refresh_from_db()
    assert (run.state, run.queue_order, run.queued_at is not None) == ("queued", place, True)
    assert "Resumed by mate: queued again, it continues from its latest checkpoint" in run.events.values_list(
        "message", flat=True)
    assert ledger.resume(run, t.owner) is False  # queued: nothing to resume


def test_a_queued_run_is_held_at_once_and_a_pending_pause_is_withdrawn_by_resume(api_team: Team) -> None:
    t = api_team
    queued = make_run(t.owner, t.base, t.dataset, t.config)
    assert ledger.request_pause(queued, t.owner) == "paused"
    assert TrainingRun.objects.get(pk=queued.pk).state == "paused"
    assert ledger.request_pause(queued, t.owner) == ""  # already paused
    assert ledger.request_cancel(queued) == "cancelled"  # a paused run is cancelled at once
    assert TrainingRun.objects.get(pk=queued.pk).state == "cancelled"

    run, token, attempt = running_run(t)
    ledger.request_pause(run, t.owner)
    assert ledger.resume(run, t.owner) is True  # before the worker saw it: the pause is withdrawn
    run.refresh_from_db()
    assert (run.state, run.pause_requested) == ("running", False)
    reply = worker_post(token, f"/jobs/{run.pk}/events", {"attempt": attempt, "events": []}).json()
    assert reply["interrupt"] == ""


def test_a_dispatched_run_its_worker_has_not_claimed_is_paused_at_once_and_the_late_claim_refused(api_team: Team) -> None:
    t = api_team
    run = make_run(t.owner, t.base, t.dataset, t.config)
    worker, token = make_worker("w-late")
    attempt = ledger.dispatch(run, worker)
    assert ledger.request_pause(run, t.owner) == "paused"
    run.refresh_from_db()
    assert (run.state, run.worker, run.attempt_log[-1]["outcome"]) == ("paused", None, "paused")
    assert worker_post(token, f"/jobs/{run.pk}/claim", {"attempt": attempt}).status_code == 404


def test_a_worker_lost_while_a_pause_is_pending_leaves_the_run_paused_not_queued(api_team: Team) -> None:
    t = api_team
    run, _token, _attempt = running_run(t)
    ledger.request_pause(run, t.owner)
    run.refresh_from_db()
    assert ledger.requeue_or_fail(run, "Worker w-pause went offline", max_attempts=3) == "paused"
    run.refresh_from_db()
    assert (run.state, run.failures, run.attempt_log[-1]["outcome"]) == ("paused", 1, "lost")


def test_the_rest_api_pauses_and_resumes_for_the_owner_only(client: Client, api_team: Team) -> None:
    t = api_team
    run = make_run(t.owner, t.base, t.dataset, t.config)
    raw = key_for(t.owner)
    problem_of(api_post(client, f"/api/v1/runs/{run.pk}/pause/", key_for(t.mate)), 403)
    body = api_post(client, f"/api/v1/runs/{run.pk}/pause/", raw).json()
    assert (body["state"], body["pause_requested"]) == ("paused", False)
    assert "only a queued or running run" in problem_of(api_post(client, f"/api/v1/runs/{run.pk}/pause/", raw), 409)["detail"]
    listed = client.get("/api/v1/runs/?state=paused", **bearer(raw)).json()
    assert [r["id"] for r in listed["results"]] == [run.pk]
    assert api_post(client, f"/api/v1/runs/{run.pk}/resume/", raw).json()["state"] == "queued"
    assert "only a paused run" in problem_of(api_post(client, f"/api/v1/runs/{run.pk}/resume/", raw), 409)["detail"]

    running, _token, _attempt = running_run(t)
    body = api_post(client, f"/api/v1/runs/{running.pk}/pause/", key_for(t.boss)).json()  # staff may
    assert (body["state"], body["pause_requested"]) == ("running", True)


def test_the_run_page_shows_pause_then_resume_and_posts_them_with_its_csrf_token(api_team: Team) -> None:
    t = api_team
    t.owner.set_password("pw-owner-123")
    t.owner.save()
    run = make_run(t.owner, t.base, t.dataset, t.config)
    browser = Client(enforce_csrf_checks=True)
    assert browser.login(username="owner", password="pw-owner-123")
    page = browser.get(f"/runs/{run.pk}/").content.decode()
    assert f'action="/runs/{run.pk}/pause/"' in page and 'id="resume-run"' not in page
    token = browser.cookies["csrftoken"].value
    assert browser.post(f"/runs/{run.pk}/pause/").status_code == 403  # no CSRF token
    page = browser.post(f"/runs/{run.pk}/pause/", {"csrfmiddlewaretoken": token}, follow=True).content.decode()
    assert TrainingRun.objects.get(pk=run.pk).state == "paused"
    assert 'id="resume-run"' in page and 'id="pause-run"' not in page and 'id="paused-notice"' in page
    browser.post(f"/runs/{run.pk}/resume/", {"csrfmiddlewaretoken": token})
    assert TrainingRun.objects.get(pk=run.pk).state == "queued"

    other = Client()
    other.force_login(t.mate)
    assert other.post(f"/runs/{run.pk}/pause/").status_code == 403
    assert 'id="pause-run"' not in other.get(f"/runs/{run.pk}/").content.decode()
