"""The worker API: a worker sees only its own jobs, and reports from an older attempt change nothing."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.webapp.factories import demo_objects, make_run, make_worker
from tests.webapp.fleetprocs import Fleet, until
from webapp.celery import send_wakeup
from webapp.fleet.models import Worker
from webapp.jobs import ledger
from webapp.playground import services
from webapp.playground.models import AdapterJob
from webapp.training.models import Adapter, RunEvent, TrainingRun

pytestmark = pytest.mark.django_db


@pytest.fixture
def setup(tiny_model_dir, store_dir):  # type: ignore[no-untyped-def]
    user, base, dataset, config = demo_objects(tiny_model_dir)
    run = make_run(user, base, dataset, config)
    worker, token = make_worker("w1")
    _other, other_token = make_worker("w2")
    return run, worker, token, other_token


def post(token: str, path: str, payload: dict):  # type: ignore[no-untyped-def]
    return Client().post(f"/api/worker/v1{path}", payload, content_type="application/json",
                         headers={"Authorization": f"Bearer {token}"})


def test_it_gives_the_spec_only_to_the_assigned_worker(setup) -> None:  # type: ignore[no-untyped-def]
    run, worker, token, other_token = setup
    attempt = ledger.dispatch(run, worker)
    wrong = post(other_token, f"/jobs/{run.pk}/claim", {"attempt": attempt})
    assert wrong.status_code == 404 and "spec" not in wrong.json()
    assert post("tdw_forged", f"/jobs/{run.pk}/claim", {"attempt": attempt}).status_code == 401
    ok = post(token, f"/jobs/{run.pk}/claim", {"attempt": attempt})
    assert ok.status_code == 200
    assert ok.json()["spec"]["attempt"] == attempt and ok.json()["spec"]["run_id"] == run.pk
    # A redelivered wake-up claims again: refused, so the job never runs twice.
    again = post(token, f"/jobs/{run.pk}/claim", {"attempt": attempt})
    assert again.status_code == 409 and "already claimed" in again.json()["detail"]


def test_reports_from_an_older_attempt_get_409_and_change_nothing(setup) -> None:  # type: ignore[no-untyped-def]
    run, worker, token, _ = setup
    first = ledger.dispatch(run, worker)
    post(token, f"/jobs/{run.pk}/status", {"attempt": first, "state": "running"})
    ledger.requeue_or_fail(TrainingRun.objects.get(pk=run.pk), "worker lost", max_attempts=3)
    second = ledger.dispatch(run, worker)
    assert second == first + 1
    before = RunEvent.objects.count()

    stale_events = post(token, f"/jobs/{run.pk}/events",
                        {"attempt": first, "events": [{"seq": 1, "kind": "log", "message": "late"}]})
    stale_status = post(token, f"/jobs/{run.pk}/status",
                        {"attempt": first, "state": "failed", "error": "old attempt died"})
    assert (stale_events.status_code, stale_status.status_code) == (409, 409)
    run.refresh_from_db()
    assert (run.state, run.attempt, run.error) == ("dispatched", second, "")
    assert RunEvent.objects.count() == before


def test_a_retried_event_batch_is_stored_once_and_returns_the_cancel_flag(setup) -> None:  # type: ignore[no-untyped-def]
    run, worker, token, _ = setup
    attempt = ledger.dispatch(run, worker)
    assert post(token, f"/jobs/{run.pk}/claim", {"attempt": attempt}).status_code == 200
    batch = {"attempt": attempt, "events": [
        {"seq": 1, "kind": "log", "message": "<script>alert(1)</script>"},
        {"seq": 2, "kind": "metric", "data": {"step": 3, "total_steps": 10, "loss": 1.5}},
    ]}
    assert post(token, f"/jobs/{run.pk}/events", batch).json()["cancel"] is False
    ledger.request_cancel(run)
    assert post(token, f"/jobs/{run.pk}/events", batch).json()["cancel"] is True
    assert list(RunEvent.objects.filter(run=run, seq__isnull=False).values_list("seq", flat=True)) == [1, 2]
    run.refresh_from_db()
    assert (run.step, run.total_steps, run.last_loss) == (3, 10, 1.5)


# --- cancel before the worker claimed the attempt -----------------------------------------------------------


def adapter_job(user, base) -> AdapterJob:  # type: ignore[no-untyped-def]
    """A merge job of an adapter (no file behind it: the job is only dispatched, claimed and cancelled)."""
    adapter = Adapter.objects.create(name="a", owner=user, base_model=base, rank=8, uri="store://adapters/a",
                                     size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=2)
    return services.start_merge(user, adapter)


@pytest.mark.parametrize("kind", ["run", "adapter job"])
def test_a_job_cancelled_before_its_worker_claimed_it_ends_at_once_and_the_claim_is_refused(setup, kind) -> None:  # type: ignore[no-untyped-def]
    run, worker, token, _ = setup
    job, model, path = (run, TrainingRun, "jobs") if kind == "run" else (adapter_job(run.owner, run.base_model), AdapterJob, "adapter-jobs")
    attempt = ledger.dispatch(job, worker, gpu_indices=[0])
    assert ledger.request_cancel(model.objects.get(pk=job.pk))
    job = model.objects.get(pk=job.pk)
    # Nothing runs on the worker yet: the job is cancelled now, not flagged for a worker that has not started it.
    assert (job.state, job.gpu_indices, job.failures, job.finished_at is not None) == ("cancelled", [], 0, True)
    assert job.attempt_log[-1]["outcome"] == "cancelled" and "before" in job.attempt_log[-1]["reason"]

    refused = post(token, f"/{path}/{job.pk}/claim", {"attempt": attempt})
    assert refused.status_code == 409 and "spec" not in refused.json()
    assert refused.json()["code"] == "cancelled" and "cancelled" in refused.json()["detail"]
    assert model.objects.get(pk=job.pk).claimed_at is None
    # The heartbeat has nothing to cancel on the worker: it never started it.
    beat = post(token, "/heartbeat", {}).json()
    assert beat["cancel"] == [] and beat["cancel_adapter_jobs"] == []


def test_a_flagged_attempt_that_was_never_claimed_is_refused_at_claim_and_ends_cancelled(setup) -> None:  # type: ignore[no-untyped-def]
    """A cancel flag set on an unclaimed attempt (a cancel racing the claim, or a row flagged by an older
    version) is honoured by the claim itself: nothing is handed to the worker."""
    run, worker, token, _ = setup
    attempt = ledger.dispatch(run, worker)
    TrainingRun.objects.filter(pk=run.pk).update(cancel_requested=True)
    refused = post(token, f"/jobs/{run.pk}/claim", {"attempt": attempt})
    assert refused.status_code == 409 and refused.json()["code"] == "cancelled"
    run.refresh_from_db()
    assert (run.state, run.claimed_at, run.failures) == ("cancelled", None, 0)


def test_a_claimed_job_is_flagged_and_its_worker_stops_it(setup) -> None:  # type: ignore[no-untyped-def]
    run, worker, token, _ = setup
    attempt = ledger.dispatch(run, worker)
    assert post(token, f"/jobs/{run.pk}/claim", {"attempt": attempt}).status_code == 200
    assert ledger.request_cancel(run)
    run.refresh_from_db()
    assert (run.state, run.cancel_requested) == ("dispatched", True)  # the worker holds it: it learns and stops
    assert post(token, f"/jobs/{run.pk}/status", {"attempt": attempt, "state": "running"}).json()["cancel"] is True
    post(token, f"/jobs/{run.pk}/status", {"attempt": attempt, "state": "cancelled"})
    assert TrainingRun.objects.get(pk=run.pk).state == "cancelled"


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_real_worker_skips_jobs_cancelled_before_their_claim_without_loading_them(  # type: ignore[no-untyped-def]
    live_server, tmp_path, settings, tiny_model_dir
) -> None:
    settings.ARTIFACT_STORE = tmp_path
    fleet = Fleet(live_server.url, tmp_path)
    try:
        user, base, dataset, config = demo_objects(tiny_model_dir)
        fleet.start("w-cancel")
        fleet.wait_ready("w-cancel")
        worker = Worker.objects.get(name="w-cancel")
        jobs = [(make_run(user, base, dataset, config), TrainingRun), (adapter_job(user, base), AdapterJob)]
        for job, model in jobs:  # the wake-up arrives after the cancel, as when the user is quicker than the broker
            attempt = ledger.dispatch(job, worker)
            assert attempt is not None and ledger.request_cancel(model.objects.get(pk=job.pk))
            send_wakeup(worker.name, job.pk, attempt, model.TASK)
        until(lambda: fleet.log("w-cancel").count("cancelled before it started: skipped") == 2, 120,
              lambda: fleet.log("w-cancel")[-3000:])
        log = fleet.log("w-cancel")
        assert " claimed" not in log and "Traceback" not in log
        for job, model in jobs:
            job = model.objects.get(pk=job.pk)
            assert (job.state, job.failures, job.claimed_at, job.started_at) == ("cancelled", 0, None, None)
            assert not job.events.filter(seq__isnull=False).exists()  # the worker reported nothing: it loaded nothing
    finally:
        fleet.stop()


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("gpus", [1, 2])
def test_a_run_cancelled_between_its_claim_and_its_start_loads_nothing(  # type: ignore[no-untyped-def]
    live_server, tmp_path, settings, tiny_model_dir, gpus
) -> None:
    """The worker holds the attempt (so the cancel is a flag): its first report's reply says so, and the
    runner stops there, before the dataset, the model or (on several GPUs) the process group."""
    from workers.contract.spec import TrainSpec
    from workers.contract.store import ArtifactStore
    from workers.runtime.client import HttpReporter, WorkerClient
    from workers.runtime.launch import run_training_job

    settings.ARTIFACT_STORE = tmp_path
    user, base, dataset, config = demo_objects(tiny_model_dir)
    run = make_run(user, base, dataset, config, num_gpus=gpus, strategy="ddp", batch_size=2, grad_accum=2)
    worker, token = make_worker("w1")
    attempt = ledger.dispatch(run, worker)
    api = WorkerClient(live_server.url, token)
    spec = TrainSpec.from_dict(api.claim(run.pk, attempt))
    assert ledger.request_cancel(TrainingRun.objects.get(pk=run.pk))
    reporter = HttpReporter(api, run.pk, attempt)
    assert run_training_job(spec, lambda: reporter, ArtifactStore(tmp_path)) is None
    run.refresh_from_db()
    assert (run.state, run.failures) == ("cancelled", 0)
    said = " | ".join(run.events.filter(seq__isnull=False).values_list("message", flat=True))
    assert "Cancelled" in said and "loading" not in said and "Launching" not in said, said


def test_log_text_is_escaped_on_the_run_page(setup, client) -> None:  # type: ignore[no-untyped-def]
    run, worker, token, _ = setup
    attempt = ledger.dispatch(run, worker)
    post(token, f"/jobs/{run.pk}/events",
         {"attempt": attempt, "events": [{"seq": 1, "kind": "log", "message": "<script>alert(1)</script>"}]})
    client.login(username="owner", password="owner-pass-123")
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_an_unknown_target_module_is_refused_at_creation_with_the_valid_names(setup, client) -> None:  # type: ignore[no-untyped-def]
    run, *_ = setup
    run.lora_config.params["target_modules"] = ["q_proj", "query_key_value"]
    run.lora_config.save()
    client.login(username="owner", password="owner-pass-123")
    form = {"base_model": run.base_model.pk, "dataset": run.dataset.pk, "lora_config": run.lora_config.pk,
            **{k: v for k, v in run.hyperparameters.items() if not isinstance(v, bool)}}
    response = client.post("/runs/new/", form)
    assert response.status_code == 400
    text = response.content.decode()
    assert "target_modules: query_key_value not found; the linear modules of tiny are: down_proj, gate_proj" in text
    assert TrainingRun.objects.count() == 1


def test_a_dataset_with_a_malformed_line_is_rejected_naming_the_line(client, store_dir) -> None:  # type: ignore[no-untyped-def]
    from django.contrib.auth import get_user_model
    from django.core.files.uploadedfile import SimpleUploadedFile

    get_user_model().objects.create_user("u", password="u-pass-12345")
    client.login(username="u", password="u-pass-12345")
    upload = SimpleUploadedFile("bad.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    response = client.post("/datasets/", {"name": "bad", "file": upload})
    assert response.status_code == 400
    assert "line 3: invalid JSON" in response.content.decode()
    from webapp.catalog.models import Dataset

    assert not Dataset.objects.exists() and not list(store_dir.rglob("*.jsonl"))


@pytest.mark.parametrize(("bad", "named"), [
    ({"seq": 2, "kind": "metric", "data": [1, 2]}, "events[1] (seq 2).data must be a JSON object"),
    ({"seq": 2, "kind": "metric", "data": "str"}, "events[1] (seq 2).data must be a JSON object"),
    ({"seq": 2, "kind": "metric", "data": {"step": "three"}}, "events[1] (seq 2).data.step must be"),
    ({"seq": 2, "kind": "metric", "data": {"step": 3, "loss": "low"}}, "events[1] (seq 2).data.loss must be"),
    ({"seq": "two", "kind": "log", "message": "x"}, "events[1].seq must be"),
    ({"seq": 2**31, "kind": "log", "message": "x"}, "events[1].seq must be an integer from 0 to 2147483647"),
    ({"kind": "log", "message": "x"}, "events[1].seq is required"),
    ({"seq": 2, "kind": "log", "message": {"text": "x"}}, "events[1] (seq 2).message must be a string"),
    ("not an event", "events[1] must be a JSON object"),
])
def test_a_malformed_event_is_refused_naming_it_and_nothing_of_the_batch_is_stored(setup, bad, named) -> None:  # type: ignore[no-untyped-def]
    run, worker, token, _ = setup
    attempt = ledger.dispatch(run, worker)
    before = RunEvent.objects.filter(run=run).count()
    good = {"seq": 1, "kind": "metric", "data": {"step": 1, "total_steps": 10, "loss": 2.0}}
    response = post(token, f"/jobs/{run.pk}/events", {"attempt": attempt, "events": [good, bad]})
    assert response.status_code == 400, response.content
    assert named in response.json()["detail"]
    assert RunEvent.objects.filter(run=run).count() == before
    run.refresh_from_db()
    assert (run.step, run.last_loss) == (0, None)
