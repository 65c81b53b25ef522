"""The `tunedeck` command: `up` (everything on one machine), `web`, `scheduler`, `worker`, `manage`, and the
client commands over the REST API (`login`, `datasets`, `runs`, `adapters`, …: webapp/client/).

`worker` never imports Django: a GPU machine runs it with the broker URL, the server URL and
its token only.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Any

SETTINGS = "webapp.settings"


def _django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", SETTINGS)
    import django

    django.setup()


def _manage(argv: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", SETTINGS)
    from django.core.management import execute_from_command_line

    execute_from_command_line(["tunedeck manage", *argv])


def cmd_manage(args: argparse.Namespace) -> int:
    _manage(args.rest)
    return 0


def _web_argv(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "webapp.asgi:application", "--host", host, "--port", str(port),
            "--no-access-log", "--timeout-graceful-shutdown", "3"]


def cmd_web(args: argparse.Namespace) -> int:
    os.execv(sys.executable, _web_argv(args.host, args.port))


def cmd_scheduler(args: argparse.Namespace) -> int:
    _manage(["scheduler", f"--interval={args.interval}"])
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    if args.server:
        os.environ["TUNEDECK_SERVER"] = args.server
    # An explicit --token or --token-file wins over whatever the environment holds (a _FILE variable
    # would otherwise take precedence over the token itself).
    if args.token:
        os.environ["TUNEDECK_WORKER_TOKEN"] = args.token
        os.environ.pop("TUNEDECK_WORKER_TOKEN_FILE", None)
    elif args.token_file:
        os.environ["TUNEDECK_WORKER_TOKEN_FILE"] = args.token_file
    from workers.tasks import start_worker

    start_worker(args.queue or [], loglevel=args.loglevel)
    return 0


def _prepare_embedded() -> tuple[dict[str, str], list[str]]:
    """Migrate, create demo content and the local worker; return the worker's env and notes."""
    from django.core.management import call_command

    _django()
    call_command("migrate", interactive=False, verbosity=0)
    from webapp.catalog.demo import ensure_admin, ensure_demo_content
    from webapp.fleet.models import Worker

    notes = [f"created {item}" for item in ensure_demo_content()]
    admin = ensure_admin()
    if admin:
        notes.append(f"admin account: {admin[0]} / {admin[1]}   (shown once: keep it)")
    worker = Worker.objects.filter(name="local").first() or Worker(name="local", labels=["local"])
    token = worker.set_new_token()  # a fresh token each start: the old local process is gone
    worker.save()
    return {"TUNEDECK_WORKER_TOKEN": token}, notes


class Children:
    """Child processes in their own sessions, so Ctrl-C reaches only us and we stop them in order."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append((name, proc))

    def dead(self) -> str | None:
        return next((name for name, proc in self.procs if proc.poll() is not None), None)

    def stop(self, grace: float = 15.0) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_until_listening(host: str, port: int, children: Children, timeout: float = 60.0) -> bool:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not children.dead():
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.2)
    return False


def cmd_up(args: argparse.Namespace) -> int:
    print("Tunedeck: preparing the database and demo content…", flush=True)
    worker_env, notes = _prepare_embedded()
    server = f"http://{args.host}:{args.port}"
    children = Children()
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    manage = [sys.executable, "-m", "webapp.cli", "manage"]
    children.start("web", _web_argv(args.host, args.port))
    children.start("scheduler", [*manage, "scheduler"])
    if not args.no_worker:
        worker_cmd = [sys.executable, "-m", "webapp.cli", "worker", "--server", server]
        children.start("worker", worker_cmd, env=worker_env)
    if _wait_until_listening(args.host, args.port, children):
        for line in notes:
            print(f"  {line}", flush=True)
        print(f"Tunedeck is running at {server}/  (Ctrl-C stops it)", flush=True)
    status = 0
    while not stopping:
        dead = children.dead()
        if dead:
            print(f"Tunedeck: the {dead} process exited; stopping the rest", file=sys.stderr, flush=True)
            status = 1
            break
        time.sleep(0.3)
    print("Tunedeck: stopping…", flush=True)
    children.stop()
    print("Tunedeck: stopped", flush=True)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunedeck", description="Self-hosted LoRA/QLoRA fine-tuning dashboard.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="Run everything on this machine (embedded default: SQLite, no broker server).")
    up.add_argument("--host", default=os.environ.get("TUNEDECK_HOST", "127.0.0.1"))
    up.add_argument("--port", type=int, default=int(os.environ.get("TUNEDECK_PORT", "8000")))
    up.add_argument("--no-worker", action="store_true", help="Do not start the local worker.")
    up.set_defaults(func=cmd_up)

    web = sub.add_parser("web", help="Run the web server (ASGI, uvicorn).")
    web.add_argument("--host", default="0.0.0.0")
    web.add_argument("--port", type=int, default=8000)
    web.set_defaults(func=cmd_web)

    sched = sub.add_parser("scheduler", help="Run the scheduler loop.")
    sched.add_argument("--interval", type=float, default=1.0)
    sched.set_defaults(func=cmd_scheduler)

    worker = sub.add_parser(
        "worker", help="Run a worker (on a GPU machine): needs the server URL and a token.",
        description="Run a worker: needs the control plane URL and the worker's token (shown once when an admin "
                    "registers the worker or rotates its token). The token comes from --token, --token-file, "
                    "or the environment: TUNEDECK_WORKER_TOKEN, or TUNEDECK_WORKER_TOKEN_FILE naming a file.")
    worker.add_argument("--server", default=os.environ.get("TUNEDECK_SERVER", ""),
                        help="Control plane URL, e.g. https://tunedeck.example.com (default: TUNEDECK_SERVER).")
    token = worker.add_mutually_exclusive_group()
    token.add_argument("--token", help="The worker token (visible to other users in process listings: prefer "
                                       "--token-file or TUNEDECK_WORKER_TOKEN).")
    token.add_argument("--token-file", help="File holding the worker token (default: TUNEDECK_WORKER_TOKEN_FILE, "
                                            "else TUNEDECK_WORKER_TOKEN).")
    worker.add_argument("--queue", action="append", help="Extra queue to consume (repeatable).")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=cmd_worker)

    manage = sub.add_parser("manage", help="Django management commands (migrate, createsuperuser, …).")
    manage.add_argument("rest", nargs=argparse.REMAINDER)
    manage.set_defaults(func=cmd_manage)

    from webapp.client import register as register_client  # the REST API client: httpx only, never Django

    register_client(sub)
    return parser


# Commands that serve from the database: each stops at once, naming it, when the database cannot be reached.
NEEDS_DATABASE = ("web", "scheduler", "up")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.func.__name__.removeprefix("cmd_")
    if command in NEEDS_DATABASE:
        from webapp.health import require_database

        require_database(command)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
