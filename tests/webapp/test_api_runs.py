"""Runs over the REST API: create (validated as the run form), list filters, get, cancel, retry, clone,
delete, events (JSON pages and the SSE stream), metrics and checkpoints, idempotent creation."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.test import AsyncClient, Client

from tests.webapp.api_helpers import Team, bearer, key_for, make_team, problem_of
from tests.webapp.factories import make_run, run_world
from webapp.playground.models import AdapterJob
from webapp.training.models import RunEvent, TrainingRun
from workers.contract.spec import suggest_train_params


@pytest.fixture
def api_team(tiny_model_dir: Path, store_dir: Path, db: Any) -> Team:
    return make_team(tiny_model_dir)


def post(client: Client, path: str, body: Any, raw: str, **headers: Any) -> Any:
    return client.post(path, json.dumps(body), content_type="application/json", **bearer(raw), **headers)


# --- create -------------------------------------------------------------------------------------------------


def test_a_run_is_created_with_the_forms_defaults_labels_and_placement(client: Client, api_team: Team) -> None:
    raw = key_for(api_team.owner)
    response = post(client, "/api/v1/runs/", api_team.run_body(hyperparameters={"max_steps": 3}, labels=["a100"],
                                                               priority=-2), raw)
    assert response.status_code == 201, response.content
    body = response.json()
    run = TrainingRun.objects.get(pk=body["id"])
    suggested = suggest_train_params(api_team.base.num_parameters)
    assert run.owner == api_team.owner and run.state == "queued" and body["owner"] == "owner"
    assert run.hyperparameters["max_steps"] == 3 and run.hyperparameters["learning_rate"] == suggested.learning_rate
    assert (run.needs_labels, run.priority, run.needs_gpus) == (["a100"], -2, 1)
    assert body["labels"] == ["a100"] and body["base_model_name"] == "tiny" and body["adapter"] is None
    assert body["created_at"].endswith("Z")
    assert RunEvent.objects.filter(run=run, message="Queued by owner").exists()


def test_bad_fields_are_400_problems_naming_each_field(client: Client, api_team: Team) -> None:
    raw = key_for(api_team.owner)
    body = problem_of(post(client, "/api/v1/runs/", {"name": "x"}, raw), 400)
    assert set(body["errors"]) == {"base_model", "dataset", "lora_config"}

    body = problem_of(post(client, "/api/v1/runs/", api_team.run_body(base_model=999999, dataset="seven"), raw), 400)
    assert body["errors"]["base_model"] == ["no base model with id 999999: GET /api/v1/base-models/ (tunedeck models "
                                            "list) lists their names and ids"]
    assert body["errors"]["dataset"][0].startswith("no dataset named 'seven': ")

    # Hyperparameter problems (types, the run form's checks, unknown names) are under hyperparameters.<field>.
    hp = {"learning_rate": 5.0, "batch_size": "many", "lr": 0.1, "lr_scheduler": "sometimes"}
    body = problem_of(post(client, "/api/v1/runs/", api_team.run_body(hyperparameters=hp), raw), 400)
    assert set(body["errors"]) == {"hyperparameters.lr"}, body  # unknown names first: nothing else is looked at
    del hp["lr"]
    body = problem_of(post(client, "/api/v1/runs/", api_team.run_body(hyperparameters=hp), raw), 400)
    assert set(body["errors"]) == {"hyperparameters.batch_size", "hyperparameters.lr_scheduler"}, body
    body = problem_of(post(client, "/api/v1/runs/", api_team.run_body(hyperparameters={"learning_rate": 5.0}), raw), 400)
    assert list(body["errors"]) == ["hyperparameters.learning_rate"] and "hyperparameters.learning_rate" in body["detail"]

    body = problem_of(post(client, "/api/v1/runs/", api_team.run_body(labels=["Team NLP"]), raw), 400)
    assert "a label is a lowercase slug" in body["errors"]["labels"][0]
    body = problem_of(post(client, "/api/v1/runs/", api_team.run_body(priority=5), raw), 400)
    assert body["errors"]["priority"] == ["only an admin can set a priority above 0"]
    body = problem_of(post(client, "/api/v1/runs/", api_team.run_body(colour="blue"), raw), 400)
    assert "unknown field" in body["errors"]["colour"][0]
    assert not TrainingRun.objects.exists()

    response = post(client, "/api/v1/runs/", api_team.run_body(priority=5), key_for(api_team.boss))
    assert response.status_code == 201 and response.json()["priority"] == 5


def test_references_take_an_id_or_a_name_and_a_refusal_names_the_field_the_value_and_the_list(
        client: Client, api_team: Team) -> None:
    t = api_team
    test_rows = _test_rows(t)
    raw = key_for(t.owner)
    by_name = t.run_body(base_model="tiny", dataset="toy", eval_dataset="toy-test", lora_config="cfg")
    response = post(client, "/api/v1/runs/", by_name, raw)
    assert response.status_code == 201, response.content
    run = TrainingRun.objects.get(pk=response.json()["id"])
    assert (run.base_model, run.dataset, run.eval_dataset, run.lora_config) == (t.base, t.dataset, test_rows, t.config)
    response = post(client, "/api/v1/runs/", t.run_body(lora_config=str(t.config.pk), dataset=t.dataset.pk), raw)
    assert response.status_code == 201 and response.json()["lora_config"] == t.config.pk  # "7" is id 7, as before

    body = problem_of(post(client, "/api/v1/runs/", t.run_body(lora_config="no-such", dataset="nope"), raw), 400)
    assert body["errors"] == {
        "lora_config": ["no LoRA config named 'no-such': GET /api/v1/lora-configs/ (tunedeck lora-configs list) "
                        "lists their names and ids"],
        "dataset": ["no dataset named 'nope': GET /api/v1/datasets/ (tunedeck datasets list) lists their names and "
                    "ids"]}
    body = problem_of(post(client, "/api/v1/runs/", t.run_body(base_model=["tiny"]), raw), 400)
    assert body["errors"] == {"base_model": ["must be an id (a whole number) or a name, got list"]}

    # A dataset named like another one's id: the string is ambiguous, a number is always an id.
    from webapp.catalog.services import register_dataset
    from workers.training.demo import toy_rows

    named_as_id = register_dataset(str(t.dataset.pk), "n.jsonl", "".join(json.dumps(r) + "\n" for r in toy_rows(8, 1)).encode())
    body = problem_of(post(client, "/api/v1/runs/", t.run_body(dataset=str(t.dataset.pk)), raw), 400)
    assert body["errors"] == {"dataset": [
        f"'{t.dataset.pk}' is both the name of dataset {named_as_id.pk} and the id of dataset {t.dataset.pk} "
        f"(toy): send the id as a number, {named_as_id.pk} or {t.dataset.pk}"]}
    response = post(client, "/api/v1/runs/", t.run_body(dataset=named_as_id.pk), raw)
    assert response.status_code == 201 and response.json()["dataset"] == named_as_id.pk
    assert TrainingRun.objects.count() == 3


def test_the_same_post_with_the_same_key_creates_one_run(client: Client, api_team: Team) -> None:
    raw = key_for(api_team.owner)
    first = post(client, "/api/v1/runs/", api_team.run_body(), raw, HTTP_IDEMPOTENCY_KEY="nightly-42")
    again = post(client, "/api/v1/runs/", api_team.run_body(), raw, HTTP_IDEMPOTENCY_KEY="nightly-42")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again["Idempotent-Replayed"] == "true"
    assert TrainingRun.objects.count() == 1
    other = post(client, "/api/v1/runs/", api_team.run_body(name="other"), raw, HTTP_IDEMPOTENCY_KEY="nightly-42")
    problem_of(other, 422)
    assert post(client, "/api/v1/runs/", api_team.run_body(), raw, HTTP_IDEMPOTENCY_KEY="nightly-43").status_code == 201
    assert TrainingRun.objects.count() == 2


# --- read ---------------------------------------------------------------------------------------------------


def test_the_list_filters_by_state_owner_base_model_and_dataset(client: Client, api_team: Team) -> None:
    t = api_team
    mine = make_run(t.owner, t.base, t.dataset, t.config)
    theirs = make_run(t.mate, t.base, t.dataset, t.config, )
    TrainingRun.objects.filter(pk=theirs.pk).update(state="failed")
    raw = key_for(t.owner, "read")

    def ids(query: str) -> list[int]:
        response = client.get(f"/api/v1/runs/{query}", **bearer(raw))
        assert response.status_code == 200, response.content
        return [r["id"] for r in response.json()["results"]]

    assert ids("") == [theirs.pk, mine.pk]  # everyone on the team sees every run, newest first
    assert ids("?state=failed") == [theirs.pk] and ids("?owner=me") == [mine.pk] and ids("?owner=mate") == [theirs.pk]
    assert ids(f"?base_model={t.base.pk}&dataset={t.dataset.pk}") == [theirs.pk, mine.pk]
    assert ids(f"?dataset={t.dataset.pk + 1}") == []
    assert "state" in problem_of(client.get("/api/v1/runs/?state=done", **bearer(raw)), 400)["errors"]
    assert "no user named 'nobody'" in problem_of(client.get("/api/v1/runs/?owner=nobody", **bearer(raw)), 400)["detail"]
    assert "base_model" in problem_of(client.get("/api/v1/runs/?base_model=x", **bearer(raw)), 400)["errors"]


def test_an_unknown_or_malformed_id_is_a_404_problem(client: Client, api_team: Team) -> None:
    raw = key_for(api_team.owner, "read")
    for path in ("/api/v1/runs/999999/", "/api/v1/runs/abc/", "/api/v1/runs/99999999999999999999999/",
                 "/api/v1/runs/0/events/", "/api/v1/runs/999/metrics/"):
        assert problem_of(client.get(path, **bearer(raw)), 404)["detail"].startswith("no run with id")


# --- actions ------------------------------------------------------------------------------------------------


def test_cancel_a_queued_run_then_409_once_finished(client: Client, api_team: Team) -> None:
    t = api_team
    run = make_run(t.owner, t.base, t.dataset, t.config)
    raw = key_for(t.owner)
    response = post(client, f"/api/v1/runs/{run.pk}/cancel/", {}, raw)
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    body = problem_of(post(client, f"/api/v1/runs/{run.pk}/cancel/", {}, raw), 409)
    assert "already finished" in body["detail"] and "cancelled" in body["detail"]

    running = make_run(t.owner, t.base, t.dataset, t.config)
    TrainingRun.objects.filter(pk=running.pk).update(state="running", attempt=1)
    response = post(client, f"/api/v1/runs/{running.pk}/cancel/", {}, raw)
    assert response.status_code == 200 and response.json()["cancel_requested"] is True
    assert response.json()["state"] == "running"  # its worker stops it at the next step


def test_retry_a_failed_run_and_409_for_a_queued_one(client: Client, api_team: Team) -> None:
    t = api_team
    run = make_run(t.owner, t.base, t.dataset, t.config)
    raw = key_for(t.owner)
    assert "only a failed or cancelled run" in problem_of(post(client, f"/api/v1/runs/{run.pk}/retry/", {}, raw), 409)["detail"]
    TrainingRun.objects.filter(pk=run.pk).update(state="failed", error="boom", attempt=1)
    response = post(client, f"/api/v1/runs/{run.pk}/retry/", {}, raw)
    assert response.status_code == 200 and response.json()["state"] == "queued" and response.json()["error"] == ""


def test_delete_only_a_finished_run(client: Client, api_team: Team) -> None:
    t = api_team
    run = make_run(t.owner, t.base, t.dataset, t.config)
    TrainingRun.objects.filter(pk=run.pk).update(state="running")
    raw = key_for(t.owner)
    assert "cancel it first" in problem_of(client.delete(f"/api/v1/runs/{run.pk}/", **bearer(raw)), 409)["detail"]
    TrainingRun.objects.filter(pk=run.pk).update(state="succeeded")
    deleted = client.delete(f"/api/v1/runs/{run.pk}/", **bearer(raw))
    assert deleted.status_code == 200 and deleted.json()["run"] == run.pk
    assert not TrainingRun.objects.filter(pk=run.pk).exists()
    problem_of(client.delete(f"/api/v1/runs/{run.pk}/", **bearer(raw)), 404)


def test_delete_reports_what_went_and_what_stayed_and_frees_the_files(
    client: Client, api_team: Team, store_dir: Path, django_capture_on_commit_callbacks: Any
) -> None:
    t = api_team
    world = run_world(store_dir, t.owner, t.base, t.dataset, t.config)
    url = f"/api/v1/runs/{world.run.pk}/"
    assert problem_of(client.delete(url, **bearer(key_for(t.mate))), 403)
    with django_capture_on_commit_callbacks(execute=True):
        answer = client.delete(url, **bearer(key_for(t.owner)))
    assert answer.status_code == 200, answer.content
    report = answer.json()
    assert report["run"] == world.run.pk and report["adapter"]["id"] == world.adapter.pk
    assert report["events"] == 2 and report["checkpoints"] == 2
    assert [(m["id"], m["verified"]) for m in report["merged_models"]] == [(world.merged.pk, True)]
    assert report["jobs"] == [world.merge.pk]
    assert {f["uri"] for f in report["files"]} == {f"store://runs/{world.run.pk}", f"store://jobs/{world.merge.pk}"}
    assert report["freed_bytes"] == world.freed_bytes == sum(f["bytes"] for f in report["files"])
    assert report["kept"] == {"comparisons": [world.comparison.pk], "evaluations": [world.evaluation.pk],
                              "combined_adapters": [world.blend.pk], "jobs": [world.combine.pk]}
    assert not world.run_folder.exists() and not world.merge_folder.exists() and world.outside.exists()
    assert not TrainingRun.objects.filter(pk=world.run.pk).exists()
    problem_of(client.delete(url, **bearer(key_for(t.owner))), 404)


def test_delete_is_refused_while_a_job_reads_the_runs_adapter(client: Client, api_team: Team, store_dir: Path) -> None:
    t = api_team
    world = run_world(store_dir, t.owner, t.base, t.dataset, t.config)
    AdapterJob.objects.filter(pk=world.merge.pk).update(state="queued")
    body = problem_of(client.delete(f"/api/v1/runs/{world.run.pk}/", **bearer(key_for(t.owner))), 409)
    assert f"merge job {world.merge.pk}" in body["detail"].lower()
    assert TrainingRun.objects.filter(pk=world.run.pk).exists() and world.run_folder.is_dir()


def test_clone_queues_a_new_run_with_the_same_inputs_for_the_caller(client: Client, api_team: Team) -> None:
    t = api_team
    source = make_run(t.owner, t.base, t.dataset, t.config, max_steps=7)
    TrainingRun.objects.filter(pk=source.pk).update(state="succeeded", name="nightly", needs_labels=["a100"], priority=3)
    raw = key_for(t.mate)
    response = post(client, f"/api/v1/runs/{source.pk}/clone/", {}, raw, HTTP_IDEMPOTENCY_KEY="c1")
    assert response.status_code == 201, response.content
    clone = TrainingRun.objects.get(pk=response.json()["id"])
    assert clone.pk != source.pk and clone.owner == t.mate and clone.state == "queued" and clone.name == "nightly (copy)"
    assert (clone.base_model, clone.dataset, clone.lora_config) == (t.base, t.dataset, t.config)
    assert clone.hyperparameters["max_steps"] == 7 and clone.needs_labels == ["a100"]
    assert clone.priority == 0  # a priority above 0 is for staff to give
    replay = post(client, f"/api/v1/runs/{source.pk}/clone/", {}, raw, HTTP_IDEMPOTENCY_KEY="c1")
    assert replay.json()["id"] == clone.pk and TrainingRun.objects.count() == 2
    named = post(client, f"/api/v1/runs/{source.pk}/clone/", {"name": "again"}, raw)
    assert named.status_code == 201 and named.json()["name"] == "again"
    assert "unknown field" in problem_of(post(client, f"/api/v1/runs/{source.pk}/clone/", {"nme": "x"}, raw), 400)["detail"]


def _test_rows(t: Team) -> Any:
    from webapp.catalog.services import register_dataset
    from workers.training.demo import toy_rows

    return register_dataset("toy-test", "test.jsonl", "".join(json.dumps(r) + "\n" for r in toy_rows(16, 9)).encode())


def test_a_run_with_an_eval_dataset_round_trips_and_its_clone_keeps_it(client: Client, api_team: Team) -> None:
    t = api_team
    test_rows = _test_rows(t)
    raw = key_for(t.owner)
    plain = post(client, "/api/v1/runs/", t.run_body(), raw).json()
    assert (plain["eval_dataset"], plain["eval_dataset_name"]) == (None, None)

    response = post(client, "/api/v1/runs/", t.run_body(eval_dataset=test_rows.pk,
                                                        hyperparameters={"early_stopping_patience": 2}), raw)
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["eval_dataset"], body["eval_dataset_name"]) == (test_rows.pk, "toy-test")
    run = TrainingRun.objects.get(pk=body["id"])
    assert run.eval_dataset == test_rows and run.job_spec().eval_dataset.uri == test_rows.uri  # type: ignore[union-attr]
    assert client.get(f"/api/v1/runs/{run.pk}/", **bearer(raw)).json()["eval_dataset"] == test_rows.pk
    listed = client.get("/api/v1/runs/", **bearer(raw)).json()["results"]
    assert {r["id"]: r["eval_dataset"] for r in listed} == {run.pk: test_rows.pk, plain["id"]: None}

    clone = post(client, f"/api/v1/runs/{run.pk}/clone/", {}, raw)
    assert clone.status_code == 201, clone.content
    assert clone.json()["eval_dataset"] == test_rows.pk
    assert TrainingRun.objects.get(pk=clone.json()["id"]).eval_dataset == test_rows


def test_eval_dataset_refusals_are_field_errors(client: Client, api_team: Team) -> None:
    t = api_team
    test_rows = _test_rows(t)
    raw = key_for(t.owner)
    body = problem_of(post(client, "/api/v1/runs/", t.run_body(eval_dataset=999999), raw), 400)
    assert body["errors"]["eval_dataset"][0].startswith("no dataset with id 999999: ")
    both = t.run_body(eval_dataset=test_rows.pk, hyperparameters={"eval_fraction": 0.1})
    body = problem_of(post(client, "/api/v1/runs/", both, raw), 400)
    assert list(body["errors"]) == ["eval_dataset"] and "not both" in body["errors"]["eval_dataset"][0]
    body = problem_of(post(client, "/api/v1/runs/", t.run_body(hyperparameters={"early_stopping_patience": 2}), raw), 400)
    assert "needs an eval set" in body["errors"]["hyperparameters.early_stopping_patience"][0]
    assert not TrainingRun.objects.exists()


def test_a_dpo_run_takes_preference_pairs_and_its_settings_and_clones_with_them(client: Client,
                                                                                api_team: Team) -> None:
    from webapp.catalog.services import register_dataset

    t = api_team
    raw = key_for(t.owner)
    pairs = register_dataset("pairs", "pairs.jsonl", "".join(
        json.dumps({"prompt": f"What is {n} + 1?\n", "chosen": str(n + 1), "rejected": str(n + 2)}) + "\n"
        for n in range(8)).encode())
    dpo = {"objective": "dpo", "beta": 0.5, "dpo_loss": "hinge"}

    response = post(client, "/api/v1/runs/", t.run_body(dataset=pairs.pk, hyperparameters=dpo), raw)

    assert response.status_code == 201, response.content
    assert {k: response.json()["hyperparameters"][k] for k in dpo} == dpo
    clone = post(client, f"/api/v1/runs/{response.json()['id']}/clone/", {}, raw)
    assert clone.status_code == 201 and TrainingRun.objects.get(pk=clone.json()["id"]).train_params().beta == 0.5
    body = problem_of(post(client, "/api/v1/runs/", t.run_body(dataset=pairs.pk), raw), 400)
    assert list(body["errors"]) == ["dataset"] and "(sft) trains on" in body["errors"]["dataset"][0]
    body = problem_of(post(client, "/api/v1/runs/", t.run_body(hyperparameters={**dpo, "dpo_loss": "kto"}), raw), 400)
    assert body["errors"] == {"hyperparameters.dpo_loss": ['"kto" is not a valid choice.']}


# --- events, metrics, checkpoints ---------------------------------------------------------------------------


def _events(run: TrainingRun, count: int) -> list[RunEvent]:
    return [RunEvent.objects.create(run=run, attempt=1, seq=i, kind="metric" if i % 3 == 2 else "log",
                                    message=f"line {i}", data={"step": i}) for i in range(count)]


def test_event_pages_follow_the_after_cursor(client: Client, api_team: Team) -> None:
    t = api_team
    run = make_run(t.owner, t.base, t.dataset, t.config)
    events = _events(run, 5)
    raw = key_for(t.mate, "read")
    page = client.get(f"/api/v1/runs/{run.pk}/events/?limit=2", **bearer(raw)).json()
    assert [e["message"] for e in page["results"]] == ["line 0", "line 1"]
    assert page["next_after"] == events[1].id and page["has_more"] is True and page["state"] == "queued"
    assert page["final"] is False
    page = client.get(f"/api/v1/runs/{run.pk}/events/?after={page['next_after']}", **bearer(raw)).json()
    assert [e["id"] for e in page["results"]] == [e.id for e in events[2:]] and page["has_more"] is False
    page = client.get(f"/api/v1/runs/{run.pk}/events/?after={events[-1].id}&kind=log", **bearer(raw)).json()
    assert page["results"] == [] and page["next_after"] == events[-1].id
    metrics = client.get(f"/api/v1/runs/{run.pk}/events/?kind=metric", **bearer(raw)).json()["results"]
    assert [e["data"] for e in metrics] == [{"step": 2}]
    for query in ("after=-1", "after=x", "limit=0", "limit=5000"):
        problem_of(client.get(f"/api/v1/runs/{run.pk}/events/?{query}", **bearer(raw)), 400)
    TrainingRun.objects.filter(pk=run.pk).update(state="succeeded")
    page = client.get(f"/api/v1/runs/{run.pk}/events/?after={events[-1].id}", **bearer(raw)).json()
    assert page["final"] is True and page["state"] == "succeeded"


@pytest.mark.django_db(transaction=True)  # the stream polls from other threads: the rows must be committed
def test_the_stream_sends_the_events_after_last_event_id_then_ends(tiny_model_dir, store_dir) -> None:  # type: ignore[no-untyped-def]
    t = Team(tiny_model_dir)
    run = make_run(t.owner, t.base, t.dataset, t.config)
    TrainingRun.objects.filter(pk=run.pk).update(state="succeeded")
    events, raw = _events(run, 4), key_for(t.mate, "read")
    # In a thread of its own: an earlier test (Playwright's sync API) may leave an event loop in this one.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _stream_checks(run, events, raw)).result()


async def _stream_checks(run: TrainingRun, events: list[RunEvent], raw: str) -> None:
    client = AsyncClient()
    auth = {"Authorization": f"Bearer {raw}"}
    response = await client.get(f"/api/v1/runs/{run.pk}/events/stream/",
                                headers={**auth, "Last-Event-ID": str(events[1].id), "Accept": "text/event-stream"})
    assert response.status_code == 200 and response["Content-Type"].startswith("text/event-stream")
    body = b"".join([chunk async for chunk in response.streaming_content]).decode()
    sent = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: {\"id\"")]
    assert [e["id"] for e in sent] == [e.id for e in events[2:]]  # only those after Last-Event-ID, once each
    assert f"id: {events[3].id}" in body and 'data: {"state":"succeeded"}' in body
    assert body.rstrip().endswith("event: done\ndata:")

    missing = await client.get("/api/v1/runs/999999/events/stream/", headers={**auth, "Accept": "text/event-stream"})
    assert missing.status_code == 404 and missing["Content-Type"] == "application/problem+json"
    bad = await client.get(f"/api/v1/runs/{run.pk}/events/stream/", headers={**auth, "Last-Event-ID": "x1"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["errors"]
    anonymous = await client.get(f"/api/v1/runs/{run.pk}/events/stream/")
    assert anonymous.status_code == 401


def test_metrics_and_checkpoints(client: Client, api_team: Team) -> None:
    t = api_team
    run = make_run(t.owner, t.base, t.dataset, t.config)
    points = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0, "eval_loss": 2.2}]
    TrainingRun.objects.filter(pk=run.pk).update(metric_points=points)
    saved = RunEvent.objects.create(run=run, attempt=1, seq=1, kind="checkpoint", message="saved",
                                    data={"step": 2, "uri": "store://runs/1/checkpoints/step-2"})
    raw = key_for(t.mate, "read")
    assert client.get(f"/api/v1/runs/{run.pk}/metrics/", **bearer(raw)).json() == {"run": run.pk, "points": points}
    body = client.get(f"/api/v1/runs/{run.pk}/checkpoints/", **bearer(raw)).json()
    assert [(c["id"], c["step"], c["attempt"]) for c in body["results"]] == [(saved.pk, 2, 1)]


# --- rows longer than max_seq_length ------------------------------------------------------------------------


def test_a_run_whose_rows_cannot_reach_their_answer_is_refused_on_create_and_clone(client: Client, api_team: Team) -> None:
    from tests.webapp.test_training_pages import long_prompt_dataset

    t = api_team
    long = long_prompt_dataset()
    raw = key_for(t.owner)
    tight = {"max_seq_length": 48, "completion_only_loss": True}
    body = problem_of(post(client, "/api/v1/runs/", t.run_body(dataset=long.pk, hyperparameters=tight), raw), 400)
    assert list(body["errors"]) == ["dataset"]
    assert "long: 2 of its 5 rows would train on nothing" in body["errors"]["dataset"][0]
    assert "line 5 (prompt of " in body["errors"]["dataset"][0]

    source = make_run(t.owner, t.base, long, t.config, **tight)  # queued before the check existed
    body = problem_of(post(client, f"/api/v1/runs/{source.pk}/clone/", {}, raw), 400)
    assert "line 4 (prompt of " in body["errors"]["dataset"][0]
    assert TrainingRun.objects.count() == 1


def test_the_dpo_example_run_spec_trains_on_the_demo_preference_pairs(client: Client, store_dir: Path,
                                                                      django_user_model: Any) -> None:
    import yaml

    from webapp.catalog.demo import DEMO_PREFERENCES, ensure_demo_content
    from webapp.catalog.models import Dataset

    assert f"dataset {DEMO_PREFERENCES}" in ensure_demo_content()
    assert Dataset.objects.get(name=DEMO_PREFERENCES).format == "preference"
    owner = django_user_model.objects.create_user("owner", password="pw-owner-123")
    body = yaml.safe_load(Path("examples/dpo.yaml").read_text())

    response = post(client, "/api/v1/runs/", body, key_for(owner))

    assert response.status_code == 201, response.content
    job = TrainingRun.objects.get(pk=response.json()["id"]).job_spec()
    assert (job.train.objective, job.dataset.format) == ("dpo", "preference")


@pytest.mark.parametrize(("example", "objective", "dataset", "fmt"), [
    ("kto", "kto", "DEMO_FEEDBACK", "feedback"), ("orpo", "orpo", "DEMO_PREFERENCES", "preference")])
def test_the_kto_and_orpo_example_run_specs_train_on_the_demo_content(
        client: Client, store_dir: Path, django_user_model: Any, example: str, objective: str, dataset: str,
        fmt: str) -> None:
    import yaml

    from webapp.catalog import demo
    from webapp.catalog.models import Dataset

    assert f"dataset {getattr(demo, dataset)}" in demo.ensure_demo_content()
    assert Dataset.objects.get(name=getattr(demo, dataset)).format == fmt
    owner = django_user_model.objects.create_user("owner", password="pw-owner-123")
    body = yaml.safe_load(Path(f"examples/{example}.yaml").read_text())

    response = post(client, "/api/v1/runs/", body, key_for(owner))

    assert response.status_code == 201, response.content
    job = TrainingRun.objects.get(pk=response.json()["id"]).job_spec()
    assert (job.train.objective, job.dataset.format) == (objective, fmt)
    assert {k: getattr(job.train, k) for k in body["hyperparameters"]} == body["hyperparameters"]


def test_kto_runs_take_feedback_and_orpo_runs_pairs_and_each_is_refused_on_the_other(client: Client,
                                                                                      api_team: Team) -> None:
    from webapp.catalog.services import register_dataset
    from workers.training.demo import feedback_rows

    t = api_team
    raw = key_for(t.owner)
    feedback = register_dataset("feedback", "feedback.jsonl", "".join(
        json.dumps(row) + "\n" for row in feedback_rows(8, seed=0)).encode())
    pairs = register_dataset("pairs", "pairs.jsonl", "".join(
        json.dumps({"prompt": f"What is {n} + 1?\n", "chosen": str(n + 1), "rejected": str(n + 2)}) + "\n"
        for n in range(8)).encode())
    kto = {"objective": "kto", "beta": 0.2, "desirable_weight": 1.33, "undesirable_weight": 0.5}

    response = post(client, "/api/v1/runs/", t.run_body(dataset=feedback.pk, hyperparameters=kto), raw)
    assert response.status_code == 201, response.content
    assert {k: response.json()["hyperparameters"][k] for k in kto} == kto
    assert post(client, "/api/v1/runs/", t.run_body(dataset=pairs.pk, hyperparameters={"objective": "orpo"}),
                raw).status_code == 201

    body = problem_of(post(client, "/api/v1/runs/", t.run_body(dataset=pairs.pk, hyperparameters=kto), raw), 400)
    assert list(body["errors"]) == ["dataset"]
    assert "pairs is preference rows, and kahneman-tversky optimization (kto) trains on feedback rows" in (
        body["errors"]["dataset"][0])
    body = problem_of(post(client, "/api/v1/runs/", t.run_body(
        dataset=feedback.pk, hyperparameters={"objective": "orpo"}), raw), 400)
    assert list(body["errors"]) == ["dataset"] and "(orpo) trains on preference rows" in body["errors"]["dataset"][0]
    body = problem_of(post(client, "/api/v1/runs/", t.run_body(dataset=feedback.pk), raw), 400)
    assert list(body["errors"]) == ["dataset"] and "feedback rows, and supervised" in body["errors"]["dataset"][0]
    body = problem_of(post(client, "/api/v1/runs/", t.run_body(
        dataset=feedback.pk, hyperparameters={**kto, "desirable_weight": 0, "batch_size": 1}), raw), 400)
    assert set(body["errors"]) == {"hyperparameters.desirable_weight", "hyperparameters.batch_size"}
