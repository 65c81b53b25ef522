from __future__ import annotations

from pathlib import Path

import pytest

from workers.demo import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama with a tokenizer trained on the fly: nothing is downloaded."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def store_dir(tmp_path: Path, settings) -> Path:  # type: ignore[no-untyped-def]
    settings.ARTIFACT_STORE = tmp_path / "artifacts"
    return Path(settings.ARTIFACT_STORE)
