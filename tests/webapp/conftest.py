import pytest

from tests.webapp.team import team  # noqa: F401  (the fixture, for every page test here)


@pytest.fixture(autouse=True)
def _test_models_are_local_models(local_models):  # type: ignore[no-untyped-def]
    """Every test here may register the tiny test models by path (tests/conftest.py, `local_models`)."""
