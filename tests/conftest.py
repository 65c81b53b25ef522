from __future__ import annotations

from pathlib import Path

import pytest

from workers.training.demo import build_tiny_llama


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests' tiny models live. The control plane reads local models only under its model roots:
    tests that register them from here add this folder (`local_models`)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model_dir(models_root: Path) -> Path:
    """A tiny random-weight Llama with a tokenizer trained on the fly: nothing is downloaded."""
    return build_tiny_llama(models_root / "tiny-llama")


@pytest.fixture
def local_models(settings, models_root: Path) -> Path:  # type: ignore[no-untyped-def]
    """The test models' folder is one of the control plane's model roots (TUNEDECK_MODEL_ROOTS) for this test."""
    settings.MODEL_ROOTS = [*settings.MODEL_ROOTS, models_root]
    return models_root


@pytest.fixture
def store_dir(tmp_path: Path, settings) -> Path:  # type: ignore[no-untyped-def]
    settings.ARTIFACT_STORE = tmp_path / "artifacts"
    return Path(settings.ARTIFACT_STORE)


@pytest.fixture(scope="module")
def adapted(tiny_model_dir: Path, task_adapters):  # type: ignore[no-untyped-def]
    """The tiny base with the "add" and "double" LoRA adapters of `task_adapters`, as a compare job loads them:
    (model, tokenizer), one per test module."""
    from workers.adapters.inference import load_for_inference
    from workers.contract.jobspecs import AdapterRef, LoadParams
    from workers.contract.spec import ModelRef

    store, uris = task_adapters
    refs = [AdapterRef(key=task, label=task, uri=uri) for task, uri in uris.items()]
    model, tokenizer, _ = load_for_inference(ModelRef(source=str(tiny_model_dir)), refs, LoadParams(), store)
    return model, tokenizer


@pytest.fixture(scope="session")
def task_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Two LoRA adapters of the tiny model, trained on different toy tasks ("add" and "double").

    Returns (store, {task: adapter store URI}); the datasets are at store://datasets/<task>.jsonl.
    Shared by the compare, merge and evaluate tests: training both takes a few seconds on the CPU.
    """
    from workers.contract.reporter import MemoryReporter
    from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainSpec, suggest_train_params
    from workers.contract.store import ArtifactStore
    from workers.training.demo import write_toy_dataset
    from workers.training.train import run_training

    store = ArtifactStore(tmp_path_factory.mktemp("task-adapters"))
    uris = {}
    for run_id, task in enumerate(("add", "double"), start=1):
        write_toy_dataset(store.path(f"store://datasets/{task}.jsonl"), task=task, seed=run_id)
        spec = TrainSpec(
            run_id=run_id,
            attempt=1,
            base_model=ModelRef(source=str(tiny_model_dir)),
            dataset=DatasetRef(uri=f"store://datasets/{task}.jsonl", format="alpaca"),
            lora=LoraParams(dropout=0.0, r=8, alpha=16),
            train=suggest_train_params(100_000),
            output_uri=f"store://runs/{run_id}/attempt-1/adapter",
        )
        reporter = MemoryReporter()
        result = run_training(spec, reporter, store)
        assert result is not None, reporter.logs[-3:]
        uris[task] = result["adapter_uri"]
    return store, uris


@pytest.fixture(scope="session")
def chatml_adapter(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A tiny Llama whose tokenizer speaks ChatML (<|im_start|> and <|im_end|> are tokens, EOS is </s>) and a LoRA
    trained through that template on the "double" task: it ends each answer with <|im_end|>, never with EOS.

    Returns (model folder, store, adapter URI)."""
    from workers.contract.reporter import MemoryReporter
    from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainSpec, suggest_train_params
    from workers.contract.store import ArtifactStore
    from workers.data.prompts import FALLBACK_CHAT_TEMPLATE
    from workers.training.demo import build_tiny_llama, write_toy_dataset
    from workers.training.train import run_training

    root = tmp_path_factory.mktemp("chatml")
    model_dir = build_tiny_llama(
        root / "model", chat_template=FALLBACK_CHAT_TEMPLATE, extra_special_tokens=["<|im_start|>", "<|im_end|>"]
    )
    store = ArtifactStore(root / "store")
    write_toy_dataset(store.path("store://datasets/double.jsonl"), task="double", seed=1)
    spec = TrainSpec(
        run_id=1,
        attempt=1,
        base_model=ModelRef(source=str(model_dir)),
        dataset=DatasetRef(uri="store://datasets/double.jsonl", format="alpaca"),
        lora=LoraParams(dropout=0.0, r=8, alpha=16),
        train=suggest_train_params(100_000),
        output_uri="store://runs/1/attempt-1/adapter",
    )
    reporter = MemoryReporter()
    result = run_training(spec, reporter, store)
    assert result is not None, reporter.logs[-3:]
    return model_dir, store, result["adapter_uri"]
