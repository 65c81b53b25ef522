"""The jobs core sees every kind of job: the scheduler, the worker API and the queue work through its registry."""

from __future__ import annotations

import pytest
from django.test import RequestFactory

from webapp.jobs.ledger import events_of
from webapp.jobs.registry import job_models, model_named, worker_paths
from webapp.jobs.stream import BadCursor, page_cursor, stream_cursor
from webapp.playground.kinds import HOOKS, JobKind
from webapp.playground.models import AdapterJob, JobEvent
from webapp.training.models import RunEvent, TrainingRun
from workers.contract.kinds import KINDS


def test_the_registry_lists_every_concrete_kind_in_the_apps_order() -> None:
    assert job_models() == (TrainingRun, AdapterJob)
    assert model_named("AdapterJob") is AdapterJob
    assert worker_paths() == {"jobs": TrainingRun, "adapter-jobs": AdapterJob}
    assert events_of(TrainingRun) == (RunEvent, "run") and events_of(AdapterJob) == (JobEvent, "job")


def test_a_cursor_that_is_no_event_id_is_refused_by_the_api_and_left_out_by_the_pages() -> None:
    factory = RequestFactory()
    mixed = factory.get("/x", {"after": "12"}, headers={"Last-Event-ID": "x1"})
    with pytest.raises(BadCursor) as refused:
        stream_cursor(mixed)
    assert refused.value.source == "Last-Event-ID"
    assert page_cursor(mixed) == 12
    assert stream_cursor(factory.get("/x", {"after": "7"}, headers={"Last-Event-ID": " 9 "})) == 9
    assert page_cursor(factory.get("/x", {"after": "9" * 20})) == 0  # past a bigint: no event id


def test_every_adapter_job_kind_is_declared_on_both_planes() -> None:
    """A kind's worker half (spec, runner, needs: workers.contract.kinds) and its control-plane half (the ledger's
    hooks: playground.kinds) name the same kinds as the model's choices."""
    assert set(JobKind.values) == set(KINDS) == set(HOOKS)
