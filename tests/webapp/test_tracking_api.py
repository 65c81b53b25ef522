"""A run's trackers over the APIs: OpenAI's `integrations` mapped onto report_to and the tracking settings, the
site's default trackers, and the trackers' files served as a zip by the run page and the REST API."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from openai.types.fine_tuning import FineTuningJob

from tests.webapp.api_helpers import Team, bearer, key_for, make_team, problem_of
from tests.webapp.factories import make_run
from webapp.training.models import TrainingRun
from webapp.training.tracking import tracking_folder

pytestmark = pytest.mark.django_db


@pytest.fixture
def team(tiny_model_dir: Path, store_dir: Path) -> Team:
    return make_team(tiny_model_dir)


def post(client: Client, path: str, body: Any, raw: str) -> Any:
    return client.post(path, json.dumps(body), content_type="application/json", **bearer(raw))


def openai_job(client: Client, team: Team, **extra: Any) -> Any:
    body = {"model": "tiny", "training_file": f"file-{team.dataset.pk}", **extra}
    return post(client, "/v1/fine_tuning/jobs", body, key_for(team.owner))


def openai_error(response: Any) -> dict[str, Any]:
    assert response.status_code == 400, response.content
    return response.json()["error"]


def test_it_maps_a_wandb_integration_onto_the_runs_trackers(client: Client, team: Team) -> None:
    wandb = {"project": "arith", "name": "first try", "tags": ["nightly", "sft"]}
    response = openai_job(client, team, integrations=[{"type": "wandb", "wandb": wandb}],
                          tunedeck={"hyperparameters": {"report_to": ["tensorboard"]}})
    assert response.status_code == 200, response.content
    job = FineTuningJob.model_validate(response.json())
    run = TrainingRun.objects.get(pk=int(job.id.removeprefix("ftjob-")))
    params = run.train_params()
    assert params.report_to == ["tensorboard", "wandb"]
    assert (params.tracking_project, params.tracking_run_name, params.tracking_tags) == (
        "arith", "first try", ["nightly", "sft"])
    (integration,) = job.integrations or []
    assert integration.type == "wandb" and integration.wandb.project == "arith"
    assert integration.wandb.name == "first try" and integration.wandb.tags == ["nightly", "sft"]
    assert integration.wandb.entity is None


@pytest.mark.parametrize(("integrations", "param", "words"), [
    ([{"type": "comet", "comet": {}}], "integrations[0].type", "'comet' is not supported"),
    ([{"type": "wandb", "wandb": {"project": "p", "entity": "team"}}], "integrations[0].wandb.entity", "WANDB_ENTITY"),
    ([{"type": "wandb", "wandb": {"name": "no project"}}], "integrations[0].wandb.project", "is required"),
    ([{"type": "wandb", "wandb": {"project": "p", "api_key": "k"}}], "integrations[0].wandb.api_key", "unknown"),
    ([{"type": "wandb", "wandb": {"project": "p", "tags": ["x" * 65]}}], "integrations[0].wandb.tags", "1 to 64"),
    ({"type": "wandb"}, "integrations", "must be a list"),
])
def test_it_refuses_integrations_it_cannot_honour_in_openais_shape(
        client: Client, team: Team, integrations: Any, param: str, words: str) -> None:
    error = openai_error(openai_job(client, team, integrations=integrations))
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"
    assert not TrainingRun.objects.exists()


def test_an_integration_and_report_to_none_are_refused_together(client: Client, team: Team) -> None:
    error = openai_error(openai_job(client, team, integrations=[{"type": "wandb", "wandb": {"project": "p"}}],
                                    tunedeck={"hyperparameters": {"report_to": ["none"]}}))
    assert error["param"] == "integrations[0]" and "none" in error["message"]


def test_runs_that_name_no_tracker_take_the_sites_default(client: Client, team: Team, settings: Any) -> None:
    settings.TUNEDECK_REPORT_TO = ["tensorboard", "mlflow"]
    raw = key_for(team.owner)
    created = post(client, "/api/v1/runs/", team.run_body(), raw)
    assert created.status_code == 201, created.content
    assert created.json()["hyperparameters"]["report_to"] == ["tensorboard", "mlflow"]
    own = post(client, "/api/v1/runs/", team.run_body(hyperparameters={"report_to": ["wandb"]}), raw)
    assert own.json()["hyperparameters"]["report_to"] == ["wandb"]
    off = post(client, "/api/v1/runs/", team.run_body(hyperparameters={"report_to": ["none"]}), raw)
    assert off.json()["hyperparameters"]["report_to"] == ["none"]
    spec = TrainingRun.objects.get(pk=off.json()["id"]).job_spec()
    assert spec.train.trackers == [] and spec.tracking_uri == f"store://runs/{off.json()['id']}/tracking"


def test_an_unknown_tracker_is_a_400_naming_the_field(client: Client, team: Team) -> None:
    response = post(client, "/api/v1/runs/", team.run_body(hyperparameters={"report_to": ["comet"]}),
                    key_for(team.owner))
    body = problem_of(response, 400)
    assert "comet: not a tracker" in json.dumps(body)
    assert not TrainingRun.objects.exists()


def test_the_trackers_files_download_as_a_zip_from_the_page_and_the_api(client: Client, team: Team) -> None:
    run = make_run(team.owner, team.base, team.dataset, team.config, report_to=["tensorboard"])
    raw = key_for(team.mate, "read")  # runs are visible to the whole team
    assert client.get(f"/api/v1/runs/{run.pk}/tracking/", **bearer(raw)).status_code == 404
    folder = tracking_folder(run)
    (folder / "tensorboard").mkdir(parents=True)
    (folder / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"\x00event")
    response = client.get(f"/api/v1/runs/{run.pk}/tracking/", **bearer(raw))
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert archive.namelist() == ["tensorboard/events.out.tfevents.1.host"]

    client.force_login(team.mate)
    page = client.get(f"/runs/{run.pk}/")
    assert f'href="/runs/{run.pk}/tracking.zip"' in page.content.decode()
    download = client.get(f"/runs/{run.pk}/tracking.zip")
    assert download.status_code == 200
    assert zipfile.ZipFile(io.BytesIO(b"".join(download.streaming_content))).read(
        "tensorboard/events.out.tfevents.1.host") == b"\x00event"
    client.logout()
    assert client.get(f"/runs/{run.pk}/tracking.zip").status_code == 302  # to the login page
