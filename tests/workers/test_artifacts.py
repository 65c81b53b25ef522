"""What a job reads and writes, read off its spec (both planes authorize and move artifacts by it), and the
remote worker's input cache: bounded, least recently used out first, a running job's files kept by their links."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from workers.contract.artifacts import MODEL_SCHEME, job_artifacts, relative_file
from workers.contract.jobspecs import AdapterRef, EvaluateSpec, MergeSpec, PushSpec
from workers.contract.spec import DatasetRef, LoraParams, ModelRef, TrainParams, TrainSpec
from workers.runtime.remote import InputCache, place


def train_spec(**overrides: object) -> TrainSpec:
    values: dict[str, object] = dict(
        run_id=7, attempt=2, base_model=ModelRef(source="/models/tiny"),
        dataset=DatasetRef(uri="store://datasets/a.jsonl"), lora=LoraParams(), train=TrainParams(),
        output_uri="store://runs/7/attempt-2/adapter", checkpoint_uri="store://runs/7/checkpoints",
        eval_dataset=DatasetRef(uri="store://datasets/held-out.jsonl"),
        init_adapter_uri="store://runs/3/attempt-1/adapter", tracking_uri="store://runs/7/tracking",
    )
    values.update(overrides)
    return TrainSpec(**values)  # type: ignore[arg-type]


def test_a_training_run_reads_its_data_and_parent_and_writes_its_attempt_and_checkpoints() -> None:
    found = job_artifacts(train_spec())
    assert found.inputs == ["store://datasets/a.jsonl", "store://datasets/held-out.jsonl",
                            "store://runs/3/attempt-1/adapter"]
    assert found.outputs == ["store://runs/7/attempt-2/adapter"]
    assert found.carried == ["store://runs/7/tracking"]
    assert found.model == "/models/tiny"
    assert found.may_read(MODEL_SCHEME + "/models/tiny") and not found.may_read(MODEL_SCHEME + "/models/other")
    assert found.may_read("store://datasets/a.jsonl") and found.may_read("store://runs/7/checkpoints")
    assert not found.may_read("store://datasets/b.jsonl")  # another job's input
    assert not found.may_read("store://runs/7/attempt-1/adapter")  # the first attempt's output
    assert not found.may_write("store://datasets/a.jsonl")  # inputs are read-only
    assert not found.may_write("store://runs/7/attempt-1/adapter")  # the first attempt's output
    assert found.may_write("store://runs/7/attempt-2/adapter") and found.may_write("store://runs/7/tracking")
    assert found.may_write("store://runs/7/checkpoints/checkpoint-40")
    for bad in ("store://runs/7/checkpoints", "store://runs/7/checkpoints/checkpoint-40/x",
                "store://runs/7/checkpoints/../attempt-1", "store://runs/7/checkpoints/checkpoint-x"):
        assert not found.may_write(bad), bad


def test_a_hub_model_is_not_fetched_and_adapter_jobs_read_their_adapters() -> None:
    assert job_artifacts(train_spec(base_model=ModelRef(source="meta-llama/Llama-3.1-8B"))).model == ""
    merge = MergeSpec(job_id=1, attempt=1, base_model=ModelRef(source="org/base"),
                      adapter=AdapterRef(key="a", uri="store://runs/1/attempt-1/adapter"), output_uri="store://jobs/1/output")
    found = job_artifacts(merge)
    assert (found.inputs, found.outputs, found.checkpoints) == (
        ["store://runs/1/attempt-1/adapter"], ["store://jobs/1/output"], "")
    evaluate = EvaluateSpec(job_id=2, attempt=1, base_model=ModelRef(source="org/base"),
                            adapters=[AdapterRef(key="a", uri="store://x/a"), AdapterRef(key="b", uri="store://x/b")],
                            dataset=DatasetRef(uri="store://datasets/e.jsonl"))
    assert job_artifacts(evaluate).inputs == ["store://x/a", "store://x/b", "store://datasets/e.jsonl"]
    push = PushSpec(job_id=3, attempt=1, source_uri="store://jobs/1/output", repo_id="me/x")
    assert job_artifacts(push).inputs == ["store://jobs/1/output"]


def test_a_spec_in_its_json_form_has_the_same_artifacts() -> None:
    """The control plane holds an adapter job's spec as JSON (its params): the rules must read it alike."""
    import dataclasses

    merge = MergeSpec(job_id=1, attempt=1, base_model=ModelRef(source="/models/tiny"),
                      adapter=AdapterRef(key="a", uri="store://adapters/a"), output_uri="store://jobs/1/output")
    assert job_artifacts(dataclasses.asdict(merge)) == job_artifacts(merge)
    assert job_artifacts(dataclasses.asdict(train_spec())) == job_artifacts(train_spec())
    assert job_artifacts(dataclasses.asdict(merge)).inputs == ["store://adapters/a"]


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "a\\b", "a\x00b"])
def test_file_paths_cannot_leave_their_artifact(path: str) -> None:
    with pytest.raises(ValueError, match="bad file path"):
        relative_file(path)


def test_the_cache_keeps_the_most_recently_used_within_its_bound(tmp_path: Path) -> None:
    cache = InputCache(tmp_path / "cache", max_bytes=250)
    blobs = []
    for i, name in enumerate("abc"):
        part = cache.partial(name * 64)
        part.write_bytes(bytes([i]) * 100)
        blobs.append(cache.put(part, name * 64))
        os.utime(blobs[-1], (time.time() - 100 + i * 10, time.time() - 100 + i * 10))
    # Three blobs of 100 bytes do not fit 250: the oldest went when the third came.
    assert not blobs[0].exists() and blobs[1].exists() and blobs[2].exists()
    assert cache.get("a" * 64, 100) is None and cache.get("b" * 64, 100) == blobs[1]  # b is now the newest used
    assert cache.get("c" * 64, 99) is None  # a size that differs is not the same input
    part = cache.partial("d" * 64)
    part.write_bytes(b"d" * 100)
    job_file = tmp_path / "job" / "data.jsonl"
    place(cache.put(part, "d" * 64), job_file)
    assert not blobs[2].exists() and blobs[1].exists()  # c was the least recently used
    assert cache.used_bytes() == 200
    # A job's file is a link to its blob: evicting the blob leaves the job's copy whole.
    cache.max_bytes = 0
    cache.evict()
    assert cache.used_bytes() == 0 and job_file.read_bytes() == b"d" * 100
