"""Adapter jobs end to end: a real worker process compares, merges, combines and evaluates adapters
of the tiny model, driven over HTTP like a browser (SQLite + filesystem broker, or PostgreSQL + Redis)."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.webapp.factories import demo_objects, make_worker
from tests.webapp.test_end_to_end import WORKER_NAME, WORKER_TOKEN, browser, csrf, wait_for, worker_process  # noqa: F401
from webapp.catalog.services import register_dataset
from webapp.playground.models import AdapterJob, Comparison, MergedModel
from webapp.training.models import Adapter
from workers.training.demo import double_rows, toy_rows

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def adapters(worker_process, task_adapters, tiny_model_dir, settings):  # type: ignore[no-untyped-def]  # noqa: F811
    """The two task adapters copied into the worker's store and registered on the tiny base."""
    store = worker_process.store
    settings.ARTIFACT_STORE = store
    source, uris = task_adapters
    user, base, _, _ = demo_objects(tiny_model_dir)
    make_worker(WORKER_NAME, token=WORKER_TOKEN)
    worker_process.start()  # once its token is registered
    rows = {}
    for task, uri in uris.items():
        target = store / "adapters" / task
        shutil.copytree(source.path(uri), target, dirs_exist_ok=True)
        rows[task] = Adapter.objects.create(
            name=task, owner=user, base_model=base, rank=8, uri=f"store://adapters/{task}",
            size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=1,
        )
    return store, base, rows


def post(client: httpx.Client, page: str, url: str, data: dict[str, Any]) -> httpx.Response:
    response = client.post(url, data={"csrfmiddlewaretoken": csrf(client.get(page).text), **data})
    assert response.status_code == 200, response.text[:2000]
    return response


def job_of(response: httpx.Response) -> AdapterJob:
    match = re.search(r"/jobs/(\d+)/$", str(response.url))
    assert match, (response.url, response.text[:3000])
    return AdapterJob.objects.get(pk=int(match.group(1)))


def answer_error(text: str, reference: str) -> int:
    """|answer - reference| when the answer is a number; 100 (more than any numeric miss here) otherwise."""
    match = re.fullmatch(r"\s*(\d{1,4})\s*", text)
    return min(abs(int(match.group(1)) - int(reference)), 100) if match else 100


def test_compare_vote_merge_combine_and_evaluate_on_a_real_worker(adapters, live_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store, base, rows = adapters
    client = browser(live_server)
    add, double = rows["add"], rows["double"]

    # Compare: the base and both adapters on prompts of both tasks, streamed into the grid.
    prompts = toy_rows(10, seed=777) + double_rows(10, seed=778)
    typed = "\n".join(r["instruction"] for r in prompts)
    response = post(client, "/compare/new/", "/compare/new/", {
        "adapters": [add.pk, double.pk], "include_base": "on", "prompts": typed, "max_new_tokens": 6,
        "temperature": 0, "top_p": 1, "seed": 0, "chat_template": "on",
    })
    comparison = Comparison.objects.get(pk=int(str(response.url).rstrip("/").rsplit("/", 1)[1]))
    job = wait_for(comparison.job, FINAL, timeout=300)
    assert job.state == "succeeded", job.error
    cells = {(c.row, c.column): c.text for c in comparison.cells.all()}
    assert len(cells) == len(prompts) * 3
    error = {  # mean answer error of each adapter on the add prompts and on the double prompts
        key: [sum(answer_error(cells[(i, key)], prompts[i]["output"]) for i in task_rows) / 10
              for task_rows in (range(10), range(10, 20))]
        for key in (add.key, double.key)
    }
    assert error[add.key][0] < error[double.key][0] and error[double.key][1] < error[add.key][1], error

    stream = client.get(f"/jobs/{job.pk}/stream/?after=0").text
    streamed: dict[str, str] = {}
    for name, data in re.findall(r"^event: (c-\d+-\w+)\nid: \d+\n((?:data: .*\n)+)", stream, re.M):
        streamed[name] = streamed.get(name, "") + html.unescape("\n".join(line[6:] for line in data.splitlines()))
    expected = {f"c-{row}-{key}": text for (row, key), text in cells.items() if text}
    assert streamed == expected
    page = client.get(f"/compare/{comparison.pk}/").text
    assert html.escape(cells[(0, double.key)]) in page

    vote_page = client.get(f"/compare/{comparison.pk}/vote/")
    reply = client.post(f"/compare/{comparison.pk}/vote/", data={
        "csrfmiddlewaretoken": csrf(vote_page.text), "row": 0, "choice": "A"})  # the first output of this voter's blind order
    assert reply.status_code == 200 and "Your vote" in reply.text

    # Merge in float32: verified against the adapter on its base, and loadable as downloaded.
    merged_job = job_of(post(client, f"/adapters/{add.pk}/", f"/adapters/{add.pk}/merge/", {"dtype": "float32"}))
    merged_job = wait_for(merged_job, FINAL, timeout=300)
    assert merged_job.state == "succeeded", merged_job.error
    merged = MergedModel.objects.get(job=merged_job)
    assert merged.verified and merged.dtype == "float32", merged.figures
    download = client.get(f"/merged/{merged.pk}/download.zip")
    zipfile.ZipFile(io.BytesIO(download.content)).extractall(tmp_path / "merged")
    import torch

    full = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.source), store / "adapters" / "add")
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, on_base(ids).logits, atol=1e-4)

    # Combine: a new adapter with its lineage, loadable by PEFT.
    combine = job_of(post(client, "/adapters/combine/", "/adapters/combine/", {
        "adapters": [add.pk, double.pk], "weights": "0.5, 0.5", "combination_type": "linear",
        "majority_sign_method": "total", "name": "both",
    }))
    combine = wait_for(combine, FINAL, timeout=300)
    assert combine.state == "succeeded", combine.error
    child = Adapter.objects.get(name="both")
    assert set(child.parents.all()) == {add, double}
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.source), store / child.uri.removeprefix("store://"))

    # Evaluate on the "add" task: the add adapter has the lowest loss; the page shows the table.
    data = "".join(json.dumps(r) + "\n" for r in toy_rows(40, seed=4321)).encode()
    dataset = register_dataset("add-eval", "add.jsonl", data)
    evaluation = job_of(post(client, "/evaluations/new/", "/evaluations/new/", {
        "adapters": [add.pk, double.pk], "include_base": "on", "dataset": dataset.pk, "max_rows": 20, "max_new_tokens": 4,
    }))
    evaluation = wait_for(evaluation, FINAL, timeout=300)
    assert evaluation.state == "succeeded", evaluation.error
    scores = evaluation.result["scores"]
    assert min(scores, key=lambda k: scores[k]["loss"]) == add.key, scores
    page = client.get(f"/jobs/{evaluation.pk}/").text
    assert 'id="scores"' in page and "ROUGE-L" in page
