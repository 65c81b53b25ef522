"""The OpenAI-compatible subset at /v1/: every endpoint's success and error paths, API keys as bearer tokens,
errors in OpenAI's shape, and every object parsed by the `openai` package's own models."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from openai.types import FileObject
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from tests.webapp.factories import demo_objects, make_run
from webapp.api.models import ApiKey
from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.training.models import Adapter, RunEvent, TrainingRun
from workers.training.demo import SEVENS_GRADER, prompt_rows

pytestmark = pytest.mark.django_db

CHAT = [
    {"messages": [{"role": "system", "content": "You add."}, {"role": "user", "content": f"What is {a} + {b}?"},
                  {"role": "assistant", "content": str(a + b)}]}
    for a, b in ((1, 2), (3, 4), (10, 20), (7, 8))
]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


class Api:
    """A client that sends one API key as a bearer token, the way the openai package does."""

    def __init__(self, raw: str | None):
        self.client, self.headers = Client(), ({"Authorization": f"Bearer {raw}"} if raw else {})

    def get(self, path: str, **query: Any) -> Any:
        return self.client.get(f"/v1/{path}", query, headers=self.headers)

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        return self.client.post(f"/v1/{path}", json.dumps(body or {}), content_type="application/json",
                                headers={**self.headers, **(headers or {})})

    def upload(self, name: str, data: bytes, purpose: str = "fine-tune") -> Any:
        from django.core.files.uploadedfile import SimpleUploadedFile

        return self.client.post("/v1/files", {"file": SimpleUploadedFile(name, data), "purpose": purpose},
                                 headers=self.headers)


@pytest.fixture
def world(tiny_model_dir: Path, store_dir: Path, django_user_model: Any) -> dict[str, Any]:
    owner, base, dataset, config = demo_objects(tiny_model_dir)
    mate = django_user_model.objects.create_user("mate", password="pw-mate-123")
    staff = django_user_model.objects.create_user("boss", password="pw-boss-123", is_staff=True)
    keys = {
        "owner": ApiKey.issue(owner, "ci", ["write"])[1],
        "reader": ApiKey.issue(owner, "dashboards", ["read"])[1],
        "mate": ApiKey.issue(mate, "notebook", ["write"])[1],
        "staff": ApiKey.issue(staff, "ops", ["admin"])[1],
    }
    return {"owner": owner, "mate": mate, "staff": staff, "base": base, "dataset": dataset, "config": config,
            "keys": keys, "api": {who: Api(raw) for who, raw in keys.items()}}


def error_of(response: Any, status: int) -> dict[str, Any]:
    """The body is OpenAI's error shape with the given status (what the openai package raises its errors from)."""
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def job_body(world: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "training_file": f"file-{world['dataset'].pk}", **extra}


# --- authentication and scopes -------------------------------------------------------------------------


def test_it_refuses_requests_without_a_valid_api_key(world: dict[str, Any]) -> None:
    for api, words in ((Api(None), "no API key"), (Api("tdk_not-a-real-key"), "invalid API key"),
                       (Api("tdw_0123456789"), "worker token"), (Api("sk-proj-openai"), "invalid API key")):
        response = api.get("fine_tuning/jobs")
        error = error_of(response, 401)
        assert words in error["message"] and error["type"] == "authentication_error"
        assert response["WWW-Authenticate"].startswith("Bearer")
    key = ApiKey.objects.get(name="ci")
    key.revoked_at = timezone.now()
    key.save()
    assert "revoked" in error_of(world["api"]["owner"].get("files"), 401)["message"]
    ApiKey.objects.filter(name="notebook").update(expires_at=timezone.now() - timedelta(minutes=1))
    assert "expired" in error_of(world["api"]["mate"].get("files"), 401)["message"]


def test_a_read_only_key_reads_but_every_post_is_403(world: dict[str, Any]) -> None:
    reader = world["api"]["reader"]
    assert reader.get("fine_tuning/jobs").status_code == 200
    assert reader.get("files").status_code == 200
    for response in (reader.post("fine_tuning/jobs", job_body(world)), reader.upload("chat.jsonl", jsonl(CHAT)),
                     reader.post(f"fine_tuning/jobs/ftjob-{make_run(world['owner'], world['base'], world['dataset'], world['config']).pk}/cancel")):
        error = error_of(response, 403)
        assert error["type"] == "permission_error" and "'write' scope" in error["message"]
    assert TrainingRun.objects.filter(state="cancelled").count() == 0
    assert Dataset.objects.count() == 1


def test_other_paths_under_v1_are_openai_404s(world: dict[str, Any]) -> None:
    error = error_of(world["api"]["owner"].get("models"), 404)
    assert "/v1/models" in error["message"] and error["type"] == "not_found_error"
    error_of(Api(None).get("models"), 401)  # nothing under /v1/ answers without a key


def test_errors_raised_before_any_view_are_in_openai_shape(world: dict[str, Any]) -> None:
    api = world["api"]["owner"]
    refused = api.client.get("/v1/files", headers={**api.headers, "Host": "evil.example"})  # CommonMiddleware refuses it
    assert error_of(refused, 400)["type"] == "invalid_request_error"


# --- files ---------------------------------------------------------------------------------------------


def test_an_uploaded_chat_file_becomes_a_dataset_and_an_openai_file(world: dict[str, Any]) -> None:
    api = world["api"]["owner"]
    data = jsonl(CHAT)
    response = api.upload("add.jsonl", data)
    assert response.status_code == 200, response.content
    file = FileObject.model_validate(response.json())
    dataset = Dataset.objects.get(pk=int(file.id.removeprefix("file-")))
    assert (file.object, file.purpose, file.status, file.filename, file.bytes) == (
        "file", "fine-tune", "processed", "add.jsonl", len(data))
    assert file.created_at == int(dataset.created_at.timestamp())
    assert (dataset.format, dataset.row_count, dataset.created_by) == ("messages", 4, world["owner"])

    # The same name again is a second dataset (names are unique: it is numbered).
    second = FileObject.model_validate(api.upload("add.jsonl", data).json())
    assert Dataset.objects.get(pk=int(second.id.removeprefix("file-"))).name == "add.jsonl (2)"

    assert FileObject.model_validate(api.get(f"files/{file.id}").json()) == file
    listed = api.get("files", limit=2).json()
    assert listed["object"] == "list" and listed["has_more"] is True
    assert [f["id"] for f in listed["data"]] == [second.id, file.id]
    rest = api.get("files", limit=2, after=file.id).json()
    assert [f["id"] for f in rest["data"]] == [f"file-{world['dataset'].pk}"] and rest["has_more"] is False
    assert [f["id"] for f in api.get("files", order="asc").json()["data"]][-1] == second.id
    assert api.get("files", purpose="batch").json()["data"] == []
    content = api.get(f"files/{file.id}/content")
    assert b"".join(content.streaming_content) == data


def test_a_bad_file_is_refused_naming_the_line_and_the_field(world: dict[str, Any]) -> None:
    api = world["api"]["owner"]
    bad_role = [*CHAT[:2], {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}]
    error = error_of(api.upload("chat.jsonl", jsonl(bad_role)), 400)
    assert "line 3" in error["message"] and "messages[1].role" in error["message"] and "'bot'" in error["message"]
    assert (error["param"], error["code"], error["type"]) == ("file", "invalid_file", "invalid_request_error")

    error = error_of(api.upload("chat.jsonl", jsonl(CHAT[:1]) + b"{oops\n"), 400)
    assert "line 2" in error["message"] and "invalid JSON" in error["message"]
    error = error_of(api.upload("chat.txt", jsonl(CHAT)), 400)
    assert "chat.txt" in error["message"]
    assert error_of(api.upload("chat.jsonl", jsonl(CHAT), purpose="assistants"), 400)["param"] == "purpose"
    no_file = api.client.post("/v1/files", {"purpose": "fine-tune"}, headers=api.headers)
    assert error_of(no_file, 400)["param"] == "file"
    assert Dataset.objects.count() == 1  # nothing stored


def test_unknown_files_are_404(world: dict[str, Any]) -> None:
    api = world["api"]["owner"]
    for file_id in ("file-999999", "file-abc", "12"):
        assert error_of(api.get(f"files/{file_id}"), 404)["type"] == "not_found_error"
    lost = Dataset.objects.create(name="lost", uri="store://datasets/gone.jsonl", original_filename="gone.jsonl",
                                  format="text", row_count=1, size_bytes=1, sha256="0" * 64)
    assert "missing" in error_of(api.get(f"files/file-{lost.pk}/content"), 404)["message"]
    assert error_of(api.get("files", limit=0), 400)["param"] == "limit"
    assert error_of(api.get("files", after="nope"), 400)["param"] == "after"


# --- creating jobs -------------------------------------------------------------------------------------


def test_a_job_is_a_run_with_the_openai_and_tunedeck_settings(world: dict[str, Any]) -> None:
    api = world["api"]["owner"]
    body = job_body(world, suffix="adder", seed=7,
                    hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5},
                    tunedeck={"lora": {"r": 4, "alpha": 8, "target_modules": ["attention"]},
                              "hyperparameters": {"max_steps": 3, "logging_steps": 1}, "worker_labels": ["cpu"]})
    response = api.post("fine_tuning/jobs", body)
    assert response.status_code == 200, response.content
    job = FineTuningJob.model_validate(response.json())
    run = TrainingRun.objects.get(pk=int(job.id.removeprefix("ftjob-")))
    hp = run.train_params()
    assert (hp.num_epochs, hp.batch_size, hp.seed, hp.max_steps, hp.logging_steps) == (2, 4, 7, 3, 1)
    assert hp.learning_rate == pytest.approx(0.5 * 5e-3)  # the tiny base's suggested learning rate, halved
    assert (run.name, run.owner, run.base_model, run.dataset, run.needs_labels) == (
        "adder", world["owner"], world["base"], world["dataset"], ["cpu"])
    lora = run.lora_config.lora_params()
    assert (lora.r, lora.alpha, lora.target_modules) == (4, 8, ["attention"])
    assert run.events.filter(message__contains="OpenAI-compatible API").exists()

    assert (job.status, job.model, job.training_file, job.seed, job.fine_tuned_model) == (
        "queued", "tiny", f"file-{world['dataset'].pk}", 7, None)
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (2, 4)
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(0.5)
    assert job.method is not None and job.method.type == "supervised"
    assert job.created_at == int(run.created_at.timestamp()) and job.finished_at is None

    # The same inline LoRA settings again reuse the saved config; "auto" keeps the suggestion.
    again = api.post("fine_tuning/jobs", job_body(world, hyperparameters={"n_epochs": "auto"},
                                                  tunedeck={"lora": {"r": 4, "alpha": 8, "target_modules": ["attention"]}}))
    other = TrainingRun.objects.get(pk=int(again.json()["id"].removeprefix("ftjob-")))
    assert other.lora_config_id == run.lora_config_id
    assert other.train_params().num_epochs == 3  # the tiny base's suggestion
    # Hyperparameters under method.supervised work the same; a saved config is named.
    nested = api.post("fine_tuning/jobs", job_body(
        world, method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2}}},
        tunedeck={"lora_config": "cfg"}))
    third = TrainingRun.objects.get(pk=int(nested.json()["id"].removeprefix("ftjob-")))
    assert third.train_params().batch_size == 2 and third.lora_config == world["config"]


def test_a_dpo_job_trains_direct_preference_optimization_on_preference_rows(world: dict[str, Any]) -> None:
    from webapp.catalog.services import register_dataset

    pairs = register_dataset("pairs", "pairs.jsonl", "".join(
        json.dumps({"prompt": f"What is {n} + 1?\n", "chosen": str(n + 1), "rejected": str(n + 2)}) + "\n"
        for n in range(12)).encode())
    body = job_body(world, training_file=f"file-{pairs.pk}",
                    method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}})

    response = world["api"]["owner"].post("fine_tuning/jobs", body)

    assert response.status_code == 200, response.content
    job = FineTuningJob.model_validate(response.json())
    hp = TrainingRun.objects.get(pk=int(job.id.removeprefix("ftjob-"))).train_params()
    assert (hp.objective, hp.beta, hp.num_epochs) == ("dpo", 0.25, 2)
    assert job.method is not None and job.method.type == "dpo" and job.method.dpo is not None
    assert job.method.dpo.hyperparameters is not None and job.method.dpo.hyperparameters.beta == 0.25


def test_a_dpo_job_takes_a_training_file_in_openais_own_preference_format(world: dict[str, Any]) -> None:
    from webapp.catalog.services import register_dataset

    pairs = register_dataset("openai-pairs", "openai-pairs.jsonl", "".join(json.dumps({
        "input": {"messages": [{"role": "user", "content": f"What is {n} + 1?"}]},
        "preferred_output": [{"role": "assistant", "content": str(n + 1)}],
        "non_preferred_output": [{"role": "assistant", "content": str(n + 2)}]}) + "\n" for n in range(12)).encode())
    body = job_body(world, training_file=f"file-{pairs.pk}", method={"type": "dpo", "dpo": {}})

    response = world["api"]["owner"].post("fine_tuning/jobs", body)

    assert pairs.format == "preference" and pairs.row_count == 12
    assert response.status_code == 200, response.content
    run = TrainingRun.objects.get(pk=int(response.json()["id"].removeprefix("ftjob-")))
    assert (run.train_params().objective, run.dataset.format) == ("dpo", "preference")
def test_a_reinforcement_job_trains_grpo_with_its_grader_and_maps_its_hyperparameters(world: dict[str, Any]) -> None:
    from webapp.catalog.services import register_dataset

    prompts = register_dataset("prompts", "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in prompt_rows(16, 0)).encode())
    method = {"type": "reinforcement", "reinforcement": {"grader": SEVENS_GRADER, "hyperparameters": {
        "n_epochs": 2, "batch_size": 16, "compute_multiplier": 0.5, "eval_interval": "auto", "eval_samples": "auto",
        "reasoning_effort": "default"}}}
    body = job_body(world, training_file=f"file-{prompts.pk}", method=method,
                    tunedeck={"hyperparameters": {"temperature": 0.7, "max_completion_length": 8, "kl_coef": 0.02}})

    response = world["api"]["owner"].post("fine_tuning/jobs", body)

    assert response.status_code == 200, response.content
    job = FineTuningJob.model_validate(response.json())
    hp = TrainingRun.objects.get(pk=int(job.id.removeprefix("ftjob-"))).train_params()
    assert (hp.objective, hp.graders, hp.num_epochs, hp.batch_size, hp.num_generations) == (
        "grpo", SEVENS_GRADER, 2, 16, 4)
    assert (hp.temperature, hp.max_completion_length, hp.kl_coef, hp.eval_steps) == (0.7, 8, 0.02, 0)
    assert job.method is not None and job.method.type == "reinforcement" and job.method.reinforcement is not None
    assert job.method.reinforcement.grader.type == "text_similarity"
    assert job.method.reinforcement.hyperparameters.compute_multiplier == 0.5
    assert response.json()["method"]["reinforcement"]["grader"] == SEVENS_GRADER

    # A grader's problem is named by its path under the param that gave it.
    bad = {**SEVENS_GRADER, "reference": "{{item.nope}}"}
    body["method"] = {"type": "reinforcement", "reinforcement": {"grader": bad}}
    error = error_of(world["api"]["owner"].post("fine_tuning/jobs", body), 400)
    assert error["param"] == "method.reinforcement.grader.reference" and "nope" in error["message"], error
    bad = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "7777",
           "operation": "equals"}
    body["method"] = {"type": "reinforcement", "reinforcement": {"grader": bad}}
    error = error_of(world["api"]["owner"].post("fine_tuning/jobs", body), 400)
    assert error["param"] == "method.reinforcement.grader.operation", error


def test_a_model_given_by_path_is_registered_on_the_fly(world: dict[str, Any], tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    link = tmp_path / "tiny-elsewhere"
    os.symlink(tiny_model_dir, link)
    response = world["api"]["owner"].post("fine_tuning/jobs", job_body(world, model=str(link)))
    assert response.status_code == 200, response.content
    base = BaseModel.objects.get(source=str(link))
    assert base.name == str(link) and base.num_parameters == world["base"].num_parameters
    assert response.json()["model"] == str(link)
    error = error_of(world["api"]["owner"].post("fine_tuning/jobs", job_body(world, model=str(tmp_path / "none"))), 400)
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert "local base models must be folders under" in error["message"]


def test_a_model_path_outside_the_model_roots_is_not_registered(world: dict[str, Any], tmp_path: Path,
                                                                settings: Any) -> None:
    settings.MODEL_ROOTS = [tmp_path / "models"]
    messages = []
    for model in ("/root/.ssh", str(tmp_path), str(tmp_path / "none")):
        error = error_of(world["api"]["owner"].post("fine_tuning/jobs", job_body(world, model=model)), 400)
        assert (error["param"], error["code"]) == ("model", "model_not_found")
        messages.append(error["message"].replace(repr(model), "<model>"))
    assert len(set(messages)) == 1 and "must be folders under" in messages[0] and str(tmp_path / "models") in messages[0]
    assert list(BaseModel.objects.values_list("name", flat=True)) == ["tiny"]


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"training_file": "file-999999"}, "training_file", "No such file"),
    ({"training_file": None}, "training_file", "required"),
    ({"model": ""}, "model", "required"),
    ({"hyperparameters": {"n_epochs": "three"}}, "hyperparameters.n_epochs", "positive integer"),
    ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size", "positive integer"),
    ({"hyperparameters": {"epochs": 3}}, "hyperparameters.epochs", "unknown field"),
    ({"method": {"type": "reinforcement"}}, "method.reinforcement.grader", "required"),
    ({"method": {"type": "preference"}}, "method.type", "supervised, dpo, reinforcement"),
    ({"method": {"type": "reinforcement", "reinforcement": {"grader": "exact"}}}, "method.reinforcement.grader",
     "must be an object"),
    ({"method": {"type": "reinforcement", "reinforcement": {"grader": SEVENS_GRADER}}}, "training_file",
     "(grpo) trains on prompt_only rows"),
    ({"method": {"type": "reinforcement", "reinforcement": {"grader": SEVENS_GRADER, "model": "o4-mini"}}},
     "method.reinforcement.model", "unknown field"),
    ({"method": {"type": "reinforcement", "reinforcement": {"grader": SEVENS_GRADER,
                                                            "hyperparameters": {"reasoning_effort": "high"}}}},
     "method.reinforcement.hyperparameters.reasoning_effort", "not supported"),
    ({"method": {"type": "reinforcement", "reinforcement": {"grader": SEVENS_GRADER,
                                                            "hyperparameters": {"eval_samples": 4}}}},
     "method.reinforcement.hyperparameters.eval_samples", "not supported"),
    ({"method": {"type": "reinforcement", "reinforcement": {"grader": SEVENS_GRADER,
                                                            "hyperparameters": {"beta": 0.1}}}},
     "method.reinforcement.hyperparameters.beta", "unknown field"),
    ({"method": {"type": "reinforcement", "reinforcement": {"grader": SEVENS_GRADER}},
      "tunedeck": {"hyperparameters": {"graders": SEVENS_GRADER}}}, "method.reinforcement.grader", "give one"),
    ({"method": {"type": "dpo"}}, "training_file", "(dpo) trains on preference rows"),
    ({"method": {"type": "dpo", "supervised": {}}}, "method.supervised", "unknown field"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}}, "method.dpo.hyperparameters.beta",
     "positive number"),
    ({"method": {"type": "dpo"}, "tunedeck": {"hyperparameters": {"objective": "sft"}}}, "method.type", "give one"),
    ({"hyperparameters": {"beta": 0.1}}, "hyperparameters.beta", "unknown field"),
    ({"hyperparameters": {"n_epochs": 2}, "method": {"supervised": {"hyperparameters": {"n_epochs": 3}}}},
     "hyperparameters", "not both"),
    ({"validation_file": "file-999999"}, "validation_file", "No such file"),
    ({"validation_file": "batch-{dataset}"}, "validation_file", "ids look like file-123"),
    ({"validation_file": 7}, "validation_file", "must be the id of an uploaded file"),
    ({"validation_file": "file-{dataset}", "tunedeck": {"hyperparameters": {"eval_fraction": 0.1}}},
     "validation_file", "not both"),
    ({"seed": -1}, "seed", "non-negative"),
    ({"suffix": "x" * 65}, "suffix", "64"),
    ({"metadata": {"team": "nlp"}}, "metadata", "not supported"),
    ({"tunedeck": {"lora": {"r": 0}}}, "tunedeck.lora.r", "between 1 and 1024"),
    ({"tunedeck": {"lora": {"rank": 8}}}, "tunedeck.lora.rank", "unknown field"),
    ({"tunedeck": {"lora_config": "nope"}}, "tunedeck.lora_config", "no LoRA config"),
    ({"tunedeck": {"hyperparameters": {"learning_rate": 5}}}, "tunedeck.hyperparameters.learning_rate", "(0, 1]"),
    ({"tunedeck": {"hyperparameters": {"max_seq_length": 10**6}}}, "tunedeck.hyperparameters.max_seq_length",
     "positions"),
    ({"tunedeck": {"hyperparameters": {"optimizer": "adam"}}}, "tunedeck.hyperparameters.optimizer", "adamw_torch"),
    ({"tunedeck": {"hyperparameters": {"batch_size": 3, "grad_accum": 1, "num_gpus": 2}}},
     "tunedeck.hyperparameters.num_gpus", "split evenly"),
    ({"hyperparameters": {"n_epochs": 2}, "tunedeck": {"hyperparameters": {"num_epochs": 3}}},
     "hyperparameters.n_epochs", "both set num_epochs"),
    ({"tunedeck": {"worker_labels": ["Not A Label"]}}, "tunedeck.worker_labels", "slug"),
    ({"tunedeck": {"priority": 5}}, "tunedeck.priority", "only an admin"),
    ({"tunedeck": {"gpu": 1}}, "tunedeck.gpu", "unknown field"),
    ({"temperature": 1}, "temperature", "unknown field"),
])
def test_a_bad_job_request_is_a_400_naming_the_param(world: dict[str, Any], extra: dict[str, Any], param: str,
                                                     words: str) -> None:
    body = json.loads(json.dumps(job_body(world, **extra)).replace("{dataset}", str(world["dataset"].pk)))
    configs = LoraConfig.objects.count()
    error = error_of(world["api"]["owner"].post("fine_tuning/jobs", body), 400)
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert not TrainingRun.objects.exists() and LoraConfig.objects.count() == configs


def test_labels_take_the_run_requests_name_and_the_documented_old_one(world: dict[str, Any]) -> None:
    api = world["api"]["owner"]
    for key in ("labels", "worker_labels"):
        response = api.post("fine_tuning/jobs", job_body(world, tunedeck={key: ["cpu", "team-nlp"]}))
        assert response.status_code == 200, response.content
        assert TrainingRun.objects.latest("id").needs_labels == ["cpu", "team-nlp"]
    error = error_of(api.post("fine_tuning/jobs", job_body(world, tunedeck={"labels": ["Bad Label"]})), 400)
    assert error["param"] == "tunedeck.labels" and "slug" in error["message"], error
    both = job_body(world, tunedeck={"labels": ["cpu"], "worker_labels": ["cpu"]})
    error = error_of(api.post("fine_tuning/jobs", both), 400)
    assert error["param"] == "tunedeck.worker_labels" and "not both" in error["message"], error


def test_a_validation_file_is_the_runs_eval_dataset(world: dict[str, Any]) -> None:
    api = world["api"]["owner"]
    uploaded = api.upload("valid.jsonl", jsonl(CHAT))
    assert uploaded.status_code == 200, uploaded.content
    file_id = uploaded.json()["id"]
    response = api.post("fine_tuning/jobs", job_body(world, validation_file=file_id,
                                                     tunedeck={"hyperparameters": {"early_stopping_patience": 2}}))
    assert response.status_code == 200, response.content
    job = FineTuningJob.model_validate(response.json())
    run = TrainingRun.objects.get(pk=int(job.id.removeprefix("ftjob-")))
    assert run.eval_dataset == Dataset.objects.get(pk=int(file_id.removeprefix("file-")))
    assert (job.validation_file, job.training_file, job.trained_tokens) == (
        file_id, f"file-{world['dataset'].pk}", None)
    assert api.get(f"fine_tuning/jobs/{job.id}").json()["validation_file"] == file_id
    listed = api.get("fine_tuning/jobs").json()["data"]
    assert [j["validation_file"] for j in listed] == [file_id]
    # null, like leaving it out: the run holds out its eval_fraction (or evaluates on nothing).
    plain = api.post("fine_tuning/jobs", job_body(world, validation_file=None)).json()
    assert plain["validation_file"] is None
    assert TrainingRun.objects.get(pk=int(plain["id"].removeprefix("ftjob-"))).eval_dataset is None


def test_staff_may_raise_the_priority(world: dict[str, Any]) -> None:
    response = world["api"]["staff"].post("fine_tuning/jobs", job_body(world, tunedeck={"priority": 5}))
    assert response.status_code == 200, response.content
    assert TrainingRun.objects.get().priority == 5 and response.json()["tunedeck"]["priority"] == 5


def test_a_retried_create_with_the_same_idempotency_key_makes_one_job(world: dict[str, Any]) -> None:
    api = world["api"]["owner"]
    body = job_body(world, suffix="once")
    first = api.post("fine_tuning/jobs", body, headers={"Idempotency-Key": "nightly-42"})
    second = api.post("fine_tuning/jobs", body, headers={"Idempotency-Key": "nightly-42"})
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"] and second["Idempotent-Replayed"] == "true"
    assert TrainingRun.objects.count() == 1
    error = error_of(api.post("fine_tuning/jobs", job_body(world, suffix="other"),
                              headers={"Idempotency-Key": "nightly-42"}), 422)
    assert error["param"] == "Idempotency-Key" and "another request" in error["message"]
    # A refused create leaves the key free: the corrected request goes through with it.
    error_of(api.post("fine_tuning/jobs", job_body(world, seed=-1), headers={"Idempotency-Key": "fix-me"}), 400)
    assert api.post("fine_tuning/jobs", job_body(world, seed=1), headers={"Idempotency-Key": "fix-me"}).status_code == 200
    assert TrainingRun.objects.count() == 2


# --- reading and cancelling jobs -----------------------------------------------------------------------


def test_jobs_are_listed_newest_first_in_pages(world: dict[str, Any]) -> None:
    runs = [make_run(world["owner"], world["base"], world["dataset"], world["config"]) for _ in range(3)]
    api = world["api"]["mate"]  # the whole team sees every job
    first = api.get("fine_tuning/jobs", limit=2).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [j["id"] for j in first["data"]] == [f"ftjob-{runs[2].pk}", f"ftjob-{runs[1].pk}"]
    rest = api.get("fine_tuning/jobs", limit=2, after=first["data"][-1]["id"]).json()
    assert [j["id"] for j in rest["data"]] == [f"ftjob-{runs[0].pk}"] and rest["has_more"] is False
    for job in first["data"] + rest["data"]:
        FineTuningJob.model_validate(job)
    assert error_of(api.get("fine_tuning/jobs", limit=101), 400)["param"] == "limit"
    assert error_of(api.get("fine_tuning/jobs/ftjob-999999"), 404)["type"] == "not_found_error"
    assert error_of(api.get("fine_tuning/jobs/run-1"), 404)["type"] == "not_found_error"


def test_the_job_status_follows_the_run(world: dict[str, Any]) -> None:
    api = world["api"]["owner"]
    run = make_run(world["owner"], world["base"], world["dataset"], world["config"])

    def job() -> FineTuningJob:
        return FineTuningJob.model_validate(api.get(f"fine_tuning/jobs/ftjob-{run.pk}").json())

    assert job().status == "queued"
    TrainingRun.objects.filter(pk=run.pk).update(state="dispatched", attempt=1)
    assert job().status == "running" and job().estimated_finish is None
    started = timezone.now() - timedelta(seconds=100)
    TrainingRun.objects.filter(pk=run.pk).update(state="running", started_at=started, step=25, total_steps=100)
    assert job().status == "running"
    assert job().estimated_finish == pytest.approx(started.timestamp() + 400, abs=5)
    finished = timezone.now()
    TrainingRun.objects.filter(pk=run.pk).update(state="failed", finished_at=finished, error="CUDA out of memory")
    failed = job()
    assert failed.status == "failed" and failed.finished_at == int(finished.timestamp())
    assert failed.error is not None and failed.error.message == "CUDA out of memory" and failed.fine_tuned_model is None
    assert failed.trained_tokens is None
    TrainingRun.objects.filter(pk=run.pk).update(state="succeeded", error="")
    Adapter.objects.create(run=run, owner=world["owner"], base_model=world["base"], uri="store://a", size_bytes=1,
                           sha256="0" * 64, trainable_params=1, total_params=2, metrics={"trained_tokens": 51234})
    succeeded = job()
    assert (succeeded.status, succeeded.fine_tuned_model, succeeded.error) == ("succeeded", f"tiny:ft-{run.pk}", None)
    assert succeeded.trained_tokens == 51234  # what the runner counted (workers/training/train.py trained_tokens)
    TrainingRun.objects.filter(pk=run.pk).update(state="cancelled")
    assert job().status == "cancelled" and job().fine_tuned_model is None


def test_cancel_by_the_owner_or_staff_only(world: dict[str, Any]) -> None:
    make = lambda: make_run(world["owner"], world["base"], world["dataset"], world["config"])  # noqa: E731
    queued, active, done = make(), make(), make()
    TrainingRun.objects.filter(pk=active.pk).update(state="running", attempt=1)
    TrainingRun.objects.filter(pk=done.pk).update(state="succeeded")

    error = error_of(world["api"]["mate"].post(f"fine_tuning/jobs/ftjob-{queued.pk}/cancel"), 403)
    assert "owner" in error["message"]
    response = world["api"]["owner"].post(f"fine_tuning/jobs/ftjob-{queued.pk}/cancel")
    assert response.status_code == 200 and FineTuningJob.model_validate(response.json()).status == "cancelled"
    # An active run is flagged: its worker stops at the next step, and the job reads running until then.
    response = world["api"]["staff"].post(f"fine_tuning/jobs/ftjob-{active.pk}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "running"
    assert response.json()["tunedeck"]["cancel_requested"] is True
    assert TrainingRun.objects.get(pk=active.pk).cancel_requested
    assert "succeeded" in error_of(world["api"]["owner"].post(f"fine_tuning/jobs/ftjob-{done.pk}/cancel"), 400)["message"]
    error_of(world["api"]["owner"].post("fine_tuning/jobs/ftjob-999999/cancel"), 404)


def test_pause_and_resume_by_the_owner_or_staff_only(world: dict[str, Any]) -> None:
    make = lambda: make_run(world["owner"], world["base"], world["dataset"], world["config"])  # noqa: E731
    queued, active, done = make(), make(), make()
    TrainingRun.objects.filter(pk=active.pk).update(state="running", attempt=1)
    TrainingRun.objects.filter(pk=done.pk).update(state="succeeded")
    owner = world["api"]["owner"]

    assert "owner" in error_of(world["api"]["mate"].post(f"fine_tuning/jobs/ftjob-{queued.pk}/pause"), 403)["message"]
    paused = owner.post(f"fine_tuning/jobs/ftjob-{queued.pk}/pause").json()
    assert paused["status"] == "paused" and TrainingRun.objects.get(pk=queued.pk).state == "paused"
    error = error_of(owner.post(f"fine_tuning/jobs/ftjob-{queued.pk}/pause"), 400)
    assert (error["code"], error["message"]) == ("job_not_pausable", "the job is paused: only a queued or running job "
                                                                    "can be paused")
    assert owner.post(f"fine_tuning/jobs/ftjob-{queued.pk}/resume").json()["status"] == "queued"
    assert error_of(owner.post(f"fine_tuning/jobs/ftjob-{queued.pk}/resume"), 400)["code"] == "job_not_paused"

    # A running job reads running, pause_requested, until its worker has saved a checkpoint and stopped.
    flagged = world["api"]["staff"].post(f"fine_tuning/jobs/ftjob-{active.pk}/pause").json()
    assert (flagged["status"], flagged["tunedeck"]["pause_requested"]) == ("running", True)
    assert "succeeded" in error_of(owner.post(f"fine_tuning/jobs/ftjob-{done.pk}/pause"), 400)["message"]
    error_of(owner.post("fine_tuning/jobs/ftjob-999999/pause"), 404)


def test_metrics_events_carry_openais_names_and_the_objectives_own_figures(world: dict[str, Any]) -> None:
    run = make_run(world["owner"], world["base"], world["dataset"], world["config"])
    point = {"step": 3, "total_steps": 8, "loss": 0.61, "learning_rate": 1e-4, "mean_token_accuracy": 0.75,
             "rewards/margins": 0.42, "rewards/accuracies": 0.9}
    RunEvent.objects.create(run=run, attempt=1, seq=1, kind="metric", data=point)
    RunEvent.objects.create(run=run, attempt=1, seq=2, kind="metric",
                            data={"step": 3, "total_steps": 8, "eval_loss": 0.7, "eval_mean_token_accuracy": 0.5,
                                  "eval_rewards/margins": 0.3})
    RunEvent.objects.create(run=run, attempt=1, seq=3, kind="checkpoint", data={"step": 3})
    TrainingRun.objects.filter(pk=run.pk).update(metric_points=[{"step": 3, "loss": 0.61, "eval_loss": 0.7}])
    api = world["api"]["owner"]
    events = api.get(f"fine_tuning/jobs/ftjob-{run.pk}/events").json()["data"]
    train, valid = (FineTuningJobEvent.model_validate(e) for e in events[:0:-1])
    assert (train.type, valid.type) == ("metrics", "metrics")
    assert {k: v for k, v in train.data.items() if k != "tunedeck"} == {
        "step": 3, "total_steps": 8, "train_loss": 0.61, "train_mean_token_accuracy": 0.75,
        "train_rewards_margins": 0.42, "train_rewards_accuracies": 0.9}
    assert train.data["tunedeck"] == point  # the worker's point as it stored it, learning rate included
    assert (valid.data["valid_loss"], valid.data["valid_mean_token_accuracy"], valid.data["valid_rewards_margins"]) == (
        0.7, 0.5, 0.3)

    checkpoint = FineTuningJobCheckpoint.model_validate(api.get(f"fine_tuning/jobs/ftjob-{run.pk}/checkpoints").json()["data"][0])
    assert (checkpoint.step_number, checkpoint.metrics.train_loss, checkpoint.metrics.valid_loss) == (3, 0.61, 0.7)
    assert (checkpoint.metrics.train_mean_token_accuracy, checkpoint.metrics.valid_mean_token_accuracy) == (0.75, 0.5)
    assert checkpoint.metrics.to_dict()["train_rewards_margins"] == 0.42


def test_events_are_newest_first_with_metrics_typed(world: dict[str, Any]) -> None:
    run = make_run(world["owner"], world["base"], world["dataset"], world["config"])
    made = [
        RunEvent.objects.create(run=run, attempt=1, kind="status", message="Attempt 1 dispatched to worker w1"),
        RunEvent.objects.create(run=run, attempt=1, seq=1, kind="log", message="Trainable parameters: 1,024"),
        RunEvent.objects.create(run=run, attempt=1, seq=2, kind="metric",
                                data={"step": 2, "total_steps": 4, "loss": 1.5, "learning_rate": 0.001}),
        RunEvent.objects.create(run=run, attempt=1, seq=3, kind="log", level="warning", message="<b>slow</b>"),
        RunEvent.objects.create(run=run, attempt=1, seq=4, kind="checkpoint", message="Checkpoint saved at step 2",
                                data={"step": 2}),
    ]
    api = world["api"]["mate"]
    page = api.get(f"fine_tuning/jobs/ftjob-{run.pk}/events", limit=3).json()
    events = [FineTuningJobEvent.model_validate(e) for e in page["data"]]
    assert [e.id for e in events] == [f"ftevent-{m.pk}" for m in made[::-1][:3]] and page["has_more"] is True
    assert (events[1].level, events[1].message, events[1].type) == ("warn", "<b>slow</b>", "message")
    metric = events[2]
    assert metric.type == "metrics" and metric.data["train_loss"] == 1.5 and metric.data["step"] == 2
    assert "Step 2/4" in metric.message and "1.5000" in metric.message
    rest = api.get(f"fine_tuning/jobs/ftjob-{run.pk}/events", after=events[-1].id).json()
    assert [e["id"] for e in rest["data"]] == [f"ftevent-{made[1].pk}", f"ftevent-{made[0].pk}"]
    assert rest["has_more"] is False
    error_of(api.get("fine_tuning/jobs/ftjob-999999/events"), 404)


def test_checkpoints_come_from_checkpoint_events_with_the_curve_at_their_step(world: dict[str, Any]) -> None:
    run = make_run(world["owner"], world["base"], world["dataset"], world["config"])
    TrainingRun.objects.filter(pk=run.pk).update(metric_points=[
        {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}, {"step": 3, "loss": 1.2},
        {"step": 4, "loss": 1.0}])
    RunEvent.objects.create(run=run, attempt=1, seq=1, kind="checkpoint", data={"step": 2, "epoch": 0.5})
    RunEvent.objects.create(run=run, attempt=1, seq=2, kind="log", message="step 3")
    RunEvent.objects.create(run=run, attempt=1, seq=3, kind="checkpoint", data={"step": 4, "epoch": 1.0})
    api = world["api"]["owner"]
    page = api.get(f"fine_tuning/jobs/ftjob-{run.pk}/checkpoints").json()
    checkpoints = [FineTuningJobCheckpoint.model_validate(c) for c in page["data"]]
    assert [c.step_number for c in checkpoints] == [4, 2] and page["has_more"] is False
    assert checkpoints[0].metrics.train_loss == 1.0 and checkpoints[0].metrics.valid_loss is None
    assert (checkpoints[1].metrics.train_loss, checkpoints[1].metrics.valid_loss) == (1.5, 1.7)
    assert checkpoints[0].fine_tuned_model_checkpoint == f"tiny:ft-{run.pk}:ckpt-step-4"
    assert checkpoints[0].fine_tuning_job_id == f"ftjob-{run.pk}"
    second = api.get(f"fine_tuning/jobs/ftjob-{run.pk}/checkpoints", limit=1, after=checkpoints[0].id).json()
    assert [c["step_number"] for c in second["data"]] == [2]


# --- hostile files and rows past max_seq_length -----------------------------------------------------------------


def test_deeply_nested_json_and_a_decompression_bomb_are_400s_naming_where(world: dict[str, Any]) -> None:
    from tests.webapp.test_catalog_pages import NESTED, _bomb

    api = world["api"]["owner"]
    error = error_of(api.upload("deep.jsonl", jsonl(CHAT[:1]) + NESTED + b"\n"), 400)
    assert "line 2: JSON nested deeper than 32 levels" in error["message"] and error["code"] == "invalid_file"
    error = error_of(api.upload("bomb.parquet", _bomb()), 400)
    assert "row 1, field 'text': decodes to 2 MB" in error["message"]
    assert Dataset.objects.count() == 1  # the world's own dataset: nothing stored, nothing lost


def test_a_job_whose_rows_cannot_reach_their_answer_is_refused(world: dict[str, Any]) -> None:
    from tests.webapp.test_training_pages import long_prompt_dataset
    from webapp.training.models import TrainingRun

    long = long_prompt_dataset()
    body = job_body(world, training_file=f"file-{long.pk}",
                    tunedeck={"hyperparameters": {"max_seq_length": 48, "completion_only_loss": True}})
    error = error_of(world["api"]["owner"].post("fine_tuning/jobs", body), 400)
    assert error["param"] == "training_file" and "long: 2 of its 5 rows would train on nothing" in error["message"]
    assert not TrainingRun.objects.exists()
