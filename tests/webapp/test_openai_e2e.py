"""The OpenAI-compatible API end to end, through the official `openai` package against a live server with a
real `tunedeck worker` process training the tiny model: upload a file, create a job, poll it to `succeeded`
(the scheduler ticking meanwhile), list its events and checkpoints, then cancel a second job mid-training; train a
dpo and a reinforcement job, read their metrics events, and pause and resume a job mid-training."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.webapp.factories import demo_objects
from tests.webapp.fleetprocs import Fleet, until
from webapp.api.models import ApiKey
from webapp.catalog.models import Dataset
from webapp.training.models import Adapter, TrainingRun
from workers.training.demo import SEVENS_GRADER, preference_rows, prompt_rows, toy_rows

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]
FINAL = ("succeeded", "failed", "cancelled")
# Small enough for two slow cores: a handful of steps, a checkpoint every 3.
TUNEDECK = {"lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["all-linear"]},
            "hyperparameters": {"max_steps": 6, "save_steps": 3, "keep_checkpoints": 2, "logging_steps": 1,
                                "max_seq_length": 64, "gradient_checkpointing": "off"}}


@pytest.fixture
def fleet(live_server: Any, tmp_path: Path, settings: Any) -> Iterator[Fleet]:
    settings.ARTIFACT_STORE = tmp_path
    fleet = Fleet(live_server.url, tmp_path)
    yield fleet
    fleet.stop()


def chat_file(count: int) -> bytes:
    rows = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
            for r in toy_rows(count, seed=3)]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def wait_for_job(client: openai.OpenAI, job_id: str, done: Any, timeout: float = 240) -> Any:
    """Retrieve the job through the SDK until `done(job)`, with the scheduler ticking (it places queued runs)."""
    seen: dict[str, Any] = {}

    def check() -> bool:
        seen["job"] = client.fine_tuning.jobs.retrieve(job_id)
        return bool(done(seen["job"]))

    def describe() -> Any:
        run = TrainingRun.objects.get(pk=int(job_id.removeprefix("ftjob-")))
        return seen.get("job"), [e.message for e in run.events.order_by("id")][-12:]

    until(check, timeout, describe, tick=True)
    return seen["job"]


def test_the_openai_package_uploads_trains_polls_lists_and_cancels(fleet: Fleet, live_server: Any,
                                                                   tiny_model_dir: Path) -> None:
    user, _base, _dataset, _config = demo_objects(tiny_model_dir)
    _, raw = ApiKey.issue(user, "sdk", ["write"])
    fleet.start("w-openai")
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key=raw, max_retries=0)

    # Files: a bad one is refused with the line and field, a good one becomes a dataset.
    with pytest.raises(openai.BadRequestError) as refused:
        bad_row = b'{"messages": [{"role": "user", "content": "2+2"}, {"role": "assistant"}]}\n'
        client.files.create(file=("bad.jsonl", chat_file(3) + bad_row), purpose="fine-tune")
    assert "line 4" in str(refused.value) and "messages[1].content" in str(refused.value)
    file = client.files.create(file=("add.jsonl", chat_file(96)), purpose="fine-tune")
    assert (file.object, file.status, file.filename, file.purpose) == ("file", "processed", "add.jsonl", "fine-tune")
    assert Dataset.objects.get(pk=int(file.id.removeprefix("file-"))).format == "messages"
    assert client.files.retrieve(file.id).bytes == file.bytes
    assert file.id in [f.id for f in client.files.list()]

    with pytest.raises(openai.PermissionDeniedError):  # a read-only key reads but cannot create
        read_only = openai.OpenAI(base_url=live_server.url + "/v1", api_key=ApiKey.issue(user, "ro", ["read"])[1],
                                  max_retries=0)
        read_only.fine_tuning.jobs.create(model="tiny", training_file=file.id)

    fleet.wait_ready("w-openai")
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=file.id, suffix="adder", seed=11,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 8, "n_epochs": 1}}},
        extra_body={"tunedeck": TUNEDECK},
    )
    assert (job.status, job.model, job.training_file, job.seed) == ("queued", "tiny", file.id, 11)

    job = wait_for_job(client, job.id, lambda j: j.status in FINAL)
    run = TrainingRun.objects.get(pk=int(job.id.removeprefix("ftjob-")))
    assert job.status == "succeeded", (job.error, run.error)
    assert job.fine_tuned_model == f"tiny:ft-{run.pk}" and job.finished_at is not None and job.error is None
    adapter = Adapter.objects.get(run=run)
    assert adapter.metrics["steps"] == 6 and job.to_dict()["tunedeck"]["adapter_id"] == adapter.pk

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=10))  # the SDK follows `after` page to page
    assert len(events) == run.events.count()
    numbers = [int(e.id.removeprefix("ftevent-")) for e in events]
    assert numbers == sorted(numbers, reverse=True)  # newest first
    metrics = [e for e in events if e.type == "metrics" and e.data and "train_loss" in e.data]
    assert sorted(e.data["step"] for e in metrics) == [1, 2, 3, 4, 5, 6]
    assert any("Adapter saved" in e.message for e in events)

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [6, 3]
    assert all(c.metrics.train_loss is not None and c.fine_tuning_job_id == job.id for c in checkpoints)
    assert checkpoints[0].fine_tuned_model_checkpoint == f"tiny:ft-{run.pk}:ckpt-step-6"

    # A second job, cancelled while it trains: the worker stops at its next step.
    long = {**TUNEDECK, "hyperparameters": {**TUNEDECK["hyperparameters"], "max_steps": 5000, "save_steps": 0}}
    second = client.fine_tuning.jobs.create(model="tiny", training_file=file.id, extra_body={"tunedeck": long},
                                            extra_headers={"Idempotency-Key": "second-job"})
    retried = client.fine_tuning.jobs.create(model="tiny", training_file=file.id, extra_body={"tunedeck": long},
                                             extra_headers={"Idempotency-Key": "second-job"})
    assert retried.id == second.id and TrainingRun.objects.count() == 2
    wait_for_job(client, second.id, lambda j: j.status == "running" and j.to_dict()["tunedeck"]["step"] > 0)
    assert client.fine_tuning.jobs.cancel(second.id).status == "running"  # until the worker stops
    cancelled = wait_for_job(client, second.id, lambda j: j.status in FINAL, timeout=120)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    assert TrainingRun.objects.get(pk=int(second.id.removeprefix("ftjob-"))).step < 5000

    assert [j.id for j in client.fine_tuning.jobs.list(limit=10)] == [second.id, job.id]
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)  # it already succeeded


def test_the_openai_package_downloads_a_files_content_whatever_it_accepts(live_server: Any, tmp_path: Path,
                                                                         settings: Any, django_user_model: Any) -> None:
    """`files.content` sends `Accept: application/binary`, the deprecated `retrieve_content` JSON's: both get the
    bytes, and an error under either is still OpenAI's JSON error the package raises from."""
    settings.ARTIFACT_STORE = tmp_path
    user = django_user_model.objects.create_user("sdk-user", password="pw-sdk-123")
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key=ApiKey.issue(user, "sdk", ["write"])[1],
                           max_retries=0)
    data = chat_file(8)
    file = client.files.create(file=("add.jsonl", data), purpose="fine-tune")

    assert client.files.content(file.id).content == data
    if hasattr(client.files, "retrieve_content"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            assert client.files.retrieve_content(file.id) == data.decode()
    for accept in ("application/octet-stream", "text/plain", "application/xml", "*/*", "application/json"):
        assert client.files.content(file.id, extra_headers={"Accept": accept}).content == data, accept
        assert client.files.retrieve(file.id, extra_headers={"Accept": accept}).id == file.id, accept

    with pytest.raises(openai.NotFoundError) as missing:
        client.files.content("file-999999")
    assert missing.value.body == {"message": "No such File object: file-999999", "type": "not_found_error",
                                  "param": "id", "code": "not_found"}
    with pytest.raises(openai.AuthenticationError) as refused:
        openai.OpenAI(base_url=live_server.url + "/v1", api_key="tdk_not-a-key", max_retries=0).files.content(file.id)
    assert "invalid API key" in refused.value.message


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def metrics_of(client: openai.OpenAI, job_id: str) -> list[dict[str, Any]]:
    """The data of the job's metrics events with a training loss, oldest first."""
    events = client.fine_tuning.jobs.list_events(job_id, limit=100)
    return [e.data for e in reversed(list(events)) if e.type == "metrics" and e.data and "train_loss" in e.data]


def test_the_openai_package_trains_dpo_and_reinforcement_and_pauses_and_resumes_a_job(
        fleet: Fleet, live_server: Any, tiny_model_dir: Path) -> None:
    user, _base, _dataset, _config = demo_objects(tiny_model_dir)
    _, raw = ApiKey.issue(user, "sdk", ["write"])
    fleet.start("w-methods")
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key=raw, max_retries=0)
    tiny = {**TUNEDECK["hyperparameters"], "save_steps": 0}
    fleet.wait_ready("w-methods")

    # DPO on preference pairs: the metrics events carry its rewards in OpenAI's names.
    pairs = client.files.create(file=("pairs.jsonl", jsonl(preference_rows(32, seed=1))), purpose="fine-tune")
    dpo = client.fine_tuning.jobs.create(
        model="tiny", training_file=pairs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 8}}},
        extra_body={"tunedeck": {**TUNEDECK, "hyperparameters": {**tiny, "max_steps": 3}}})
    assert dpo.method is not None and dpo.method.type == "dpo"
    dpo = wait_for_job(client, dpo.id, lambda j: j.status in FINAL)
    assert dpo.status == "succeeded", dpo.error
    points = metrics_of(client, dpo.id)
    assert [p["step"] for p in points] == [1, 2, 3]
    assert all({"train_loss", "train_rewards_margins", "train_rewards_accuracies", "train_rewards_chosen"} <= set(p)
               for p in points), points[-1]

    # Reinforcement: GRPO with the grader, its answers sampled on the worker and scored there.
    prompts = client.files.create(file=("prompts.jsonl", jsonl(prompt_rows(32, seed=2))), purpose="fine-tune")
    reinforcement = client.fine_tuning.jobs.create(
        model="tiny", training_file=prompts.id,
        method={"type": "reinforcement", "reinforcement": {
            "grader": SEVENS_GRADER, "hyperparameters": {"batch_size": 8, "compute_multiplier": 0.5}}},
        extra_body={"tunedeck": {**TUNEDECK, "hyperparameters": {**tiny, "max_steps": 2, "max_completion_length": 4}}})
    assert reinforcement.method is not None and reinforcement.method.type == "reinforcement"
    assert reinforcement.method.reinforcement is not None
    assert reinforcement.method.reinforcement.grader.name == "sevens"
    reinforcement = wait_for_job(client, reinforcement.id, lambda j: j.status in FINAL)
    assert reinforcement.status == "succeeded", reinforcement.error
    points = metrics_of(client, reinforcement.id)
    assert [p["step"] for p in points] == [1, 2]
    assert all(0.0 <= p["train_reward"] <= 1.0 and "train_rewards_sevens_mean" in p for p in points), points[-1]
    run = TrainingRun.objects.get(pk=int(reinforcement.id.removeprefix("ftjob-")))
    assert run.train_params().num_generations == 4 and run.adapter.metrics["steps"] == 2

    # Pause: the worker saves a checkpoint at the step it reached and frees the job; resume continues from there.
    file = client.files.create(file=("add.jsonl", chat_file(64)), purpose="fine-tune")
    long = client.fine_tuning.jobs.create(model="tiny", training_file=file.id,
                                          extra_body={"tunedeck": {**TUNEDECK, "hyperparameters": {**tiny, "max_steps": 5000}}})
    wait_for_job(client, long.id, lambda j: j.status == "running" and j.to_dict()["tunedeck"]["step"] > 0)
    asked = client.fine_tuning.jobs.pause(long.id)
    assert asked.status == "running" and asked.to_dict()["tunedeck"]["pause_requested"] is True  # until it stops
    paused = wait_for_job(client, long.id, lambda j: j.status == "paused", timeout=120)
    step = paused.to_dict()["tunedeck"]["step"]
    assert 0 < step < 5000
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(long.id).data] == [step]
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.pause(long.id)  # already paused
    assert client.fine_tuning.jobs.resume(long.id).status == "queued"
    wait_for_job(client, long.id, lambda j: j.status == "running" and j.to_dict()["tunedeck"]["step"] > step)
    long_run = TrainingRun.objects.get(pk=int(long.id.removeprefix("ftjob-")))
    assert long_run.attempt == 2 and any(f"Resuming from checkpoint checkpoint-{step}" in m
                                         for m in long_run.events.values_list("message", flat=True))
    assert client.fine_tuning.jobs.cancel(long.id).status == "running"
    assert wait_for_job(client, long.id, lambda j: j.status in FINAL, timeout=120).status == "cancelled"
