"""The `tunedeck` command: `up` (everything on one machine), `web`, `scheduler`, `worker`, `manage`, and the
client commands over the REST API (`login`, `datasets`, `runs`, `adapters`, …: tunedeck_cli/).

`worker` never imports Django: a GPU machine runs it with the broker URL, the server URL and
its token only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING

from workers.config import private_var_dir

if TYPE_CHECKING:  # imported where `up` runs: the other commands need neither psutil nor its process handling
    from webapp.embedded import Children, InstanceLock, Interrupts

SETTINGS = "webapp.settings"


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


def require_database(command: str) -> None:
    """Set Django up and stop `command` at once, naming the database, when it cannot be reached. Imported here,
    not at the top: the client commands (login, runs, …) run where Django is not configured."""
    from webapp.health import require_database as check

    check(command)


def cmd_web(args: argparse.Namespace) -> int:
    require_database("web")
    os.execv(sys.executable, _web_argv(args.host, args.port))


def cmd_scheduler(args: argparse.Namespace) -> int:
    require_database("scheduler")
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
    from workers.runtime.startup import start_worker

    start_worker(args.queue or [], loglevel=args.loglevel)
    return 0


LOCAL_WORKER = "local"


def _prepare_embedded() -> tuple[dict[str, str], list[str]]:
    """Migrate, create demo content and the local worker; return the worker's env and notes.

    Called with the instance lock held and Django set up (require_database): no worker of an earlier start is
    alive, so the local worker's token can be replaced."""
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)
    from webapp.catalog.demo import ensure_admin, ensure_demo_content
    from webapp.fleet.models import Worker

    notes = [f"created {item}" for item in ensure_demo_content()]
    admin = ensure_admin()
    if admin and admin[1]:
        notes.append(f"admin account: {admin[0]} / {admin[1]}   (shown once: keep it)")
    elif admin:
        notes.append(f"admin account: {admin[0]} (password from TUNEDECK_ADMIN_PASSWORD)")
    worker = Worker.objects.filter(name=LOCAL_WORKER).first() or Worker(name=LOCAL_WORKER, labels=[LOCAL_WORKER])
    token = worker.set_new_token()  # a fresh token each start: the old local process is gone
    worker.save()
    from django.conf import settings

    # The local worker shares this machine's store: it reads and writes it directly.
    store = {"TUNEDECK_WORKER_STORE": "local", "ARTIFACT_STORE": str(settings.ARTIFACT_STORE)}
    return {"TUNEDECK_WORKER_TOKEN": token, **store}, notes


def _local_worker_grace() -> float:
    """How long the local worker may take to hand its running jobs back (see webapp/fleet/handover.py)."""
    from django.db import DatabaseError

    from webapp.fleet.handover import CHECKPOINT_AND_REPORTS_S, handover_grace
    from webapp.fleet.models import Worker

    try:
        worker = Worker.objects.filter(name=LOCAL_WORKER).first()
        return handover_grace(worker) if worker else CHECKPOINT_AND_REPORTS_S
    except DatabaseError:
        return CHECKPOINT_AND_REPORTS_S


def _claim(args: argparse.Namespace, url: str) -> InstanceLock | None:
    """The instance lock on var/ and a free port, before anything is touched; None after saying why not."""
    from webapp.embedded import AlreadyRunning, InstanceLock, check_port_free

    lock = InstanceLock(private_var_dir())
    try:
        lock.acquire(url)
    except AlreadyRunning as exc:
        print(f"Tunedeck: {exc}", file=sys.stderr, flush=True)
        return None
    problem = check_port_free(args.host, args.port)
    if problem:
        print(f"Tunedeck: {problem}", file=sys.stderr, flush=True)
        return None
    return lock


def _start(children: Children, args: argparse.Namespace, server: str, worker_env: dict[str, str]) -> int:
    """Start the web server, the scheduler and the local worker; return the web server's pid."""
    web = children.start("web server", _web_argv(args.host, args.port))
    children.start("scheduler", [sys.executable, "-m", "webapp.cli", "manage", "scheduler"])
    if not args.no_worker:
        children.start("worker", [sys.executable, "-m", "webapp.cli", "worker", "--server", server], env=worker_env)
    return web.pid


def _supervise(children: Children, web_pid: int, port: int, server: str, interrupts: Interrupts) -> int:
    """Say where Tunedeck runs once the web server itself listens; return 1 when a child exits, 0 on Ctrl-C."""
    from webapp.embedded import listens_on

    announced = False
    while not interrupts.count:
        dead = children.dead()
        if dead:
            print(f"Tunedeck: the {dead} process exited; stopping the rest", file=sys.stderr, flush=True)
            return 1
        if not announced and listens_on(web_pid, port):
            announced = True
            print(f"Tunedeck is running at {server}/  (Ctrl-C stops it)", flush=True)
        time.sleep(0.3)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    # Everything `up` and the processes it starts create (database, broker messages, artifacts) is this user's only.
    os.umask(0o077)
    server = f"http://{args.host}:{args.port}"
    lock = _claim(args, f"{server}/")
    if lock is None:
        return 1
    # After the lock and the port: a second start touches nothing, not even the SQLite file.
    require_database("up")
    print("Tunedeck: preparing the database and demo content…", flush=True)
    worker_env, notes = _prepare_embedded()
    for line in notes:
        print(f"  {line}", flush=True)
    from webapp.embedded import Children, Interrupts

    interrupts = Interrupts()
    children = Children(lock)
    status = _supervise(children, _start(children, args, server, worker_env), args.port, server, interrupts)
    print("Tunedeck: stopping…", flush=True)
    # The worker first, while the web server can still take its reports: its running jobs save a checkpoint at
    # their next step and go back to the queue. Then the scheduler, then the web server.
    children.stop({"worker": _local_worker_grace()}, hurry=lambda: interrupts.count > 1,
                  say=lambda line: print(f"Tunedeck: {line}", flush=True))
    print("Tunedeck: stopped", flush=True)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunedeck", description="Self-hosted LoRA/QLoRA fine-tuning dashboard.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="Run everything on this machine (embedded default: SQLite, no broker server).")
    up.add_argument("--host", default=os.environ.get("TUNEDECK_HOST", "127.0.0.1"),
                    help="Interface to listen on (default 127.0.0.1: this machine only).")
    up.add_argument("--port", type=int, default=int(os.environ.get("TUNEDECK_PORT", "8000")))
    up.add_argument("--no-worker", action="store_true", help="Do not start the local worker.")
    up.set_defaults(func=cmd_up)

    web = sub.add_parser("web", help="Run the web server (ASGI, uvicorn).")
    web.add_argument("--host", default="127.0.0.1",
                     help="Interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface).")
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

    from tunedeck_cli import register as register_client  # the REST API client: httpx only, never Django

    register_client(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
