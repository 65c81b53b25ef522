"""The `tunedeck` client commands: the REST API at /api/v1/ over HTTP (httpx), never Django.

`register(subparsers)` adds `login`, `logout`, `whoami`, `datasets`, `models`, `runs`, `adapters`,
`compare` and `merge` to the `tunedeck` parser (webapp/cli.py).
"""

from tunedeck_cli.commands import register

__all__ = ["register"]
