"""The training pages: runs list (filters, sort, pages, live rows), run detail, actions and the adapters list."""

from __future__ import annotations

import re
import shutil

import pytest
from django.contrib.messages import get_messages

from tests.webapp.factories import run_world
from tests.webapp.team import login, make
from webapp.fleet.models import Worker
from webapp.jobs import ledger
from webapp.playground import deletion
from webapp.playground.models import AdapterJob, Comparison, MergedModel
from webapp.training.models import Adapter, AdapterParent, RunEvent, TrainingRun
from webapp.training.views import next_batch
from workers.formatting import size

pytestmark = pytest.mark.django_db
HOSTILE = ['<img src=x onerror=alert(1)>', '<div hx-get=/x>']


def ids_on(page: str) -> list[int]:
    return [int(i) for i in re.findall(r'id="run-(\d+)-state"', page)]


# ---- runs list ---------------------------------------------------------------------------------

def test_it_filters_by_state_owner_base_model_and_dataset_and_keeps_the_values(team, client) -> None:  # type: ignore[no-untyped-def]
    users, bases, datasets, _ = team
    a = make(team, state="failed")
    b = make(team, owner="mate", base=1)
    c = make(team, data=1, state="running")
    login(client, "mate")
    assert ids_on(client.get("/runs/", {"state": "failed"}).content.decode()) == [a.pk]
    assert ids_on(client.get("/runs/", {"owner": users["mate"].pk}).content.decode()) == [b.pk]
    assert ids_on(client.get("/runs/", {"base_model": bases[1].pk}).content.decode()) == [b.pk]
    page = client.get("/runs/", {"dataset": datasets[1].pk, "state": "running"}).content.decode()
    assert ids_on(page) == [c.pk]
    assert '<option value="running" selected>' in page
    assert re.search(rf'<option value="{datasets[1].pk}" selected>', page)
    # A bad value is ignored rather than an error page.
    assert sorted(ids_on(client.get("/runs/", {"state": "bogus", "owner": "x"}).content.decode())) == [a.pk, b.pk, c.pk]


def test_it_sorts_by_loss_name_step_and_created_with_missing_losses_last(team, client) -> None:  # type: ignore[no-untyped-def]
    r1 = make(team, name="beta", last_loss=0.5, step=30)
    r2 = make(team, name="alpha", last_loss=None, step=10)
    r3 = make(team, name="gamma", last_loss=0.1, step=20)
    login(client, "owner")
    assert ids_on(client.get("/runs/").content.decode()) == [r3.pk, r2.pk, r1.pk]  # newest first
    assert ids_on(client.get("/runs/", {"sort": "created"}).content.decode()) == [r1.pk, r2.pk, r3.pk]
    assert ids_on(client.get("/runs/", {"sort": "loss"}).content.decode()) == [r3.pk, r1.pk, r2.pk]
    assert ids_on(client.get("/runs/", {"sort": "-loss"}).content.decode()) == [r1.pk, r3.pk, r2.pk]
    assert ids_on(client.get("/runs/", {"sort": "name"}).content.decode()) == [r2.pk, r1.pk, r3.pk]
    assert ids_on(client.get("/runs/", {"sort": "-step"}).content.decode()) == [r1.pk, r3.pk, r2.pk]


def test_pages_cover_every_run_once_and_links_keep_the_filters(team, client) -> None:  # type: ignore[no-untyped-def]
    runs = [make(team, state="failed") for _ in range(120)] + [make(team, state="succeeded")]
    login(client, "owner")
    seen: list[int] = []
    for number in (1, 2, 3):
        page = client.get("/runs/", {"state": "failed", "sort": "step", "page": number}).content.decode()
        seen += ids_on(page)
    assert sorted(seen) == sorted(r.pk for r in runs[:120]) and len(seen) == 120
    first = client.get("/runs/", {"state": "failed", "sort": "step"}).content.decode()
    assert "?state=failed&amp;sort=step&amp;page=2" in first and "page 1 of 3" in first


def test_the_rows_partial_polls_only_while_a_visible_run_is_active(team, client) -> None:  # type: ignore[no-untyped-def]
    make(team, state="succeeded")
    login(client, "owner")
    rows = client.get("/runs/", headers={"HX-Request": "true"}).content.decode()
    assert rows.lstrip().startswith('<tbody id="runs-rows"') and "<html" not in rows and "hx-trigger" not in rows
    running = make(team, state="running")
    rows = client.get("/runs/", {"state": "running"}, headers={"HX-Request": "true"}).content.decode()
    assert 'hx-trigger="every 3s"' in rows and 'hx-get="/runs/?state=running"' in rows
    assert f'id="run-{running.pk}-state">running<' in rows
    # Filtered to finished runs only: nothing on the page can change, so no polling.
    page = client.get("/runs/", {"state": "succeeded"}).content.decode()
    assert "hx-trigger" not in page


def test_the_runs_list_query_count_does_not_grow_with_runs(team, client, django_assert_max_num_queries) -> None:  # type: ignore[no-untyped-def]
    login(client, "owner")
    make(team)
    with django_assert_max_num_queries(10):
        client.get("/runs/")
    for i in range(60):
        make(team, owner="mate" if i % 2 else "owner", base=i % 2, data=i % 2, state="running")
    with django_assert_max_num_queries(10):
        assert client.get("/runs/", {"sort": "loss", "page": 2}).status_code == 200


# ---- new run ------------------------------------------------------------------------------------

def _selected(page: str, field: str) -> list[str]:
    select = page[page.index(f'name="{field}"'):]
    return re.findall(r'<option value="(\d+)"[^>]* selected[ >]', select[:select.index("</select>")])


def test_the_new_run_page_preselects_the_only_choice_else_the_demos(team, client) -> None:  # type: ignore[no-untyped-def]
    from webapp.catalog.demo import DEMO_DATASET

    _, _, datasets, config = team
    login(client, "owner")
    page = client.get("/runs/new/").content.decode()
    assert _selected(page, "lora_config") == [str(config.pk)]  # the only one
    assert _selected(page, "dataset") == []  # two, neither the demo's: the user chooses
    assert _selected(page, "eval_dataset") == []  # optional: never chosen for the user
    datasets[1].name = DEMO_DATASET
    datasets[1].save()
    assert _selected(client.get("/runs/new/").content.decode(), "dataset") == [str(datasets[1].pk)]


# ---- run detail ----------------------------------------------------------------------------------

def add_events(run: TrainingRun, n: int) -> None:
    """What a worker reports, through the ledger as the worker API stores it."""
    from webapp.jobs.ledger import record_events

    events = []
    for i in range(n):
        events.append({"seq": 3 * i, "kind": "log", "message": f"line {i}"})
        events.append({"seq": 3 * i + 1, "kind": "metric", "data": {
            "step": i + 1, "total_steps": n, "loss": 2.0 / (i + 1), "learning_rate": 1e-4, "grad_norm": 0.5,
            "tokens_per_s": 1000 + i, **({"eval_loss": 1.5} if i % 5 == 0 else {})}})
        if i % 10 == 0:
            events.append({"seq": 3 * i + 2, "kind": "checkpoint", "data": {"step": i + 1},
                           "message": f"Checkpoint saved at step {i + 1}"})
    record_events(run, run.attempt, events)
    run.refresh_from_db()


def test_the_run_page_shows_config_charts_checkpoints_and_worker(team, client) -> None:  # type: ignore[no-untyped-def]
    worker = Worker.objects.create(name="gpu-7", state="online")
    run = make(team, state="running", attempt=1, worker=worker, step=30, total_steps=30)
    add_events(run, 30)
    login(client, "mate")
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert "learning_rate" in page and "cfg" in page and "gpu-7" in page
    for title in ("Loss", "Learning rate", "Grad norm", "Throughput"):
        assert f"<strong>{title}</strong>" in page
    # Drawn by charts.js from the run's metrics.json; without script each caption keeps the latest values.
    assert page.count('<span class="legend') == 5  # train + eval loss, lr, grad norm, tokens/s
    assert 'class="legend series eval"' in page and "train: 0.0667" in page
    assert f'data-metrics-url="/runs/{run.pk}/metrics.json"' in page and "tunedeck/charts.js" in page
    # Three saved, the trainer's default keep_checkpoints (2) kept on disk.
    assert "Checkpoints (2)" in page and "1 earlier checkpoint removed" in page and "latest: a retry resumes here" in page
    assert "tunedeck/training.js" in page and "<script>" not in page and "style=" not in page
    assert 'id="log-search"' in page and 'id="follow"' in page
    # A line's class must not be the bare "log" of its box (it took the box's 360px height).
    assert 'class="line kind-log info"' in page and 'class="line log' not in page
    # The same view serves the status partial to htmx.
    partial = client.get(f"/runs/{run.pk}/", headers={"HX-Request": "true"}).content.decode()
    assert "<html" not in partial and 'id="run-state"' in partial


def test_the_run_page_query_count_does_not_grow_with_events(team, client, django_assert_max_num_queries) -> None:  # type: ignore[no-untyped-def]
    run = make(team, state="running", attempt=1)
    add_events(run, 3)
    login(client, "owner")
    with django_assert_max_num_queries(12):
        client.get(f"/runs/{run.pk}/")
    add_events_more = [RunEvent(run=run, attempt=2, seq=i, kind="log", message="x") for i in range(400)]
    RunEvent.objects.bulk_create(add_events_more)
    with django_assert_max_num_queries(12):
        assert client.get(f"/runs/{run.pk}/").status_code == 200


def test_hostile_log_text_is_text_on_the_page_and_in_the_stream(team, client) -> None:  # type: ignore[no-untyped-def]
    run = make(team, state="failed", attempt=1, error=HOSTILE[0])
    RunEvent.objects.bulk_create([RunEvent(run=run, attempt=1, seq=i, kind="log", message=m) for i, m in enumerate(HOSTILE)])
    login(client, "mate")
    page = client.get(f"/runs/{run.pk}/").content.decode()
    # The stream's messages, as its generator yields them (the view runs them in a worker thread,
    # which would not see this test's uncommitted rows).
    messages, _, _, final = next_batch(run.pk, 0)
    body = "".join(messages)
    assert final
    for text in (page, body):
        assert "<img src=x" not in text and "<div hx-get=/x>" not in text
        assert "&lt;img src=x onerror=alert(1)&gt;" in text and "&lt;div hx-get=/x&gt;" in text
    assert body.count("event: log") == 2 and "event: status" in body


def test_the_stream_sends_the_last_lines_committed_with_the_final_state(team) -> None:  # type: ignore[no-untyped-def]
    """A worker's last log lines and its final state can commit while the stream polls. Whatever order they land
    in, the stream must not end ("done") without the lines stored before the state became final."""
    from django.db import connection

    run = make(team, state="running", attempt=1)
    RunEvent.objects.create(run=run, attempt=1, seq=1, kind="log", message="step 1")
    table = TrainingRun._meta.db_table
    landed = []

    def land_before_the_state_is_read(execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        if not landed and sql.lstrip().upper().startswith("SELECT") and table in sql and '"state"' in sql:
            landed.append(True)  # the worker's last line, then its final state, between two reads of the poll
            RunEvent.objects.create(run=run, attempt=1, seq=2, kind="log", message="the last line")
            TrainingRun.objects.filter(pk=run.pk).update(state="succeeded")
        return execute(sql, params, many, context)

    sent, after, mark, final = [], 0, None, False
    with connection.execute_wrapper(land_before_the_state_is_read):
        while not final:
            messages, after, mark, final = next_batch(run.pk, after, mark)
            sent += messages
    assert landed and mark == ("succeeded", "")
    assert "the last line" in "".join(sent), "the stream ended without the line stored before the final state"


def test_a_queued_run_s_page_follows_its_wait_reason_live(team) -> None:  # type: ignore[no-untyped-def]
    """The scheduler changes a queued job's wait reason, not its state nor its events: the feed and the stream
    must see that too, or the page keeps saying why it waited when it opened."""
    from webapp.jobs.live import Watch, signatures

    run = make(team)  # queued
    messages, after, mark, final = next_batch(run.pk, 0)
    assert not final and mark == ("queued", "")
    watch = Watch(after)
    watch.read(mark, after)
    assert not watch.behind(signatures(TrainingRun, [run.pk])[run.pk])
    TrainingRun.objects.filter(pk=run.pk).update(wait_reason="needs labels a100; no online worker has them all")
    assert watch.behind(signatures(TrainingRun, [run.pk])[run.pk])  # the stream is woken
    messages, _, mark, _ = next_batch(run.pk, after, mark)
    panel = "".join(m for m in messages if m.startswith("event: status"))
    assert "needs labels a100; no online worker has them all" in panel
    assert mark == ("queued", "needs labels a100; no online worker has them all")


# ---- actions and permissions -----------------------------------------------------------------------

@pytest.mark.parametrize("action", ["cancel", "retry", "delete"])
def test_a_teammate_sees_the_run_but_may_not_act_on_it(team, client, action) -> None:  # type: ignore[no-untyped-def]
    run = make(team, state="failed" if action != "cancel" else "running")
    login(client, "mate")
    page = client.get(f"/runs/{run.pk}/").content.decode()
    assert page and 'id="retry-run"' not in page and 'id="delete-run"' not in page and 'id="cancel-run"' not in page
    assert client.post(f"/runs/{run.pk}/{action}/").status_code == 403
    if action == "delete":
        assert client.get(f"/runs/{run.pk}/delete/").status_code == 403
    run.refresh_from_db()
    assert TrainingRun.objects.filter(pk=run.pk).exists() and not run.cancel_requested and run.state != "queued"


@pytest.mark.parametrize("path", ["", "cancel/", "retry/", "delete/", "status/"])
def test_someone_not_logged_in_is_sent_to_log_in(team, client, path) -> None:  # type: ignore[no-untyped-def]
    run = make(team, state="failed")
    response = client.post(f"/runs/{run.pk}/{path}") if path in ("cancel/", "retry/", "delete/") else client.get(f"/runs/{run.pk}/{path}")
    assert response.status_code == 302 and "/login/" in response["Location"]
    assert client.get("/runs/").status_code == 302 and client.get("/adapters/").status_code == 302
    assert TrainingRun.objects.get(pk=run.pk).state == "failed"


@pytest.mark.parametrize("who", ["owner", "staff"])
def test_the_owner_or_staff_can_cancel_retry_and_delete(team, client, who) -> None:  # type: ignore[no-untyped-def]
    login(client, who)
    queued = make(team)
    client.post(f"/runs/{queued.pk}/cancel/")
    assert TrainingRun.objects.get(pk=queued.pk).state == "cancelled"
    client.post(f"/runs/{queued.pk}/retry/")
    assert TrainingRun.objects.get(pk=queued.pk).state == "queued"
    done = make(team, state="succeeded")
    assert client.post(f"/runs/{done.pk}/delete/").status_code == 302
    assert not TrainingRun.objects.filter(pk=done.pk).exists()


def test_retry_moves_a_failed_run_back_to_queued_keeping_the_attempt_for_the_scheduler(team, client) -> None:  # type: ignore[no-untyped-def]
    worker = Worker.objects.create(name="w", state="online")
    run = make(team, state="failed", attempt=2, worker=worker, error="CUDA out of memory", cancel_requested=True)
    login(client, "owner")
    assert 'id="retry-run"' in client.get(f"/runs/{run.pk}/").content.decode()
    response = client.post(f"/runs/{run.pk}/retry/")
    assert response.status_code == 302
    run.refresh_from_db()
    assert (run.state, run.attempt, run.worker_id, run.error, run.cancel_requested, run.finished_at) == (
        "queued", 2, None, "", False, None)
    assert RunEvent.objects.filter(run=run, kind="status", message__contains="Retry requested").exists()
    assert ledger.dispatch(run, worker) == 3  # the scheduler bumps it; attempt 2's reports are now stale
    # A run that is not failed or cancelled is not retried.
    done = make(team, state="succeeded", attempt=1)
    client.post(f"/runs/{done.pk}/retry/")
    assert TrainingRun.objects.get(pk=done.pk).state == "succeeded"


def test_delete_asks_first_then_removes_events_and_adapter_and_refuses_an_active_run(team, client) -> None:  # type: ignore[no-untyped-def]
    run = make(team, state="running", attempt=1)
    add_events(run, 5)
    TrainingRun.objects.filter(pk=run.pk).update(state="succeeded")
    Adapter.objects.create(run=run, uri="file:///a", size_bytes=10, sha256="0" * 64, trainable_params=1, total_params=10)
    login(client, "owner")
    confirm = client.get(f"/runs/{run.pk}/delete/")
    assert confirm.status_code == 200 and 'id="confirm-delete"' in confirm.content.decode()
    assert TrainingRun.objects.filter(pk=run.pk).exists()  # a GET deletes nothing
    assert client.post(f"/runs/{run.pk}/delete/").status_code == 302
    assert not TrainingRun.objects.filter(pk=run.pk).exists()
    assert not RunEvent.objects.filter(run_id=run.pk).exists() and not Adapter.objects.filter(run_id=run.pk).exists()
    active = make(team, state="running", attempt=1)
    assert 'id="confirm-delete"' not in client.get(f"/runs/{active.pk}/delete/").content.decode()
    client.post(f"/runs/{active.pk}/delete/")
    assert TrainingRun.objects.filter(pk=active.pk).exists()


def test_deleting_a_run_lists_what_goes_with_sizes_then_frees_its_files_after_the_commit(  # type: ignore[no-untyped-def]
    team, client, store_dir, django_capture_on_commit_callbacks
) -> None:
    users, bases, datasets, config = team
    world = run_world(store_dir, users["owner"], bases[0], datasets[0], config)
    login(client, "owner")
    page = client.get(f"/runs/{world.run.pk}/delete/").content.decode()
    assert 'id="confirm-delete"' in page
    goes = page[page.index('id="deleted"'):page.index('id="kept"')]
    kept = page[page.index('id="kept"'):]
    # What goes: the adapter, the verified merged model and its job, the folders with their sizes and the total.
    assert "doomed" in goes and f"merge job {world.merge.pk}" in goes.lower() and "verified" in goes
    assert f"store://runs/{world.run.pk}" in goes and f"store://jobs/{world.merge.pk}" in goes
    assert "2 checkpoints" in goes and size(world.freed_bytes) in goes
    assert size(world.merged.size_bytes) in goes
    # What stays, saying the adapter is gone: the comparison's column, the evaluation, the combined adapter.
    assert "doomed vs survivor" in kept and f"evaluate job {world.evaluation.pk}" in kept.lower() and "blend" in kept
    assert "survivor" not in goes

    with django_capture_on_commit_callbacks() as callbacks:
        deleted = client.post(f"/runs/{world.run.pk}/delete/")
        assert deleted.status_code == 302
    assert world.run_folder.is_dir() and world.merge_folder.is_dir()  # nothing leaves the disk before the commit
    flashed = [str(message) for message in get_messages(deleted.wsgi_request)]
    assert f"{size(world.freed_bytes)} freed" in " ".join(flashed), flashed  # in the units the pages use
    for callback in callbacks:
        callback()
    assert not world.run_folder.exists() and not world.merge_folder.exists()
    assert world.outside.read_bytes() == b"not the store's"  # a link inside the run's folder: the link went, not its target
    assert (store_dir / "runs" / str(world.other.run_id)).is_dir() and (store_dir / "jobs" / str(world.combine.pk)).is_dir()

    assert not TrainingRun.objects.filter(pk=world.run.pk).exists() and not RunEvent.objects.filter(run_id=world.run.pk).exists()
    assert not Adapter.objects.filter(pk=world.adapter.pk).exists()
    assert not MergedModel.objects.filter(pk=world.merged.pk).exists() and not AdapterJob.objects.filter(pk=world.merge.pk).exists()
    comparison = Comparison.objects.get(pk=world.comparison.pk)
    labels = dict(comparison.columns())
    assert labels[world.adapter.key] == "doomed (adapter deleted)" and labels[world.other.key] == "survivor"
    assert comparison.cells.filter(column=world.adapter.key, text=f"{world.adapter.key} says 0").exists()
    evaluation = AdapterJob.objects.get(pk=world.evaluation.pk)
    assert [a["label"] for a in evaluation.params["adapters"]] == ["doomed (adapter deleted)", "survivor"]
    assert evaluation.params["held_out_of_deleted"] is True
    link = AdapterParent.objects.get(child=world.blend, parent_name="doomed")
    assert link.parent_id is None and link.weight == 0.5
    lineage = client.get(f"/adapters/{world.blend.pk}/").content.decode()
    assert "doomed (deleted)" in lineage
    held_out = client.get(f"/jobs/{world.evaluation.pk}/").content.decode()
    assert f"run {world.run.pk} (deleted)" in held_out and f'href="/runs/{world.run.pk}/"' not in held_out


def test_a_run_whose_adapter_a_job_still_reads_is_not_deleted(team, client, store_dir) -> None:  # type: ignore[no-untyped-def]
    users, bases, datasets, config = team
    world = run_world(store_dir, users["owner"], bases[0], datasets[0], config)
    AdapterJob.objects.filter(pk=world.comparison.job_id).update(state="running", attempt=2)
    login(client, "owner")
    page = client.get(f"/runs/{world.run.pk}/delete/").content.decode()
    assert 'id="confirm-delete"' not in page and f"compare job {world.comparison.job_id}" in page.lower()
    client.post(f"/runs/{world.run.pk}/delete/")
    assert TrainingRun.objects.filter(pk=world.run.pk).exists() and world.run_folder.is_dir()


@pytest.mark.parametrize("target", ["another run's folder", "a folder outside the store"])
def test_a_run_whose_folder_is_a_link_loses_the_link_only(  # type: ignore[no-untyped-def]
    team, client, store_dir, tmp_path, django_capture_on_commit_callbacks, target
) -> None:
    users, bases, datasets, config = team
    world = run_world(store_dir, users["owner"], bases[0], datasets[0], config)
    if target == "another run's folder":
        pointed = store_dir / "runs" / str(world.other.run_id)
    else:
        pointed = tmp_path / "elsewhere"
        shutil.copytree(world.run_folder, pointed, symlinks=True)
    shutil.rmtree(world.run_folder)
    world.run_folder.symlink_to(pointed, target_is_directory=True)
    files = {path: path.read_bytes() for path in pointed.rglob("*") if path.is_file() and not path.is_symlink()}
    # The link is listed as the run's folder, with nothing under it counted: what it points to is not the run's.
    planned = {folder.uri: folder.bytes for folder in deletion.plan(world.run).folders}
    assert planned[f"store://runs/{world.run.pk}"] == 0
    assert not any(uri.startswith(f"store://runs/{world.other.run_id}") for uri in planned)
    login(client, "owner")
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post(f"/runs/{world.run.pk}/delete/").status_code == 302
    assert not TrainingRun.objects.filter(pk=world.run.pk).exists()
    assert not world.run_folder.is_symlink() and not world.run_folder.exists()  # the link went
    assert {path: path.read_bytes() for path in files if path.is_file()} == files  # what it pointed to stayed
    assert not world.merge_folder.exists()


# ---- adapters ----------------------------------------------------------------------------------------

def test_the_adapters_page_shows_lineage_metrics_and_a_download_without_n_plus_one(  # type: ignore[no-untyped-def]
        team, client, django_assert_max_num_queries) -> None:
    def adapter(i: int) -> Adapter:
        run = make(team, base=i % 2, data=i % 2, state="succeeded", name=f"run-{i}")
        return Adapter.objects.create(run=run, name=run.name, owner=run.owner, base_model=run.base_model,
                                      uri=f"file:///a{i}", size_bytes=2048, sha256="0" * 64,
                                      trainable_params=1000, total_params=1_000_000, final_loss=0.25,
                                      metrics={"final_loss": 0.25, "eval_loss": 0.375})
    first = adapter(0)
    login(client, "mate")
    with django_assert_max_num_queries(8):
        page = client.get("/adapters/").content.decode()
    assert "run-0" in page and "base-0" in page and "data-0" in page and "cfg" in page
    assert "0.25" in page and "0.375" in page and "2.0 KiB" in page and "(0.1%)" in page
    assert f"/adapters/{first.pk}/download.zip" in page and f"/runs/{first.run_id}/" in page
    assert 'formaction="/compare/new/"' in page and f'name="adapters" value="{first.pk}"' in page
    for i in range(1, 30):
        adapter(i)
    with django_assert_max_num_queries(8):
        assert client.get("/adapters/").status_code == 200


def test_metric_points_merge_resumed_attempts_and_stay_bounded() -> None:
    from webapp.training.metrics import MAX_METRIC_POINTS, merge_points

    points = merge_points([], [{"step": s, "loss": 10.0 - s / 10} for s in range(1, 11)])
    points = merge_points(points, [{"step": 10, "eval_loss": 9.5}])  # an eval point at a trained step merges
    assert len(points) == 10 and points[-1] == {"step": 10, "loss": 9.0, "eval_loss": 9.5}
    # Attempt 2 from a checkpoint at step 4: what came after is dropped, its own steps follow.
    resumed = merge_points(points, [{"step": 4, "restart": True}, {"step": 5, "loss": 1.0}, {"step": 6, "loss": 0.9}])
    assert [p["step"] for p in resumed] == [1, 2, 3, 4, 5, 6] and resumed[4] == {"step": 5, "loss": 1.0}
    # A lost attempt reported only up to step 2 before dying after its checkpoint at 4: the next attempt
    # replays the checkpoint's logged steps, which fill the gap without touching what was there.
    gap = merge_points(points[:2], [{"step": 4, "restart": True}, {"step": 1, "loss": 7.0}, {"step": 3, "loss": 9.7},
                                    {"step": 4, "loss": 9.6}, {"step": 5, "loss": 9.5}])
    assert [(p["step"], p.get("loss")) for p in gap] == [(1, 7.0), (2, 9.8), (3, 9.7), (4, 9.6), (5, 9.5)]
    many = merge_points([], [{"step": s, "loss": 1.0, **({"eval_loss": 2.0} if s % 500 == 0 else {})}
                             for s in range(1, 3 * MAX_METRIC_POINTS)])
    assert len(many) <= MAX_METRIC_POINTS and many[-1]["step"] == 3 * MAX_METRIC_POINTS - 1
    assert sum("eval_loss" in p for p in many) == (3 * MAX_METRIC_POINTS - 1) // 500  # eval points all kept


def test_the_stream_cursor_takes_ascii_digits_only() -> None:
    from django.test import RequestFactory

    from webapp.jobs.stream import page_cursor

    factory = RequestFactory()
    assert page_cursor(factory.get("/runs/1/stream/", {"after": "12"}, headers={"Last-Event-ID": "40"})) == 40
    assert page_cursor(factory.get("/runs/1/stream/", headers={"Last-Event-ID": "²"})) == 0  # isdigit() but not int()
    assert page_cursor(factory.get("/runs/1/stream/", {"after": "-3"})) == 0


# ---- a separate eval dataset ---------------------------------------------------------------------


def _eval_world(tiny_model_dir):  # type: ignore[no-untyped-def]
    """The tiny base, its toy training dataset (instruction/output rows) and two eval datasets: chat and plain text."""
    import json

    from tests.webapp.factories import demo_objects
    from webapp.catalog.services import register_dataset
    from workers.training.demo import toy_rows

    user, base, dataset, config = demo_objects(tiny_model_dir)
    rows = toy_rows(24, seed=77)
    chat = register_dataset("toy-test", "test.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    text = register_dataset("toy-text", "text.jsonl", "".join(
        json.dumps({"text": f"{r['instruction']} {r['output']}"}) + "\n" for r in rows).encode())
    return user, base, dataset, config, chat, text


def _run_post(base, dataset, config, **overrides):  # type: ignore[no-untyped-def]
    import dataclasses

    from workers.contract.spec import suggest_train_params

    params = dataclasses.asdict(suggest_train_params(base.num_parameters))
    return {"base_model": base.pk, "dataset": dataset.pk, "lora_config": config.pk,
            **{k: v for k, v in params.items() if not isinstance(v, bool)}, **overrides}


def test_a_run_with_an_eval_dataset_stores_it_shows_it_and_clones_with_it(tiny_model_dir, store_dir, client) -> None:  # type: ignore[no-untyped-def]
    user, base, dataset, config, chat, _ = _eval_world(tiny_model_dir)
    client.login(username="owner", password="owner-pass-123")
    page = client.get("/runs/new/").content.decode()
    assert 'name="eval_dataset"' in page and "instead of a held-out fraction" in page
    assert page.count('name="mode"') == 1  # each training setting once, outside "What to train"

    response = client.post("/runs/new/", _run_post(base, dataset, config, eval_dataset=chat.pk, eval_steps=5,
                                                   early_stopping_patience=2))
    assert response.status_code == 302, response.content.decode()[-2000:]
    run = TrainingRun.objects.get()
    assert run.eval_dataset == chat and run.train_params().early_stopping_patience == 2
    assert run.job_spec().eval_dataset is not None and run.job_spec().eval_dataset.uri == chat.uri
    detail = client.get(f"/runs/{run.pk}/").content.decode()
    assert f'<a href="/datasets/{chat.pk}/" id="eval-dataset">toy-test</a>' in detail and "24 rows" in detail
    clone = client.get(f"/runs/new/?clone={run.pk}").content.decode()
    assert _selected(clone, "eval_dataset") == [str(chat.pk)]

    # Without one, the page says what the run evaluates on.
    plain = TrainingRun.objects.create(owner=user, base_model=base, dataset=dataset, lora_config=config,
                                       hyperparameters={"eval_fraction": 0.1})
    assert "a held-out 10.0% of the dataset" in client.get(f"/runs/{plain.pk}/").content.decode()


def test_an_eval_dataset_and_an_eval_fraction_together_are_refused(tiny_model_dir, store_dir, client) -> None:  # type: ignore[no-untyped-def]
    from webapp.training.forms import RunForm

    _, base, dataset, config, chat, _ = _eval_world(tiny_model_dir)
    client.login(username="owner", password="owner-pass-123")
    response = client.post("/runs/new/", _run_post(base, dataset, config, eval_dataset=chat.pk, eval_fraction=0.1))
    assert response.status_code == 400
    form = RunForm(_run_post(base, dataset, config, eval_dataset=chat.pk, eval_fraction=0.1))
    assert not form.is_valid() and list(form.errors) == ["eval_dataset"]
    assert "not both" in form.errors["eval_dataset"][0] and "eval_fraction 0.1" in form.errors["eval_dataset"][0]
    # Early stopping needs an eval set: the eval dataset is one.
    form = RunForm(_run_post(base, dataset, config, early_stopping_patience=2))
    assert not form.is_valid() and "needs an eval set" in form.errors["early_stopping_patience"][0]
    assert RunForm(_run_post(base, dataset, config, early_stopping_patience=2, eval_dataset=chat.pk)).is_valid()
    assert not TrainingRun.objects.exists()


def test_chat_eval_rows_need_a_chat_template_when_the_training_rows_are_not_chat(tiny_model_dir, store_dir) -> None:  # type: ignore[no-untyped-def]
    """The one mix that breaks training (tests/workers/test_train_runner.py shows it): plain-text training rows,
    chat eval rows and a base without a chat template. Every other mix is accepted."""
    from webapp.training.forms import RunForm

    _, base, chat_train, config, chat, text = _eval_world(tiny_model_dir)
    assert base.has_chat_template  # the demo tokenizer has one: any mix works
    assert RunForm(_run_post(base, text, config, eval_dataset=chat.pk)).is_valid()
    base.has_chat_template = False
    base.save()
    form = RunForm(_run_post(base, text, config, eval_dataset=chat.pk))
    assert not form.is_valid() and list(form.errors) == ["eval_dataset"]
    message = form.errors["eval_dataset"][0]
    assert "toy-test is alpaca rows" in message and "toy-text is text rows" in message and "no chat template" in message
    assert RunForm(_run_post(base, chat_train, config, eval_dataset=text.pk)).is_valid()  # chat training, text eval
    assert RunForm(_run_post(base, text, config, eval_dataset=text.pk)).is_valid()


# ---- rows longer than max_seq_length --------------------------------------------------------------------------


def long_prompt_dataset(name: str = "long"):  # type: ignore[no-untyped-def]
    """Three toy rows, then two whose prompt alone is far longer than 48 tokens (lines 4 and 5)."""
    import json

    from webapp.catalog.services import register_dataset
    from workers.training.demo import toy_rows

    rows = [*toy_rows(3, seed=4),
            *({"instruction": "add these numbers: " + " + ".join(str(k * i) for k in range(40)), "output": "0"}
              for i in (1, 2))]
    return register_dataset(name, f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())


def test_rows_whose_prompts_fill_max_seq_length_are_refused_before_queueing(tiny_model_dir, store_dir, client) -> None:  # type: ignore[no-untyped-def]
    _, base, _, config, _, _ = _eval_world(tiny_model_dir)
    long = long_prompt_dataset()
    client.login(username="owner", password="owner-pass-123")
    post = _run_post(base, long, config, max_seq_length=48, completion_only_loss="on")
    response = client.post("/runs/new/", post)
    page = response.content.decode()
    assert response.status_code == 400 and not TrainingRun.objects.exists()
    found = re.search(r"long: 2 of its 5 rows would train on nothing: cut to max_seq_length 48, their prompts leave "
                      r"no room for the answer \(line 5 \(prompt of (\d+) tokens\), line 4 \(prompt of (\d+) tokens\)\)"
                      r"\. Raise max_seq_length to at least (\d+)", page)
    assert found, page[page.find("would train"):][:600]
    assert int(found[3]) == int(found[1]) + 1 > int(found[2]) > 48
    assert "turn off completion_only_loss" in page
    # Long enough to reach every answer, or training on the prompts too: queued.
    assert client.post("/runs/new/", {**post, "max_seq_length": found[3]}).status_code == 302
    assert client.post("/runs/new/", {k: v for k, v in post.items() if k != "completion_only_loss"}).status_code == 302
    assert TrainingRun.objects.count() == 2


def test_an_eval_dataset_whose_prompts_fill_max_seq_length_is_refused(tiny_model_dir, store_dir) -> None:  # type: ignore[no-untyped-def]
    from webapp.training.forms import RunForm

    _, base, dataset, config, _, _ = _eval_world(tiny_model_dir)
    form = RunForm(_run_post(base, dataset, config, eval_dataset=long_prompt_dataset().pk, max_seq_length=48,
                             eval_fraction=0, completion_only_loss="on"))
    assert not form.is_valid() and list(form.errors) == ["eval_dataset"]
    assert "long: 2 of its 5 rows would train on nothing" in form.errors["eval_dataset"][0]


def test_a_dataset_whose_rows_the_objective_does_not_train_on_is_refused_on_its_field(  # type: ignore[no-untyped-def]
        tiny_model_dir, store_dir, monkeypatch) -> None:
    """The run's objective names the row formats it trains on (workers/training/objectives): supervised training
    takes every format, so the check is seen here with its formats narrowed to chat rows."""
    from webapp.training.forms import RunForm
    from workers.training.objectives import OBJECTIVES

    _, base, chat_train, config, chat, text = _eval_world(tiny_model_dir)
    assert RunForm(_run_post(base, text, config, eval_dataset=chat.pk)).is_valid()
    monkeypatch.setattr(OBJECTIVES["sft"], "row_formats", ("alpaca",))
    form = RunForm(_run_post(base, text, config, eval_dataset=text.pk))
    assert not form.is_valid() and sorted(form.errors) == ["dataset", "eval_dataset"]
    assert "toy-text is text rows" in form.errors["dataset"][0] and "(sft) trains on alpaca rows" in form.errors["dataset"][0]
    assert RunForm(_run_post(base, chat_train, config, eval_dataset=chat.pk)).is_valid()
    assert not TrainingRun.objects.exists()


def test_preference_pairs_train_dpo_and_a_supervised_run_on_them_is_refused_on_the_dataset_field(  # type: ignore[no-untyped-def]
        tiny_model_dir, store_dir, client) -> None:
    import json

    from webapp.catalog.services import register_dataset
    from webapp.training.forms import RunForm

    _, base, chat_train, config, _, text = _eval_world(tiny_model_dir)
    pairs = register_dataset("pairs", "pairs.jsonl", "".join(
        json.dumps({"prompt": f"What is {n} + 1?\n", "chosen": str(n + 1), "rejected": str(n + 2)}) + "\n"
        for n in range(12)).encode())
    assert pairs.format == "preference"

    sft = RunForm(_run_post(base, pairs, config))
    assert not sft.is_valid() and sorted(sft.errors) == ["dataset"]
    assert "pairs is preference rows" in sft.errors["dataset"][0]
    assert "(sft) trains on text, prompt_completion, alpaca, messages, sharegpt rows" in sft.errors["dataset"][0]

    assert RunForm(_run_post(base, pairs, config, objective="dpo", beta=0.2, dpo_loss="ipo")).is_valid()
    varlen = RunForm(_run_post(base, pairs, config, objective="dpo", attention="varlen", batching="pad"))
    assert not varlen.is_valid() and "not padded batches" in varlen.errors["attention"][0]
    cut = RunForm(_run_post(base, pairs, config, objective="dpo", completion_only_loss=False, max_seq_length=8))
    assert not cut.is_valid() and "12 of its 12 rows would train on nothing" in str(cut.errors)
    assert "completion_only_loss" not in str(cut.errors)  # DPO's loss is always the answers'
    dpo = RunForm(_run_post(base, chat_train, config, objective="dpo", eval_dataset=text.pk, beta=0))
    assert not dpo.is_valid() and sorted(dpo.errors) == ["beta", "dataset", "eval_dataset"]
    assert "(dpo) trains on preference rows" in dpo.errors["dataset"][0]
    assert not TrainingRun.objects.exists()

    client.login(username="owner", password="owner-pass-123")
    response = client.post("/runs/new/", _run_post(base, pairs, config, objective="dpo", beta=0.2, dpo_loss="ipo"))
    assert response.status_code == 302, response.content.decode()[-2000:]
    job = TrainingRun.objects.get().job_spec()
    assert (job.train.objective, job.train.beta, job.train.dpo_loss, job.dataset.format) == ("dpo", 0.2, "ipo",
                                                                                              "preference")
    page = client.get(f"/datasets/{pairs.pk}/")
    assert page.status_code == 200 and "preference" in page.content.decode()
    analysis = client.get(f"/datasets/{pairs.pk}/", {"base_model": base.pk, "row": 1, "batching": "pad",
                                                     "completion_only_loss": "on"}, HTTP_HX_REQUEST="true")
    assert analysis.status_code == 200 and 'role="alert"' not in analysis.content.decode()
    assert 'class="tok trained"' in analysis.content.decode()  # shown as the prompt and its chosen answer
