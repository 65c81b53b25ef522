"""The `tunedeck` client commands: the REST API at /api/v1/ over HTTP (httpx), never Django.

`register(subparsers)` adds `login`, `logout`, `whoami`, `datasets`, `models`, `runs`, `adapters`,
`compare` and `merge` to the `tunedeck` parser (webapp/cli.py).
"""

from webapp.client.commands import register

__all__ = ["register"]
