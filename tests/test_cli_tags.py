"""`tunedeck runs tag` and the list's --tag and --search, as a user's shell runs them against a live server."""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_cli_client import bare  # noqa: F401  (the fixture: the server and the demo catalog, no worker)
from tests.webapp.factories import make_run

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.e2e, pytest.mark.usefixtures("local_models")]


def test_runs_are_tagged_noted_and_listed_by_tag_from_the_cli(bare: Any) -> None:  # noqa: F811
    cli, objs = bare
    run = make_run(objs["user"], objs["base"], objs["dataset"], objs["config"])
    other = make_run(objs["user"], objs["base"], objs["dataset"], objs["config"])

    done = cli("runs", "tag", str(run.pk), "Baseline", "lr-sweep", "--note", "first try")
    assert done.code == 0, done.err
    assert done.out.strip() == f"Run {run.pk} tags: baseline, lr-sweep"
    done = cli("runs", "tag", str(run.pk), "lr-sweep", "--remove", "--json")
    assert (done.json()["tags"], done.json()["note"]) == (["baseline"], "first try")

    listed = cli("runs", "list", "--tag", "baseline", "--json")
    assert [r["id"] for r in listed.json()] == [run.pk]
    assert [r["id"] for r in cli("runs", "list", "--search", "FIRST", "--json").json()] == [run.pk]
    assert {r["id"] for r in cli("runs", "list", "--json").json()} == {run.pk, other.pk}

    refused = cli("runs", "tag", str(other.pk), "no good!")
    assert refused.code == 2 and "tags: 'no good!' is not a tag" in refused.err
