"""One declaration of a new run: the CLI's YAML run specs, the REST body and the New run page name a run's fields
as `RunRequest` names them (the page and the API spread its typed settings into a field each)."""

from __future__ import annotations

import dataclasses
from typing import Any

from tunedeck_cli import runspec
from webapp.api.runs import HyperparametersSerializer, RunCreateSerializer
from webapp.training.forms import RunForm
from webapp.training.services import RunRequest
from workers.contract.spec import TrainParams

REQUEST_FIELDS = {f.name for f in dataclasses.fields(RunRequest)}
SETTINGS = {f.name for f in dataclasses.fields(TrainParams)}


def test_a_cli_run_spec_takes_exactly_the_run_requests_fields() -> None:
    assert set(runspec.FIELDS) == REQUEST_FIELDS


def test_the_api_body_is_a_run_request_and_its_hyperparameters_the_typed_settings() -> None:
    assert set(RunCreateSerializer().fields) == REQUEST_FIELDS
    assert set(HyperparametersSerializer().fields) == SETTINGS


def test_the_new_run_page_has_a_field_for_each_part_of_a_run_request_and_each_setting(db: Any) -> None:
    assert set(RunForm().fields) == (REQUEST_FIELDS - {"hyperparameters"}) | SETTINGS
