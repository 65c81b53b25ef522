"""An export for Ollama end to end: started from the adapter page, run by a real worker process on the tiny model,
recorded with the merged models and downloaded (SQLite + filesystem broker, or PostgreSQL + Redis)."""

from __future__ import annotations

import io
import zipfile

import pytest

from tests.webapp.test_adapter_jobs_e2e import FINAL, adapters, job_of, post  # noqa: F401
from tests.webapp.test_end_to_end import browser, wait_for, worker_process  # noqa: F401
from webapp.playground.models import MergedModel
from workers.adapters import ollama

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e]


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
