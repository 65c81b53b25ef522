"""Whether this process and what it needs can serve: `/healthz` (the process answers; nothing else is
touched), `/readyz` (the database and the broker answer: 200, else 503 with the reason), the check every
server command makes at start, and telling a database that cannot serve from a query that failed."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from django.db import InterfaceError, OperationalError, connections
from django.http import HttpRequest, HttpResponseBase, JsonResponse

RETRY_AFTER_S = 5
PROBE_TIMEOUT_S = 3
# SQLSTATE classes of a server that is gone or full: connection exceptions (08), insufficient resources
# (53: too many connections), operator intervention (57: shutting down, starting up).
UNAVAILABLE_SQLSTATES = ("08", "53", "57")


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` says the database cannot serve now (down, unreachable, out of connections, the pool's
    wait ran out, SQLite locked), as against a query that is wrong."""
    if isinstance(exc, InterfaceError):  # a connection the server closed under us
        return True
    if not isinstance(exc, OperationalError):
        return False
    cause = exc.__cause__
    if type(cause).__module__.startswith("psycopg"):  # psycopg's own errors and psycopg_pool's
        # No SQLSTATE: the connection itself failed (refused, reset, timed out, no pooled connection came).
        sqlstate = getattr(cause, "sqlstate", None)
        return sqlstate is None or sqlstate[:2] in UNAVAILABLE_SQLSTATES
    return "database is locked" in str(exc)


def describe_database(alias: str = "default") -> str:
    """The database in words, without its password: what a message about it must name."""
    db = connections[alias].settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"the SQLite database {db['NAME']}"
    where = f"{db.get('HOST') or 'localhost'}:{db.get('PORT') or 5432}"
    user = f" as user {db['USER']!r}" if db.get("USER") else ""
    return f"the PostgreSQL database {db['NAME']!r} on {where}{user}"


def database_problem(alias: str = "default") -> str | None:
    """None when the database answers a query; else why not, naming it.

    PostgreSQL is probed on a connection of its own with a short timeout, not through the pool: a pool
    whose server is gone makes a caller wait its whole timeout and then says only that it waited."""
    db = connections[alias]
    try:
        if db.vendor == "postgresql":
            import psycopg

            # The probe's own timeout replaces any connect_timeout that DATABASE_URL put into OPTIONS.
            with psycopg.connect(**{**db.get_connection_params(), "connect_timeout": PROBE_TIMEOUT_S}) as conn:
                conn.execute("SELECT 1")
        else:
            with db.cursor() as cursor:
                cursor.execute("SELECT 1")
    except Exception as exc:  # whatever the driver raises, the answer is the same: not ready, and why
        return f"cannot reach {describe_database(alias)}: {_one_line(exc)}"
    finally:
        if db.vendor != "postgresql":
            db.close()
    return None


def broker_problem() -> str | None:
    """None when the Celery broker accepts a connection; else why not, naming it (without its password)."""
    from webapp.celery import app

    with app.connection_for_write() as conn:
        try:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=PROBE_TIMEOUT_S)
        except Exception as exc:  # kombu and its transports raise many kinds: all mean the same here
            return f"cannot reach the broker {conn.as_uri()}: {_one_line(exc)}"
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()).rstrip(".?") or type(exc).__name__


def readiness() -> dict[str, Any]:
    checks = {"database": database_problem() or "ok", "broker": broker_problem() or "ok"}
    ready = all(value == "ok" for value in checks.values())
    return {"status": "ready" if ready else "unavailable", "checks": checks}


class HealthMiddleware:
    """Answers /healthz and /readyz before any other middleware: no session, no host check (a container's
    healthcheck asks for 127.0.0.1, whatever ALLOWED_HOSTS says), nothing that needs the database."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if request.path == "/healthz":
            return JsonResponse({"status": "ok"})
        if request.path == "/readyz":
            body = readiness()
            if body["status"] == "ready":
                return JsonResponse(body)
            return JsonResponse(body, status=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.get_response(request)


def require_database(command: str) -> None:
    """Stop `command` at once, saying which database and why, when the database cannot be reached (rather
    than serving 503s, or dying later in a traceback)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    import django

    django.setup()
    problem = database_problem()
    if problem:
        sys.exit(f"tunedeck {command}: {problem}.\nIs the database running, and is DATABASE_URL right?")
