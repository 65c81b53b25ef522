"""The pieces of `tunedeck up` (everything on one machine), Django-free: one instance per var/, the port, the
child processes and their stop in order.

One instance per var/: `InstanceLock` holds var/tunedeck.lock (flock) for the life of `tunedeck up` and of every
process it starts, so a second start finds the lock taken before it touches anything (the database, the local
worker's token, the port) and says where the first one runs.

The stop hands work over: the worker is stopped first and given time to checkpoint its running jobs at their
next step and report them `interrupted` to the web server, which is still up; then the scheduler; then the web
server.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

LOCK_NAME = "tunedeck.lock"
STOP_GRACE_S = 15.0  # the scheduler and the web server, each
POLL_S = 0.2


class AlreadyRunning(Exception):
    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        self.path, self.pid, self.url = path, holder.get("pid"), holder.get("url")
        super().__init__(self.message())

    def message(self) -> str:
        var = self.path.parent
        if not isinstance(self.pid, int) or not psutil.pid_exists(self.pid):
            return (f"Tunedeck is already running on {var}: processes it started still hold {self.path} "
                    f"(`fuser -v {self.path}` lists them; stop them first)")
        return (f"Tunedeck is already running (pid {self.pid}) at {self.url} on {var}: open it, or stop it first "
                f"(Ctrl-C where it runs, or kill {self.pid})")


class InstanceLock:
    """An exclusive flock on var/tunedeck.lock; the file records the holder's pid and URL for a second start."""

    def __init__(self, var: Path) -> None:
        self.path = var / LOCK_NAME
        self.fd = -1

    def acquire(self, url: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise AlreadyRunning(self.path, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "url": url}).encode(), 0)
        self.fd = fd


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # being written at this very moment
        return {}
    return holder if isinstance(holder, dict) else {}


def check_port_free(host: str, port: int) -> str:
    """'' if the web server will be able to listen on host:port, else why not (said before anything starts).

    uvicorn (asyncio's create_server) listens on every address the host resolves to, localhost's 127.0.0.1 and
    ::1 alike, and fails if any one is taken: each is tried here, the same way."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror}"
    for family, kind, proto, _, address in dict.fromkeys(infos):
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:  # a family this machine lacks (IPv6): asyncio skips it too
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a just-closed port is free
            if family == socket.AF_INET6:  # as asyncio binds: IPv6 only, an IPv4 listener on the port is no conflict
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                taken = " (another program listens there: stop it, or choose another port with --port)"
                return f"cannot listen on {host}:{port}: {exc.strerror}{taken if exc.errno == errno.EADDRINUSE else ''}"
    return ""


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` itself listens on `port` (a connection alone could reach another program)."""
    try:
        connections = psutil.Process(pid).net_connections(kind="inet")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


class Interrupts:
    """Counts SIGINT and SIGTERM from here on: the first stops `tunedeck up` in order, a second hurries the stop."""

    def __init__(self) -> None:
        self.count = 0
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.count += 1


class Children:
    """Child processes in their own sessions, so Ctrl-C reaches only us and we stop them in order. Each inherits
    the instance lock: while any of them lives, var/ stays taken."""

    def __init__(self, lock: InstanceLock) -> None:
        self.lock = lock
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        keep = (self.lock.fd,) if self.lock.fd >= 0 else ()
        proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, start_new_session=True, pass_fds=keep)
        self.procs.append((name, proc))
        return proc

    def dead(self) -> str | None:
        return next((name for name, proc in self.procs if proc.poll() is not None), None)

    def stop(self, graces: dict[str, float], hurry: Callable[[], bool], say: Callable[[str], None]) -> None:
        """Stop the children one at a time, the last started first: SIGTERM, then SIGKILL to its process group
        once its grace (default STOP_GRACE_S) has passed, or at once when `hurry()` turns true (a second Ctrl-C)."""
        for name, proc in reversed(self.procs):
            if proc.poll() is not None:
                continue
            grace = graces.get(name, STOP_GRACE_S)
            say(f"stopping the {name} (up to {grace:.0f} s; Ctrl-C again stops everything at once)")
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while proc.poll() is None and time.monotonic() < deadline and not hurry():
                time.sleep(POLL_S)
            if proc.poll() is None:
                say(f"the {name} did not stop in time: killed")
                _kill_group(proc)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the group id is its pid
    except ProcessLookupError:
        pass
    proc.wait()
