"""`tunedeck login`, `logout` and `whoami`."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from webapp.client import config
from webapp.client.api import Api, whoami
from webapp.client.errors import USAGE, CliError
from webapp.client.output import details, emit_json, note


def _read_key(args: argparse.Namespace) -> str:
    if args.key:
        return str(args.key).strip()
    if sys.stdin.isatty():
        return getpass.getpass("API key (tdk_…): ").strip()
    return sys.stdin.readline().strip()


def login(args: argparse.Namespace) -> int:
    """Check the key against the server, then store both in the config file (mode 0600)."""
    server = config.normalize_server(args.server or os.environ.get("TUNEDECK_SERVER", ""))
    key = _read_key(args)
    if not key:
        raise CliError("no API key given: pass --key or pipe it on stdin", USAGE)
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
        print(f"Logged in to {server}{who}; key stored in {path}")
    return 0


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
