"""The job-kind registry: every declared kind can be run by a worker and read from its JSON form."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from workers.contract.kinds import KINDS, spec_from_dict


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_kind_names_a_runner_that_imports_and_a_dataclass_spec(name: str) -> None:
    decl = KINDS[name]
    assert decl.name == name
    assert dataclasses.is_dataclass(decl.spec)
    runner = getattr(importlib.import_module(decl.runner_module), decl.runner_function)
    assert callable(runner)
    assert decl.flush_interval > 0
    assert decl.weight_bytes_per_param is None or decl.weight_bytes_per_param > 0


def test_an_unknown_field_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown field"):
        spec_from_dict("compare", {"no_such_field": 1})
