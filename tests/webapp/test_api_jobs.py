"""Adapters, adapter jobs (merge, push, compare, evaluate, combine), merged models and workers over the REST API:
success and error paths."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.webapp.api_helpers import Team, bearer, key_for, make_team, problem_of
from tests.webapp.factories import make_run
from webapp.fleet.models import Worker, hash_token
from webapp.playground.models import AdapterJob, Comparison, MergedModel
from webapp.training.models import Adapter, TrainingRun
from workers.contract.store import ArtifactStore


@pytest.fixture
def api_team(tiny_model_dir: Path, store_dir: Path, db: Any) -> Team:
    return make_team(tiny_model_dir)


def post(client: Client, path: str, body: Any, raw: str, **headers: Any) -> Any:
    return client.post(path, json.dumps(body), content_type="application/json", **bearer(raw), **headers)


def _adapter(team: Team, store: Path, name: str = "a", method: str = "lora", files: bool = True) -> Adapter:
    run = make_run(team.owner, team.base, team.dataset, team.config)
    TrainingRun.objects.filter(pk=run.pk).update(state="succeeded")
    uri = f"store://runs/{run.pk}/attempt-1/adapter"
    if files:
        folder = ArtifactStore(store).path(uri)
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text('{"r": 8}')
        (folder / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return Adapter.objects.create(name=name, owner=team.owner, base_model=team.base, run=run, rank=8, uri=uri,
                                  method=method, size_bytes=64, sha256="0" * 64, trainable_params=1, total_params=2)


def test_adapters_list_get_filter_and_download(client: Client, api_team: Team, store_dir: Path) -> None:
    adapter = _adapter(api_team, store_dir)
    missing = _adapter(api_team, store_dir, "gone", files=False)
    raw = key_for(api_team.mate, "read")
    body = client.get(f"/api/v1/adapters/?run={adapter.run_id}", **bearer(raw)).json()
    assert [a["id"] for a in body["results"]] == [adapter.pk] and body["results"][0]["owner"] == "owner"
    assert client.get(f"/api/v1/adapters/{adapter.pk}/", **bearer(raw)).json()["rank"] == 8
    response = client.get(f"/api/v1/adapters/{adapter.pk}/download/", **bearer(raw))
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))).namelist()
    assert sorted(names) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "missing from the artifact store" in problem_of(
        client.get(f"/api/v1/adapters/{missing.pk}/download/", **bearer(raw)), 404)["detail"]
    problem_of(client.get("/api/v1/adapters/99999/download/", **bearer(raw)), 404)
    assert "origin" in problem_of(client.get("/api/v1/adapters/?origin=x", **bearer(raw)), 400)["errors"]


def test_merge_starts_a_job_and_refusals_name_the_field(client: Client, api_team: Team, store_dir: Path) -> None:
    adapter = _adapter(api_team, store_dir)
    raw = key_for(api_team.mate)
    response = post(client, f"/api/v1/adapters/{adapter.pk}/merge/", {"dtype": "float16"}, raw, HTTP_IDEMPOTENCY_KEY="m")
    assert response.status_code == 201, response.content
    job = AdapterJob.objects.get(pk=response.json()["id"])
    assert (job.kind, job.owner, job.params["dtype"], response.json()["adapters"]) == ("merge", api_team.mate,
                                                                                       "float16", [adapter.pk])
    assert post(client, f"/api/v1/adapters/{adapter.pk}/merge/", {"dtype": "float16"}, raw,
                HTTP_IDEMPOTENCY_KEY="m").json()["id"] == job.pk and AdapterJob.objects.count() == 1
    assert "dtype" in problem_of(post(client, f"/api/v1/adapters/{adapter.pk}/merge/", {"dtype": "int3"}, raw), 400)["errors"]
    ia3 = _adapter(api_team, store_dir, "ia3", method="ia3")
    body = problem_of(post(client, f"/api/v1/adapters/{ia3.pk}/merge/", {}, raw), 400)
    assert "only LoRA adapters merge" in body["errors"]["adapter"][0]


def test_push_needs_the_owner_a_repo_id_and_a_hub_token(client: Client, api_team: Team, store_dir: Path,
                                                       settings: Any) -> None:
    adapter = _adapter(api_team, store_dir)
    settings.HF_TOKEN = ""
    body = {"repo_id": "team/model"}
    assert "only the adapter's owner" in problem_of(post(client, f"/api/v1/adapters/{adapter.pk}/push/", body,
                                                         key_for(api_team.mate)), 403)["detail"]
    raw = key_for(api_team.owner)
    assert "TUNEDECK_HF_TOKEN" in problem_of(post(client, f"/api/v1/adapters/{adapter.pk}/push/", body, raw),
                                             400)["errors"]["repo_id"][0]
    settings.HF_TOKEN = "hf_test"
    assert "namespace/name" in problem_of(post(client, f"/api/v1/adapters/{adapter.pk}/push/", {"repo_id": "no slash"},
                                               raw), 400)["errors"]["repo_id"][0]
    response = post(client, f"/api/v1/adapters/{adapter.pk}/push/", body, raw)
    assert response.status_code == 201 and response.json()["kind"] == "push"
    assert "hf_test" not in response.content.decode()  # the Hub token never leaves the server in a job


def test_comparisons_from_typed_prompts_and_refusals(client: Client, api_team: Team, store_dir: Path) -> None:
    adapter = _adapter(api_team, store_dir)
    raw = key_for(api_team.owner)
    body = {"adapters": [adapter.pk], "prompts": ["1+1=", "2+2="], "max_new_tokens": 8}
    response = post(client, "/api/v1/comparisons/", body, raw)
    assert response.status_code == 201, response.content
    created = response.json()
    comparison = Comparison.objects.get(pk=created["id"])
    assert [c["key"] for c in created["columns"]] == ["__base__", adapter.key] and created["state"] == "queued"
    assert [r["prompt"] for r in created["rows"]] == ["1+1=", "2+2="] and created["rows"][0]["cells"][0]["text"] == ""
    assert comparison.job.params["generation"]["max_new_tokens"] == 8
    detail = client.get(f"/api/v1/comparisons/{comparison.pk}/", **bearer(raw)).json()
    assert detail["win_rates"][-1]["key"] == "tie" and detail["votes"] == 0

    both = problem_of(post(client, "/api/v1/comparisons/", {**body, "dataset": api_team.dataset.pk}, raw), 400)
    assert "one of prompt_set, prompts or dataset" in both["errors"]["non_field_errors"][0]
    assert "adapters" in problem_of(post(client, "/api/v1/comparisons/", {**body, "adapters": []}, raw), 400)["errors"]
    assert "no adapter with id 999" in problem_of(post(client, "/api/v1/comparisons/", {**body, "adapters": [999]}, raw),
                                                  400)["detail"]
    assert Comparison.objects.count() == 1

    # The base model and the dataset by name, as `tunedeck compare --base-model tiny` sends it.
    named = post(client, "/api/v1/comparisons/", {"adapters": [adapter.pk], "base_model": "tiny", "dataset": "toy",
                                                  "dataset_rows": 2}, raw)
    assert named.status_code == 201, named.content
    assert Comparison.objects.get(pk=named.json()["id"]).job.base_model == api_team.base
    unknown = problem_of(post(client, "/api/v1/comparisons/", {**body, "base_model": "nope"}, raw), 400)
    assert unknown["errors"]["base_model"][0].startswith("no base model named 'nope': GET /api/v1/base-models/")
    assert Comparison.objects.count() == 2


def test_a_comparison_takes_its_base_precision_and_says_it(client: Client, api_team: Team, store_dir: Path) -> None:
    adapter = _adapter(api_team, store_dir)
    raw = key_for(api_team.owner)
    body = {"adapters": [adapter.pk], "prompts": ["1+1="], "base_precision": "float16"}
    created = post(client, "/api/v1/comparisons/", body, raw).json()
    assert created["base_precision"] == {"chosen": "float16", "quantization": "none", "compute_dtype": "float16",
                                         "used": None}  # fmt: skip
    assert created["stop_tokens"] is None  # known once the worker has run it
    job = AdapterJob.objects.get(pk=created["job"])
    assert job.params["load"] == {"quantization": "none", "compute_dtype": "float16"}
    unsaid = post(client, "/api/v1/comparisons/", {k: v for k, v in body.items() if k != "base_precision"}, raw)
    assert unsaid.json()["base_precision"]["chosen"] == "auto"
    refused = problem_of(post(client, "/api/v1/comparisons/", {**body, "base_precision": "int4"}, raw), 400)
    assert '"int4" is not a valid choice.' in refused["errors"]["base_precision"][0]
    assert Comparison.objects.count() == 2


@pytest.mark.parametrize(
    ("precision", "quantization", "used", "dtype"),
    [("4bit", "4bit", "4-bit NF4 double-quant (compute float32)", "uint8"), ("bfloat16", "none", "bfloat16", "bfloat16")],
)
def test_a_comparison_runs_in_the_chosen_base_precision_end_to_end(
    client: Client, api_team: Team, store_dir: Path, task_adapters: Any, monkeypatch: pytest.MonkeyPatch,
    precision: str, quantization: str, used: str, dtype: str,
) -> None:  # fmt: skip
    """From the API to the worker's generation and back: the spec the worker claims loads the base as chosen (a
    LoRA adapter trained unquantized, on a 4-bit or a bfloat16 base), and the comparison says what was used."""
    import shutil

    import torch

    from tests.webapp.factories import make_worker
    from webapp.jobs import ledger
    from workers.adapters import generate, inference
    from workers.contract import kinds
    from workers.contract.reporter import MemoryReporter

    source, uris = task_adapters
    shutil.copytree(source.path(uris["double"]), store_dir / "adapters" / "double")
    adapter = Adapter.objects.create(name="double", owner=api_team.owner, base_model=api_team.base, rank=8,
                                     uri="store://adapters/double", size_bytes=1, sha256="0" * 64,
                                     trainable_params=1, total_params=2)  # fmt: skip
    raw = key_for(api_team.owner)
    body = {"adapters": [adapter.pk], "prompts": ["Double 17"], "max_new_tokens": 6, "base_precision": precision}
    created = post(client, "/api/v1/comparisons/", body, raw).json()
    job = AdapterJob.objects.get(pk=created["job"])
    worker, token = make_worker()
    attempt = ledger.dispatch(job, worker)
    worker_api = {"content_type": "application/json", "HTTP_AUTHORIZATION": f"Bearer {token}"}
    claimed = client.post(f"/api/worker/v1/adapter-jobs/{job.pk}/claim", json.dumps({"attempt": attempt}), **worker_api)
    spec = kinds.spec_from_dict("compare", claimed.json()["spec"])
    assert spec.load.quantization == quantization
    loaded: list[Any] = []
    original = inference._load_base
    monkeypatch.setattr(inference, "_load_base", lambda *args: loaded.append(original(*args)) or loaded[-1])  # a look
    reporter = MemoryReporter()

    result = generate.run_compare(spec, reporter, ArtifactStore(store_dir))

    assert result is not None, reporter.states[-1]
    assert loaded[0].model.layers[0].self_attn.q_proj.weight.dtype == getattr(torch, dtype)
    assert f"Loading {api_team.base.source} in {used} on cpu" in reporter.logs
    assert result["base_precision"] == used
    for state, extra in (("running", {}), ("succeeded", {"result": result})):
        answer = client.post(f"/api/worker/v1/adapter-jobs/{job.pk}/status",
                             json.dumps({"attempt": attempt, "state": state, **extra}), **worker_api)  # fmt: skip
        assert answer.status_code == 200, answer.content

    detail = client.get(f"/api/v1/comparisons/{created['id']}/", **bearer(raw)).json()
    assert detail["base_precision"] == {"chosen": precision, "quantization": quantization,
                                        "compute_dtype": "bfloat16" if precision == "bfloat16" else "auto",
                                        "used": used}  # fmt: skip
    assert detail["stop_tokens"] == [{"text": "</s>", "token_id": 2, "why": "EOS, end of turn"}]
    client.force_login(api_team.owner)
    page = client.get(f"/compare/{created['id']}/").content.decode()
    assert f'<span id="base-precision">{used}</span> <small>(base precision {precision})</small>' in page
    assert '<span id="stop-tokens"><code>&lt;/s&gt;</code> <small>(EOS, end of turn)</small></span>' in page


def test_evaluations_and_combinations_refuse_with_the_field(client: Client, api_team: Team, store_dir: Path) -> None:
    a, b = _adapter(api_team, store_dir, "a"), _adapter(api_team, store_dir, "b")
    raw = key_for(api_team.owner)
    held = problem_of(post(client, "/api/v1/evaluations/", {"adapters": [a.pk], "held_out_of": a.run_id}, raw), 400)
    assert "held nothing out" in held["errors"]["held_out_of"][0]
    neither = problem_of(post(client, "/api/v1/evaluations/", {"adapters": [a.pk]}, raw), 400)
    assert "non_field_errors" in neither["errors"]
    response = post(client, "/api/v1/evaluations/", {"adapters": [a.pk], "dataset": api_team.dataset.pk, "max_rows": 4},
                    raw)
    assert response.status_code == 201 and response.json()["kind"] == "evaluate"
    assert [j["id"] for j in client.get("/api/v1/evaluations/", **bearer(raw)).json()["results"]] == [response.json()["id"]]

    weights = problem_of(post(client, "/api/v1/combinations/", {"adapters": [a.pk, b.pk], "weights": [1.0]}, raw), 400)
    assert "one weight per adapter" in weights["errors"]["weights"][0]
    response = post(client, "/api/v1/combinations/", {"adapters": [a.pk, b.pk], "weights": [0.5, 0.5], "name": "mix"}, raw)
    assert response.status_code == 201 and response.json()["params"]["name"] == "mix"


def test_jobs_list_cancel_retry_and_events(client: Client, api_team: Team, store_dir: Path) -> None:
    adapter = _adapter(api_team, store_dir)
    raw = key_for(api_team.owner)
    job_id = post(client, f"/api/v1/adapters/{adapter.pk}/merge/", {}, raw).json()["id"]
    assert [j["id"] for j in client.get("/api/v1/jobs/?kind=merge&owner=me", **bearer(raw)).json()["results"]] == [job_id]
    assert client.get("/api/v1/jobs/?kind=compare", **bearer(raw)).json()["results"] == []
    assert "kind" in problem_of(client.get("/api/v1/jobs/?kind=train", **bearer(raw)), 400)["errors"]
    assert "only the job's owner" in problem_of(post(client, f"/api/v1/jobs/{job_id}/cancel/", {},
                                                     key_for(api_team.mate)), 403)["detail"]
    assert "only a failed or cancelled job" in problem_of(post(client, f"/api/v1/jobs/{job_id}/retry/", {}, raw),
                                                          409)["detail"]
    assert post(client, f"/api/v1/jobs/{job_id}/cancel/", {}, raw).json()["state"] == "cancelled"
    problem_of(post(client, f"/api/v1/jobs/{job_id}/cancel/", {}, raw), 409)
    assert post(client, f"/api/v1/jobs/{job_id}/retry/", {}, raw).json()["state"] == "queued"
    page = client.get(f"/api/v1/jobs/{job_id}/events/", **bearer(raw)).json()
    assert [e["message"] for e in page["results"]][:2] == ["Queued by owner", "Cancelled before it started"]
    problem_of(client.get("/api/v1/jobs/424242/", **bearer(raw)), 404)


def test_merged_models_and_their_download(client: Client, api_team: Team, store_dir: Path) -> None:
    adapter = _adapter(api_team, store_dir)
    folder = ArtifactStore(store_dir).path("store://jobs/9/output")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    merged = MergedModel.objects.create(adapter=adapter, uri="store://jobs/9/output", dtype="bfloat16", size_bytes=2,
                                        sha256="1" * 64, verified=True, figures={"max_logit_diff": 0.01})
    raw = key_for(api_team.mate, "read")
    body = client.get(f"/api/v1/merges/{merged.pk}/", **bearer(raw)).json()
    assert body["files"] == [{"name": "config.json", "size": 2}] and body["verified"] is True
    response = client.get(f"/api/v1/merges/{merged.pk}/download/", **bearer(raw))
    assert zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))).namelist() == ["config.json"]


def test_workers_register_rotate_revoke_drain_resume_and_delete(client: Client, api_team: Team, settings: Any) -> None:
    raw = key_for(api_team.boss, "admin")
    response = post(client, "/api/v1/workers/", {"name": "gpu-1", "labels": ["a100"], "max_gpu_gib": "20", "max_jobs": 2},
                    raw)
    assert response.status_code == 201, response.content
    token = response.json()["token"]
    worker = Worker.objects.get(name="gpu-1")
    assert worker.token_hash == hash_token(token) and response["Cache-Control"].startswith("max-age=0")
    assert (worker.labels, worker.max_gpu_bytes, worker.max_jobs) == (["a100"], 20 * 2**30, 2)
    listed = client.get("/api/v1/workers/", **bearer(raw))
    assert token not in listed.content.decode() and listed.json()[0]["name"] == "gpu-1"
    assert "already exists" in problem_of(post(client, "/api/v1/workers/", {"name": "gpu-1"}, raw), 400)["errors"]["name"][0]
    assert "name" in problem_of(post(client, "/api/v1/workers/", {"name": "not a slug"}, raw), 400)["errors"]

    rotated = post(client, f"/api/v1/workers/{worker.pk}/rotate/", {}, raw).json()
    worker.refresh_from_db()
    assert rotated["token"] != token and worker.token_hash == hash_token(rotated["token"])
    assert worker.previous_token_hash == hash_token(token) and rotated["previous_token_valid_until"]
    revoked = post(client, f"/api/v1/workers/{worker.pk}/revoke/", {}, raw).json()
    assert revoked["revoked"] is True and "token" not in revoked

    assert "only an online worker" in problem_of(post(client, f"/api/v1/workers/{worker.pk}/drain/", {}, raw), 409)["detail"]
    Worker.objects.filter(pk=worker.pk).update(state="online")
    assert post(client, f"/api/v1/workers/{worker.pk}/drain/", {}, raw).json()["state"] == "draining"
    assert post(client, f"/api/v1/workers/{worker.pk}/resume/", {}, raw).json()["state"] == "offline"  # never heard from
    problem_of(post(client, f"/api/v1/workers/{worker.pk}/resume/", {}, raw), 409)

    patched = client.patch(f"/api/v1/workers/{worker.pk}/", json.dumps({"labels": ["h100"]}),
                           content_type="application/json", **bearer(raw)).json()
    assert patched["labels"] == ["h100"] and patched["max_jobs"] == 2  # fields left out keep their values

    run = make_run(api_team.owner, api_team.base, api_team.dataset, api_team.config)
    TrainingRun.objects.filter(pk=run.pk).update(state="running", worker=worker)
    assert "active job" in problem_of(client.delete(f"/api/v1/workers/{worker.pk}/", **bearer(raw)), 409)["detail"]
    TrainingRun.objects.filter(pk=run.pk).update(state="succeeded")
    assert client.delete(f"/api/v1/workers/{worker.pk}/", **bearer(raw)).status_code == 204
    problem_of(client.get(f"/api/v1/workers/{worker.pk}/", **bearer(raw)), 404)
