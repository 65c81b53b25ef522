"""`tunedeck runs`: list, show, create (from YAML, optionally waiting), logs (optionally following), cancel,
pause, resume, retry, clone, tag."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from typing import Any

from tunedeck_cli import runspec
from tunedeck_cli.api import Api
from tunedeck_cli.errors import FAILED, OK
from tunedeck_cli.output import emit_json, field, list_command, note, progress, ref, show_command, shown, when
from workers.formatting import count, figure

FINAL = ("succeeded", "failed", "cancelled")
POLL_S = 1.0
EVENTS_PAGE = 1000
RUN_COLUMNS = [("id", field("id")), ("name", field("name")), ("state", field("state")),
               ("step", lambda r: f"{count(r.get('step') or 0)}/{count(r['total_steps']) if r.get('total_steps') else '?'}"),
               ("loss", shown("last_loss", figure)), ("base model", lambda r: r.get("base_model_name") or r.get("base_model")),
               ("dataset", lambda r: r.get("dataset_name") or r.get("dataset")), ("owner", field("owner")),
               ("created", when("created_at"))]


def runs_list(args: argparse.Namespace, api: Api) -> int:
    return list_command(args, api, "runs/", RUN_COLUMNS, "no runs match", state=args.state, owner=args.owner,
                        base_model=args.base_model, dataset=args.dataset, tag=getattr(args, "tag", None),
                        q=getattr(args, "search", None))  # fmt: skip


def runs_show(args: argparse.Namespace, api: Api) -> int:
    return show_command(args, api, f"runs/{args.id}/", skip=("metric_points",))


def wait_for_run(api: Api, run_id: int, quiet: bool) -> dict[str, Any]:
    """Poll the run until it ends, a bar of its steps on stderr; return the final run."""
    run: dict[str, Any] = api.get(f"runs/{run_id}/")
    with progress(run.get("total_steps"), f"run {run_id} {run.get('state')}", unit="step", quiet=quiet) as bar:
        while True:
            total = run.get("total_steps") or 0
            if total and bar.total != total:
                bar.total = total
            bar.set_description(f"run {run_id} {run.get('state')}", refresh=False)
            loss = run.get("last_loss")
            if loss is not None:
                bar.set_postfix_str(f"loss {figure(loss)}", refresh=False)
            bar.update(int(run.get("step") or 0) - bar.n)
            if run.get("state") in FINAL:
                break
            time.sleep(POLL_S)
            run = api.get(f"runs/{run_id}/")
    return run


def _finish(args: argparse.Namespace, run: dict[str, Any]) -> int:
    """Print the run's end and give the exit code: 0 succeeded, 1 failed or cancelled."""
    state = run.get("state")
    if args.json:
        emit_json(run)
    else:
        line = f"Run {run.get('id')} {state}"
        if state == "succeeded" and run.get("last_loss") is not None:
            line += f": final loss {figure(run['last_loss'])}"
        adapter = run.get("adapter")
        if adapter:
            line += f"; adapter {ref(adapter) if not isinstance(adapter, dict) else adapter.get('id')}"
        print(line)
        if run.get("error"):
            note(f"error: {run['error']}")
    return OK if state == "succeeded" else FAILED


def runs_create(args: argparse.Namespace, api: Api) -> int:
    spec = runspec.load(args.file)
    key = args.idempotency_key or str(uuid.uuid4())
    response = api.post("runs/", runspec.body(spec), idempotency_key=key)
    run = response.json()
    replayed = response.headers.get("Idempotent-Replayed") == "true"
    if not args.wait:
        if args.json:
            emit_json(run)
        else:
            print(f"Run {run.get('id')} {run.get('state')}" + (" (already created with this Idempotency-Key)"
                                                                 if replayed else ""))
        return OK
    note(f"Run {run.get('id')} created ({run.get('state')}); waiting for it to end (Ctrl-C stops waiting, "
         "not the run)")
    return _finish(args, wait_for_run(api, int(run["id"]), args.quiet))


def format_event(event: dict[str, Any]) -> str:
    when = str(event.get("created_at") or "")
    clock = when[11:19] if len(when) >= 19 else when
    kind = event.get("kind", "")
    message = str(event.get("message") or "")
    if kind == "metric" and not message:
        data = event.get("data") or {}
        message = " ".join(f"{k}={figure(v)}" if isinstance(v, float) else f"{k}={v}" for k, v in data.items())
    level = event.get("level", "info")
    marker = f" {level.upper()}" if level not in ("info", "") else ""
    return f"{clock} [{kind}]{marker} {message}"


def runs_logs(args: argparse.Namespace, api: Api) -> int:
    """Page through the run's events by `after`; with -f keep polling until the run ends and all is read."""
    after = int(args.after or 0)
    state = None
    while True:
        page = api.get(f"runs/{args.id}/events/", after=after, limit=EVENTS_PAGE)
        events = page.get("results", [])
        state = page.get("state", state)
        for event in events:
            if args.json:
                sys.stdout.write(_json_line(event))
            elif event.get("kind") != "metric" or args.metrics:
                print(format_event(event))
        sys.stdout.flush()
        after = max(after, int(page.get("next_after") or 0))
        if page.get("final", state in FINAL and not events):
            break  # the run has ended and every event is read
        if page.get("has_more", bool(events)):
            continue
        if not args.follow:
            break
        time.sleep(POLL_S)
    if args.follow and not args.json:
        note(f"run {args.id} {state}")
    return OK if not args.follow or state == "succeeded" else FAILED


def _json_line(event: dict[str, Any]) -> str:
    import json

    return json.dumps(event, ensure_ascii=False) + "\n"


def _action(args: argparse.Namespace, api: Api, action: str, verb: str, creates: bool = False) -> int:
    response = api.post(f"runs/{args.id}/{action}/", idempotency_key=str(uuid.uuid4()) if creates else None)
    run = response.json() if response.content else {}
    if getattr(args, "wait", False) and run.get("id"):
        return _finish(args, wait_for_run(api, int(run["id"]), args.quiet))
    if args.json:
        emit_json(run)
    elif creates and run.get("id") not in (None, args.id):
        print(f"Run {run.get('id')} {run.get('state')} ({verb} run {args.id})")
    else:
        print(f"Run {args.id} {verb}" + (f": {run.get('state')}" if run.get("state") else ""))
    return OK


def runs_cancel(args: argparse.Namespace, api: Api) -> int:
    return _action(args, api, "cancel", "cancel requested")


def runs_pause(args: argparse.Namespace, api: Api) -> int:
    return _action(args, api, "pause", "pause requested")


def runs_resume(args: argparse.Namespace, api: Api) -> int:
    return _action(args, api, "resume", "resumed")


def runs_retry(args: argparse.Namespace, api: Api) -> int:
    return _action(args, api, "retry", "retried", creates=True)


def runs_clone(args: argparse.Namespace, api: Api) -> int:
    return _action(args, api, "clone", "cloned from", creates=True)


def runs_tag(args: argparse.Namespace, api: Api) -> int:
    """Add tags to a run (or take them off with --remove), and set its note with --note."""
    run = api.get(f"runs/{args.id}/")
    tags = list(run.get("tags") or [])
    wanted = [t.strip().lower() for t in args.tags]
    tags = [t for t in tags if t not in wanted] if args.remove else tags + [t for t in wanted if t not in tags]
    body: dict[str, Any] = {"tags": tags}
    if args.note is not None:
        body["note"] = args.note
    updated = api.request("PATCH", f"runs/{args.id}/", json=body).json()
    if args.json:
        emit_json(updated)
    else:
        print(f"Run {args.id} tags: {', '.join(updated.get('tags') or []) or '(none)'}")
    return OK
