"""Exports for Ollama on the control plane: the adapter page's form, the API, what a succeeded export records,
the merged models list and the downloads (the worker side: tests/workers/test_export.py)."""

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
from webapp.playground.models import AdapterJob, MergedModel
from webapp.training.models import Adapter, TrainingRun
from workers.contract.kinds import spec_from_dict
from workers.contract.store import ArtifactStore


@pytest.fixture
def team(tiny_model_dir: Path, store_dir: Path, db: Any) -> Team:
    return make_team(tiny_model_dir)


def adapter_of(team: Team, store: Path, name: str = "a", method: str = "lora") -> Adapter:
    run = make_run(team.owner, team.base, team.dataset, team.config)
    TrainingRun.objects.filter(pk=run.pk).update(state="succeeded")
    uri = f"store://runs/{run.pk}/attempt-1/adapter"
    folder = ArtifactStore(store).path(uri)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return Adapter.objects.create(name=name, owner=team.owner, base_model=team.base, run=run, rank=8, uri=uri,
                                  method=method, size_bytes=64, sha256="0" * 64, trainable_params=1, total_params=2)


def post(client: Client, path: str, body: Any, raw: str, **headers: Any) -> Any:
    return client.post(path, json.dumps(body), content_type="application/json", **bearer(raw), **headers)


def exported(adapter: Adapter, store: Path, form: str = "adapter", name: str = "team/support:v1") -> MergedModel:
    """An export job that succeeded, with its folder in the store, recorded as the ledger records it."""
    from webapp.playground import services

    job = services.start_export(adapter.owner, adapter, form=form, name=name)
    folder = ArtifactStore(store).path(job.params["output_uri"])
    (folder / "adapter").mkdir(parents=True)
    (folder / "Modelfile").write_text("FROM base\nADAPTER ./adapter\n")
    (folder / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    job.record_result({"output_uri": job.params["output_uri"], "target": "ollama", "form": form, "name": name,
                       "family": "chatml", "size_bytes": 40, "sha256": "a" * 64})
    return MergedModel.objects.get(job=job)


def test_the_api_starts_an_export_and_refusals_name_the_field(client: Client, team: Team, store_dir: Path) -> None:
    adapter = adapter_of(team, store_dir)
    raw = key_for(team.mate)
    body = {"form": "adapter", "name": "team/support:v1", "system": "Be brief.", "base_name": "llama3.2:1b",
            "temperature": 0.2}
    response = post(client, f"/api/v1/adapters/{adapter.pk}/export/", body, raw, HTTP_IDEMPOTENCY_KEY="e")
    assert response.status_code == 201, response.content
    job = AdapterJob.objects.get(pk=response.json()["id"])
    assert (job.kind, job.owner, response.json()["adapters"]) == ("export", team.mate, [adapter.pk])
    assert job.params["output_uri"] == f"store://jobs/{job.pk}/output" and job.needs_gpu_bytes == AdapterJob.objects.get(
        pk=post(client, f"/api/v1/adapters/{adapter.pk}/merge/", {}, raw).json()["id"]).needs_gpu_bytes
    spec = spec_from_dict("export", job.job_spec())  # what the worker builds at claim time
    assert (spec.target, spec.form, spec.name, spec.system, spec.base_name, spec.temperature, spec.top_p) == (
        "ollama", "adapter", "team/support:v1", "Be brief.", "llama3.2:1b", 0.2, None)
    assert post(client, f"/api/v1/adapters/{adapter.pk}/export/", body, raw,
                HTTP_IDEMPOTENCY_KEY="e").json()["id"] == job.pk
    url = f"/api/v1/adapters/{adapter.pk}/export/"
    assert "name" in problem_of(post(client, url, {"name": "<script>x</script>"}, raw), 400)["errors"]
    assert "target" in problem_of(post(client, url, {"target": "gguf"}, raw), 400)["errors"]
    refused = problem_of(post(client, url, {"form": "adapter", "quantize": "q4_K_M"}, raw), 400)
    assert "only a merged model" in refused["errors"]["quantize"][0]
    ia3 = adapter_of(team, store_dir, "ia3", method="ia3")
    assert "LoRA adapters only" in problem_of(post(client, f"/api/v1/adapters/{ia3.pk}/export/", {}, raw), 400)["errors"]["adapter"][0]
    assert [j["id"] for j in client.get("/api/v1/jobs/?kind=export", **bearer(raw)).json()["results"]] == [job.pk]


def test_a_succeeded_export_is_listed_with_the_merged_models_and_downloads_by_file_and_zip(
    client: Client, team: Team, store_dir: Path
) -> None:
    made = exported(adapter_of(team, store_dir, "<b>support</b>"), store_dir)
    assert (made.target, made.form, made.name, made.checked) == ("ollama", "adapter", "team/support:v1", False)
    raw = key_for(team.mate, "read")
    body = client.get(f"/api/v1/merges/{made.pk}/", **bearer(raw)).json()
    assert (body["target"], body["form"], body["name"]) == ("ollama", "adapter", "team/support:v1")
    assert {f["name"] for f in body["files"]} == {"Modelfile", "adapter/adapter_config.json"}
    job = client.get(f"/api/v1/jobs/{made.job_id}/", **bearer(raw)).json()
    assert job["merged_model"] == made.pk
    response = client.get(f"/api/v1/merges/{made.pk}/download/", **bearer(raw))
    names = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))).namelist()
    assert sorted(names) == ["Modelfile", "adapter/adapter_config.json"]

    client.force_login(team.mate)
    page = client.get("/merged/").content.decode()
    row = page[page.index(f'id="merged-{made.pk}"'):]
    row = row[:row.index("</tr>")]
    assert "ollama export, adapter" in row and "<code>team/support:v1</code>" in row
    assert "&lt;b&gt;support&lt;/b&gt;" in row and "<b>support" not in row and "check failed" not in row
    file = client.get(f"/merged/{made.pk}/files/adapter/adapter_config.json")
    assert file.status_code == 200 and b"".join(file.streaming_content) == b'{"r": 8}'
    assert client.get(f"/merged/{made.pk}/files/Modelfile").status_code == 200
    assert client.get(f"/merged/{made.pk}/files/../../../etc/passwd").status_code == 404
    assert client.get(f"/merged/{made.pk}/files/adapter/..%2F..%2Fsecret").status_code == 404
    detail = client.get(f"/jobs/{made.job_id}/").content.decode()
    assert "ollama create team/support:v1 -f Modelfile" in detail and "adapter/adapter_config.json" in detail
    assert "Greedy agreement" not in detail  # no merge, no check


def test_the_adapter_page_exports_and_escapes_a_refused_name(client: Client, team: Team, store_dir: Path) -> None:
    adapter = adapter_of(team, store_dir)
    client.force_login(team.mate)
    page = client.get(f"/adapters/{adapter.pk}/").content.decode()
    assert f'action="/adapters/{adapter.pk}/export/"' in page and "Export for Ollama" in page
    response = client.post(f"/adapters/{adapter.pk}/export/", {"form": "merged", "name": "qwen-support",
                                                                "quantize": "q4_K_M", "system": "Be brief."})
    job = AdapterJob.objects.get(kind="export")
    assert response["Location"] == f"/jobs/{job.pk}/"
    assert (job.params["form"], job.params["name"], job.params["quantize"], job.params["system"]) == (
        "merged", "qwen-support", "q4_K_M", "Be brief.")
    refused = client.post(f"/adapters/{adapter.pk}/export/", {"form": "merged", "name": "<img src=x onerror=alert(1)>"},
                          follow=True).content.decode()
    assert "Export refused" in refused and "<img src=x" not in refused and "&lt;img src=x" in refused
    assert AdapterJob.objects.filter(kind="export").count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_cli_starts_an_export_through_the_api(  # type: ignore[no-untyped-def]
    live_server, tiny_model_dir: Path, store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from tunedeck_cli import adapters
    from tunedeck_cli.api import Api
    from tunedeck_cli.commands import register
    from tunedeck_cli.config import Settings

    team = make_team(tiny_model_dir)
    adapter = adapter_of(team, store_dir)
    api = Api(Settings(server=live_server.url, api_key=key_for(team.mate), source="test"))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["export", str(adapter.pk), "--form", "adapter", "--name", "team/support:v1",
                              "--system", "Be brief.", "--base-name", "llama3.2:1b", "--quiet"])
    assert adapters.export(args, api) == 0
    job = AdapterJob.objects.get(kind="export")
    assert f"Export job {job.pk} queued" in capsys.readouterr().out
    assert (job.params["target"], job.params["form"], job.params["name"], job.params["base_name"],
            job.params["quantize"]) == ("ollama", "adapter", "team/support:v1", "llama3.2:1b", "")
    args = parser.parse_args(["export", str(adapter.pk), "--target", "vllm", "--form", "adapter", "--name", "support",
                              "--prompt", "What is 2 + 3?", "--prompt", "Hi", "--max-new-tokens", "12", "--quiet"])
    assert adapters.export(args, api) == 0
    job = AdapterJob.objects.filter(kind="export").latest("pk")
    assert (job.params["target"], job.params["check_prompts"], job.params["max_new_tokens"], job.needs_labels) == (
        "vllm", ["What is 2 + 3?", "Hi"], 12, ["runtime:vllm"])


def test_deleting_the_run_removes_its_exports_with_their_folders(  # type: ignore[no-untyped-def]
    team: Team, store_dir: Path, django_capture_on_commit_callbacks
) -> None:
    from webapp.playground import deletion

    adapter = adapter_of(team, store_dir)
    made = exported(adapter, store_dir)
    AdapterJob.objects.filter(pk=made.job_id).update(state="succeeded")
    folder = ArtifactStore(store_dir).path(made.uri)
    plan = deletion.plan(adapter.run)
    assert [job.pk for job in plan.jobs] == [made.job_id]
    assert any(f.uri == f"store://jobs/{made.job_id}" and "ollama export, adapter" in f.what for f in plan.folders)
    with django_capture_on_commit_callbacks(execute=True):
        deletion.delete_run(adapter.run)
    assert not folder.exists() and not MergedModel.objects.filter(pk=made.pk).exists()
    assert not AdapterJob.objects.filter(pk=made.job_id).exists()


def test_a_vllm_export_waits_for_a_worker_that_reports_vllm_and_goes_to_it(
    client: Client, team: Team, store_dir: Path
) -> None:
    from tests.webapp.factories import make_worker
    from webapp.fleet.scheduler import schedule_once

    adapter = adapter_of(team, store_dir)
    raw = key_for(team.mate)
    url = f"/api/v1/adapters/{adapter.pk}/export/"
    body = {"target": "vllm", "form": "adapter", "name": "support", "check_prompts": ["Hi", "What is 2 + 3?"],
            "max_new_tokens": 16}
    response = post(client, url, body, raw)
    assert response.status_code == 201, response.content
    job = AdapterJob.objects.get(pk=response.json()["id"])
    assert job.needs_labels == ["runtime:vllm"]
    spec = spec_from_dict("export", job.job_spec())
    assert (spec.target, spec.form, spec.check_prompts, spec.max_new_tokens) == ("vllm", "adapter", ["Hi", "What is 2 + 3?"], 16)
    refused = problem_of(post(client, url, {"target": "vllm", "check_prompts": ["ok", " "]}, raw), 400)
    assert list(refused["errors"]) == ["check_prompts.1"], refused  # the blank one, by its index
    assert "only an Ollama export" in problem_of(post(client, url, {"target": "vllm", "quantize": "q8_0"}, raw),
                                                 400)["errors"]["quantize"][0]

    plain, _ = make_worker("plain")  # no vLLM in its inventory: the job is not placed there, and says why
    plain.inventory = {"gpus": [], "torch": "2.13.0", "vllm": None}
    plain.save()
    schedule_once()
    job.refresh_from_db()
    assert job.state == "queued" and job.worker is None
    assert "needs a worker with vLLM installed; no online worker reports it" in job.wait_reason
    client.force_login(team.owner)
    page = client.get(f"/adapters/{adapter.pk}/").content.decode()
    assert "No online worker reports vLLM" in page

    served, _ = make_worker("served")
    served.inventory = {"gpus": [], "torch": "2.13.0", "vllm": "0.11.0"}
    served.save()
    assert "Workers with vLLM: served." in client.get(f"/adapters/{adapter.pk}/").content.decode()
    schedule_once()
    job.refresh_from_db()
    assert job.state == "dispatched" and job.worker.name == "served"
    from django.contrib.auth import get_user_model

    client.force_login(get_user_model().objects.create_user("ops", password="x", is_staff=True))
    workers_page = client.get("/workers/").content.decode()
    assert "vllm</span> 0.11.0" in workers_page
