"""Exports end to end: started from the adapter page, run by a real worker process on the tiny model, recorded with
the merged models and downloaded (SQLite + filesystem broker, or PostgreSQL + Redis). The worker has vLLM's test
double on its path (tests/doubles/README.md), so its heartbeat reports vLLM and it takes vLLM exports."""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from pathlib import Path

import pytest

from tests.webapp.test_adapter_jobs_e2e import FINAL, adapters, job_of, post  # noqa: F401
from tests.webapp.test_end_to_end import WorkerProcess, browser, wait_for
from webapp.fleet.models import Worker
from webapp.playground.models import MergedModel
from workers.adapters import ollama

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]
VLLM_SITE = Path(__file__).resolve().parents[1] / "doubles" / "vllm_site"


@pytest.fixture(scope="module")
def worker_process(live_server, tmp_path_factory):  # type: ignore[no-untyped-def]
    path = os.pathsep.join(p for p in (str(VLLM_SITE), os.environ.get("PYTHONPATH", "")) if p)
    worker = WorkerProcess(live_server.url, tmp_path_factory.mktemp("export-store"), env={"PYTHONPATH": path})
    yield worker
    worker.stop()


def test_an_export_for_ollama_runs_on_a_worker_and_downloads_with_its_modelfile(  # type: ignore[no-untyped-def]
    adapters, live_server  # noqa: F811
) -> None:
    rows = adapters[2]
    client = browser(live_server)
    add = rows["add"]
    job = job_of(post(client, f"/adapters/{add.pk}/", f"/adapters/{add.pk}/export/", {
        "form": "merged", "name": "team/adder:v1", "quantize": "q8_0", "system": "Add."}))
    job = wait_for(job, FINAL, timeout=300)
    assert job.state == "succeeded", job.error
    made = MergedModel.objects.get(job=job)
    assert (made.target, made.form, made.name, made.verified) == ("ollama", "merged", "team/adder:v1", True)
    page = client.get(f"/jobs/{job.pk}/").text
    assert "ollama create team/adder:v1 --quantize q8_0 -f Modelfile" in page and f'href="/merged/{made.pk}/files/Modelfile"' in page
    modelfile = client.get(f"/merged/{made.pk}/files/Modelfile").text
    assert modelfile.startswith("FROM .\n") and 'SYSTEM """Add."""' in modelfile
    # The adapter's tokenizer carries the template it was trained with: the demo one, near Zephyr's.
    assert f'TEMPLATE """{ollama.ZEPHYR}"""' in modelfile
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/merged/{made.pk}/download.zip").content))
    names = set(archive.namelist())
    assert {"Modelfile", "README.md", "config.json"} <= names and any(n.endswith(".safetensors") for n in names)
    assert "ollama create team/adder:v1 --quantize q8_0 -f Modelfile" in archive.read("README.md").decode()


def test_a_vllm_export_waits_for_the_worker_that_reports_vllm_and_records_its_check(  # type: ignore[no-untyped-def]
    adapters, live_server  # noqa: F811
) -> None:
    add = adapters[2]["add"]
    client = browser(live_server)
    deadline = time.monotonic() + 60
    while Worker.objects.get().inventory.get("vllm") is None:  # its first heartbeat carries its inventory
        assert time.monotonic() < deadline, "the worker's inventory never reported vLLM"
        time.sleep(0.5)
    assert "Workers with vLLM: " in client.get(f"/adapters/{add.pk}/").text
    job = job_of(post(client, f"/adapters/{add.pk}/", f"/adapters/{add.pk}/export/", {
        "target": "vllm", "form": "adapter", "name": "adder", "max_new_tokens": "8",
        "check_prompts": "What is 23 + 41?\nWhat is 2 + 3?"}))
    assert job.needs_labels == ["runtime:vllm"]
    job = wait_for(job, FINAL, timeout=300)
    assert job.state == "succeeded", job.error
    made = MergedModel.objects.get(job=job)
    assert (made.target, made.form, made.name) == ("vllm", "adapter", "adder")
    page = client.get(f"/jobs/{job.pk}/").text
    assert "2 of 2 equal Tunedeck&#x27;s token for token" in page  # the log
    assert "checked with vLLM 0.0.0+test in float32: <strong id=\"vllm-agree\">2 of 2</strong>" in page
    assert "ollama create" not in page
    report = json.loads(client.get(f"/merged/{made.pk}/files/vllm-check.json").text)
    assert (report["agree"], report["total"], report["vllm_version"]) == (2, 2, "0.0.0+test")
    assert [row["prompt"] for row in report["answers"]] == ["What is 23 + 41?", "What is 2 + 3?"]
    assert "--lora-modules adder=./adapter" in client.get(f"/merged/{made.pk}/files/README.md").text
