"""What the commands print: JSON for scripts (stdout), tables and key/value blocks for people, progress on stderr.

For people, figures, counts, sizes and times follow the pages' rules (workers/formatting.py); JSON keeps the
API's raw values."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any

from tqdm import tqdm

from workers import formatting

if TYPE_CHECKING:
    import argparse

    from tunedeck_cli.api import Api

Column = tuple[str, Callable[[dict[str, Any]], Any]]


def emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def ref(value: Any) -> str:
    """A related object shown by name where the API nests it, else as its id."""
    if isinstance(value, dict):
        return str(value.get("name") or value.get("username") or value.get("id") or "")
    return "" if value is None else str(value)


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return formatting.figure(value)
    if isinstance(value, dict):
        return ref(value)
    if isinstance(value, list):
        return ",".join(ref(v) for v in value)
    text = str(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:59] + "…"


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], empty: str = "nothing here") -> None:
    if not rows:
        print(empty)
        return
    grid = [[name.upper() for name, _ in columns]]
    grid += [[cell(get(row)) for _, get in columns] for row in rows]
    widths = [max(len(r[i]) for r in grid) for i in range(len(columns))]
    for r in grid:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def field(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda row: row.get(name)


def shown(name: str, rule: Callable[[Any], str]) -> Callable[[dict[str, Any]], Any]:
    """A column written by one of the formatting rules (an empty cell where the value is missing)."""
    def get(row: dict[str, Any]) -> str | None:
        return None if row.get(name) is None else rule(row[name])

    return get


def when(name: str) -> Callable[[dict[str, Any]], Any]:
    """An ISO 8601 timestamp as the pages write it: 2026-11-30T10:49:36.003Z → 2026-11-30 10:49 UTC."""
    return shown(name, formatting.timestamp)


def details(obj: dict[str, Any], skip: Sequence[str] = ()) -> None:
    """A key/value block; nested dicts are indented one level, long lists summarised."""
    width = max((len(k) for k in obj if k not in skip), default=0)
    for key, value in obj.items():
        if key in skip:
            continue
        if isinstance(value, dict) and value and not ("id" in value and "name" in value):
            print(f"{key}:")
            inner = max(len(str(k)) for k in value)
            for k, v in value.items():
                print(f"  {str(k).ljust(inner)}  {_scalar(v, str(k))}")
        else:
            print(f"{key.ljust(width)}  {_scalar(value, key)}")


def _scalar(value: Any, key: str = "") -> str:
    """A value of a show block: times, sizes (fields named *_bytes) and floats by the formatting rules."""
    if key.endswith("_at") and isinstance(value, str) and formatting.as_datetime(value):
        return formatting.timestamp(value)
    if key.endswith("_bytes") and isinstance(value, int):
        return formatting.size(value)
    if isinstance(value, float):
        return formatting.figure(value)
    if isinstance(value, dict):
        return ref(value) if "id" in value and "name" in value else json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        if len(value) > 8 and all(isinstance(v, dict) for v in value):
            return f"[{len(value)} items: --json shows them]"
        return json.dumps(value, ensure_ascii=False) if any(isinstance(v, dict | list) for v in value) \
            else ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


def progress(total: int | None, desc: str, unit: str = "it", quiet: bool = False, bytes_: bool = False) -> tqdm:
    """A progress bar on stderr (stdout stays clean for --json)."""
    kwargs: dict[str, Any] = {"unit": "B", "unit_scale": True, "unit_divisor": 1024} if bytes_ else {"unit": unit}
    return tqdm(total=total or None, desc=desc, file=sys.stderr, disable=quiet, dynamic_ncols=True,
                mininterval=0.2, **kwargs)


def note(message: str, stream: IO[str] | None = None) -> None:
    print(message, file=stream or sys.stderr, flush=True)


def list_command(args: argparse.Namespace, api: Api, path: str, columns: Sequence[Column], empty: str,
                 **filters: Any) -> int:  # fmt: skip
    """A list command: every page of `path` (up to --limit) as a table, or as JSON with --json."""
    rows = list(api.pages(path, limit=args.limit, **filters))
    if args.json:
        emit_json(rows)
    else:
        table(rows, columns, empty)
    return 0


def show_command(args: argparse.Namespace, api: Api, path: str, skip: Sequence[str] = ()) -> int:
    """A show command: the object at `path`, as `details` (less `skip`) or as JSON with --json."""
    return show_object(args, api.get(path), skip)


def show_object(args: argparse.Namespace, obj: Any, skip: Sequence[str] = ()) -> int:
    if args.json:
        emit_json(obj)
    else:
        details(obj, skip=skip)
    return 0
