"""Catalog endpoints: base models, datasets and LoRA configs, checked as the catalog pages check them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from tests.webapp.team import make
from webapp.api.models import ApiKey
from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from workers.training.demo import toy_rows


@pytest.fixture
def api(team) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"HTTP_AUTHORIZATION": f"Bearer {ApiKey.issue(team[0]['owner'], 'k', ['write'])[1]}"}


def _jsonl(rows: list[Any]) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def _problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    return response.json()


# --- base models -------------------------------------------------------------------------------------------


def test_it_registers_a_local_model_after_inspecting_it(client: Client, team, api, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/api/v1/base-models/", {"source": str(tiny_model_dir)}, content_type="application/json",
                           **api)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["name"] == tiny_model_dir.name and body["architecture"] == "LlamaForCausalLM"
    assert body["num_parameters"] > 0 and "q_proj" in body["linear_modules"] and body["created_by"] == "owner"
    assert response["Location"] == f"/api/v1/base-models/{body['id']}/"
    assert client.get(response["Location"], **api).json()["source"] == str(tiny_model_dir)

    again = _problem(client.post("/api/v1/base-models/", {"source": str(tiny_model_dir)},
                                 content_type="application/json", **api), 400)
    assert again["errors"]["name"] == [f"a base model named {tiny_model_dir.name} already exists"]


def test_a_source_that_is_no_model_is_refused_naming_the_field(client: Client, team, api, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                               settings) -> None:  # type: ignore[no-untyped-def]
    body = _problem(client.post("/api/v1/base-models/", {"source": "not a hub id!", "name": "x"},
                                content_type="application/json", **api), 400)
    assert list(body["errors"]) == ["source"] and "neither a hub id (owner/name) nor an absolute path" in body["errors"]["source"][0]
    settings.MODEL_ROOTS = [tmp_path]
    body = _problem(client.post("/api/v1/base-models/", {"source": str(tmp_path), "name": "empty"},
                                content_type="application/json", **api), 400)
    assert list(body["errors"]) == ["source"] and body["detail"].startswith("source: ")
    assert "cannot read a model config" in body["errors"]["source"][0]
    body = _problem(client.post("/api/v1/base-models/", {"revision": "main"}, content_type="application/json", **api), 400)
    assert body["errors"]["source"] == ["This field is required."]
    assert BaseModel.objects.count() == 2  # the team's own


def test_a_local_path_outside_the_model_roots_is_refused_without_saying_whether_it_exists(  # type: ignore[no-untyped-def]
        client: Client, team, api, tmp_path: Path, settings, tiny_model_dir: Path) -> None:
    settings.MODEL_ROOTS = [tmp_path / "models"]
    messages = []
    for source in (str(tiny_model_dir), "/root/.ssh", str(tmp_path / "missing")):
        body = _problem(client.post("/api/v1/base-models/", {"source": source}, content_type="application/json",
                                    **api), 400)
        assert list(body["errors"]) == ["source"]
        messages.append(body["errors"]["source"][0].replace(repr(source), "<source>"))
    assert len(set(messages)) == 1 and "local base models must be folders under" in messages[0]
    assert str(tmp_path / "models") in messages[0]
    assert BaseModel.objects.count() == 2  # the team's own


def test_a_base_model_is_deleted_only_when_unused(client: Client, team, api) -> None:  # type: ignore[no-untyped-def]
    users, bases, _datasets, _config = team
    make(team, base=0)
    mine = BaseModel.objects.create(name="mine", source="/m", created_by=users["owner"])
    body = _problem(client.delete(f"/api/v1/base-models/{bases[1].pk}/", **api), 403)  # registered by nobody here
    assert body["detail"] == "only its creator or staff may delete base-1"
    mate = {"HTTP_AUTHORIZATION": f"Bearer {ApiKey.issue(users['mate'], 'k', ['write'])[1]}"}
    assert "only its creator or staff" in _problem(client.delete(f"/api/v1/base-models/{mine.pk}/", **mate), 403)["detail"]
    assert client.delete(f"/api/v1/base-models/{mine.pk}/", **api).status_code == 204
    assert not BaseModel.objects.filter(pk=mine.pk).exists()
    staff = {"HTTP_AUTHORIZATION": f"Bearer {ApiKey.issue(users['staff'], 'k', ['write'])[1]}"}
    body = _problem(client.delete(f"/api/v1/base-models/{bases[0].pk}/", **staff), 409)
    assert "in use" in body["detail"] and "training run" in body["detail"]
    assert client.delete(f"/api/v1/base-models/{bases[1].pk}/", **staff).status_code == 204


# --- datasets ----------------------------------------------------------------------------------------------


def test_a_clean_upload_is_stored_with_its_report(client: Client, team, api, store_dir: Path) -> None:  # type: ignore[no-untyped-def]
    upload = SimpleUploadedFile("toy.jsonl", _jsonl(toy_rows(6, 0)))
    response = client.post("/api/v1/datasets/", {"name": "toy", "file": upload}, **api)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["row_count"] == 6 and body["format"] == "alpaca" and body["report"]["ok"] is True
    assert body["report"]["preview"] and body["stats"]["size_bytes"] == Dataset.objects.get(name="toy").size_bytes
    detail = client.get(f"/api/v1/datasets/{body['id']}/", **api).json()
    assert detail["report"]["row_count"] == 6 and detail["original_filename"] == "toy.jsonl"
    listed = client.get("/api/v1/datasets/", **api).json()["results"]
    assert listed[0]["name"] == "toy" and "report" not in listed[0]


def test_a_bad_file_is_refused_with_file_line_and_field(client: Client, team, api, store_dir: Path) -> None:  # type: ignore[no-untyped-def]
    rows: list[Any] = [{"instruction": "a", "output": "b"}, "{not json", {"instruction": "c", "output": 5}]
    upload = SimpleUploadedFile("bad.jsonl", _jsonl(rows))
    body = _problem(client.post("/api/v1/datasets/", {"name": "bad", "file": upload}, **api), 400)
    assert "bad.jsonl was not saved" in body["detail"]
    assert {p["line"] for p in body["problems"]} >= {2, 3}, body["problems"]
    assert all(p["file"] == "bad.jsonl" for p in body["problems"])
    by_line = {p["line"]: p for p in body["problems"]}
    assert by_line[3]["field"] == "output", by_line
    assert any(m.startswith("bad.jsonl, line 2") for m in body["errors"]["file"]), body["errors"]
    assert any("line 3, field 'output'" in m for m in body["errors"]["file"]), body["errors"]
    assert not Dataset.objects.filter(name="bad").exists() and not any(store_dir.rglob("*bad*"))


def test_upload_form_checks_apply(client: Client, team, api, store_dir: Path) -> None:  # type: ignore[no-untyped-def]
    body = _problem(client.post("/api/v1/datasets/", {"name": "has space",
                                                      "file": SimpleUploadedFile("t.txt", b"x")}, **api), 400)
    assert set(body["errors"]) == {"name"}  # a slug is required first
    body = _problem(client.post("/api/v1/datasets/", {"name": "ok", "file": SimpleUploadedFile("t.txt", b"x")},
                                **api), 400)
    assert "unsupported file type" in body["errors"]["file"][0]
    body = _problem(client.post("/api/v1/datasets/", {"name": "data-0",
                                                      "file": SimpleUploadedFile("t.jsonl", b"{}")}, **api), 400)
    assert body["errors"]["name"] == ["a dataset with this name already exists"]
    body = _problem(client.post("/api/v1/datasets/", {"name": "nofile"}, **api), 400)
    assert body["errors"]["file"] == ["This field is required."]


def test_a_retried_upload_makes_one_dataset(client: Client, team, api, store_dir: Path) -> None:  # type: ignore[no-untyped-def]
    data = _jsonl(toy_rows(4, 1))
    headers = {**api, "HTTP_IDEMPOTENCY_KEY": "upload-1"}
    first = client.post("/api/v1/datasets/", {"name": "once", "file": SimpleUploadedFile("a.jsonl", data)}, **headers)
    again = client.post("/api/v1/datasets/", {"name": "once", "file": SimpleUploadedFile("a.jsonl", data)}, **headers)
    assert first.status_code == again.status_code == 201 and again.json() == first.json()
    assert again["Idempotent-Replayed"] == "true" and Dataset.objects.filter(name="once").count() == 1
    other = client.post("/api/v1/datasets/", {"name": "once", "file": SimpleUploadedFile("a.jsonl", data + data)},
                        **headers)
    assert _problem(other, 422)["errors"] == {"Idempotency-Key": ["already used for a different request"]}


# --- LoRA configs ------------------------------------------------------------------------------------------


def test_a_lora_config_is_made_with_defaults_for_missing_params(client: Client, team, api) -> None:  # type: ignore[no-untyped-def]
    response = client.post("/api/v1/lora-configs/", {"name": "small", "params": {
        "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True}},
        content_type="application/json", **api)
    assert response.status_code == 201, response.content
    body = response.json()
    params = LoraConfig.objects.get(name="small").params
    assert params["r"] == 4 and params["target_modules"] == ["q_proj", "v_proj"] and params["use_dora"] is True
    assert params["dropout"] == 0.05 and params["double_quant"] is True  # defaults
    assert body["params"] == params and body["method"] == "lora" and body["summary"]


def test_lora_params_are_checked_as_the_form_checks_them(client: Client, team, api) -> None:  # type: ignore[no-untyped-def]
    def errors(params: dict[str, Any]) -> dict[str, list[str]]:
        response = client.post("/api/v1/lora-configs/", {"name": "x", "params": params},
                               content_type="application/json", **api)
        return _problem(response, 400)["errors"]

    assert "params.r" in errors({"r": "many"})
    assert set(errors({"method": "magic"})) == {"params.method"}
    assert set(errors({"rank": 8})) == {"params.rank"} and "unknown field" in errors({"rank": 8})["params.rank"][0]
    assert "params.quant_type" not in errors({"dropout": 1.5})
    assert set(errors({"dropout": 1.5})) == {"params.dropout"}
    assert set(_problem(client.post("/api/v1/lora-configs/", {"name": "cfg"}, content_type="application/json", **api),
                        400)["errors"]) == {"name"}  # the team's config is already named cfg
    assert not LoraConfig.objects.filter(name="x").exists()


def test_a_lora_config_in_use_is_kept(client: Client, team, api) -> None:  # type: ignore[no-untyped-def]
    users, _bases, _datasets, config = team
    config.created_by = users["owner"]
    config.save()
    make(team)
    assert "in use" in _problem(client.delete(f"/api/v1/lora-configs/{config.pk}/", **api), 409)["detail"]
    made = client.post("/api/v1/lora-configs/", {"name": "spare"}, content_type="application/json", **api).json()
    assert client.delete(f"/api/v1/lora-configs/{made['id']}/", **api).status_code == 204
    read_only = {"HTTP_AUTHORIZATION": f"Bearer {ApiKey.issue(users['owner'], 'r', ['read'])[1]}"}
    assert _problem(client.delete(f"/api/v1/lora-configs/{config.pk}/", **read_only), 403)


def test_json_to_an_upload_endpoint_is_refused_clearly(client: Client, team, api) -> None:  # type: ignore[no-untyped-def]
    body = _problem(client.post("/api/v1/datasets/", {"name": "x"}, content_type="application/json", **api), 415)
    assert "application/json" in body["detail"]  # multipart is what the endpoint takes


@pytest.mark.parametrize(("path", "name"), [("base-models", "base-1"), ("datasets", "data-1"), ("lora-configs", "cfg")])
def test_a_list_filtered_by_name_holds_the_one_so_named(client: Client, team, api, path: str, name: str) -> None:  # type: ignore[no-untyped-def]
    everything = client.get(f"/api/v1/{path}/", **api).json()["results"]
    assert len(everything) >= 1
    found = client.get(f"/api/v1/{path}/", {"name": name}, **api).json()["results"]
    assert [row["name"] for row in found] == [name]
    for other in (name.upper(), name[:-1], "nothing\x00"):  # exact: no case folding, no prefix
        assert client.get(f"/api/v1/{path}/", {"name": other}, **api).json()["results"] == []


def test_hostile_files_are_400_problems_naming_where(client: Client, team, api, store_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.webapp.test_catalog_pages import NESTED, _bomb

    before = set(Dataset.objects.values_list("name", flat=True))
    upload = SimpleUploadedFile("deep.json", b"[" + NESTED + b"]")
    body = _problem(client.post("/api/v1/datasets/", {"name": "deep", "file": upload}, **api), 400)
    assert body["problems"][0]["line"] == 1 and "nested deeper than 32 levels" in body["problems"][0]["message"]
    upload = SimpleUploadedFile("bomb.parquet", _bomb())
    body = _problem(client.post("/api/v1/datasets/", {"name": "bomb", "file": upload}, **api), 400)
    assert body["problems"][0] == {"file": "bomb.parquet", "line": 1, "unit": "row", "field": "text",
                                   "message": body["problems"][0]["message"]}
    assert body["problems"][0]["message"].startswith("decodes to 2 MB")
    assert set(Dataset.objects.values_list("name", flat=True)) == before and not any(store_dir.rglob("*bomb*"))
