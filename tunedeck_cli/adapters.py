"""`tunedeck adapters` (list, show, download), `compare`, `comparisons` (show, blind ballot, vote, to-dataset),
`prompt-sets`, `merge` and `export`: adapter jobs, optionally waited on."""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from typing import Any

from tunedeck_cli.api import Api
from tunedeck_cli.errors import FAILED, OK
from tunedeck_cli.output import (
    Column,
    details,
    emit_json,
    field,
    list_command,
    note,
    progress,
    show_command,
    shown,
    table,
    when,
)
from tunedeck_cli.runs import FINAL, POLL_S
from tunedeck_cli.transfer import download
from workers.formatting import figure, percent, size

ADAPTER_COLUMNS = [("id", field("id")), ("name", field("name")), ("origin", field("origin")),
                   ("run", field("run")), ("base model", lambda a: a.get("base_model_name") or a.get("base_model")),
                   ("method", field("method")), ("rank", field("rank")), ("loss", shown("final_loss", figure)),
                   ("size", shown("size_bytes", size)), ("created", when("created_at"))]


def adapters_list(args: argparse.Namespace, api: Api) -> int:
    return list_command(args, api, "adapters/", ADAPTER_COLUMNS, "no adapters yet", base_model=args.base_model,
                        run=args.run)  # fmt: skip


def adapters_show(args: argparse.Namespace, api: Api) -> int:
    return show_command(args, api, f"adapters/{args.id}/")


def adapters_download(args: argparse.Namespace, api: Api) -> int:
    target = download(api, f"adapters/{args.id}/download/", args.output, f"tunedeck-adapter-{args.id}.zip",
                      quiet=args.quiet, force=args.force)
    if args.json:
        emit_json({"adapter": args.id, "path": str(target), "bytes": target.stat().st_size})
    else:
        print(f"Saved adapter {args.id} to {target} (PeftModel.from_pretrained loads it once unzipped)")
    return OK


def _job_id(obj: dict[str, Any]) -> int | None:
    job = obj.get("job")
    if isinstance(job, dict):
        return int(job["id"])
    return int(job) if job is not None else None


def wait_for_job(api: Api, job_id: int, quiet: bool) -> dict[str, Any]:
    """Poll the adapter job until it ends, its steps (or items) as a bar on stderr."""
    job: dict[str, Any] = api.get(f"jobs/{job_id}/")
    label = f"{job.get('kind', 'job')} job {job_id}"
    with progress(job.get("total_steps"), f"{label} {job.get('state')}", quiet=quiet) as bar:
        while True:
            total = job.get("total_steps") or 0
            if total and bar.total != total:
                bar.total = total
            bar.set_description(f"{label} {job.get('state')}", refresh=False)
            bar.update(int(job.get("step") or 0) - bar.n)
            if job.get("state") in FINAL:
                break
            time.sleep(POLL_S)
            job = api.get(f"jobs/{job_id}/")
    return job


def _job_outcome(job: dict[str, Any]) -> int:
    if job.get("state") != "succeeded":
        note(f"{job.get('kind', 'job')} job {job.get('id')} {job.get('state')}"
             + (f": {job['error']}" if job.get("error") else ""))
        return FAILED
    return OK


def compare(args: argparse.Namespace, api: Api) -> int:
    body: dict[str, Any] = {"adapters": args.adapter, "include_base": not args.no_base,
                            "base_precision": args.base_precision}
    if args.prompt_set is not None:
        body["prompt_set"] = args.prompt_set
    else:
        body["prompts"] = args.prompt
    if args.base_model is not None:
        body["base_model"] = args.base_model  # a name or an id: the server looks it up
    if args.max_new_tokens is not None:
        body["max_new_tokens"] = args.max_new_tokens
    if args.name:
        body["name"] = args.name
    comparison = api.post("comparisons/", body, idempotency_key=str(uuid.uuid4())).json()
    code = OK
    job_id = _job_id(comparison)
    if args.wait and job_id is not None:
        code = _job_outcome(wait_for_job(api, job_id, args.quiet))
        comparison = api.get(f"comparisons/{comparison['id']}/")
    if args.json:
        emit_json(comparison)
    elif args.wait:
        print_grid(comparison)
    else:
        print(f"Comparison {comparison.get('id')} queued (job {job_id}); "
              f"`tunedeck comparisons show {comparison.get('id')}` once it ends")
    return code


def compare_show(args: argparse.Namespace, api: Api) -> int:
    comparison = api.get(f"comparisons/{args.id}/")
    if args.json:
        emit_json(comparison)
    else:
        print_grid(comparison)
    return OK


def print_grid(comparison: dict[str, Any]) -> None:
    """Each prompt, then each column's output under it; win rates where votes were cast."""
    print(f"Comparison {comparison.get('id')} ({comparison.get('state')})")
    precision = comparison.get("base_precision") or {}
    if precision:
        loaded = precision.get("used") or precision.get("quantization")
        print(f"base: {loaded} (base precision {precision.get('chosen')})")
    if comparison.get("stop_tokens"):
        print("answers stop at: " + ", ".join(f"{s['text']} ({s['why']})" for s in comparison["stop_tokens"]))
    for row in comparison.get("rows") or []:
        print(f"\n[{row.get('index', 0) + 1}] {row.get('prompt', '')}")
        if row.get("reference"):
            print(f"  reference: {row['reference']}")
        for cell in row.get("cells") or []:
            print(f"  {cell.get('label')}: {cell.get('text', '')}")
    rates = [r for r in comparison.get("win_rates") or [] if r.get("rate") is not None]
    if rates:
        print("\nwin rates:")
        table(rates, [("column", field("label")), ("wins", field("wins")), ("rate", shown("rate", percent))])


def _option(option: dict[str, Any]) -> str:
    """An output of a ballot row: its text, and its name once the row is voted."""
    text = option.get("text") or ""
    return f"{text} [{option['label']}]" if option.get("label") else text


def _nth_option(index: int) -> Callable[[dict[str, Any]], str]:
    return lambda row: _option(row["options"][index])


def _your_vote(row: dict[str, Any]) -> str:
    choice = row.get("choice")
    if not choice:
        return ""
    return "tie" if choice == "tie" else f"{choice} = {row.get('choice_label')}"


def comparisons_ballot(args: argparse.Namespace, api: Api) -> int:
    ballot = api.get(f"comparisons/{args.id}/ballot/")
    if args.json:
        emit_json(ballot)
        return OK
    rows = ballot.get("rows") or []
    letters = [o["option"] for o in rows[0]["options"]] if rows else []
    print(f"Comparison {ballot.get('comparison')} ({ballot.get('state')}): you voted on {ballot.get('voted')} of "
          f"{len(rows)} rows" + ("" if ballot.get("open") else "; voting opens once every output is complete"))
    if args.full:
        for row in rows:
            print(f"\nrow {row['row']}: {row.get('prompt', '')}")
            if row.get("reference"):
                print(f"  reference: {row['reference']}")
            for option in row.get("options") or []:
                print(f"  {option['option']}: {_option(option)}")
            if row.get("choice"):
                print(f"  your vote: {_your_vote(row)}")
    else:
        columns: list[Column] = [("row", field("row")), ("prompt", field("prompt"))]
        columns += [(letter, _nth_option(i)) for i, letter in enumerate(letters)]
        table(rows, [*columns, ("your vote", _your_vote)], "no rows")
    if ballot.get("open") and ballot.get("voted", 0) < len(rows):
        print(f"\nVote: tunedeck comparisons vote {ballot.get('comparison')} ROW OPTION  (OPTION: "
              f"{', '.join([*letters, 'tie'])})")
    return OK


def comparisons_vote(args: argparse.Namespace, api: Api) -> int:
    # Sent without an Idempotency-Key: a vote is taken once per person and row anyway, and the client retries a
    # keyed POST's 409, which here means "already voted".
    row = api.post(f"comparisons/{args.id}/votes/", {"row": args.row, "option": args.option}).json()
    if args.json:
        emit_json(row)
        return OK
    print(f"Row {row.get('row')}: you voted {_your_vote(row)}")
    for option in row.get("options") or []:
        print(f"  {option.get('option')}: {option.get('label')}")
    return OK


def comparisons_to_dataset(args: argparse.Namespace, api: Api) -> int:
    """A dataset of the comparison's judgements: what it holds and what was left out, and what to train it with."""
    body = {"kind": args.kind, "name": args.name or ""}
    # Sent without an Idempotency-Key: the client retries a keyed POST's 409, which here means that nothing is
    # left to make (or the comparison has not finished), and waiting does not change it.
    made = api.post(f"comparisons/{args.id}/to-dataset/", body).json()
    if args.json:
        emit_json(made)
        return OK
    dataset, train = made.get("dataset") or {}, made.get("train") or {}
    print(f"Dataset {dataset.get('id')} {dataset.get('name')!r} ({dataset.get('format')}, {dataset.get('row_count')} "
          f"rows) from comparison {made.get('comparison')}'s {made.get('judgements')} {_judged(made.get('kind'))}")
    print(made.get("summary", ""))
    start = f", init_adapter: {train['init_adapter']}" if train.get("init_adapter") else ""
    note(f"train on it: a run spec with objective: {train.get('objective')}, dataset: {train.get('dataset')}, "
         f"base_model: {train.get('base_model')}{start} (`tunedeck runs create -f`)")
    return OK


def _judged(kind: Any) -> str:
    return "votes" if kind == "preference" else "thumbs"


PROMPT_SET_COLUMNS = [("id", field("id")), ("name", field("name")), ("owner", field("owner")),
                      ("prompts", field("size")), ("references", field("has_references")),
                      ("dataset", field("source_dataset")), ("created", when("created_at"))]


def prompt_sets_list(args: argparse.Namespace, api: Api) -> int:
    return list_command(args, api, "prompt-sets/", PROMPT_SET_COLUMNS,
                        "no prompt sets yet: `tunedeck compare --prompt …` makes one", owner=args.owner)  # fmt: skip


def prompt_sets_show(args: argparse.Namespace, api: Api) -> int:
    prompt_set = api.get(f"prompt-sets/{args.id}/")
    if args.json:
        emit_json(prompt_set)
        return OK
    details(prompt_set, skip=("rows",))
    print()
    rows = [{"row": i, **r} for i, r in enumerate(prompt_set.get("rows") or [])]
    table(rows, [("row", field("row")), ("prompt", field("prompt")), ("reference", field("reference"))], "no prompts")
    return OK


def _start_job(args: argparse.Namespace, api: Api, action: str, body: dict[str, Any]) -> tuple[dict[str, Any], Any, int]:
    """POST an adapter's job action, and with --wait follow it to its end: (job, its id, the exit code)."""
    job = api.post(f"adapters/{args.adapter_id}/{action}/", body, idempotency_key=str(uuid.uuid4())).json()
    job_id = _job_id(job) or job.get("id")
    code = OK
    if args.wait and job_id is not None:
        job = wait_for_job(api, int(job_id), args.quiet)
        code = _job_outcome(job)
    if args.json:
        emit_json(job)
    return job, job_id, code


def merge(args: argparse.Namespace, api: Api) -> int:
    job, job_id, code = _start_job(args, api, "merge", {"dtype": args.dtype})
    if not args.json:
        merged = job.get("merged_model")
        print(f"Merge job {job_id} {job.get('state')}" + (f"; merged model {merged} (merges/{merged}/)"
                                                           if merged else ""))
    return code


def export(args: argparse.Namespace, api: Api) -> int:
    body: dict[str, Any] = {"target": args.target, "form": args.form, "name": args.name}
    if args.target == "vllm":
        body.update(check_prompts=args.prompts or [], max_new_tokens=args.max_new_tokens)
    else:
        body.update(quantize=args.quantize or "", system=args.system or "", base_name=args.base_name or "")
    job, job_id, code = _start_job(args, api, "export", body)
    if not args.json:
        made = job.get("merged_model")
        then = ("see its vllm-check.json and README for vllm serve" if args.target == "vllm"
                else f"ollama create {args.name} -f Modelfile")
        print(f"Export job {job_id} {job.get('state')}" + (f"; download merges/{made}/download/, then: {then}" if made else ""))
    return code
