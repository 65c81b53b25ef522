"""The client sub-commands' parsers, and the wrapper that turns every failure into its exit code.

Exit codes: 0 ok; 1 the operation failed (a run or job failed or was cancelled, a conflict); 2 usage or
validation error (the server's field errors are printed); 3 authentication or permission; 4 not found;
5 server or network error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from tunedeck_cli import account, adapters, catalog, chat, runs, sweeps
from tunedeck_cli.api import Api
from tunedeck_cli.config import load
from tunedeck_cli.errors import CliError
from workers.contract import jobspecs

Handler = Callable[[argparse.Namespace, Api], int]
EPILOG = ("Server and key: TUNEDECK_SERVER and TUNEDECK_API_KEY, else the file written by `tunedeck login` "
          "($TUNEDECK_CONFIG or ~/.config/tunedeck/config.toml). Exit codes: 0 ok, 1 the operation failed "
          "(e.g. the run failed), 2 usage or validation error, 3 authentication or permission, 4 not found, "
          "5 server or network error.")


def run(handler: Callable[..., int], needs_api: bool = True) -> Callable[[argparse.Namespace], int]:
    def call(args: argparse.Namespace) -> int:
        try:
            if not needs_api:
                return handler(args)
            with Api(load()) as api:
                return handler(args, api)
        except CliError as exc:
            sys.stdout.flush()
            print("\n".join(exc.lines()), file=sys.stderr, flush=True)
            return exc.code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `tunedeck runs logs 7 | head`: the reader left, which is no failure
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0

    return call


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="Print JSON on stdout (for scripts).")
    return common


def _quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="No progress bar.")


def _limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=50, help="At most this many, newest first (default 50; 0: all).")


def _leaf(group: Any, name: str, handler: Callable[..., int], help_: str, needs_api: bool = True,
          **kwargs: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(name, help=help_, description=help_, parents=[_common()],
                                                       epilog=EPILOG, **kwargs)
    parser.set_defaults(func=run(handler, needs_api))
    return parser


def _group(sub: Any, name: str, help_: str) -> Any:
    parser = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def register(sub: Any) -> None:
    """Add the client commands to the `tunedeck` sub-parsers."""
    login = _leaf(sub, "login", account.login, "Store the server URL and an API key in the config file: a key "
                  "you have (checked first), or a new one made for your user name and password.", needs_api=False)
    login.add_argument("--server", help="Tunedeck URL, e.g. https://tunedeck.example.com (default: TUNEDECK_SERVER).")
    login.add_argument("--key", help="The API key (tdk_…); without it (and without --username) the key is read from "
                                     "stdin, which keeps it out of process listings and shell history.")
    login.add_argument("--username", help="Log in with this user name: the password is prompted without echo (or "
                                          "read from stdin when it is no terminal) and a new key named \"cli on "
                                          "<this host>\" is made. On a terminal, login without --key asks for it.")
    login.add_argument("--scopes", default="read,write", help="With --username: the new key's scopes "
                                                              "(default read,write; admin for staff only).")
    _leaf(sub, "logout", account.logout, "Remove the stored API key.", needs_api=False)
    _leaf(sub, "whoami", account.show_whoami, "Check the API key against the server (and whose it is, where the server says).")

    datasets = _group(sub, "datasets", "Datasets: list, upload (validated by the server), show.")
    _limit(_leaf(datasets, "list", catalog.datasets_list, "List datasets."))
    up = _leaf(datasets, "upload", catalog.datasets_upload, "Upload a dataset file (JSONL, JSON, CSV, Parquet); a "
               "refused file exits 2 with each problem's line and field.")
    up.add_argument("file")
    up.add_argument("--name", help="The dataset's name (default: the file name without its suffix).")
    up.add_argument("--idempotency-key", help="Sent as Idempotency-Key (default: a fresh one).")
    _quiet(up)
    _leaf(datasets, "show", catalog.datasets_show, "A dataset with its validation report.").add_argument(
        "id", metavar="ID_OR_NAME")

    models = _group(sub, "models", "Base models: list, show, register.")
    _limit(_leaf(models, "list", catalog.models_list, "List base models."))
    _leaf(models, "show", catalog.models_show, "A base model: source, architecture, size, linear modules.").add_argument(
        "id", metavar="ID_OR_NAME")
    reg = _leaf(models, "register", catalog.models_register, "Register a base model by hub id or local path "
                "(the server inspects it first).")
    reg.add_argument("name")
    reg.add_argument("source", help="A Hugging Face hub id or a path on the workers.")
    reg.add_argument("--revision", help="Hub revision (branch, tag or commit).")

    configs = _group(sub, "lora-configs", "LoRA configs: list, show.")
    _limit(_leaf(configs, "list", catalog.configs_list, "List LoRA configs."))
    _leaf(configs, "show", catalog.configs_show, "A LoRA config with every parameter.").add_argument(
        "id", metavar="ID_OR_NAME")

    _register_runs(_group(sub, "runs", "Training runs: list, show, create, logs, cancel, pause, resume, retry, clone, tag."))
    _register_sweeps(_group(sub, "sweeps", "Hyperparameter sweeps: create, list, show, stop."))
    _register_adapters(sub)


def _register_sweeps(group: Any) -> None:
    create = _leaf(group, "create", sweeps.sweeps_create, "Create a sweep from a YAML spec (see examples/sweep.yaml).")
    create.add_argument("-f", "--file", required=True, help="The sweep spec (YAML).")
    create.add_argument("--wait", action="store_true", help="Follow the trials until the sweep ends: exit 0 when a "
                                                            "trial finished with a value, 1 otherwise.")
    _quiet(create)
    _limit(_leaf(group, "list", sweeps.sweeps_list, "List sweeps, newest first."))
    _leaf(group, "show", sweeps.sweeps_show, "A sweep with its trials.").add_argument("id", type=int)
    _leaf(group, "stop", sweeps.sweeps_stop, "Stop a sweep: no new trials; runs already going finish.").add_argument(
        "id", type=int)


def _register_runs(group: Any) -> None:
    lst = _leaf(group, "list", runs.runs_list, "List runs, newest first.")
    lst.add_argument("--state", help="queued, dispatched, running, paused, succeeded, failed or cancelled.")
    lst.add_argument("--owner", help="A username, or `me`.")
    lst.add_argument("--base-model", help="A base model id.")
    lst.add_argument("--dataset", help="A dataset id.")
    lst.add_argument("--tag", action="append", help="Only runs with this tag (repeatable: all of them).")
    lst.add_argument("--search", help="Free text in the name, note or tags.")
    _limit(lst)
    tag = _leaf(group, "tag", runs.runs_tag, "Add tags to a run (--remove takes them off); --note sets its note.")
    tag.add_argument("id", type=int)
    tag.add_argument("tags", nargs="*", metavar="TAG")
    tag.add_argument("--remove", action="store_true", help="Take these tags off instead.")
    tag.add_argument("--note", help="The run's note (an empty string clears it).")
    _leaf(group, "show", runs.runs_show, "A run: state, progress, settings, error.").add_argument("id", type=int)
    create = _leaf(group, "create", runs.runs_create, "Create a run from a YAML spec (see examples/run.yaml).")
    create.add_argument("-f", "--file", required=True, help="The run spec (YAML; `-` reads stdin).")
    create.add_argument("--wait", action="store_true", help="Follow the run's steps until it ends: exit 0 when it "
                                                            "succeeded, 1 when it failed or was cancelled.")
    create.add_argument("--idempotency-key", help="Sent as Idempotency-Key (default: a fresh one). Running the "
                                                  "same command with the same key never creates a second run.")
    _quiet(create)
    logs = _leaf(group, "logs", runs.runs_logs, "A run's log (JSON lines with --json).")
    logs.add_argument("id", type=int)
    logs.add_argument("-f", "--follow", action="store_true", help="Keep printing until the run ends (exit 0 when it "
                                                                  "succeeded, 1 otherwise).")
    logs.add_argument("--after", type=int, default=0, help="Only events after this event id.")
    logs.add_argument("--metrics", action="store_true", help="Print metric events too.")
    _leaf(group, "cancel", runs.runs_cancel, "Ask a queued or running run to stop.").add_argument("id", type=int)
    _leaf(group, "pause", runs.runs_pause, "Pause a run: a queued one is held in its place, a running one saves a "
                                           "checkpoint at its next step and frees its GPU.").add_argument("id", type=int)
    resume = _leaf(group, "resume", runs.runs_resume, "Queue a paused run again; it continues from its checkpoint.")
    resume.add_argument("id", type=int)
    resume.add_argument("--wait", action="store_true", help="Wait for it to end.")
    _quiet(resume)
    retry = _leaf(group, "retry", runs.runs_retry, "Queue a failed or cancelled run again.")
    retry.add_argument("id", type=int)
    retry.add_argument("--wait", action="store_true", help="Wait for it to end.")
    _quiet(retry)
    clone = _leaf(group, "clone", runs.runs_clone, "Queue a new run with the same settings.")
    clone.add_argument("id", type=int)
    clone.add_argument("--wait", action="store_true", help="Wait for the new run to end.")
    _quiet(clone)


def _register_adapters(sub: Any) -> None:
    group = _group(sub, "adapters", "Adapters: list, show, download.")
    lst = _leaf(group, "list", adapters.adapters_list, "List adapters, newest first.")
    lst.add_argument("--base-model", help="A base model id.")
    lst.add_argument("--run", help="A run id.")
    _limit(lst)
    _leaf(group, "show", adapters.adapters_show, "An adapter: lineage, metrics.").add_argument("id", type=int)
    down = _leaf(group, "download", adapters.adapters_download, "Download an adapter as a zip.")
    down.add_argument("id", type=int)
    down.add_argument("-o", "--output", help="File (or folder) to write (default: the server's file name).")
    down.add_argument("--force", action="store_true", help="Overwrite an existing file.")
    _quiet(down)

    comp = _leaf(sub, "compare", adapters.compare, "Generate from the base and adapters side by side.")
    comp.add_argument("--base-model", help="The base model (name or id); the adapters' own base by default.")
    comp.add_argument("--adapter", type=int, action="append", required=True, help="An adapter id (repeatable).")
    prompts = comp.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="A prompt (repeatable).")
    prompts.add_argument("--prompt-set", type=int, help="A saved prompt set's id (`tunedeck prompt-sets list`).")
    comp.add_argument("--no-base", action="store_true", help="Leave the base model's own column out.")
    comp.add_argument("--max-new-tokens", type=int)
    # The server's own choices and words (workers.contract.jobspecs imports no ML library: the client stays quick to start).
    comp.add_argument("--base-precision", choices=jobspecs.BASE_PRECISIONS, default="auto",
                      help=f"{jobspecs.BASE_PRECISION_HELP} Default: auto.")
    comp.add_argument("--name")
    comp.add_argument("--wait", action="store_true", help="Wait and print the grid (exit 1 when the job failed).")
    _quiet(comp)
    comps = _group(sub, "comparisons", "Comparisons: show, blind votes (ballot, vote), datasets of the votes "
                   "(to-dataset).")
    _leaf(comps, "show", adapters.compare_show, "A comparison's grid and win rates.").add_argument("id", type=int)
    ballot = _leaf(comps, "ballot", adapters.comparisons_ballot, "Your blind ballot: each row's outputs under option "
                   "letters in an order shuffled for you; names show only on the rows you voted on.")
    ballot.add_argument("id", type=int)
    ballot.add_argument("--full", action="store_true", help="Each row's outputs in full, not cut to a table cell.")
    vote = _leaf(comps, "vote", adapters.comparisons_vote, "Vote on one row of your ballot and see the names: "
                 "exit 1 when you already voted on it or the comparison has not finished, 2 for a bad row or option.")
    vote.add_argument("id", type=int)
    vote.add_argument("row", type=int, help="The row, as numbered on your ballot (from 0).")
    vote.add_argument("option", help="An option letter of that row (A, B, …), or tie.")
    made = _leaf(comps, "to-dataset", adapters.comparisons_to_dataset, "Make a dataset of a comparison's "
                 "judgements: preference pairs from its blind votes (for DPO) or feedback rows from its thumbs (for "
                 "KTO); prints what it holds and what was left out. Exit 1 when nothing is left.")
    made.add_argument("id", type=int)
    made.add_argument("--kind", choices=("preference", "feedback"), default="preference",
                      help="preference (the votes, default) or feedback (the thumbs).")
    made.add_argument("--name", help="The dataset's name (default: votes of <comparison>, or thumbs of).")

    sets = _group(sub, "prompt-sets", "Prompt sets: list, show.")
    sets_list = _leaf(sets, "list", adapters.prompt_sets_list, "List prompt sets, newest first.")
    sets_list.add_argument("--owner", help="A username, or `me`.")
    _limit(sets_list)
    _leaf(sets, "show", adapters.prompt_sets_show, "A prompt set with its prompts and references.").add_argument(
        "id", type=int)

    chat.register(sub, _leaf)

    export = _leaf(sub, "export", adapters.export, "Export an adapter for Ollama (a folder with a Modelfile) or for "
                   "vLLM (the folder vLLM serves, checked in vLLM on a worker that has it): a job.")
    export.add_argument("adapter_id", type=int)
    export.add_argument("--target", choices=["ollama", "vllm"], default="ollama", help="The runtime (default ollama).")
    export.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                        help="vllm: a check prompt (repeat it; default: three short general ones).")
    export.add_argument("--max-new-tokens", type=int, default=32, help="vllm: tokens per check answer.")
    export.add_argument("--form", choices=["merged", "adapter"], default="merged",
                        help="merged: the base with the adapter merged (FROM .); adapter: FROM the base, ADAPTER.")
    export.add_argument("--name", default="tunedeck-model", help="The model's name in Ollama (vllm: the LoRA module's).")
    export.add_argument("--quantize", choices=["q8_0", "q4_K_S", "q4_K_M"], help="For ollama create --quantize.")
    export.add_argument("--system", help="A default system prompt.")
    export.add_argument("--base-name", help="Adapter form: the name Ollama knows the base by.")
    export.add_argument("--wait", action="store_true", help="Wait for the export (exit 1 when it failed).")
    _quiet(export)

    merge = _leaf(sub, "merge", adapters.merge, "Merge an adapter into its base model (a job).")
    merge.add_argument("adapter_id", type=int)
    merge.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (default auto).")
    merge.add_argument("--wait", action="store_true", help="Wait for the merge (exit 1 when it failed).")
    _quiet(merge)
