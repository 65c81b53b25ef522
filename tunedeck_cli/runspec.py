"""Run specs in YAML: the API's JSON body for POST /api/v1/runs/, with catalog objects named or numbered (the
server takes either).

    name: addition-r16
    base_model: tiny            # a name or an id
    dataset: toy-addition
    eval_dataset: toy-addition-test   # optional: evaluate on it instead of a held-out fraction
    lora_config: attention+mlp
    hyperparameters: {max_steps: 40, learning_rate: 0.0002}
    priority: 0
    labels: [a100]
    init_adapter: 12            # optional warm start: an adapter's id (tunedeck adapters list); the LoRA config
                                # must have its shape (its own run's config does)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tunedeck_cli.errors import USAGE, CliError

# The server's RunRequest fields (webapp/training/services.py), which this client cannot import: a test keeps the two
# equal (tests/webapp/test_run_request.py).
FIELDS = ("name", "base_model", "dataset", "eval_dataset", "lora_config", "hyperparameters", "priority", "labels",
          "init_adapter")


def load(path: str) -> dict[str, Any]:
    """Parse and check the spec's shape; every problem names the file and the field."""
    try:
        text = Path(path).read_text(encoding="utf-8") if path != "-" else _stdin()
    except OSError as exc:
        raise CliError(f"cannot read the run spec {path}: {exc.strerror}", USAGE) from exc
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        raise CliError(f"{path}{at} is not valid YAML: {getattr(exc, 'problem', exc)}", USAGE) from exc
    if not isinstance(spec, dict):
        raise CliError(f"{path}: a run spec is a mapping of {', '.join(FIELDS)}", USAGE)
    problems = []
    for key in spec:
        if key not in FIELDS:
            problems.append(f"{key}: unknown field (a run spec has {', '.join(FIELDS)}; training settings go "
                            "under hyperparameters)")
    for key in ("base_model", "dataset", "lora_config"):
        if spec.get(key) in (None, ""):
            problems.append(f"{key}: required (a name or an id)")
        elif not isinstance(spec[key], str | int) or isinstance(spec[key], bool):
            problems.append(f"{key}: a name or an id, got {type(spec[key]).__name__}")
    evaluation = spec.get("eval_dataset")
    if evaluation is not None and (not isinstance(evaluation, str | int) or isinstance(evaluation, bool)):
        problems.append(f"eval_dataset: a name or an id, got {type(evaluation).__name__}")
    parent = spec.get("init_adapter")
    if parent is not None and not _is_id(parent):
        problems.append(f"init_adapter: an adapter's id (tunedeck adapters list), got {str(parent)[:80]!r}")
    if not isinstance(spec.get("hyperparameters", {}), dict):
        problems.append("hyperparameters: a mapping of training settings, e.g. {max_steps: 100}")
    labels = spec.get("labels", [])
    if isinstance(labels, str):
        spec["labels"] = [s.strip() for s in labels.split(",") if s.strip()]
    elif not (isinstance(labels, list) and all(isinstance(s, str) for s in labels)):
        problems.append("labels: a list of worker labels, e.g. [a100]")
    if "priority" in spec and (not isinstance(spec["priority"], int) or isinstance(spec["priority"], bool)):
        problems.append("priority: a whole number")
    if problems:
        raise CliError(f"the run spec {path} is not valid", USAGE, problems)
    return spec


def _is_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and value > 0) or (isinstance(value, str) and value.isdigit())


def _stdin() -> str:
    import sys

    return sys.stdin.read()


def body(spec: dict[str, Any]) -> dict[str, Any]:
    """The JSON body to POST: the spec as it is (the server looks the names up and names any it cannot find),
    an empty eval_dataset or init_adapter left out."""
    return {key: value for key, value in spec.items()
            if not (key in ("eval_dataset", "init_adapter") and value in (None, ""))}
