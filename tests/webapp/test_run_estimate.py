"""The New run page's estimate panel (plan, peak GPU memory by part, the workers it fits on, duration from
earlier runs' throughput), its folded groups of settings, and the run page's estimated-vs-measured block."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from webapp.catalog.models import BaseModel
from webapp.fleet.models import Worker
from webapp.training.estimates import estimate_run
from webapp.training.models import Adapter, TrainingRun
from workers.contract import spec

GiB = 2**30
H100 = "NVIDIA H100 80GB HBM3"
# A Llama of about a billion parameters: big enough that its memory is GPU-sized. Only its config is read
# (the tiny model's tokenizer beside it counts the rows' tokens); its weights are never loaded.
BIG_CONFIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
              "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}


@pytest.fixture
def world(db: None, tiny_model_dir: Path, tmp_path: Path, store_dir: Path, local_models: Path, client: Any):  # type: ignore[no-untyped-def]
    from tests.webapp.factories import demo_objects

    user, _, dataset, config = demo_objects(tiny_model_dir)
    big_dir = local_models / "big-llama"
    if not big_dir.exists():
        shutil.copytree(tiny_model_dir, big_dir)
        config_file = big_dir / "config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **BIG_CONFIG}))
    big = BaseModel.objects.create(name="big", source=str(big_dir), num_parameters=1_100_000_000, max_positions=2048,
                                   architecture="LlamaForCausalLM", model_type="llama")
    client.force_login(user)
    return user, big, dataset, config


def form_data(base: Any, dataset: Any, config: Any, **overrides: Any) -> dict[str, Any]:
    params = dataclasses.asdict(spec.suggest_train_params(base.num_parameters))
    data = {"base_model": base.pk, "dataset": dataset.pk, "lora_config": config.pk,
            **{k: v for k, v in params.items() if not isinstance(v, bool | dict)}, "completion_only_loss": "on"}
    return {**data, **overrides}


def gpu_worker(name: str, gpu: str, memory: int) -> Worker:
    return Worker.objects.create(name=name, state="online", last_heartbeat=timezone.now(),
                                 inventory={"gpus": [{"index": 0, "name": gpu, "memory_total": memory}]})


def panel(client: Any, data: dict[str, Any]) -> str:
    response = client.post("/runs/new/estimate/", data)
    assert response.status_code == 200
    return response.content.decode()


def memory_bytes(page: str) -> int:
    return int(re.search(r'id="estimate-memory" data-bytes="(\d+)"', page).group(1))  # type: ignore[union-attr]


def test_the_estimate_shows_the_plan_and_the_memory_by_part(world, client) -> None:  # type: ignore[no-untyped-def]
    _, big, dataset, config = world
    page = panel(client, form_data(big, dataset, config, batch_size=4, grad_accum=2, max_seq_length=512))
    assert 2 * GiB < memory_bytes(page) < 40 * GiB
    assert re.search(r'micro-batch <b id="plan-micro-batch">4</b> × 2 accumulated', page)
    assert "recomputes 16 of 16 layers" in page  # no worker: a GPU of unknown size, every layer recomputed
    for part in ("weights", "adapter", "activations", "CUDA context"):
        assert f"{part}</span> <span class=\"figure\">" in page
    assert "Fits no online worker: no worker is online." in page


def test_a_larger_batch_raises_the_memory_estimate(world, client) -> None:  # type: ignore[no-untyped-def]
    _, big, dataset, config = world
    small = memory_bytes(panel(client, form_data(big, dataset, config, batch_size=2)))
    large = memory_bytes(panel(client, form_data(big, dataset, config, batch_size=32)))
    assert large > small


def test_it_names_the_workers_it_fits_and_why_the_others_do_not(world, client) -> None:  # type: ignore[no-untyped-def]
    _, big, dataset, config = world
    gpu_worker("h100-box", H100, 80 * GiB)
    gpu_worker("tiny-box", "NVIDIA T400 4GB", 4 * GiB)
    Worker.objects.create(name="gone", state="offline", inventory={"gpus": [{"name": H100, "memory_total": 80 * GiB}]})
    page = panel(client, form_data(big, dataset, config, batch_size=8, max_seq_length=1024))
    fits = re.findall(r'<li class="(fits|misfit)"><span class="mark" aria-hidden="true">.</span> <b>([\w-]+)</b>', page)
    assert sorted(fits) == [("fits", "h100-box"), ("misfit", "tiny-box")]
    assert re.search(r"needs ~[\d.]+ GiB of GPU memory; the largest GPU of an online worker can give a job 3.5 GiB", page)
    assert "as planned on h100-box" in page
    assert "no recomputation" in page  # throughput mode keeps the activations on an 80 GiB card
    assert "gone" not in page and "Fits no online worker" not in page


def test_no_worker_big_enough_is_said_with_the_sizes(world, client) -> None:  # type: ignore[no-untyped-def]
    _, big, dataset, config = world
    gpu_worker("tiny-box", "NVIDIA T400 4GB", 4 * GiB)
    page = panel(client, form_data(big, dataset, config, batch_size=16))
    assert re.search(r"Fits no online worker: needs ~[\d.]+ GiB of GPU memory; the largest GPU", page)
    assert "No duration: no online worker fits it." in page


def test_the_duration_comes_from_finished_runs_of_the_base_on_that_gpu(world, client) -> None:  # type: ignore[no-untyped-def]
    user, big, dataset, config = world
    h100 = gpu_worker("h100-box", H100, 80 * GiB)
    data = form_data(big, dataset, config, num_epochs=2, max_steps=0)
    page = panel(client, data)
    assert f"No finished run of big on {H100} yet." in page
    assert 'id="estimate-duration">—<' in page

    # Runs that do not count: another base, another GPU, a failed run; then one that does.
    other_gpu = Worker.objects.create(name="a10-box", state="offline",
                                      inventory={"gpus": [{"name": "NVIDIA A10G", "memory_total": 24 * GiB}]})
    points = [{"step": s, "loss": 1.0, "tokens_per_s": 2000.0} for s in (5, 10, 15)]
    for worker, state in ((other_gpu, "succeeded"), (h100, "failed")):
        TrainingRun.objects.create(owner=user, base_model=big, dataset=dataset, lora_config=config, state=state,
                                   worker=worker, metric_points=points)
    assert "No finished run of big on" in panel(client, data)
    TrainingRun.objects.create(owner=user, base_model=big, dataset=dataset, lora_config=config, state="succeeded",
                               worker=h100, metric_points=[*points, {"step": 20, "tokens_per_s": 4000.0}])

    found = estimate_run(big, dataset, config, spec.TrainParams(**{**dataclasses.asdict(
        spec.suggest_train_params(big.num_parameters)), "num_epochs": 2.0}))
    assert found.duration is not None and found.duration.tokens_per_s == 2000.0 and found.duration.runs == 1
    per_row = found.duration.tokens / (2 * dataset.row_count)  # type: ignore[operator]
    assert 5 < per_row < 200  # the toy rows are short
    assert found.duration.seconds == pytest.approx(found.duration.tokens / 2000.0)  # type: ignore[operator]
    page = panel(client, data)
    assert "At the median 2,000 tokens/s of 1 finished run of big on " + H100 in page
    assert 'id="estimate-duration">—<' not in page

    # A run whose adapter recorded its tokens and time counts them, start to end (here 1,000 tokens/s).
    timed = TrainingRun.objects.create(owner=user, base_model=big, dataset=dataset, lora_config=config,
                                       state="succeeded", worker=h100, metric_points=points)
    Adapter.objects.create(run=timed, name="t", base_model=big, uri="store://t", size_bytes=1, sha256="0" * 64,
                           trainable_params=1, total_params=2, metrics={"trained_tokens": 30_000, "runtime_s": 30.0})
    assert "At the median 1,500 tokens/s of 2 finished runs of big on " + H100 in panel(client, data)


def test_a_half_filled_form_says_what_to_fill_never_an_error(world, client) -> None:  # type: ignore[no-untyped-def]
    _, big, dataset, config = world
    assert "Fill dataset, lora config to estimate." in panel(client, {"base_model": big.pk})
    assert "Fill base model, dataset, lora config" in panel(client, {})
    assert "Fill base model" in panel(client, {**form_data(big, dataset, config), "base_model": "99999"})
    page = panel(client, form_data(big, dataset, config, batch_size="lots"))
    assert "Fill batch size to estimate." in page
    page = panel(client, form_data(big, dataset, config, batch_size=0))
    assert "Fill batch size (must be at least 1) to estimate." in page
    # A setting the estimate does not use may be wrong meanwhile: the estimate still comes.
    assert memory_bytes(panel(client, form_data(big, dataset, config, warmup_ratio=7))) > 0


def test_hostile_names_are_escaped_in_the_panel(world, client) -> None:  # type: ignore[no-untyped-def]
    _, big, dataset, config = world
    gpu_worker("box", '<img src=x onerror=alert(1)>', 80 * GiB)
    page = panel(client, form_data(big, dataset, config))
    assert "<img" not in page and "&lt;img src=x" in page


def test_the_estimate_needs_a_login_and_a_post(world, client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/runs/new/estimate/").status_code == 405
    client.logout()
    assert client.post("/runs/new/estimate/", {}).status_code == 302


def test_the_page_folds_the_groups_and_opens_the_one_with_an_error(world, client) -> None:  # type: ignore[no-untyped-def]
    _, big, dataset, config = world
    page = client.get("/runs/new/").content.decode()
    for group in ("memory", "schedule", "evaluation"):
        assert f'<details class="card group" id="group-{group}">' in page
    assert '<details class="card group" id="placement-fields">' in page
    assert 'hx-post="/runs/new/estimate/"' in page
    assert page.index('id="id_learning_rate"') < page.index('id="group-memory"') < page.index('id="id_batch_size"')
    # Each setting's help in one line, its whole text on its ⓘ.
    assert 'data-help="Micro-batch per device: examples (pad), rows of max_seq_length tokens (pack)' in page
    response = client.post("/runs/new/", form_data(big, dataset, config, warmup_ratio=3))
    page = response.content.decode()
    assert response.status_code == 400
    assert '<details class="card group" id="group-schedule" open>' in page
    assert '<details class="card group" id="group-memory">' in page
    assert "must be in [0, 1)" in page


def test_a_queued_run_keeps_its_estimate_and_its_page_shows_it_beside_the_measured(world, client) -> None:  # type: ignore[no-untyped-def]
    _, big, dataset, config = world
    h100 = gpu_worker("h100-box", H100, 80 * GiB)
    response = client.post("/runs/new/", form_data(big, dataset, config, max_seq_length=256))
    assert response.status_code == 302, response.content.decode()[:2000]
    run = TrainingRun.objects.get()
    assert run.estimates["peak_gpu_bytes"] > GiB and run.estimates["plan"]["on"] == "h100-box"
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "Estimated and measured" in page and "measured when the run finishes" in page

    started = timezone.now() - timedelta(minutes=30)
    TrainingRun.objects.filter(pk=run.pk).update(
        state="succeeded", worker=h100, started_at=started, finished_at=started + timedelta(minutes=12),
        estimates={**run.estimates, "seconds": 600, "peak_gpu_bytes": 10 * GiB})
    Adapter.objects.create(run=run, name="a", base_model=big, uri="store://x", size_bytes=1, sha256="0" * 64,
                           trainable_params=1, total_params=2, metrics={
                               "peak_memory_reserved": 9 * GiB,
                               "plan": {"device": "cuda", "dtype": "bfloat16", "mode": "throughput", "batching": "pack",
                                        "attention": "varlen", "checkpoint_layers": 0, "num_layers": 32,
                                        "activation_offload": False, "liger": True, "compile": True, "micro_batch": 8,
                                        "grad_accum": 2, "notes": ["compile on: 380 steps", "<b>not markup</b>"],
                                        "a_field_of_a_later_version": 1}})
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "micro-batch 8 x 2" in page and "(compile on: 380 steps)" in page  # the worker's choice, and why
    assert "&lt;b&gt;not markup&lt;/b&gt;" in page
    assert re.search(r'id="estimated-memory">10.0 GiB</span>, measured <span id="measured-memory">9.0 GiB', page)
    assert re.search(r'id="estimated-time">10 min</span>, took <span id="measured-time">12 min</span>', page)
    assert "120.0% of the estimate" in page and "90.0% of the estimate" in page
