"""The comparison grid page: what a finished cell shows."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tests.webapp.team import login
from tests.webapp.test_adapter_jobs import adapter, compare
from webapp.playground.models import AdapterJob

pytestmark = pytest.mark.django_db


def test_an_answer_that_ended_at_once_says_so_and_a_running_cell_stays_blank(team: Any, client: Client) -> None:
    a = adapter(team, name="add-adapter")
    comparison = compare(team, a, prompts="What is 2 + 2?")
    login(client, "mate")
    running = client.get(f"/compare/{comparison.pk}/").content.decode()
    assert "(no output)" not in running  # nothing generated yet is not "no output"

    comparison.store_outputs(
        [{"row": 0, "column": "__base__", "text": "<b>4</b>"}, {"row": 0, "column": a.key, "text": ""}]
    )
    AdapterJob.objects.filter(pk=comparison.job_id).update(state="succeeded")
    page = client.get(f"/compare/{comparison.pk}/").content.decode()
    assert page.count("(no output)") == 1
    assert "&lt;b&gt;4&lt;/b&gt;" in page and "<b>4</b>" not in page
