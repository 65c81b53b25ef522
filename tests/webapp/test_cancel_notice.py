"""A cancel's message follows the run: it lives in the live status panel, which the stream replaces as the
state changes, never in a flash message that outlives the cancel."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tests.webapp.team import login, make
from webapp.fleet.models import Worker
from webapp.jobs import ledger
from webapp.training.models import TrainingRun
from webapp.training.views import next_batch

pytestmark = pytest.mark.django_db


def status_panel(page: str) -> str:
    return page[page.index('id="run-status"'):page.index('id="log-heading"')]


def flashes(page: str) -> str:
    main = page[page.index("<main>"):page.index('class="live"')]
    return main if 'class="flash' in main else ""


def test_the_cancel_notice_is_in_the_live_status_panel_and_goes_once_the_run_is_cancelled(team: Any, client: Client) -> None:
    worker = Worker.objects.create(name="gpu-1", state="online")
    run = make(team, state="running", attempt=1, worker=worker)
    login(client, "owner")
    page = client.post(f"/runs/{run.pk}/cancel/", follow=True).content.decode()
    assert flashes(page) == ""  # a flash would stay on the page after the run is cancelled
    assert 'id="cancel-notice"' in status_panel(page) and "Cancel requested" in status_panel(page)

    # The worker stops at its next step and reports it: the panel the stream sends now replaces the notice.
    TrainingRun.objects.filter(pk=run.pk).update(state="cancelled")
    messages, _, (state, _), final = next_batch(run.pk, 0, ("running", ""))
    panel = next(m for m in messages if m.startswith("event: status"))
    assert state == "cancelled" and final
    assert "Cancel requested" not in panel and 'id="run-state">cancelled<' in panel
    reloaded = client.get(f"/runs/{run.pk}/").content.decode()
    assert "Cancel requested" not in status_panel(reloaded) and flashes(reloaded) == ""


def test_a_queued_run_is_cancelled_at_once_and_the_message_says_so(team: Any, client: Client) -> None:
    run = make(team)
    login(client, "owner")
    page = client.post(f"/runs/{run.pk}/cancel/", follow=True).content.decode()
    assert TrainingRun.objects.get(pk=run.pk).state == "cancelled"
    assert "Cancel requested" not in page and "Cancelled before it started" in flashes(page)
    finished = client.post(f"/runs/{run.pk}/cancel/", follow=True).content.decode()
    assert "already cancelled" in flashes(finished)


def test_a_running_run_that_stops_right_after_the_cancel_is_not_said_to_have_never_started(
    team: Any, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = Worker.objects.create(name="gpu-1", state="online")
    run = make(team, state="running", attempt=1, worker=worker)
    request_cancel = ledger.request_cancel

    def and_the_worker_stops_at_once(job: Any) -> Any:
        asked = request_cancel(job)
        TrainingRun.objects.filter(pk=job.pk).update(state="cancelled")  # its report arrives before the answer
        return asked

    monkeypatch.setattr(ledger, "request_cancel", and_the_worker_stops_at_once)
    login(client, "owner")
    page = client.post(f"/runs/{run.pk}/cancel/", follow=True).content.decode()
    assert TrainingRun.objects.get(pk=run.pk).state == "cancelled"
    assert "Cancelled before it started" not in page and flashes(page) == ""
