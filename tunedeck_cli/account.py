"""`tunedeck login`, `logout` and `whoami`."""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
from typing import Any

from tunedeck_cli import config
from tunedeck_cli.api import Api, whoami
from tunedeck_cli.errors import USAGE, CliError
from tunedeck_cli.output import details, emit_json, note


def _read_secret(prompt: str) -> str:
    """Prompted without echo on a terminal; else the first line of stdin (for scripts), kept as typed."""
    if sys.stdin.isatty():
        return getpass.getpass(prompt)
    return sys.stdin.readline().rstrip("\r\n")


def _read_key(args: argparse.Namespace) -> str:
    return str(args.key or _read_secret("API key (tdk_…): ")).strip()


def _username(args: argparse.Namespace) -> str | None:
    """The user name to log in with, or None for an API key: --username; else, on a terminal without --key, asked
    (an empty answer asks for a key instead); stdin that is no terminal carries a key, as always."""
    if args.username is not None:
        if args.key:
            raise CliError("give --key or --username, not both", USAGE)
        return str(args.username).strip()
    if args.key or not sys.stdin.isatty():
        return None
    return input("Username (Enter to paste an API key instead): ").strip() or None


def login(args: argparse.Namespace) -> int:
    """Check the key against the server (or exchange a user name and password for a new one), then store both
    in the config file (mode 0600)."""
    server = config.normalize_server(args.server or os.environ.get("TUNEDECK_SERVER", ""))
    username = _username(args)
    if username is not None:
        key, me = _key_for_password(server, username, args.scopes)
    else:
        key = _read_key(args)
        if not key:
            raise CliError("no API key given: pass --key or pipe it on stdin (or log in with --username)", USAGE)
        if not key.startswith("tdk_"):
            raise CliError("an API key starts with tdk_ (a worker token, tdw_…, is for `tunedeck worker`)", USAGE)
        with Api(config.Settings(server, key, "login")) as api:
            me = whoami(api)
    values = {**config.read_file(), "server": server, "api_key": key}
    path = config.write_file(values)
    if args.json:
        emit_json({"server": server, "config": str(path), "user": me})
    else:
        who = f" as {me['username']}" if me.get("username") else ""
        made = f"; new API key {me['key_name']!r} ({me['key_prefix']}…)" if username is not None else ""
        print(f"Logged in to {server}{who}{made}; key stored in {path}")
    return 0


def _key_for_password(server: str, username: str, scopes: str) -> tuple[str, dict[str, Any]]:
    """A new key named after this machine, from POST login/; returns it with what `whoami` would say of it."""
    if not username:
        raise CliError("--username is empty", USAGE)
    password = _read_secret(f"Password for {username} on {server}: ")
    if not password:
        raise CliError("no password given: type it at the prompt, or pipe it on stdin", USAGE)
    body = {"username": username, "password": password, "name": f"cli on {socket.gethostname()}"[:100],
            "scopes": [s.strip() for s in scopes.split(",") if s.strip()]}
    with Api(config.Settings(server, "", "login")) as api:
        made = api.post("login/", body).json()
    me = {"username": made["username"], "key_name": made["name"], "key_prefix": made["prefix"],
          "scopes": made["scopes"], "expires_at": made["expires_at"]}
    return str(made["key"]), me


def logout(args: argparse.Namespace) -> int:
    path = config.config_path()
    values = config.read_file(path)
    if "api_key" in values:
        del values["api_key"]
        config.write_file(values, path)
        message = f"Removed the API key from {path}"
    else:
        message = f"No API key stored in {path}"
    if os.environ.get("TUNEDECK_API_KEY"):
        message += " (TUNEDECK_API_KEY is still set in this environment)"
    if args.json:
        emit_json({"config": str(path), "logged_out": True})
    else:
        print(message)
    return 0


def show_whoami(args: argparse.Namespace, api: Api) -> int:
    me = whoami(api)
    if args.json:
        emit_json({"server": api.server, **me})
    else:
        note(f"server: {api.server}", sys.stdout)
        details(me)
    return 0
