"""Property-based fuzzing of the whole REST API from its own OpenAPI schema (schemathesis) against a live
server: no server errors, every response the schema describes matches it, and nothing answers without
credentials.

Bounded: a few generated requests per operation (TUNEDECK_FUZZ_EXAMPLES, default 6), so that the whole run
stays within a few minutes on a small CI machine. Failures are collected per operation and reported together.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.webapp.api_helpers import key_for, make_team
from tests.webapp.factories import make_run, make_worker
from webapp.playground import services
from webapp.training.models import Adapter, RunEvent, TrainingRun
from workers.contract.store import ArtifactStore

EXAMPLES = int(os.environ.get("TUNEDECK_FUZZ_EXAMPLES", "6"))
# A stream stays open while its job runs: it is tested on its own (test_api_runs, test_chat_e2e), not fuzzed. So is
# sending a chat message: with `stream` it answers with the answers' stream, open until a worker has written them.
STREAMS = r"(/events/stream/|/messages/\{index\}/stream/|/playground/sessions/\{id\}/messages/)$"
LOGIN = r"^/api/v1/login/$"
TIMEOUT = 30


def _seed(tiny_model_dir: Path, store: Path) -> Any:
    """Rows for the generated ids to find: runs with events, an adapter with files, jobs, a worker."""
    team = make_team(tiny_model_dir)
    finished = make_run(team.owner, team.base, team.dataset, team.config)
    TrainingRun.objects.filter(pk=finished.pk).update(state="succeeded", attempt=1,
                                                      metric_points=[{"step": 1, "loss": 2.0}])
    RunEvent.objects.create(run=finished, attempt=1, seq=0, kind="log", message="hello")
    RunEvent.objects.create(run=finished, attempt=1, seq=1, kind="checkpoint", data={"step": 1})
    make_run(team.mate, team.base, team.dataset, team.config)
    uri = "store://runs/1/attempt-1/adapter"
    folder = ArtifactStore(store).path(uri)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    adapter = Adapter.objects.create(name="a", owner=team.owner, base_model=team.base, run=finished, rank=8, uri=uri,
                                     size_bytes=8, sha256="0" * 64, trainable_params=1, total_params=2)
    services.start_merge(team.owner, adapter)
    make_worker("fuzz-worker")
    return team


def _fuzz(schema: Any, base_url: str, headers: dict[str, str], checks: list[Any], examples: int,
          expect: Any = None) -> list[str]:
    """Every operation of `schema`, `examples` generated requests each; the failures, one line per operation."""
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                             suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            response = case.call(base_url=base_url, headers=headers, timeout=TIMEOUT)
            case.validate_response(response, checks=checks, headers=headers)
            if expect is not None:
                expect(case, response)

        try:
            check()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # schemathesis raises a group; each operation's failures are collected
            failures.append(f"{operation.method.upper()} {operation.path}: {str(exc).strip()[:1500]}")
    return failures


@pytest.mark.django_db(transaction=True)
def test_the_whole_api_survives_fuzzing_and_needs_credentials(live_server, tiny_model_dir: Path, store_dir: Path,
                                                              settings) -> None:  # type: ignore[no-untyped-def]
    settings.TUNEDECK_API_RATE = settings.TUNEDECK_API_ANON_RATE = "1000000/minute"
    team = _seed(tiny_model_dir, store_dir)
    schema = schemathesis.openapi.from_url(f"{live_server.url}/api/v1/schema/")
    assert len(list(schema.get_all_operations())) > 40

    # Without credentials every operation (streams included) answers 401 or 403 and nothing else; but the login,
    # whose credentials are a user name and password in its body.
    def refused(case: Any, response: Any) -> None:
        assert response.status_code in (401, 403), f"{response.status_code} without credentials: {response.text[:300]}"

    failures = _fuzz(schema.exclude(path_regex=LOGIN), live_server.url, {}, [not_a_server_error], 2, expect=refused)
    failures += _fuzz(schema.include(path_regex=LOGIN), live_server.url, {},
                      [not_a_server_error, response_schema_conformance], EXAMPLES)

    # A write-scoped key of a staff member (admin endpoints refuse it: 403), then an admin key on the workers.
    checks = [not_a_server_error, response_schema_conformance]
    write = {"Authorization": f"Bearer {key_for(team.boss, 'read', 'write')}"}
    failures += _fuzz(schema.exclude(path_regex=STREAMS), live_server.url, write, checks, EXAMPLES)
    admin = {"Authorization": f"Bearer {key_for(team.boss, 'admin')}"}
    failures += _fuzz(schema.include(path_regex=r"^/api/v1/workers/"), live_server.url, admin, checks, EXAMPLES)
    assert not failures, "\n\n".join(failures)
