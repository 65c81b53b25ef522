"""`tunedeck sweeps`: create (from a YAML spec, optionally waiting), list, show, stop."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

from tunedeck_cli.api import Api
from tunedeck_cli.errors import FAILED, OK, USAGE, CliError
from tunedeck_cli.output import emit_json, field, list_command, note, progress, show_object, shown, when
from workers.formatting import figure

POLL_S = 2.0
# The server's sweep spec keys (webapp/api/sweeps.py SweepCreateSerializer); see examples/sweep.yaml.
FIELDS = ("name", "base_run", "base_settings", "space", "first_trials", "num_runs", "runs_at_once", "metric",
          "direction", "sampler", "pruner")
SWEEP_COLUMNS = [("id", field("id")), ("name", field("name")), ("state", field("state")),
                 ("trials", lambda s: f"{s.get('trials_ended', 0)}/{s.get('num_runs')}"),
                 ("best", shown("best_value", figure)), ("metric", lambda s: f"{s.get('direction')} {s.get('metric')}"),
                 ("search", lambda s: f"{s.get('sampler')}/{s.get('pruner')}"), ("owner", field("owner")),
                 ("created", when("created_at"))]


def load(path: str) -> dict[str, Any]:
    """The sweep spec, its shape checked; each problem names the field."""
    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"cannot read the sweep spec {path}: {exc.strerror}", USAGE) from exc
    except yaml.YAMLError as exc:
        raise CliError(f"{path} is not valid YAML: {getattr(exc, 'problem', exc)}", USAGE) from exc
    if not isinstance(spec, dict):
        raise CliError(f"{path}: a sweep spec is a mapping of {', '.join(FIELDS)}", USAGE)
    problems = [f"{key}: unknown field (a sweep spec has {', '.join(FIELDS)})" for key in spec if key not in FIELDS]
    if not isinstance(spec.get("space"), dict):
        problems.append("space: a mapping of settings to search, e.g. {learning_rate: {type: float, low: 1.0e-5, "
                        "high: 1.0e-3, log: true}}")
    if problems:
        raise CliError(f"the sweep spec {path} is not valid", USAGE, problems)
    return spec


def sweeps_list(args: argparse.Namespace, api: Api) -> int:
    return list_command(args, api, "sweeps/", SWEEP_COLUMNS, "no sweeps")


def sweeps_show(args: argparse.Namespace, api: Api) -> int:
    sweep = api.get(f"sweeps/{args.id}/")
    if args.json:
        return show_object(args, sweep)
    show_object(args, sweep, skip=("trials",))
    for trial in sweep.get("trials", []):
        value = figure(trial["value"]) if trial.get("value") is not None else "–"
        pruned = f" (pruned at step {trial['pruned_at_step']})" if trial.get("pruned_at_step") is not None else ""
        print(f"  #{trial['number']} run {trial['run']} {trial['state']}{pruned}: {value}  {trial['params']}")
    return OK


def sweeps_stop(args: argparse.Namespace, api: Api) -> int:
    sweep = api.post(f"sweeps/{args.id}/stop/").json()
    if args.json:
        emit_json(sweep)
    else:
        print(f"Sweep {sweep['id']} {sweep['state']}: no new trials; runs already going finish")
    return OK


def wait_for_sweep(api: Api, sweep_id: int, quiet: bool) -> dict[str, Any]:
    """Poll until the sweep has no trial left to run, a bar of trials ended on stderr."""
    sweep: dict[str, Any] = api.get(f"sweeps/{sweep_id}/")
    with progress(sweep.get("num_runs"), f"sweep {sweep_id}", unit="trial", quiet=quiet) as bar:
        while True:
            bar.update(int(sweep.get("trials_ended") or 0) - bar.n)
            if sweep.get("best_value") is not None:
                bar.set_postfix_str(f"best {figure(sweep['best_value'])} (run {sweep['best_run']})", refresh=False)
            active = any(t.get("state") == "active" for t in sweep.get("trials", []))
            if sweep.get("state") != "running" and not active:
                return sweep
            time.sleep(POLL_S)
            sweep = api.get(f"sweeps/{sweep_id}/")


def sweeps_create(args: argparse.Namespace, api: Api) -> int:
    sweep = api.post("sweeps/", load(args.file)).json()
    if not args.wait:
        if args.json:
            emit_json(sweep)
        else:
            print(f"Sweep {sweep['id']} {sweep['state']}: {len(sweep.get('trials', []))} trial(s) queued")
        return OK
    note(f"Sweep {sweep['id']} created; waiting for its trials (Ctrl-C stops waiting, not the sweep)")
    sweep = wait_for_sweep(api, int(sweep["id"]), args.quiet)
    if args.json:
        emit_json(sweep)
    elif sweep.get("best_run") is not None:
        print(f"Sweep {sweep['id']} {sweep['state']}: best {sweep['metric']} {figure(sweep['best_value'])} "
              f"(run {sweep['best_run']})")
    else:
        print(f"Sweep {sweep['id']} {sweep['state']}: no trial finished")
    return OK if sweep.get("best_run") is not None else FAILED
