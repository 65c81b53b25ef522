"""Deleting a finished run: one set of rules for the confirmation page, the page's delete and the REST DELETE.

What goes is the run's own work, which nothing else needs: the run and its events, its adapter, the adapter's
merge and export jobs with the merged models and exports they made, and their folders in the artifact store (the
run's: every attempt's adapter and zip, the checkpoints; each merge or export job's: its output).

What stays is work that mixes the adapter with other adapters, often other people's, and needs none of its
files; it says the adapter was deleted. Comparisons keep every cell's text and name the adapter's column
"<name> (adapter deleted)"; evaluations keep their scores under that name; a combined adapter keeps its own
weights, and its lineage the parent's name and weight; the adapter's other jobs (combinations, pushes) keep
their log, with a line saying so. Deleting these as well would take a teammate's work with the run; refusing
while they exist would leave a run that can never be deleted (adapters are not deleted on their own).

Refused: a run that has not finished (cancel it first), and a run whose adapter a job still reads (queued or
running), a run warm-started from it included, named in the refusal, so that no file goes from under a worker.
A finished run started from the adapter is kept and keeps its name (TrainingRun.init_adapter_name).

Files go only once the transaction has committed (a delete that rolls back leaves every file), and only inside
the artifact store: each path is checked first (inside the store, no link on the way), and links are removed,
never followed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from django.db import transaction

from webapp.catalog.services import store
from webapp.jobs import ledger
from webapp.jobs.models import FINAL_STATES
from webapp.playground.kinds import JobKind
from webapp.playground.models import AdapterJob, Comparison, MergedModel
from webapp.training.models import Adapter, RunEvent, TrainingRun
from workers.contract.store import SCHEME, ArtifactStore
from workers.formatting import count, plural

log = logging.getLogger(__name__)

DELETED_MARK = " (adapter deleted)"


class DeleteRefused(Exception):
    """Why a run was not deleted: an HTTP status (404 gone, 409 not now) and a message saying what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclasses.dataclass
class Folder:
    """A folder of the artifact store that goes with the run: its URI, its size on disk and what it holds."""

    uri: str
    bytes: int
    what: str


@dataclasses.dataclass
class RunDeletion:
    """Everything a run's deletion removes and keeps, read before anything is removed."""

    run: TrainingRun
    events: int
    checkpoints: int
    adapter: Adapter | None
    merged: list[MergedModel]
    jobs: list[AdapterJob]  # deleted: the adapter's merge and export jobs
    folders: list[Folder]  # deleted once the transaction commits
    comparisons: list[Comparison]  # kept: the adapter's column says it was deleted
    evaluations: list[AdapterJob]  # kept: of the adapter, or on the run's held-out rows
    combined: list[Adapter]  # kept: their lineage keeps the parent's name
    other_jobs: list[AdapterJob]  # kept: combinations and pushes of the adapter
    busy: list[AdapterJob | TrainingRun]  # jobs and warm-started runs still reading the adapter: the deletion waits

    @property
    def freed_bytes(self) -> int:
        return sum(folder.bytes for folder in self.folders)

    def refusal(self) -> str:
        if not self.run.is_final:
            return f"a {self.run.state} run cannot be deleted: cancel it first"
        if self.busy:
            jobs = ", ".join(f"{job} ({job.state})" for job in self.busy)
            return f"its adapter is still read by {jobs}: delete the run once they have finished, or cancel them"
        return ""

    def report(self) -> dict[str, Any]:
        """What was deleted and what was kept, by id (the REST API's answer)."""
        adapter = self.adapter
        return {
            "run": self.run.pk,
            "events": self.events,
            "checkpoints": self.checkpoints,
            "adapter": {"id": adapter.pk, "name": str(adapter)} if adapter else None,
            "merged_models": [
                {"id": m.pk, "dtype": m.dtype, "verified": m.verified, "size_bytes": m.size_bytes} for m in self.merged
            ],
            "jobs": [job.pk for job in self.jobs],
            "files": [dataclasses.asdict(folder) for folder in self.folders],
            "freed_bytes": self.freed_bytes,
            "kept": {
                "comparisons": [c.pk for c in self.comparisons],
                "evaluations": [job.pk for job in self.evaluations],
                "combined_adapters": [a.pk for a in self.combined],
                "jobs": [job.pk for job in self.other_jobs],
            },
        }


def plan(run: TrainingRun) -> RunDeletion:
    """What deleting `run` would remove and keep (with the folders' sizes on disk); changes nothing."""
    adapter = Adapter.objects.filter(run=run).first()
    used = list(AdapterJob.objects.filter(adapters=adapter).order_by("id")) if adapter else []
    jobs = [job for job in used if job.kind in (JobKind.MERGE, JobKind.EXPORT)]
    merged = list(MergedModel.objects.filter(adapter=adapter).order_by("id")) if adapter else []
    evaluations = {job.pk: job for job in used if job.kind == JobKind.EVALUATE}
    evaluations.update({job.pk: job for job in AdapterJob.objects.filter(kind=JobKind.EVALUATE, params__held_out_of=run.pk)})
    folders, checkpoints = _folders(run, adapter, jobs, merged)
    return RunDeletion(
        run=run,
        events=RunEvent.objects.filter(run=run).count(),
        checkpoints=checkpoints,
        adapter=adapter,
        merged=merged,
        jobs=jobs,
        folders=folders,
        comparisons=list(Comparison.objects.filter(job__in=[j for j in used if j.kind == JobKind.COMPARE]).order_by("id")),
        evaluations=sorted(evaluations.values(), key=lambda job: job.pk),
        combined=list(adapter.children.order_by("id")) if adapter else [],
        other_jobs=[job for job in used if job.kind in (JobKind.COMBINE, JobKind.PUSH)],
        busy=[*(job for job in used if not job.is_final), *_unfinished_runs_started_from(adapter)],
    )


def _unfinished_runs_started_from(adapter: Adapter | None) -> list[TrainingRun]:
    if adapter is None:
        return []
    return list(TrainingRun.objects.filter(init_adapter=adapter).exclude(state__in=FINAL_STATES).order_by("id"))


def delete_run(run: TrainingRun) -> RunDeletion:
    """Delete a finished run as `plan` describes it, or raise DeleteRefused; its folders go after the commit."""
    with transaction.atomic():
        locked = TrainingRun.objects.select_for_update().filter(pk=run.pk).first()
        if locked is None:
            raise DeleteRefused(404, f"run {run.pk} no longer exists")
        deletion = plan(locked)
        refusal = deletion.refusal()
        if refusal:
            raise DeleteRefused(409, refusal)
        _mark_what_stays(deletion)
        AdapterJob.objects.filter(pk__in=[job.pk for job in deletion.jobs]).delete()  # with their events
        # Its events, its adapter and the adapter's merged models go with it (CASCADE), parent links stay; deleted
        # through a queryset, so the instances the report reads keep their ids.
        TrainingRun.objects.filter(pk=locked.pk).delete()
        artifacts = store()
        paths = [path for folder in deletion.folders if (path := _inside_store(artifacts, folder.uri)) is not None]
        transaction.on_commit(lambda: remove_folders(paths))
    return deletion


def _mark_what_stays(deletion: RunDeletion) -> None:
    """Name the adapter as deleted wherever its work is kept: columns, scores, job logs. (A lineage link already
    holds the parent's name, set when the combined adapter was made.)"""
    adapter, run = deletion.adapter, deletion.run
    for job in {j.pk: j for j in [*deletion.evaluations, *deletion.other_jobs,
                                  *(c.job for c in deletion.comparisons if c.job)]}.values():
        params = dict(job.params)
        if adapter is not None:
            params["adapters"] = [_deleted_ref(a) if a.get("key") == adapter.key else a for a in params.get("adapters", [])]
        if params.get("held_out_of") == run.pk:
            params["held_out_of_deleted"] = True
        AdapterJob.objects.filter(pk=job.pk).update(params=params)
        ledger.note(job, f"Run {run.pk} ({run}) was deleted with its adapter: this job's record is kept")


def _deleted_ref(ref: dict[str, Any]) -> dict[str, Any]:
    label = str(ref.get("label", ""))
    return {**ref, "label": label if label.endswith(DELETED_MARK) else label + DELETED_MARK}


# --- files ---------------------------------------------------------------------------------------------------


def _folders(
    run: TrainingRun, adapter: Adapter | None, jobs: list[AdapterJob], merged: list[MergedModel]
) -> tuple[list[Folder], int]:
    """The store's folders that go with the run (those that exist), and the checkpoints among them."""
    artifacts = store()
    run_uri = ArtifactStore.uri("runs", run.pk)
    run_dir = _inside_store(artifacts, run_uri)
    # A folder that is a link holds nothing of the run's: only the link goes.
    own = run_dir if run_dir is not None and run_dir.is_dir() and not run_dir.is_symlink() else None
    attempts = len(list(own.glob("attempt-*"))) if own else 0
    checkpoints = len(list((own / "checkpoints").glob("checkpoint-*"))) if own else 0
    candidates = [(run_uri, f"the run's folder: the adapters of {plural(count(attempts), 'attempt')}, "
                            f"{plural(count(checkpoints), 'checkpoint')}")]
    if adapter is not None:
        candidates.append((adapter.uri, f"the adapter {adapter}"))
    for job in jobs:
        made = next((m for m in merged if m.job_id == job.pk), None)
        checked = "verified" if made and made.verified else "not verified"
        if made is not None and made.target:
            what = f"the folder of {job} ({made.kind_label})"
        else:
            what = f"the merged model of {job} ({made.dtype}, {checked})" if made else f"the output of {job}"
        candidates.append((ArtifactStore.uri("jobs", job.pk), what))
    candidates += [(m.uri, f"an {m.kind_label} of {adapter}" if m.target else f"a merged model of {adapter} ({m.dtype})")
                   for m in merged]
    folders: list[Folder] = []
    taken: list[Path] = []
    for uri, what in candidates:
        path = _inside_store(artifacts, uri)
        if path is None or not os.path.lexists(path) or any(path.is_relative_to(t) for t in taken):
            continue
        taken.append(path)
        folders.append(Folder(uri=uri, bytes=_size(path), what=what))
    return folders, checkpoints


def _inside_store(artifacts: ArtifactStore, uri: str) -> Path | None:
    """The path of a store URI strictly inside the store, its last part not resolved: a link there is the path
    itself, to be removed, not followed (ArtifactStore.path resolves it, to another run's folder or out of the
    store). None for another scheme, an escape, the root, and a path reached through a link on the way: what
    lies there is the link target's."""
    if not uri.startswith(SCHEME):
        return None
    relative = Path(uri[len(SCHEME):])
    if relative.is_absolute():
        return None
    path = Path(os.path.normpath(artifacts.root / relative))
    if path == artifacts.root or not path.is_relative_to(artifacts.root) or not _no_link_above(path):
        return None
    return path


def _no_link_above(path: Path) -> bool:
    """Whether every folder above `path` is what it says (no link on the way): the store's root is resolved."""
    return path.parent.resolve() == path.parent


def _size(path: Path) -> int:
    """Bytes on disk under `path`, links not followed (a link's target is not the run's)."""
    if path.is_symlink():
        return 0
    if not path.is_dir():
        return path.stat().st_size
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            file = Path(folder) / name
            if not file.is_symlink():
                total += file.lstat().st_size
    return total


def remove_folders(paths: list[Path]) -> None:
    """Remove each path (checked to lie inside the store again: settings may differ from when it was planned).
    Run after the commit: a failure is logged, never raised, since the rows are already gone."""
    artifacts = store()
    for path in paths:
        if not path.is_relative_to(artifacts.root) or path == artifacts.root:
            log.error("not removing %s: outside the artifact store %s", path, artifacts.root)
            continue
        if not _no_link_above(path):  # a folder above became a link since: removing would follow it
            log.error("not removing %s: a folder above it is a link", path)
            continue
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)  # removes links inside, never what they point to
        except OSError as exc:
            log.error("could not remove %s: %s", path, exc)
