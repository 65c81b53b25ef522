"""`tunedeck datasets`, `models` and `lora-configs`."""

from __future__ import annotations

import argparse
import re
import uuid
from pathlib import Path

from tunedeck_cli.api import Api
from tunedeck_cli.lookup import find
from tunedeck_cli.output import emit_json, field, list_command, show_object, shown, when
from tunedeck_cli.transfer import upload
from workers.formatting import compact, count, size

DATASET_COLUMNS = [("id", field("id")), ("name", field("name")), ("format", field("format")),
                   ("rows", shown("row_count", count)), ("size", shown("size_bytes", size)), ("created", when("created_at"))]
MODEL_COLUMNS = [("id", field("id")), ("name", field("name")), ("source", field("source")),
                 ("architecture", field("architecture")), ("params", shown("num_parameters", compact))]
CONFIG_COLUMNS = [("id", field("id")), ("name", field("name")), ("method", field("method")),
                  ("summary", field("summary"))]


def datasets_list(args: argparse.Namespace, api: Api) -> int:
    return list_command(args, api, "datasets/", DATASET_COLUMNS, "no datasets yet: `tunedeck datasets upload FILE`")


def datasets_show(args: argparse.Namespace, api: Api) -> int:
    return show_object(args, find(api, "datasets/", args.id))


def datasets_upload(args: argparse.Namespace, api: Api) -> int:
    file = Path(args.file)
    name = args.name or re.sub(r"[^A-Za-z0-9_-]+", "-", file.stem).strip("-") or "dataset"  # names are slugs
    dataset = upload(api, "datasets/", file, {"name": name}, quiet=args.quiet,
                     idempotency_key=args.idempotency_key or str(uuid.uuid4()))
    if args.json:
        emit_json(dataset)
        return 0
    print(f"Dataset {dataset.get('id')} {dataset.get('name')!r}: {dataset.get('row_count')} rows, "
          f"format {dataset.get('format')}")
    return 0


def models_list(args: argparse.Namespace, api: Api) -> int:
    return list_command(args, api, "base-models/", MODEL_COLUMNS, "no base models yet: `tunedeck models register NAME SOURCE`")


def models_show(args: argparse.Namespace, api: Api) -> int:
    return show_object(args, find(api, "base-models/", args.id))


def models_register(args: argparse.Namespace, api: Api) -> int:
    body = {"name": args.name, "source": args.source, "revision": args.revision or ""}
    model = api.post("base-models/", body, idempotency_key=str(uuid.uuid4())).json()
    if args.json:
        emit_json(model)
    else:
        print(f"Base model {model.get('id')} {model.get('name')!r}: {model.get('architecture') or '?'}, "
              f"{model.get('num_parameters') or '?'} parameters")
    return 0


def configs_list(args: argparse.Namespace, api: Api) -> int:
    return list_command(args, api, "lora-configs/", CONFIG_COLUMNS, "no LoRA configs yet")


def configs_show(args: argparse.Namespace, api: Api) -> int:
    return show_object(args, find(api, "lora-configs/", args.id))
