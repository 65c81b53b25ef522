"""The push runner: an adapter from the artifact store to a (fake) Hub, as a worker runs a push job."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.fakehub import FakeHub
from tests.workers.test_hub import TOKEN, files_of
from workers.adapters.push import run_push
from workers.contract.jobspecs import PushSpec
from workers.contract.kinds import spec_from_dict
from workers.contract.reporter import MemoryReporter
from workers.contract.store import ArtifactStore


@pytest.fixture
def store(tmp_path: Path, task_adapters) -> ArtifactStore:  # type: ignore[no-untyped-def]
    source, uris = task_adapters
    store = ArtifactStore(tmp_path / "store")
    shutil.copytree(source.path(uris["add"]), store.path("store://adapters/add"))
    return store


def spec(endpoint: str, token: str = TOKEN, repo_id: str = "team/add-adapter") -> PushSpec:
    # Built the way the worker builds it: from the JSON the claim returns.
    return spec_from_dict("push", {
        "job_id": 3, "attempt": 1, "source_uri": "store://adapters/add", "repo_id": repo_id, "private": True,
        "commit_message": "Upload add from Tunedeck", "endpoint": endpoint, "token": token,
    })


def test_a_push_job_uploads_the_adapter_and_reports_the_commit(store: ArtifactStore, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    reporter = MemoryReporter()
    with FakeHub(TOKEN) as hub:
        result = run_push(spec(hub.url), reporter, store)
    assert result is not None and [s for s, _, _ in reporter.states] == ["running", "succeeded"]
    repo = hub.repo("team/add-adapter")
    assert repo.files == files_of(store.path("store://adapters/add")) and repo.private
    assert result["url"] == result["commit_url"] and result["commit_oid"] == repo.head
    everything = json.dumps([reporter.events, reporter.states])
    assert TOKEN not in everything and TOKEN not in repr(spec(hub.url))


def test_a_refused_token_fails_the_job_without_showing_it(store: ArtifactStore, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    wrong = "hf_WrongTokenZyxwvutsrq9876543210"
    reporter = MemoryReporter()
    with FakeHub(TOKEN) as hub:
        assert run_push(spec(hub.url, token=wrong), reporter, store) is None
    state, _, error = reporter.states[-1]
    assert state == "failed" and "401" in error
    assert wrong not in json.dumps([reporter.events, reporter.states])


def test_a_missing_source_or_bad_repo_id_fails_before_any_upload(store: ArtifactStore) -> None:
    with FakeHub(TOKEN) as hub:
        bad = spec(hub.url, repo_id="no-namespace")
        reporter = MemoryReporter()
        assert run_push(bad, reporter, store) is None
        assert "repo_id" in reporter.states[-1][2]
        gone = spec(hub.url)
        gone.source_uri = "store://adapters/deleted"
        reporter = MemoryReporter()
        assert run_push(gone, reporter, store) is None
        assert "store://adapters/deleted" in reporter.states[-1][2]
    assert hub.requests == []
