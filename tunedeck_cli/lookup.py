"""Catalog objects named on the command line: `tunedeck datasets show toy` as well as `show 7`.

Base models, datasets and LoRA configs have unique names; the server's lists filter by exact name (`?name=`).
A number is the object's id when one has it (what `show 7` always meant), else a name.
"""

from __future__ import annotations

from typing import Any

from tunedeck_cli.api import Api
from tunedeck_cli.errors import NOT_FOUND, CliError

# The API list, the noun and the CLI group of each named catalog kind.
KINDS = {"base-models/": ("base model", "models"), "datasets/": ("dataset", "datasets"),
         "lora-configs/": ("LoRA config", "lora-configs")}


def find(api: Api, path: str, value: str) -> dict[str, Any]:
    """The object of the list at `path` whose id or name is `value` (its detail: what `GET path/id/` answers)."""
    value = value.strip()
    if value.isdigit():
        response = api.request("GET", f"{path}{int(value)}/", ok=(404,))
        if response.status_code != 404:
            return dict(response.json())
    found = api.get(path, name=value).get("results", [])
    if not found:
        noun, group = KINDS[path]
        raise CliError(f"no {noun} has the id or name {value!r} (`tunedeck {group} list` shows them)", NOT_FOUND)
    return dict(api.get(f"{path}{found[0]['id']}/"))
