"""Warm start through every way in: the REST API (create, clone, refusals by field), the OpenAI jobs endpoint with a
fine-tuned model as `model`, the New run page's select, the CLI's run spec key, and the lineage on the run and
adapter pages and in the adapter API."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from openai.types.fine_tuning import FineTuningJob

from tests.webapp.api_helpers import Team, bearer, key_for, make_team, problem_of
from tests.webapp.factories import make_run
from webapp.catalog.models import LoraConfig
from webapp.catalog.services import register_base_model, register_dataset
from webapp.training.models import Adapter, AdapterOrigin, TrainingRun
from workers.contract.spec import suggest_train_params

PARENT_NAME = "sft <b>adder</b>"  # escaped wherever it is shown


@pytest.fixture
def team(tiny_model_dir: Path, store_dir: Path, db: Any) -> Team:
    return make_team(tiny_model_dir)


def trained_adapter(team: Team, name: str = PARENT_NAME, base: Any = None, config: Any = None,
                    **fields: Any) -> Adapter:
    """A succeeded run's adapter, as the ledger records it (rows only: the API needs no files)."""
    run = make_run(team.owner, base or team.base, team.dataset, config or team.config)
    TrainingRun.objects.filter(pk=run.pk).update(name=name, state="succeeded", attempt=1)
    return Adapter.objects.create(
        run=run, name=name, owner=team.owner, base_model=base or team.base, rank=16,
        uri=f"store://runs/{run.pk}/attempt-1/adapter", size_bytes=1, sha256="0" * 64, trainable_params=1,
        total_params=2, **fields)


def create(client: Client, team: Team, raw: str, **body: Any) -> Any:
    return client.post("/api/v1/runs/", json.dumps(team.run_body(**body)), content_type="application/json",
                       **bearer(raw))


def test_a_run_created_from_an_adapter_starts_from_it_and_a_clone_keeps_it(client: Client, team: Team) -> None:
    parent = trained_adapter(team)
    raw = key_for(team.owner)

    response = create(client, team, raw, init_adapter=parent.pk)

    assert response.status_code == 201, response.content
    body = response.json()
    run = TrainingRun.objects.get(pk=body["id"])
    assert (body["init_adapter"], body["init_adapter_name"]) == (parent.pk, PARENT_NAME)
    assert (run.init_adapter, run.init_adapter_name) == (parent, PARENT_NAME)
    spec = run.job_spec()
    assert (spec.init_adapter_uri, spec.init_adapter_name) == (parent.uri, PARENT_NAME) and spec.warm_start
    fresh = TrainingRun.objects.get(pk=create(client, team, raw).json()["id"])
    assert fresh.job_spec().init_adapter_uri == "" and not fresh.job_spec().warm_start
    assert (run.needs_gpu_bytes, run.needs_gpus) == (fresh.needs_gpu_bytes, fresh.needs_gpus)  # same estimate

    clone = client.post(f"/api/v1/runs/{run.pk}/clone/", "{}", content_type="application/json", **bearer(raw))
    assert clone.status_code == 201, clone.content
    assert clone.json()["init_adapter"] == parent.pk
    assert TrainingRun.objects.get(pk=clone.json()["id"]).init_adapter == parent


def test_a_parent_the_run_cannot_continue_is_refused_on_the_field_that_names_it(client: Client, team: Team,
                                                                                 tiny_model_dir: Path) -> None:
    raw = key_for(team.owner)
    other_base = register_base_model("tiny-twin", str(tiny_model_dir))
    elsewhere = trained_adapter(team, "of the twin", base=other_base)
    narrow = LoraConfig.objects.create(name="narrow", params={"r": 8, "alpha": 16, "dropout": 0.0,
                                                              "target_modules": ["all-linear"]})
    parent = trained_adapter(team)
    ia3 = trained_adapter(team, "scaled", method="ia3")
    blend = Adapter.objects.create(name="blend", owner=team.owner, base_model=team.base, origin=AdapterOrigin.COMBINED,
                                   rank=16, uri="store://jobs/1/output", size_bytes=1, sha256="0" * 64,
                                   trainable_params=1, total_params=2)

    errors = problem_of(create(client, team, raw, init_adapter=elsewhere.pk), 400)["errors"]
    assert errors == {"init_adapter": ["of the twin is an adapter of tiny-twin, and this run trains tiny: pick an "
                                       "adapter of tiny"]}
    errors = problem_of(create(client, team, raw, init_adapter=parent.pk, lora_config=narrow.pk), 400)["errors"]
    assert list(errors) == ["lora_config"]
    assert errors["lora_config"][0] == (
        f"narrow does not have the shape of {PARENT_NAME}, which this run continues (r: the parent's is 16, not 8; "
        "alpha: the parent's is 32, not 16): use cfg, the config it was trained with, or one of the same shape")
    errors = problem_of(create(client, team, raw, init_adapter=ia3.pk), 400)["errors"]
    assert "a warm start continues a LoRA adapter" in errors["init_adapter"][0]
    errors = problem_of(create(client, team, raw, init_adapter=blend.pk), 400)["errors"]
    assert "blend is a combination of adapters" in errors["init_adapter"][0]
    errors = problem_of(create(client, team, raw, init_adapter=999999), 400)["errors"]
    assert errors == {"init_adapter": ["no adapter with id 999999"]}
    sharded = {"num_gpus": 2, "strategy": "fsdp"}
    errors = problem_of(create(client, team, raw, init_adapter=parent.pk, hyperparameters=sharded), 400)["errors"]
    assert "a warm start (init_adapter) trains with ddp" in errors["hyperparameters.strategy"][0]
    assert not TrainingRun.objects.filter(init_adapter__isnull=False).exists()

    # A config of the parent's shape that loads the base otherwise (QLoRA, dropout) is the run's to choose.
    qlora = LoraConfig.objects.create(name="cfg-4bit", params={**team.config.params, "quantization": "4bit",
                                                               "dropout": 0.1})
    assert create(client, team, raw, init_adapter=parent.pk, lora_config=qlora.pk).status_code == 201


def test_the_parent_outlives_nothing_it_is_still_needed_for_and_a_child_outlives_it(client: Client,
                                                                                   team: Team) -> None:
    parent = trained_adapter(team)
    parent_run = parent.run
    raw = key_for(team.owner)
    child = TrainingRun.objects.get(pk=create(client, team, raw, init_adapter=parent.pk).json()["id"])

    refused = problem_of(client.delete(f"/api/v1/runs/{parent_run.pk}/", **bearer(raw)), 409)
    assert f"{child} (queued)" in refused["detail"]
    TrainingRun.objects.filter(pk=child.pk).update(state="succeeded")
    assert client.delete(f"/api/v1/runs/{parent_run.pk}/", **bearer(raw)).status_code == 200

    body = client.get(f"/api/v1/runs/{child.pk}/", **bearer(raw)).json()
    assert (body["init_adapter"], body["init_adapter_name"]) == (None, PARENT_NAME)
    errors = problem_of(client.post(f"/api/v1/runs/{child.pk}/clone/", "{}", content_type="application/json",
                                    **bearer(raw)), 400)["errors"]
    assert errors == {"init_adapter": [f"run {child.pk} started from the adapter {PARENT_NAME}, which was deleted "
                                       "since: a copy cannot start from it"]}
    child.refresh_from_db()
    assert child.job_spec().init_adapter_uri == "" and child.job_spec().warm_start  # the worker says it is gone


def test_the_openai_endpoint_continues_a_fine_tuned_model_given_as_model(team: Team) -> None:
    from webapp.api.models import ApiKey

    pairs = register_dataset("pairs", "pairs.jsonl", "".join(
        json.dumps({"prompt": f"What is {n} + 1?\n", "chosen": str(n + 1), "rejected": str(n + 2)}) + "\n"
        for n in range(12)).encode())
    parent = trained_adapter(team)
    headers = {"Authorization": f"Bearer {ApiKey.issue(team.owner, 'sdk', ['write'])[1]}"}
    client = Client()

    def post(body: dict[str, Any]) -> Any:
        return client.post("/v1/fine_tuning/jobs", json.dumps(body), content_type="application/json", headers=headers)

    model = f"tiny:ft-{parent.run_id}"
    response = post({"model": model, "training_file": f"file-{pairs.pk}", "method": {"type": "dpo"}})

    assert response.status_code == 200, response.content
    job = FineTuningJob.model_validate(response.json())
    run = TrainingRun.objects.get(pk=int(job.id.removeprefix("ftjob-")))
    assert (run.base_model, run.init_adapter, run.lora_config) == (team.base, parent, team.config)
    assert run.train_params().objective == "dpo" and job.model == model
    assert response.json()["tunedeck"]["init_adapter_id"] == parent.pk

    for given, words in ((f"{model}:ckpt-step-4", "is a checkpoint"), ("tiny:ft-999999", "no fine-tuned model"),
                         (f"other:ft-{parent.run_id}", "no fine-tuned model")):
        error = post({"model": given, "training_file": f"file-{pairs.pk}"}).json()["error"]
        assert (error["param"], error["code"]) == ("model", "model_not_found") and words in error["message"], error
    running = make_run(team.owner, team.base, team.dataset, team.config)
    error = post({"model": f"tiny:ft-{running.pk}", "training_file": f"file-{pairs.pk}"}).json()["error"]
    assert "is queued, and only a succeeded job's model can be fine-tuned further" in error["message"]
    narrow = {"lora": {"r": 8, "alpha": 16, "target_modules": ["all-linear"]}}
    error = post({"model": model, "training_file": f"file-{pairs.pk}", "method": {"type": "dpo"},
                  "tunedeck": narrow}).json()["error"]
    assert error["param"] == "tunedeck.lora" and "r: the parent's is 16, not 8" in error["message"]


def test_the_run_and_adapter_pages_say_where_the_run_started_from(client: Client, team: Team) -> None:
    parent = trained_adapter(team)
    raw = key_for(team.owner)
    child = TrainingRun.objects.get(pk=create(client, team, raw, init_adapter=parent.pk).json()["id"])
    TrainingRun.objects.filter(pk=child.pk).update(state="succeeded")
    child_adapter = Adapter.objects.create(run=child, name="dpo", owner=team.owner, base_model=team.base, rank=16,
                                           uri=f"store://runs/{child.pk}/attempt-1/adapter", size_bytes=1,
                                           sha256="0" * 64, trainable_params=1, total_params=2)
    client.login(username="owner", password="owner-pass-123")
    line = (f'started from <a href="/adapters/{parent.pk}/">sft &lt;b&gt;adder&lt;/b&gt;</a> '
            f'(<a href="/runs/{parent.run_id}/">run {parent.run_id}</a>)')

    assert line in client.get(f"/runs/{child.pk}/").content.decode()
    assert line in client.get(f"/adapters/{child_adapter.pk}/").content.decode()
    assert "Warm start" not in client.get(f"/runs/{parent.run_id}/").content.decode()
    body = client.get(f"/api/v1/adapters/{child_adapter.pk}/", **bearer(raw)).json()
    assert (body["init_adapter"], body["init_adapter_name"], body["init_adapter_run"]) == (
        parent.pk, PARENT_NAME, parent.run_id)
    assert client.get(f"/api/v1/adapters/{parent.pk}/", **bearer(raw)).json()["init_adapter"] is None

    parent.run.delete()  # with its adapter; the child keeps the name it started from
    assert "started from sft &lt;b&gt;adder&lt;/b&gt; (deleted)" in client.get(f"/runs/{child.pk}/").content.decode()


def offered(page: str) -> dict[int, bool]:
    """The adapters the page's init_adapter select offers: id -> selected."""
    select = re.search(r'<select name="init_adapter"[^>]*>(.*?)</select>', page, re.S)
    assert select is not None, page
    return {int(value): bool(chosen) for value, chosen in re.findall(r'<option value="(\d+)"( selected)?>', select[1])}


def test_the_new_run_page_offers_the_adapters_of_the_chosen_base_and_names_a_refusal(
        client: Client, team: Team, tiny_model_dir: Path) -> None:
    parent = trained_adapter(team)
    other_base = register_base_model("tiny-twin", str(tiny_model_dir))
    elsewhere = trained_adapter(team, "of the twin", base=other_base)
    client.login(username="owner", password="owner-pass-123")

    page = client.get("/runs/new/", {"base_model": team.base.pk}).content.decode()
    assert 'name="init_adapter"' in page and "reference is that adapter as it was, not the bare base" in page
    assert offered(page) == {parent.pk: False}
    # Choosing another base refreshes the settings and, out of band, the adapters offered.
    swap = client.get("/runs/new/", {"base_model": other_base.pk}, headers={"HX-Request": "true"}).content.decode()
    assert 'id="init-adapter-field" hx-swap-oob="true"' in swap and 'id="train-fields"' in swap
    assert offered(swap) == {elsewhere.pk: False}

    params = dataclasses.asdict(suggest_train_params(team.base.num_parameters))
    post = {"base_model": team.base.pk, "dataset": team.dataset.pk, "lora_config": team.config.pk,
            **{k: v for k, v in params.items() if not isinstance(v, bool)}}
    refused = client.post("/runs/new/", {**post, "init_adapter": elsewhere.pk})
    assert refused.status_code == 400 and "is an adapter of tiny-twin" in refused.content.decode()
    created = client.post("/runs/new/", {**post, "init_adapter": parent.pk})
    assert created.status_code == 302
    run = TrainingRun.objects.get(init_adapter=parent)
    clone = client.get("/runs/new/", {"clone": run.pk}).content.decode()
    assert offered(clone) == {parent.pk: True}


def test_a_cli_run_spec_names_the_adapter_to_start_from_by_id(tmp_path: Path) -> None:
    from tunedeck_cli import runspec
    from tunedeck_cli.errors import CliError

    path = tmp_path / "dpo.yaml"
    path.write_text("base_model: tiny\ndataset: pairs\nlora_config: cfg\ninit_adapter: 12\n")
    assert runspec.body(runspec.load(str(path)))["init_adapter"] == 12
    path.write_text("base_model: tiny\ndataset: pairs\nlora_config: cfg\ninit_adapter: sft adder\n")
    with pytest.raises(CliError) as refused:
        runspec.load(str(path))
    assert "init_adapter: an adapter's id (tunedeck adapters list), got 'sft adder'" in str(refused.value.details)
