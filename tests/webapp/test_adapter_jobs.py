"""Adapter jobs in the control plane: starting them, the worker API, what they record, pages, votes, downloads."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from tests.webapp.factories import make_worker
from tests.webapp.team import login, make
from webapp.fleet import scheduler
from webapp.jobs import ledger
from webapp.playground import services
from webapp.playground.models import AdapterJob, Comparison, ComparisonCell, JobEvent, MergedModel, PromptSet, Vote
from webapp.training.models import Adapter, AdapterParent
from workers.contract import jobspecs, kinds

pytestmark = pytest.mark.django_db


def adapter(team: Any, base: int = 0, rank: int = 8, quantization: str = "none", name: str = "", **fields: Any) -> Adapter:
    users, bases, _, _ = team
    return Adapter.objects.create(
        name=name, owner=users["owner"], base_model=bases[base], rank=rank, quantization=quantization,
        uri=f"store://adapters/{name or rank}", size_bytes=1000, sha256="0" * 64, trainable_params=10, total_params=100,
        **fields,
    )


def api(client: Client, token: str, job: AdapterJob, call: str, body: dict[str, Any]) -> Any:
    return client.post(f"/api/worker/v1/adapter-jobs/{job.pk}/{call}", data=json.dumps(body),
                       content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}")


def compare(team: Any, *adapters: Adapter, prompts: str = "What is 2 + 2?\nDouble 7") -> Comparison:
    users = team[0]
    prompt_set = PromptSet.objects.create(name="p", owner=users["owner"], rows=services.parse_prompts(prompts))
    return services.start_compare(users["owner"], prompt_set, list(adapters), jobspecs.GenerationParams(max_new_tokens=8))


# --- starting jobs: refused with reasons, nothing stored ---------------------------------------------


def test_adapters_of_different_bases_are_refused_with_who_was_trained_on_what(team: Any) -> None:
    one, other = adapter(team, 0, name="on-zero"), adapter(team, 1, name="on-one")
    with pytest.raises(services.JobError) as refused:
        compare(team, one, other)
    assert "on-zero on base-0" in str(refused.value) and "on-one on base-1" in str(refused.value)
    assert not AdapterJob.objects.exists() and not Comparison.objects.exists()


def test_a_factorwise_combination_of_unequal_ranks_is_refused_naming_the_ranks(team: Any) -> None:
    a, b = adapter(team, rank=8, name="r8"), adapter(team, rank=16, name="r16")
    with pytest.raises(services.JobError) as refused:
        services.start_combine(team[0]["owner"], [a, b], [0.5, 0.5], "ties", density=0.5)
    assert "equal ranks" in str(refused.value) and "8, 16" in str(refused.value)
    job = services.start_combine(team[0]["owner"], [a, b], [0.5, 0.5], "linear")  # the exact sum takes any ranks
    assert job.state == "queued" and job.params["output_uri"] == f"store://jobs/{job.pk}/output"


def test_more_than_eight_adapters_and_bad_weights_are_refused(team: Any) -> None:
    many = [adapter(team, name=f"a{i}") for i in range(9)]
    with pytest.raises(services.JobError, match="at most 8"):
        compare(team, *many)
    with pytest.raises(services.JobError, match="one weight per adapter"):
        services.start_combine(team[0]["owner"], many[:2], [1.0], "cat")
    with pytest.raises(services.JobError, match="density"):
        services.start_combine(team[0]["owner"], many[:2], [1.0, 1.0], "ties")


def test_evaluation_needs_references(team: Any) -> None:
    users, _, datasets, _ = team
    a = adapter(team)
    with pytest.raises(services.JobError, match="plain text"):
        services.start_evaluate(users["owner"], [a], dataset=datasets[0])
    run = make(team)
    run.hyperparameters = {"learning_rate": 2e-4, "eval_fraction": 0.0}
    with pytest.raises(services.JobError, match="held nothing out"):
        services.start_evaluate(users["owner"], [a], held_out_of=run)


def test_evaluating_what_a_run_held_out_uses_its_eval_dataset_when_it_has_one(team: Any, client: Client) -> None:
    from django.urls import reverse

    from webapp.catalog.models import Dataset

    users = team[0]
    a = adapter(team)
    held = Dataset.objects.create(name="add-test <b>", uri="store://datasets/add-test.jsonl", original_filename="t.jsonl",
                                  format="alpaca", row_count=40, size_bytes=100, sha256="0" * 64)
    run = make(team, eval_dataset=held)
    run.hyperparameters = {"learning_rate": 2e-4, "eval_fraction": 0.0}
    job = services.start_evaluate(users["owner"], [a], held_out_of=run)
    assert job.params["dataset"]["uri"] == held.uri and job.params["dataset"]["format"] == "alpaca"
    assert job.params["split"] == "all" and (job.params["held_out_of"], job.params["eval_rows"]) == (run.pk, "eval_dataset")
    assert kinds.spec_from_dict("evaluate", job.job_spec()).dataset.uri == held.uri  # the worker's spec
    page = login(client, "owner").get(reverse("job-detail", args=[job.pk])).content.decode()
    assert "dataset add-test &lt;b&gt;" in page
    assert f'(<span id="eval-rows">the eval dataset of <a href="/runs/{run.pk}/">run {run.pk}</a></span>)' in page
    # A run without one still evaluates on its held-out split, and the page says so.
    other = make(team)
    other.hyperparameters = {"learning_rate": 2e-4, "eval_fraction": 0.2, "seed": 3}
    other.dataset = held
    split = services.start_evaluate(users["owner"], [a], held_out_of=other)
    assert (split.params["split"], split.params["eval_fraction"], split.params["eval_rows"]) == ("held_out", 0.2, "held_out")
    assert "(held-out split of" in login(client, "owner").get(reverse("job-detail", args=[split.pk])).content.decode()


def test_the_load_follows_the_adapters_quantization(team: Any) -> None:
    four = [adapter(team, quantization="4bit", name=f"q{i}") for i in range(2)]
    assert compare(team, *four).job.params["load"]["quantization"] == "4bit"
    mixed = [four[0], adapter(team, name="full")]
    assert compare(team, *mixed).job.params["load"]["quantization"] == "none"


def test_the_base_precision_is_chosen_and_said_in_the_job_log(team: Any) -> None:
    """auto loads a QLoRA adapter's base in 4-bit only when every adapter was trained on 4-bit; any other
    precision can be chosen; the job's log says which one and why, the worker's spec carries it."""
    qlora, lora = adapter(team, quantization="4bit", name="qlora"), adapter(team, name="lora")
    users = team[0]
    prompts = PromptSet.objects.create(name="p", owner=users["owner"], rows=services.parse_prompts("Double 7"))

    def started(*adapters: Adapter, precision: str = "auto") -> AdapterJob:
        comparison = services.start_compare(users["owner"], prompts, list(adapters), jobspecs.GenerationParams(),
                                            base_precision=precision)  # fmt: skip
        return comparison.job

    cases = [
        ((qlora,), "auto", "4bit", "auto", "Base precision auto: 4bit, the base every adapter was trained on"),
        ((qlora, lora), "auto", "none", "auto",
         "Base precision auto: unquantized in the compute dtype (the adapters were trained on 4-bit and unquantized bases)"),
        ((lora,), "auto", "none", "auto",
         "Base precision auto: unquantized in the compute dtype (the adapters were trained on unquantized bases)"),
        ((qlora, lora), "4bit", "4bit", "auto", "Base precision 4bit (quantized), as chosen"),
        ((lora,), "8bit", "8bit", "auto", "Base precision 8bit (quantized), as chosen"),
        ((qlora,), "bfloat16", "none", "bfloat16", "Base precision bfloat16 (unquantized), as chosen"),
        ((qlora,), "float32", "none", "float32", "Base precision float32 (unquantized), as chosen"),
    ]  # fmt: skip
    for adapters, precision, quantization, dtype, line in cases:
        job = started(*adapters, precision=precision)
        assert job.params["load"] == {"quantization": quantization, "compute_dtype": dtype}, precision
        assert job.base_precision() == {"chosen": precision, "quantization": quantization, "compute_dtype": dtype,
                                        "used": None}  # fmt: skip
        assert line in job.events.values_list("message", flat=True)
        spec = kinds.spec_from_dict("compare", job.job_spec())
        assert (spec.load.quantization, spec.load.compute_dtype) == (quantization, dtype)
    with pytest.raises(services.JobError) as refused:
        started(lora, precision="int4")
    assert refused.value.errors == {"base_precision": "must be one of auto, 4bit, 8bit, bfloat16, float16, float32"}
    assert AdapterJob.objects.count() == len(cases)


def test_prompts_drawn_from_a_chat_dataset_keep_the_whole_conversation(team: Any, store_dir: Path) -> None:
    """As evaluations do (workers.data.prompts.prompt_row): the system prompt and earlier turns reach the worker's spec."""
    from webapp.catalog.models import Dataset
    from workers.data.datasets import to_trl_row
    from workers.data.splits import eval_rows

    chats = [
        {"messages": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "2 + 2?"},
                      {"role": "assistant", "content": "Quatre"}]},
        {"messages": [{"role": "user", "content": "Double 4"}, {"role": "assistant", "content": "8"}]},
    ]  # fmt: skip
    (store_dir / "datasets").mkdir(parents=True)
    (store_dir / "datasets" / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    dataset = Dataset.objects.create(name="chat", uri="store://datasets/chat.jsonl", original_filename="chat.jsonl",
                                     format="messages", row_count=2, size_bytes=1, sha256="0" * 64)  # fmt: skip

    rows = services.dataset_prompts(dataset, 2)

    assert rows[0]["turns"] == chats[0]["messages"][:4] and rows[0]["reference"] == "Quatre"
    assert rows[0]["prompt"] == "system: Answer in French.\nuser: Hi\nassistant: Bonjour\nuser: 2 + 2?"
    assert (rows[1]["prompt"], rows[1]["turns"]) == ("Double 4", chats[1]["messages"][:1])
    assert [jobspecs.PromptRow(**r) for r in rows] == eval_rows("messages", [to_trl_row("messages", c) for c in chats])
    users = team[0]
    prompt_set = PromptSet.objects.create(name="chat", owner=users["owner"], rows=rows)
    comparison = services.start_compare(users["owner"], prompt_set, [adapter(team)], jobspecs.GenerationParams())
    spec = kinds.spec_from_dict("compare", comparison.job.job_spec())
    assert spec.prompts[0].turns[0] == {"role": "system", "content": "Answer in French."}


def test_typed_prompts_one_per_line_or_in_blocks() -> None:
    assert [r["prompt"] for r in services.parse_prompts("a\n\n b \n")] == ["a", "b"]
    assert [r["prompt"] for r in services.parse_prompts("line 1\nline 2\n---\nsecond")] == ["line 1\nline 2", "second"]
    with pytest.raises(services.JobError, match="at least one"):
        services.parse_prompts(" \n ")


# --- the worker API: claim, streamed cells, results ---------------------------------------------------


def test_a_comparison_job_streams_cells_once_and_records_the_final_outputs(team: Any, client: Client) -> None:
    a, b = adapter(team, name="add"), adapter(team, name="double")
    comparison = compare(team, a, b)
    worker, token = make_worker()
    job = comparison.job
    attempt = ledger.dispatch(job, worker)
    claimed = api(client, token, job, "claim", {"attempt": attempt}).json()
    assert claimed["kind"] == "compare"
    spec = kinds.spec_from_dict("compare", claimed["spec"])
    assert [x.key for x in spec.adapters] == [a.key, b.key] and len(spec.prompts) == 2 and spec.include_base

    assert api(client, token, job, "status", {"attempt": attempt, "state": "running"}).status_code == 200
    batch = [
        {"seq": 1, "kind": "output", "data": {"row": 0, "column": a.key, "text": "<b>4"}},
        {"seq": 2, "kind": "output", "data": {"row": 0, "column": "__base__", "text": "hm"}},
        {"seq": 3, "kind": "metric", "data": {"step": 1, "total_steps": 8}},
    ]
    assert api(client, token, job, "events", {"attempt": attempt, "events": batch}).status_code == 200
    assert api(client, token, job, "events", {"attempt": attempt, "events": batch}).status_code == 200  # a retry
    more = [{"seq": 4, "kind": "output", "data": {"row": 0, "column": a.key, "text": "</b>"}}]
    api(client, token, job, "events", {"attempt": attempt, "events": more})
    cell = ComparisonCell.objects.get(comparison=comparison, row=0, column=a.key)
    assert cell.text == "<b>4</b>" and not cell.done  # the retried batch was not appended twice
    assert AdapterJob.objects.get(pk=job.pk).total_steps == 8

    login(client, "mate")
    page = client.get(f"/compare/{comparison.pk}/").content.decode()
    assert "&lt;b&gt;4&lt;/b&gt;" in page and "<b>4</b>" not in page  # model output is escaped

    outputs = [{"row": r, "column": c, "text": f"{c}-{r}", "tokens": 2} for r in range(2) for c in ("__base__", a.key, b.key)]
    stale = api(client, token, job, "status", {"attempt": attempt + 1, "state": "succeeded", "result": {"outputs": []}})
    assert stale.status_code == 409
    done = api(client, token, job, "status", {"attempt": attempt, "state": "succeeded", "result": {"outputs": outputs}})
    assert done.status_code == 200
    cells = {(c.row, c.column): c.text for c in comparison.cells.all()}
    assert cells == {(o["row"], o["column"]): o["text"] for o in outputs}
    assert JobEvent.objects.filter(job=job, kind="output").count() == 3


def test_a_new_attempt_of_a_comparison_starts_its_cells_afresh(team: Any, client: Client) -> None:
    comparison = compare(team, adapter(team))
    worker, token = make_worker()
    job = comparison.job
    first = ledger.dispatch(job, worker)
    api(client, token, job, "status", {"attempt": first, "state": "running"})
    api(client, token, job, "events", {"attempt": first, "events": [
        {"seq": 1, "kind": "output", "data": {"row": 0, "column": "__base__", "text": "half"}}]})
    ledger.requeue_or_fail(AdapterJob.objects.get(pk=job.pk), "worker lost", max_attempts=3)
    second = ledger.dispatch(job, worker)
    assert second == first + 1
    api(client, token, job, "status", {"attempt": second, "state": "running"})
    assert not comparison.cells.exists()


def test_a_succeeded_merge_records_the_merged_model_with_its_check(team: Any, client: Client) -> None:
    a = adapter(team)
    job = services.start_merge(team[0]["owner"], a, "float32")
    worker, token = make_worker()
    attempt = ledger.dispatch(job, worker)
    spec = kinds.spec_from_dict("merge", api(client, token, job, "claim", {"attempt": attempt}).json()["spec"])
    assert spec.adapter.uri == a.uri and spec.dtype == "float32" and spec.output_uri == f"store://jobs/{job.pk}/output"
    api(client, token, job, "status", {"attempt": attempt, "state": "running"})
    result = {"merged_uri": spec.output_uri, "dtype": "float32", "size_bytes": 123, "sha256": "f" * 64, "verified": False,
              "check": {"max_abs_logit_diff": 3.5, "greedy_agreement": 0.25, "tolerance": 0.001}}
    api(client, token, job, "status", {"attempt": attempt, "state": "succeeded", "result": result})
    merged = MergedModel.objects.get(job=job)
    assert merged.adapter == a and not merged.verified and merged.figures["max_abs_logit_diff"] == 3.5
    login(client, "owner")
    page = client.get(f"/adapters/{a.pk}/").content.decode()
    assert "check failed" in page and "3.5" in page


def test_a_succeeded_combination_is_a_new_adapter_with_its_lineage(team: Any, client: Client) -> None:
    a, b = adapter(team, name="add"), adapter(team, name="double")
    job = services.start_combine(team[0]["owner"], [a, b], [0.7, 0.3], "cat", name="add+double")
    worker, token = make_worker()
    attempt = ledger.dispatch(job, worker)
    api(client, token, job, "claim", {"attempt": attempt})
    api(client, token, job, "status", {"attempt": attempt, "state": "running"})
    result = {"adapter_uri": f"store://jobs/{job.pk}/output", "size_bytes": 10, "sha256": "e" * 64, "r": 16,
              "trainable_params": 5, "total_params": 50, "combination_type": "cat"}
    api(client, token, job, "status", {"attempt": attempt, "state": "succeeded", "result": result})
    child = Adapter.objects.get(name="add+double")
    assert child.origin == "combined" and child.rank == 16 and child.base_model == a.base_model and child.run is None
    assert [(p.parent.name, p.weight) for p in AdapterParent.objects.filter(child=child)] == [("add", 0.7), ("double", 0.3)]
    assert AdapterJob.objects.get(pk=job.pk).result["adapter_id"] == child.pk
    login(client, "mate")
    page = client.get(f"/adapters/{child.pk}/").content.decode()
    assert "Combined (cat) from" in page and f"/adapters/{a.pk}/" in page
    assert client.get("/adapters/").status_code == 200


def test_the_push_token_reaches_the_worker_at_claim_and_is_never_stored(team: Any, client: Client, settings: Any) -> None:
    a = adapter(team)
    settings.HF_TOKEN = ""
    with pytest.raises(services.JobError, match="TUNEDECK_HF_TOKEN"):
        services.start_push(team[0]["owner"], a, a.uri, "team/model")
    settings.HF_TOKEN = "hf_secretsecretsecret"
    job = services.start_push(team[0]["owner"], a, a.uri, "team/model")
    assert "hf_secret" not in json.dumps(AdapterJob.objects.get(pk=job.pk).params)
    worker, token = make_worker()
    attempt = ledger.dispatch(job, worker)
    spec = api(client, token, job, "claim", {"attempt": attempt}).json()["spec"]
    assert spec["token"] == "hf_secretsecretsecret"
    assert "hf_secret" not in repr(kinds.spec_from_dict("push", spec))


def test_the_scheduler_places_adapter_jobs_and_runs_oldest_first_one_per_worker(team: Any) -> None:
    run = make(team)
    job = compare(team, adapter(team)).job
    make_worker("w1")
    assert scheduler.dispatch_queued() == 1
    run.refresh_from_db()
    job.refresh_from_db()
    assert run.state == "dispatched" and job.state == "queued"  # the run is older; w1 is now busy
    make_worker("w2")
    assert scheduler.dispatch_queued() == 1
    job.refresh_from_db()
    assert job.state == "dispatched" and job.worker.name == "w2"
    assert scheduler.idle_workers() == []


# --- votes ---------------------------------------------------------------------------------------------


def finished_comparison(team: Any) -> Comparison:
    a, b = adapter(team, name="add-adapter"), adapter(team, name="double-adapter")
    comparison = compare(team, a, b)
    comparison.store_outputs([{"row": r, "column": c, "text": f"out {c} {r}"} for r in range(2)
                              for c in ("__base__", a.key, b.key)])
    AdapterJob.objects.filter(pk=comparison.job_id).update(state="succeeded")
    return Comparison.objects.get(pk=comparison.pk)


def test_blind_votes_hide_names_until_voted_count_once_and_give_win_rates(team: Any, client: Client) -> None:
    from webapp.playground.votes import options

    comparison = finished_comparison(team)
    users = team[0]
    login(client, "mate")
    page = client.get(f"/compare/{comparison.pk}/vote/").content.decode()
    assert "add-adapter" not in page and "Output 1 is best" in page  # names hidden before the vote

    def letter_of(user: Any, row: int, key: str) -> str:
        """The option letter under which `user`'s ballot shows `key` on `row` (what the page's button posts)."""
        return next(letter for letter, k in options(comparison, user.pk, row) if k == key)

    url = f"/compare/{comparison.pk}/vote/"
    mates_choice = comparison.blind_order(users["mate"].pk, 0)[0]
    reply = client.post(url, {"row": 0, "choice": "A"}, HTTP_HX_REQUEST="true")
    assert reply.status_code == 200 and dict(comparison.columns())[mates_choice] in reply.content.decode()
    again = client.post(url, {"row": 0, "choice": "B"})
    assert again.status_code == 409 and "one vote per person per row" in again.content.decode()
    assert client.post(url, {"row": 7, "choice": "A"}).status_code == 400
    assert client.post(url, {"row": 1, "choice": "Z"}).status_code == 400
    client.post(url, {"row": 1, "choice": "tie"})

    login(client, "owner")
    client.post(url, {"row": 0, "choice": letter_of(users["owner"], 0, mates_choice)})
    rates = {w["key"]: w for w in comparison.win_rates()}
    assert rates[mates_choice]["wins"] == 2 and rates[mates_choice]["rate"] == 1.0 and rates["tie"]["wins"] == 1
    assert Vote.objects.filter(comparison=comparison).count() == 3
    assert "Win rates" in client.get(f"/compare/{comparison.pk}/").content.decode()


def test_only_signed_in_teammates_vote_and_only_on_finished_comparisons(team: Any, client: Client) -> None:
    comparison = finished_comparison(team)
    url = f"/compare/{comparison.pk}/vote/"
    assert client.post(url, {"row": 0, "choice": "tie"}).status_code == 302  # to the login page
    assert not Vote.objects.exists()
    AdapterJob.objects.filter(pk=comparison.job_id).update(state="running")
    login(client, "mate")
    assert client.post(url, {"row": 0, "choice": "tie"}).status_code == 409
    assert not Vote.objects.exists()


def test_the_blind_order_is_shuffled_per_voter_and_stable(team: Any) -> None:
    comparison = finished_comparison(team)
    orders = {comparison.blind_order(user_id, row)[0] for user_id in range(40) for row in range(2)}
    assert len(orders) == 3  # every column leads for someone
    assert comparison.blind_order(5, 1) == comparison.blind_order(5, 1)


# --- forms and downloads ---------------------------------------------------------------------------------


def test_the_compare_form_creates_a_prompt_set_and_a_job(team: Any, client: Client) -> None:
    a = adapter(team)
    login(client, "owner")
    assert client.get(f"/compare/new/?adapters={a.pk}").status_code == 200
    response = client.post("/compare/new/", {
        "adapters": [a.pk], "include_base": "on", "prompts": "first\nsecond\nthird", "max_new_tokens": 16,
        "temperature": 0, "top_p": 1, "seed": 0, "chat_template": "on",
    })
    comparison = Comparison.objects.get()
    assert response.status_code == 302 and response.url == f"/compare/{comparison.pk}/"
    assert [r["prompt"] for r in comparison.prompt_set.rows] == ["first", "second", "third"]
    assert comparison.job.params["generation"]["max_new_tokens"] == 16
    both = client.post("/compare/new/", {"adapters": [a.pk], "prompts": "x", "prompt_set": comparison.prompt_set.pk,
                                         "max_new_tokens": 16, "temperature": 0, "top_p": 1, "seed": 0})
    assert both.status_code == 200 and "one of the three" in both.content.decode() and Comparison.objects.count() == 1
    rerun = client.get(f"/compare/new/?from={comparison.pk}").content.decode()
    assert f'value="{comparison.prompt_set.pk}" selected' in rerun


def test_the_compare_form_takes_the_base_precision(team: Any, client: Client) -> None:
    qlora = adapter(team, quantization="4bit")
    login(client, "owner")
    form = client.get(f"/compare/new/?adapters={qlora.pk}").content.decode()
    assert 'name="base_precision"' in form and "4-bit base" in form  # the choices are explained
    fields = {"adapters": [qlora.pk], "prompts": "first", "max_new_tokens": 16, "temperature": 0, "top_p": 1, "seed": 0}
    refused = client.post("/compare/new/", {**fields, "base_precision": "int4"})
    assert refused.status_code == 200 and "Select a valid choice" in refused.content.decode()
    assert not Comparison.objects.exists()
    response = client.post("/compare/new/", {**fields, "base_precision": "8bit"})
    comparison = Comparison.objects.get()
    assert response.status_code == 302
    assert comparison.job.params["load"]["quantization"] == "8bit" and comparison.job.params["base_precision"] == "8bit"
    page = client.get(f"/compare/{comparison.pk}/").content.decode()
    assert '<span id="base-precision">8bit</span> <small>(base precision 8bit)</small>' in page
    rerun = client.get(f"/compare/new/?from={comparison.pk}").content.decode()
    assert '<option value="8bit" selected>' in rerun


def test_merged_models_download_as_a_streamed_zip_and_files_one_by_one(team: Any, client: Client, store_dir: Path) -> None:
    a = adapter(team)
    folder = store_dir / "jobs" / "9" / "output"
    folder.mkdir(parents=True)
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"\x01" * 300_000)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"\x02" * 1000)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    merged = MergedModel.objects.create(adapter=a, uri="store://jobs/9/output", dtype="float32", size_bytes=301_000,
                                        sha256="0" * 64, verified=True)
    login(client, "mate")
    response = client.get(f"/merged/{merged.pk}/download.zip")
    assert response.status_code == 200 and response.streaming
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert archive.testzip() is None
    assert {i.filename: i.compress_type for i in archive.infolist()} == {
        "config.json": zipfile.ZIP_DEFLATED,
        "model-00001-of-00002.safetensors": zipfile.ZIP_STORED,
        "model-00002-of-00002.safetensors": zipfile.ZIP_STORED,
    }
    assert archive.read("model-00001-of-00002.safetensors") == b"\x01" * 300_000
    one = client.get(f"/merged/{merged.pk}/files/config.json")
    assert b"".join(one.streaming_content) == b'{"model_type": "llama"}'
    assert client.get(f"/merged/{merged.pk}/files/..").status_code == 404
    assert client.get(f"/merged/{merged.pk}/files/secret.txt").status_code == 404


def test_a_worker_busy_with_an_adapter_job_shows_it(team: Any, client: Client) -> None:
    job = compare(team, adapter(team)).job
    worker, _ = make_worker("gpu-1")
    ledger.dispatch(job, worker)
    login(client, "staff")
    assert f"compare job {job.pk}" in client.get("/workers/").content.decode()
    assert f"compare job {job.pk}" in client.get("/").content.decode()
