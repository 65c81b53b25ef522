"""The scheduler's placement: where queued jobs land, in what order, why a job waits, and reordering.

Real database rows (SQLite by default, PostgreSQL with DATABASE_URL), workers with heartbeat inventories,
one `schedule_once()` pass at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tests.webapp.factories import demo_objects, make_worker
from tests.webapp.team import login, make
from webapp.catalog.models import BaseModel
from webapp.fleet import needs, placement
from webapp.fleet.models import Worker
from webapp.fleet.scheduler import schedule_once
from webapp.jobs import ledger, queue
from webapp.playground import services
from webapp.playground.models import AdapterJob
from webapp.training.models import Adapter, TrainingRun
from workers.contract import spec
from workers.training.modelshape import ModelShape
from workers.training.specestimate import estimate_for_spec

pytestmark = pytest.mark.django_db
GiB = 2**30


def worker(name: str, gpus: tuple[float, ...] = (), labels: tuple[str, ...] = (), state: str = "online",
           free: tuple[float, ...] | None = None, **fields: Any) -> Worker:
    """A worker as its heartbeats leave it: GPUs of these sizes (GiB), optionally with less memory free."""
    inventory = {
        "gpus": [{"index": i, "name": "NVIDIA test GPU", "memory_total": int(size * GiB),
                  **({"memory_free": int(free[i] * GiB)} if free else {})} for i, size in enumerate(gpus)],
        "memory_total": 64 * GiB, "cpus": 8,
    }
    return Worker.objects.create(name=name, state=state, labels=list(labels), inventory=inventory,
                                 last_heartbeat=timezone.now(), **fields)


def job(team: Any, owner: str = "owner", gib: float | None = 4, gpus: int = 1, labels: tuple[str, ...] = (),
        **fields: Any) -> TrainingRun:
    return make(team, owner, needs_gpu_bytes=int(gib * GiB) if gib is not None else None, needs_gpus=gpus,
                needs_labels=list(labels), **fields)


def fresh(*runs: TrainingRun) -> list[TrainingRun]:
    return [TrainingRun.objects.select_related("worker").get(pk=r.pk) for r in runs]


def where(run: TrainingRun) -> tuple[str | None, list[int]]:
    (run,) = fresh(run)
    return (run.worker.name if run.worker else None), run.gpu_indices


def finish(run: TrainingRun) -> None:
    """The worker reports the attempt failed: its GPUs are free again."""
    (run,) = fresh(run)
    ledger.record_status(run, run.attempt, "failed", {}, "stopped for the test")


# --- where jobs land -------------------------------------------------------------------------------------


def test_jobs_land_only_on_workers_whose_labels_and_memory_fit(team: Any) -> None:
    worker("small", gpus=(24,), labels=("team-nlp",))
    worker("big", gpus=(80, 80), labels=("a100",))
    large = job(team, gib=40)
    nlp = job(team, gib=10, labels=("team-nlp",))
    a100 = job(team, gib=10, labels=("a100",))
    assert schedule_once()["dispatched"] == 3
    assert where(large) == ("big", [0]) and where(a100) == ("big", [1]) and where(nlp) == ("small", [0])


def test_a_run_dispatched_to_a_worker_with_a_memory_limit_is_planned_within_it(team: Any) -> None:
    worker("shared", gpus=(80,), max_gpu_bytes=24 * GiB)
    run = job(team, gib=10)
    assert schedule_once()["dispatched"] == 1
    (run,) = fresh(run)
    sent = spec.TrainSpec.from_json(run.job_spec().to_json())  # what the worker receives
    assert sent.gpu_memory_bytes == 24 * GiB  # the plan and the allocator stay within the admin's limit
    worker("whole", gpus=(80,))
    other = job(team, gib=30)  # fits only the unlimited worker
    schedule_once()
    (other,) = fresh(other)
    assert other.worker.name == "whole" and other.job_spec().gpu_memory_bytes == 0


def test_small_jobs_take_the_smallest_gpu_that_fits_keeping_big_ones_free(team: Any) -> None:
    worker("big", gpus=(80,))
    worker("small", gpus=(24,))
    small = job(team, gib=10)
    schedule_once()
    assert where(small) == ("small", [0])


def test_a_job_too_large_for_every_worker_stays_queued_and_says_the_sizes(team: Any) -> None:
    worker("small", gpus=(24,))
    worker("big", gpus=(80,), max_gpu_bytes=40 * GiB)  # an admin's limit per job
    huge = job(team, gib=60)
    labelled = job(team, gib=4, labels=("a100", "team-nlp"))
    schedule_once()
    huge, labelled = fresh(huge, labelled)
    assert huge.state == "queued" and huge.worker is None
    assert huge.wait_reason == "needs ~60 GiB of GPU memory; the largest GPU of an online worker can give a job 39.5 GiB"
    assert labelled.wait_reason == "needs labels a100, team-nlp; no online worker has them all"


def test_a_multi_gpu_job_that_no_worker_can_hold_says_how_many_gpus_the_largest_has(team: Any) -> None:
    worker("one", gpus=(80,))
    wide = job(team, gib=10, gpus=2)
    schedule_once()
    (wide,) = fresh(wide)
    assert wide.state == "queued" and wide.wait_reason == "needs 2 GPUs; the largest online worker has 1"


def test_with_no_worker_online_every_job_says_so_and_draining_or_silent_workers_take_nothing(team: Any) -> None:
    worker("draining", gpus=(80,), state="draining")
    worker("offline", gpus=(80,), state="offline")
    silent = worker("silent", gpus=(80,))
    Worker.objects.filter(pk=silent.pk).update(last_heartbeat=None)  # registered, never heard from
    waiting = job(team)
    assert schedule_once()["dispatched"] == 0
    (waiting,) = fresh(waiting)
    assert waiting.state == "queued" and waiting.wait_reason == "no worker is online"
    Worker.objects.filter(name="draining").update(state="online")
    schedule_once()
    assert where(waiting) == ("draining", [0])


def test_a_worker_past_its_heartbeat_timeout_takes_nothing_and_its_jobs_are_requeued_with_their_gpus_freed(
    team: Any, settings: Any
) -> None:
    w = worker("w", gpus=(80, 80))
    run = job(team, gpus=2)
    schedule_once()
    assert where(run) == ("w", [0, 1])
    Worker.objects.filter(pk=w.pk).update(last_heartbeat=timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER + 5))
    outcome = schedule_once()
    (run,) = fresh(run)
    assert outcome["lost_workers"] == 1 and run.state == "queued" and run.gpu_indices == [] and run.worker is None
    assert run.wait_reason == "no worker is online"
    assert [(e["worker"], e["outcome"]) for e in run.attempt_log] == [("w", "lost")]


def test_a_silent_draining_worker_loses_its_jobs_but_stays_draining_when_it_comes_back(team: Any, settings: Any) -> None:
    w, token = make_worker("d")
    run = job(team, gib=None)
    schedule_once()
    assert where(run)[0] == "d"
    Worker.objects.filter(pk=w.pk).update(
        state="draining", last_heartbeat=timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER + 5)
    )
    schedule_once()
    (run,) = fresh(run)
    assert run.state == "queued" and run.worker is None and run.attempt_log[-1]["outcome"] == "lost"
    assert Worker.objects.get(pk=w.pk).state == "draining"
    beat = Client().post("/api/worker/v1/heartbeat", {"inventory": {"gpus": []}}, content_type="application/json",
                         headers={"Authorization": f"Bearer {token}"})
    assert beat.status_code == 200
    schedule_once()
    assert Worker.objects.get(pk=w.pk).state == "draining"  # the admin's drain survives the silence
    assert fresh(run)[0].state == "queued"


def test_a_cpu_only_worker_takes_only_jobs_that_can_run_on_the_cpu(team: Any) -> None:
    worker("cpu")  # its heartbeat reported "gpus": []
    gpu_job = job(team, gib=8)
    cpu_job = job(team, gib=None)
    schedule_once()
    gpu_job, cpu_job = fresh(gpu_job, cpu_job)
    assert cpu_job.state == "dispatched" and cpu_job.worker.name == "cpu" and cpu_job.gpu_indices == []
    assert gpu_job.state == "queued" and gpu_job.wait_reason == "needs ~8 GiB of GPU memory; no online worker has a GPU"


def test_cpu_capable_jobs_go_to_cpu_workers_first_and_a_gpu_worker_takes_them_when_those_are_busy(team: Any) -> None:
    worker("gpu", gpus=(24,))
    worker("cpu")
    first, second = job(team, gib=None), job(team, gib=None)
    schedule_once()
    assert where(first) == ("cpu", []) and where(second) == ("gpu", [0])


def test_a_job_that_cannot_be_placed_now_does_not_block_the_jobs_behind_it(team: Any) -> None:
    worker("big", gpus=(80,))
    worker("small", gpus=(24,))
    occupying = job(team, gib=40)
    schedule_once()
    assert where(occupying) == ("big", [0])
    never = job(team, gib=200)  # fits no worker: skipped
    blocked = job(team, gib=40)  # fits only "big", which is busy
    behind = job(team, gib=10)
    schedule_once()
    never, blocked, behind = fresh(never, blocked, behind)
    assert behind.state == "dispatched" and behind.worker.name == "small"
    assert never.state == "queued" and never.wait_reason.startswith("needs ~200 GiB of GPU memory")
    assert blocked.state == "queued" and blocked.wait_reason == "waiting for a free GPU (next in line)"
    finish(occupying)
    schedule_once()
    assert where(blocked) == ("big", [0])


def test_waiting_jobs_count_the_jobs_ahead_of_them_and_unchanged_reasons_are_not_written_again(team: Any) -> None:
    worker("w", gpus=(24,))
    runs = [job(team) for _ in range(4)]
    schedule_once()
    reasons = [r.wait_reason for r in fresh(*runs)]
    assert reasons == ["", "waiting for a free GPU (next in line)", "waiting for a free GPU (1 job ahead)",
                       "waiting for a free GPU (2 jobs ahead)"]
    with CaptureQueriesContext(connection) as queries:
        schedule_once()
    assert not [q for q in queries.captured_queries if "wait_reason" in q["sql"] and q["sql"].startswith("UPDATE")]


def test_gpu_memory_used_outside_tunedeck_makes_a_job_wait_saying_so(team: Any) -> None:
    worker("shared", gpus=(80,), free=(6,))
    big = job(team, gib=20)
    small = job(team, gib=4)
    schedule_once()
    big, small = fresh(big, small)
    assert big.state == "queued"
    assert big.wait_reason == "waiting for GPU memory used outside Tunedeck: GPU 0 of shared has 6 GiB free (next in line)"
    assert small.state == "dispatched" and small.gpu_indices == [0]


def test_max_jobs_caps_a_worker_below_one_job_per_gpu(team: Any) -> None:
    worker("w", gpus=(80, 80, 80), max_jobs=2)
    runs = [job(team) for _ in range(3)]
    assert schedule_once()["dispatched"] == 2
    assert sorted(where(r)[1][0] for r in runs[:2]) == [0, 1] and fresh(runs[2])[0].state == "queued"


# --- GPUs held by a job ---------------------------------------------------------------------------------


def test_a_two_gpu_job_goes_only_where_two_gpus_are_free_holds_both_and_the_next_job_waits_for_them(team: Any) -> None:
    worker("single", gpus=(80,), labels=("pool",))
    worker("pair", gpus=(24, 24), labels=("pool",))
    wide = job(team, gib=10, gpus=2, labels=("pool",))
    schedule_once()
    assert where(wide) == ("pair", [0, 1])
    Worker.objects.filter(name="single").update(state="draining")
    narrow = job(team, gib=10)
    schedule_once()
    (narrow,) = fresh(narrow)
    assert narrow.state == "queued" and narrow.wait_reason == "waiting for a free GPU (next in line)"
    finish(wide)
    schedule_once()
    assert where(narrow) == ("pair", [0])


def test_a_two_gpu_job_waits_while_one_of_the_pair_is_held(team: Any) -> None:
    worker("pair", gpus=(24, 24))
    one = job(team, gib=10)
    schedule_once()
    wide = job(team, gib=10, gpus=2)
    schedule_once()
    (wide,) = fresh(wide)
    assert where(one) == ("pair", [0]) and wide.state == "queued"
    assert wide.wait_reason == "waiting for a free GPU (next in line)"


# --- order: priority, fairness, each owner's queue -----------------------------------------------------------


def test_one_users_twenty_runs_do_not_hold_back_another_users_single_run(team: Any) -> None:
    worker("w", gpus=(80,))
    batch = [job(team, "owner") for _ in range(20)]
    single = job(team, "mate")
    schedule_once()
    assert fresh(batch[0])[0].state == "dispatched"
    assert fresh(single)[0].wait_reason == "waiting for a free GPU (next in line)"
    finish(batch[0])
    schedule_once()
    assert fresh(single)[0].state == "dispatched"  # the second job placed


def test_two_free_gpus_go_to_two_owners_before_the_second_job_of_either(team: Any) -> None:
    worker("w", gpus=(80, 80))
    batch = [job(team, "owner") for _ in range(20)]
    single = job(team, "mate")
    schedule_once()
    assert [r.state for r in fresh(batch[0], batch[1], single)] == ["dispatched", "queued", "dispatched"]


def test_the_owner_with_fewer_active_jobs_goes_first(team: Any) -> None:
    worker("w", gpus=(80,))
    running = job(team, "owner")
    schedule_once()
    worker("w2", gpus=(80,))
    older = job(team, "owner")
    newer = job(team, "mate")
    schedule_once()
    assert where(running)[0] == "w" and fresh(newer)[0].state == "dispatched" and fresh(older)[0].state == "queued"


def test_priority_beats_age(team: Any) -> None:
    worker("w", gpus=(80,))
    old = job(team, "owner")
    urgent = job(team, "mate", priority=5)
    schedule_once()
    assert fresh(urgent)[0].state == "dispatched" and fresh(old)[0].state == "queued"


def test_reordering_an_owners_queue_changes_which_of_their_jobs_is_placed_first(team: Any, client: Client) -> None:
    worker("w", gpus=(80,))
    first, second, third = job(team), job(team), job(team)
    login(client, "owner")
    response = client.post(f"/runs/{third.pk}/reorder/", {"where": "top"})
    assert response.status_code == 302 and response["Location"] == f"/runs/{third.pk}/"
    schedule_once()
    assert [r.state for r in fresh(first, second, third)] == ["queued", "queued", "dispatched"]


def test_moves_up_down_top_and_bottom_keep_the_rest_of_the_queue_in_order(team: Any) -> None:
    runs = [job(team) for _ in range(4)]
    other = job(team, "mate")

    def order() -> list[int]:
        return [r.pk for r in sorted(fresh(*runs), key=lambda r: r.queue_order)]

    a, b, c, d = (r.pk for r in runs)
    assert queue.move(runs[2], "up") and order() == [a, c, b, d]
    assert queue.move(runs[2], "down") and order() == [a, b, c, d]
    assert queue.move(runs[0], "bottom") and order() == [b, c, d, a]
    assert queue.move(runs[3], "top") and order() == [d, b, c, a]
    assert queue.move(runs[3], "up") and order() == [d, b, c, a]  # already first
    assert fresh(other)[0].queue_order == other.queue_order  # another owner's queue is untouched


def test_jobs_created_in_the_same_instant_can_still_be_reordered(team: Any) -> None:
    runs = [job(team) for _ in range(3)]
    TrainingRun.objects.filter(pk__in=[r.pk for r in runs]).update(queue_order=1000.0)
    assert queue.move(runs[2], "top")
    ordered = sorted(fresh(*runs), key=lambda r: r.queue_order)
    assert [r.pk for r in ordered] == [runs[2].pk, runs[0].pk, runs[1].pk]


def test_only_the_owner_or_staff_may_reorder_and_only_queued_jobs_move(team: Any, client: Client) -> None:
    run, later = job(team), job(team)
    login(client, "mate")
    assert client.post(f"/runs/{later.pk}/reorder/", {"where": "top"}).status_code == 403
    assert client.get(f"/runs/{later.pk}/reorder/").status_code == 405
    client.logout()
    assert client.post(f"/runs/{later.pk}/reorder/", {"where": "top"}).status_code == 302  # to the login page
    assert fresh(later)[0].queue_order == later.queue_order
    login(client, "staff")
    response = client.post(f"/runs/{later.pk}/reorder/", {"where": "top", "next": "/runs/?state=queued"}, follow=True)
    assert response.redirect_chain[-1][0] == "/runs/?state=queued"
    assert fresh(later)[0].queue_order < fresh(run)[0].queue_order
    response = client.post(f"/runs/{later.pk}/reorder/", {"where": "sideways", "next": "https://evil.example/"}, follow=True)
    assert response.redirect_chain[-1][0] == f"/runs/{later.pk}/"
    assert "Unknown move “sideways”: use one of top, up, down, bottom." in response.content.decode()
    TrainingRun.objects.filter(pk=run.pk).update(state="running")
    response = client.post(f"/runs/{run.pk}/reorder/", {"where": "top"}, follow=True)
    assert "Only a queued run can be moved" in response.content.decode()


def test_adapter_jobs_share_their_owners_queue_and_can_be_reordered_by_the_owner(team: Any, client: Client) -> None:
    users, bases, _, _ = team
    adapter = Adapter.objects.create(name="a", owner=users["owner"], base_model=bases[0], rank=8, uri="store://a",
                                     size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=2)
    run = job(team, gib=None)
    merge = services.start_merge(users["owner"], adapter)
    worker("cpu")
    login(client, "mate")
    assert client.post(f"/jobs/{merge.pk}/reorder/", {"where": "top"}).status_code == 403
    login(client, "owner")
    assert client.post(f"/jobs/{merge.pk}/reorder/", {"where": "top"}).status_code == 302
    schedule_once()
    assert AdapterJob.objects.get(pk=merge.pk).state == "dispatched" and fresh(run)[0].state == "queued"


# --- what the pages show -----------------------------------------------------------------------------------


def test_the_run_page_shows_why_a_queued_run_waits_and_every_attempt(team: Any, client: Client) -> None:
    worker("w", gpus=(24,))
    run = job(team, gib=38)
    schedule_once()
    TrainingRun.objects.filter(pk=run.pk).update(attempt_log=[
        {"attempt": 1, "worker": "<b>gpu-1</b>", "outcome": "lost", "reason": "Worker gpu-1 stopped answering",
         "at": "2025-01-02T03:04:05.000000+00:00"}])
    login(client, "owner")
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "needs ~38 GiB of GPU memory; the largest GPU of an online worker can give a job 23.5 GiB" in page
    assert "Worker gpu-1 stopped answering" in page and "&lt;b&gt;gpu-1&lt;/b&gt;" in page and "<b>gpu-1" not in page
    assert f'action="/runs/{run.pk}/reorder/"' in page
    assert f'action="/runs/{run.pk}/reorder/"' in client.get("/runs/").content.decode()
    login(client, "mate")
    assert f'action="/runs/{run.pk}/reorder/"' not in client.get(f"/runs/{run.pk}/").content.decode()


def test_the_job_page_shows_why_a_queued_adapter_job_waits(team: Any, client: Client) -> None:
    users, bases, _, _ = team
    BaseModel.objects.filter(pk=bases[0].pk).update(num_parameters=8_000_000_000)
    adapter = Adapter.objects.create(name="a", owner=users["owner"], base_model=BaseModel.objects.get(pk=bases[0].pk),
                                     rank=8, uri="store://a", size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=2)
    merge = services.start_merge(users["owner"], adapter)
    worker("w", gpus=(24,))
    schedule_once()
    login(client, "owner")
    page = client.get(f"/jobs/{merge.pk}/").content.decode()
    assert "needs ~36.8 GiB of GPU memory; the largest GPU of an online worker can give a job 23.5 GiB" in page
    assert f'action="/jobs/{merge.pk}/reorder/"' in page


# --- what a job needs, set at creation -------------------------------------------------------------------------


def test_adapter_jobs_need_their_bases_weights_in_bf16_a_merge_in_float32_and_a_push_no_gpu(team: Any, settings: Any) -> None:
    users, bases, _, _ = team
    BaseModel.objects.filter(pk=bases[0].pk).update(num_parameters=8_000_000_000)
    base = BaseModel.objects.get(pk=bases[0].pk)
    adapter = Adapter.objects.create(name="a", owner=users["owner"], base_model=base, rank=8, uri="store://a",
                                     size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=2)
    other = Adapter.objects.create(name="o", owner=users["owner"], base_model=base, rank=8, uri="store://o",
                                   size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=2)
    merge = services.start_merge(users["owner"], adapter)
    combine = services.start_combine(users["owner"], [adapter, other], [1.0, 1.0], "linear")
    settings.HF_TOKEN = "hf_test_token_value"
    push = services.start_push(users["owner"], adapter, adapter.uri, "team/model")
    assert AdapterJob.objects.get(pk=merge.pk).needs_gpu_bytes == int(8e9 * 4 * 1.2 + GiB)
    assert AdapterJob.objects.get(pk=combine.pk).needs_gpu_bytes == int(8e9 * 2 * 1.2 + GiB)
    assert AdapterJob.objects.get(pk=push.pk).needs_gpu_bytes is None
    small = Adapter.objects.create(name="b", owner=users["owner"], base_model=bases[1], rank=8, uri="store://b",
                                   size_bytes=1, sha256="0" * 64, trainable_params=1, total_params=2)
    assert AdapterJob.objects.get(pk=services.start_merge(users["owner"], small).pk).needs_gpu_bytes is None  # size unknown


def _form(base: BaseModel, dataset: Any, config: Any, **overrides: Any) -> dict[str, Any]:
    params = dataclasses.asdict(spec.suggest_train_params(base.num_parameters))
    return {"base_model": base.pk, "dataset": dataset.pk, "lora_config": config.pk,
            **{k: v for k, v in params.items() if not isinstance(v, bool)}, **overrides}


def test_a_new_run_gets_its_estimate_labels_and_priority_and_only_staff_raise_priority(
    tiny_model_dir: Path, store_dir: Path, client: Client, django_user_model: Any, tmp_path: Path
) -> None:
    _user, tiny, dataset, config = demo_objects(tiny_model_dir)
    django_user_model.objects.create_user("boss", password="pw-boss-123", is_staff=True)
    client.login(username="owner", password="owner-pass-123")

    response = client.post("/runs/new/", _form(tiny, dataset, config, worker_labels="a100, Team NLP"))
    assert response.status_code == 400 and "“Team NLP”: a label is a lowercase slug" in response.content.decode()
    response = client.post("/runs/new/", _form(tiny, dataset, config, priority=5))
    assert response.status_code == 400 and "only an admin can set a priority above 0" in response.content.decode()
    response = client.post("/runs/new/", _form(tiny, dataset, config, worker_labels="a100, team-nlp", priority=-1))
    assert response.status_code == 302
    run = TrainingRun.objects.latest("id")
    assert (run.needs_labels, run.priority, run.needs_gpus) == (["a100", "team-nlp"], -1, 1)
    assert run.needs_gpu_bytes is None  # the tiny model is estimated well under 2 GiB: it may run on a CPU

    # A Llama-3.1-8B-shaped base (config only): the engine's estimate, as the catalog's estimate shows it.
    big_dir = tmp_path / "llama-8b-shape"
    big_dir.mkdir()
    (big_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192}))
    big = BaseModel.objects.create(name="llama-8b-shape", source=str(big_dir), model_type="llama", max_positions=8192,
                                   num_parameters=8_030_000_000, linear_modules=tiny.linear_modules)
    client.login(username="boss", password="pw-boss-123")
    response = client.post("/runs/new/", _form(big, dataset, config, priority=5))
    assert response.status_code == 302, response.content.decode()[-3000:]
    run = TrainingRun.objects.latest("id")
    from transformers import AutoConfig

    expected = estimate_for_spec(ModelShape.from_config(AutoConfig.from_pretrained(big_dir)), config.lora_params(),
                                 run.train_params()).estimate.device_total
    assert run.priority == 5 and run.needs_gpu_bytes == expected and run.needs_gpu_bytes > 10 * GiB
    assert client.get(f"/runs/new/?clone={run.pk}").status_code == 200


def test_a_runs_gpu_count_comes_from_its_num_gpus_setting() -> None:
    assert needs.gpus_wanted(spec.build(spec.TrainParams, {"num_gpus": 4})) == 4
    assert needs.gpus_wanted(spec.build(spec.TrainParams, {})) == 1
    assert needs.gpus_wanted(spec.build(spec.TrainParams, {"num_gpus": "two"})) == 1


# --- reservations: a job that waited too long keeps a worker for itself ---------------------------------------


SLOT_IDS = itertools.count(100)


def gpu_slot(name: str, sizes: tuple[float, ...], held: tuple[int, ...] = (), slot_id: int | None = None,
             **fields: Any) -> placement.Slot:
    """A worker as the scheduler reads it: GPUs of these sizes (GiB), `held` busy with one job each."""
    slot = placement.Slot(id=slot_id if slot_id is not None else next(SLOT_IDS), name=name, labels=frozenset(),
                          gpus=tuple(placement.Gpu(index=i, total=int(size * GiB)) for i, size in enumerate(sizes)),
                          **fields)
    for index in held:
        slot.hold([index])
    return slot


def queued(job_id: int, gib: float | None = 10, gpus: int = 1, created: float = 0.0, **fields: Any) -> placement.Job:
    """A queued run of one owner; `job_id` is also its place in that owner's queue."""
    return placement.Job(key=("TrainingRun", job_id), owner=1, created=created, queue_order=float(job_id),
                         needs_gpu_bytes=int(gib * GiB) if gib is not None else None, needs_gpus=gpus, noun="run",
                         **fields)


NOW = 10_000.0  # every job below was queued at 0, long before


def simulate(reserve_after: float | None, steps: int) -> tuple[list[list[tuple[str, list[int]]]], placement.Plan]:
    """A 2-GPU worker busy with two one-GPU jobs, a 2-GPU run first in the queue and a stream of one-GPU runs
    behind it. Each step the job running longest ends and one pass runs; returns what each pass placed."""
    running: list[tuple[str, list[int]]] = [("small 0", [0]), ("small 1", [1])]
    queue = [queued(1, gpus=2)] + [queued(10 + i) for i in range(steps)]
    placed: list[list[tuple[str, list[int]]]] = []
    result = placement.Plan()
    for _ in range(steps):
        running.pop(0)
        slot = gpu_slot("pair", (24, 24))
        for _, gpus in running:
            slot.hold(gpus)
        result = placement.plan(queue, [slot], {}, {}, now=NOW, reserve_after=reserve_after)
        step = [(f"{'wide' if job.key[1] == 1 else 'small'} {job.key[1]}", gpus) for job, _, gpus in result.placements]
        running += step
        placed.append(step)
        done = {job.key for job, _, _ in result.placements}
        queue = [job for job in queue if job.key not in done]
    return placed, result


def test_without_reservations_one_gpu_jobs_take_each_freed_gpu_and_a_two_gpu_job_starves() -> None:
    placed, last = simulate(reserve_after=None, steps=6)
    assert placed == [[("small 10", [0])], [("small 11", [1])], [("small 12", [0])], [("small 13", [1])],
                      [("small 14", [0])], [("small 15", [1])]]
    assert last.reasons[("TrainingRun", 1)] == "waiting for a free GPU (next in line)" and not last.reservations
    placed, _ = simulate(reserve_after=NOW + 1, steps=6)  # not waited long enough yet: the same
    assert [gpus for step in placed for _, gpus in step] == [[0], [1], [0], [1], [0], [1]]


def test_a_reserved_worker_keeps_its_freed_gpu_until_the_two_gpu_job_fits_then_the_small_jobs_resume() -> None:
    placed, _ = simulate(reserve_after=600, steps=4)
    assert placed == [[], [("wide 1", [0, 1])], [("small 10", [0]), ("small 11", [1])], [("small 12", [0])]]
    # The first pass, with GPU 0 free and kept: what each job says.
    slot = gpu_slot("pair", (24, 24), held=(1,))
    plan = placement.plan([queued(1, gpus=2), queued(2), queued(3)], [slot], {}, {}, now=NOW, reserve_after=600)
    assert plan.placements == [] and list(plan.reservations) == [slot.id]
    assert plan.reservations[slot.id].gpus == {0, 1} and not plan.reservations[slot.id].whole
    assert plan.reasons == {
        ("TrainingRun", 1): "next in line: worker pair is kept for it (GPUs 0, 1 fit; 1 of them busy)",
        ("TrainingRun", 2): "waiting: GPUs of pair are kept for run 1, which needs 2 GPUs with ~10 GiB each",
        ("TrainingRun", 3): "waiting: GPUs of pair are kept for run 1, which needs 2 GPUs with ~10 GiB each",
    }


def test_the_wait_counts_from_when_the_job_last_entered_the_queue_and_zero_reserves_at_once() -> None:
    def first_pass(wide: placement.Job, reserve_after: float) -> placement.Plan:
        return placement.plan([wide, queued(2)], [gpu_slot("pair", (24, 24), held=(1,))], {}, {}, now=NOW,
                              reserve_after=reserve_after)

    assert first_pass(queued(1, gpus=2, created=NOW - 599), 600).placements[0][0].key == ("TrainingRun", 2)
    assert first_pass(queued(1, gpus=2, created=NOW - 600), 600).placements == []
    requeued = queued(1, gpus=2, created=0.0, queued=NOW - 30)  # old, but back in the queue 30 s ago
    assert requeued.queued_since == NOW - 30 and first_pass(requeued, 600).placements[0][0].key == ("TrainingRun", 2)
    assert first_pass(queued(1, gpus=2, created=NOW), 0).placements == []


def test_other_workers_and_the_reserved_workers_gpus_that_do_not_fit_the_job_stay_open() -> None:
    mixed = gpu_slot("mixed", (80, 80, 24), held=(0,))
    single = gpu_slot("single", (24,))
    jobs = [queued(1, gib=40, gpus=2), queued(2), queued(3), queued(4)]
    plan = placement.plan(jobs, [mixed, single], {}, {}, now=NOW, reserve_after=0)
    assert [(job.key[1], slot.name, gpus) for job, slot, gpus in plan.placements] == [(2, "single", [0]), (3, "mixed", [2])]
    assert plan.reservations[mixed.id].gpus == {0, 1}  # the 24 GiB GPU cannot hold 40 GiB: not kept
    assert plan.reasons[("TrainingRun", 1)] == "next in line: worker mixed is kept for it (GPUs 0, 1 fit; 1 of them busy)"
    assert plan.reasons[("TrainingRun", 4)] == (
        "waiting: GPUs of mixed are kept for run 1, which needs 2 GPUs with ~40 GiB each")


def test_jobs_ahead_in_the_order_are_never_held_back_by_a_reservation() -> None:
    pair = gpu_slot("pair", (24, 24), held=(0,))
    urgent = placement.Job(key=("AdapterJob", 7), owner=2, created=NOW, priority=5, needs_gpu_bytes=10 * GiB, noun="job")
    plan = placement.plan([queued(1, gpus=2), queued(2), urgent], [pair], {}, {}, now=NOW, reserve_after=0)
    assert [(job.key, gpus) for job, _, gpus in plan.placements] == [(("AdapterJob", 7), [1])]
    assert plan.reasons[("TrainingRun", 1)] == "next in line: worker pair is kept for it (GPUs 0, 1 fit; 2 of them busy)"
    assert plan.reasons[("TrainingRun", 2)] == "waiting for a free GPU (1 job ahead)"  # both busy: no reservation to blame


def test_a_gpu_kept_for_a_job_waiting_on_memory_used_outside_tunedeck_says_so_and_names_the_job_by_its_noun() -> None:
    shared = placement.Slot(id=1, name="shared", labels=frozenset(),
                            gpus=(placement.Gpu(index=0, total=40 * GiB, free=15 * GiB), placement.Gpu(index=1, total=24 * GiB)))
    shared.hold([1])
    big = placement.Job(key=("AdapterJob", 8), owner=1, created=0.0, needs_gpu_bytes=30 * GiB, noun="job")
    plan = placement.plan([big, queued(2, gib=10)], [shared], {}, {}, now=NOW, reserve_after=0)
    assert plan.placements == []  # the run would fit in the 15 GiB left on GPU 0, but that GPU is kept
    assert plan.reasons == {
        ("AdapterJob", 8): "next in line: worker shared is kept for it (GPU 0 fits; waiting for GPU memory used outside Tunedeck)",
        ("TrainingRun", 2): "waiting: GPUs of shared are kept for job 8, which needs ~30 GiB of GPU memory",
    }


def test_at_most_one_reservation_per_worker_and_starving_jobs_reserve_different_workers_in_order() -> None:
    a, b = gpu_slot("a", (24, 24), held=(0, 1), slot_id=1), gpu_slot("b", (24, 24), held=(0,), slot_id=2)
    jobs = [queued(1, gpus=2), queued(2, gpus=2), queued(3, gpus=2), queued(4)]
    plan = placement.plan(jobs, [a, b], {}, {}, now=NOW, reserve_after=0)
    assert {slot_id: r.job.key[1] for slot_id, r in plan.reservations.items()} == {2: 1, 1: 2}  # fewest busy first
    assert plan.placements == []
    assert plan.reasons == {
        ("TrainingRun", 1): "next in line: worker b is kept for it (GPUs 0, 1 fit; 1 of them busy)",
        ("TrainingRun", 2): "1 job ahead: worker a is kept for it (GPUs 0, 1 fit; 2 of them busy)",
        ("TrainingRun", 3): "waiting for a free GPU (2 jobs ahead)",
        ("TrainingRun", 4): "waiting: GPUs of b are kept for run 1, which needs 2 GPUs with ~10 GiB each",
    }


def test_a_worker_whose_job_limit_is_below_its_gpu_count_takes_no_new_job_while_reserved() -> None:
    capped = gpu_slot("capped", (80, 80, 24), held=(0,), max_jobs=2)
    plan = placement.plan([queued(1, gib=40, gpus=2), queued(2)], [capped], {}, {}, now=NOW, reserve_after=0)
    assert plan.placements == [] and plan.reservations[capped.id].whole
    assert plan.reasons[("TrainingRun", 2)] == "waiting: worker capped is kept for run 1, which needs 2 GPUs with ~40 GiB each"
    capped.hold([2])  # at its limit: the reserved job also waits for a job to end
    plan = placement.plan([queued(1, gib=40, gpus=2)], [capped], {}, {}, now=NOW, reserve_after=0)
    assert plan.reasons[("TrainingRun", 1)] == (
        "next in line: worker capped is kept for it (GPUs 0, 1 fit; 1 of them busy; the worker runs its limit of 2 jobs)")


def test_the_reservation_goes_where_the_fewest_busy_gpus_must_free_up() -> None:
    busy = gpu_slot("a-busy", (80, 80), held=(0, 1), slot_id=1)
    half = gpu_slot("b-half", (80, 80, 80, 80), held=(0, 1, 2), slot_id=2)
    small = gpu_slot("c-small", (24, 24, 24), held=(0, 1, 2), slot_id=3)
    plan = placement.plan([queued(1, gib=20, gpus=2)], [busy, half, small], {}, {}, now=NOW, reserve_after=0)
    assert list(plan.reservations) == [2]  # one GPU to free; the other two need two
    assert plan.reasons[("TrainingRun", 1)] == "next in line: worker b-half is kept for it (GPUs 0, 1, 2, 3 fit; 3 of them busy)"
    half.held.discard(2)
    half.held.add(3)
    plan = placement.plan([queued(1, gib=20, gpus=2)], [busy, small], {}, {}, now=NOW, reserve_after=0)
    assert list(plan.reservations) == [3]  # a tie (two to free): the smaller GPUs that fit, as placement prefers


def test_a_reservation_through_the_database_keeps_the_freed_gpu_and_places_the_two_gpu_run(team: Any, settings: Any) -> None:
    settings.RESERVE_AFTER = 0
    worker("pair", gpus=(24, 24))
    worker("single", gpus=(24,))
    running = [job(team), job(team), job(team)]
    schedule_once()
    assert [where(r) for r in running] == [("pair", [0]), ("single", [0]), ("pair", [1])]
    wide = job(team, gpus=2)
    smalls = [job(team) for _ in range(2)]
    finish(running[0])
    schedule_once()
    wide, *smalls = fresh(wide, *smalls)
    assert wide.state == "queued" and all(s.state == "queued" for s in smalls)
    assert wide.wait_reason == "next in line: worker pair is kept for it (GPUs 0, 1 fit; 1 of them busy)"
    assert smalls[0].wait_reason == f"waiting: GPUs of pair are kept for run {wide.pk}, which needs 2 GPUs with ~4 GiB each"
    finish(running[1])  # the other worker frees up: a small job may run there
    schedule_once()
    assert where(smalls[0]) == ("single", [0]) and fresh(smalls[1])[0].state == "queued"
    finish(running[2])
    schedule_once()
    assert where(wide) == ("pair", [0, 1]) and fresh(smalls[1])[0].state == "queued"
    assert fresh(smalls[1])[0].wait_reason == "waiting for a free GPU (next in line)"


def busy_pair_and_a_wide_run(team: Any, settings: Any) -> tuple[list[TrainingRun], TrainingRun]:
    """A 2-GPU worker running two 1-GPU runs, and a 2-GPU run queued behind them (reservations after 600 s)."""
    settings.RESERVE_AFTER = 600
    worker("pair", gpus=(24, 24))
    running = [job(team), job(team)]
    schedule_once()
    return running, job(team, gpus=2)


def test_without_waiting_long_enough_the_freed_gpu_goes_to_a_small_job_and_a_requeue_restarts_the_wait(
    team: Any, settings: Any
) -> None:
    running, wide = busy_pair_and_a_wide_run(team, settings)
    small = job(team)
    # Created two hours ago, but lost its worker and came back to the queue a minute ago.
    TrainingRun.objects.filter(pk=wide.pk).update(
        created_at=timezone.now() - timedelta(hours=2), queued_at=timezone.now() - timedelta(seconds=60))
    finish(running[0])
    schedule_once()
    assert where(small) == ("pair", [0])
    assert fresh(wide)[0].wait_reason == "waiting for a free GPU (next in line)"
    TrainingRun.objects.filter(pk=wide.pk).update(queued_at=timezone.now() - timedelta(seconds=601))
    later = job(team)
    finish(running[1])
    schedule_once()
    assert fresh(later)[0].state == "queued"
    assert fresh(wide)[0].wait_reason == "next in line: worker pair is kept for it (GPUs 0, 1 fit; 1 of them busy)"


def test_a_one_gpu_job_takes_the_first_gpu_that_frees_anyway_so_it_leaves_the_reservation_to_a_wider_job() -> None:
    pair = gpu_slot("pair", (24, 24), held=(0, 1))
    plan = placement.plan([queued(1), queued(2, gpus=2), queued(3)], [pair], {}, {}, now=NOW, reserve_after=0)
    assert {r.job.key[1] for r in plan.reservations.values()} == {2}
    assert plan.reasons[("TrainingRun", 1)] == "waiting for a free GPU (next in line)"
    assert plan.reasons[("TrainingRun", 2)] == "1 job ahead: worker pair is kept for it (GPUs 0, 1 fit; 2 of them busy)"


def test_a_requeue_or_a_retry_restarts_the_wait_and_an_old_retried_run_does_not_reserve_at_once(
    team: Any, settings: Any
) -> None:
    running, wide = busy_pair_and_a_wide_run(team, settings)
    # Created two hours ago and failed; retried now: its wait for a reservation starts at the retry.
    TrainingRun.objects.filter(pk=wide.pk).update(created_at=timezone.now() - timedelta(hours=2), state="failed")
    before = timezone.now()
    assert ledger.retry(fresh(wide)[0], "owner")
    assert fresh(wide)[0].queued_at >= before
    small = job(team)
    finish(running[0])
    schedule_once()
    assert where(small) == ("pair", [0])  # no reservation yet: the small job takes the freed GPU
    assert fresh(wide)[0].wait_reason == "waiting for a free GPU (next in line)"

    # A lost worker's job comes back to the queue with the time of the requeue.
    lost = fresh(running[1])[0]
    before = timezone.now()
    assert ledger.requeue_or_fail(lost, "Worker pair stopped answering", max_attempts=3) == "queued"
    assert fresh(lost)[0].queued_at >= before


def test_a_job_handed_back_by_its_worker_goes_elsewhere_if_another_worker_can_take_it(team: Any, settings: Any) -> None:
    """A worker that could not run a job (a full disk: it reports `requeue`) does not get it straight back while
    another worker could take it; with no other worker able to, it may."""
    settings.MAX_ATTEMPTS = 5
    worker("w1", gpus=(80,))
    worker("w2", gpus=(80,))
    run = job(team)
    schedule_once()
    assert where(run)[0] == "w1"

    def hand_back() -> None:
        (current,) = fresh(run)
        ledger.record_status(current, current.attempt, ledger.REQUEUE, {}, "the worker's disk is full")

    hand_back()
    (queued,) = fresh(run)
    assert queued.state == "queued" and queued.attempt_log[-1]["outcome"] == "could not run"
    blocker = job(team, owner="mate")  # w2 busy: the job waits for it rather than going back to w1
    Worker.objects.filter(name="w1").update(state="draining")
    schedule_once()
    Worker.objects.filter(name="w1").update(state="online")
    assert where(blocker)[0] == "w2"
    schedule_once()
    assert where(run) == (None, []) and fresh(run)[0].state == "queued"
    finish(blocker)
    schedule_once()
    assert where(run)[0] == "w2"

    hand_back()  # and from w2, back to w1
    schedule_once()
    assert where(run)[0] == "w1"
    Worker.objects.filter(name="w2").update(state="draining")  # the only worker left is the one it failed on
    hand_back()
    schedule_once()
    assert where(run)[0] == "w1" and fresh(run)[0].failures == 3
