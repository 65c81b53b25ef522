"""Browser tests: a real headless Chromium against the real ASGI server (uvicorn) on the test database.

pytest-django's live_server is WSGI and cannot stream the run page's SSE view, so the server here is
uvicorn in a subprocess, pointed at the database pytest-django created (the SQLite test file, or the
`test_<name>` PostgreSQL database). Tests use `transactional_db` so that the subprocess sees their rows.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

# Playwright's sync API runs an event loop in this thread; Django's ORM would refuse to run here.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(os.environ.get("TUNEDECK_SCREENSHOTS") or ROOT / "var" / "screenshots")
USERNAME, PASSWORD = "owner", "owner-pass-123"  # what tests.webapp.factories.demo_objects creates
WORKER_NAME = f"browser-{uuid.uuid4().hex[:8]}"
WORKER_TOKEN = f"tdw_{uuid.uuid4().hex}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Ask a child process to stop; kill it if it has not within 15 s."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


@pytest.fixture(scope="session")
def chromium() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip(f"browser tests need Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need playwright (pip install -e '.[dev]')")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact store for the test process, the web server and the worker."""
    return tmp_path_factory.mktemp("browser-store")


def _test_database_url() -> str:
    from django.db import connection

    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    user = urllib.parse.quote(db.get("USER") or "")
    password = f":{urllib.parse.quote(db['PASSWORD'])}" if db.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    port = f":{db['PORT']}" if db.get("PORT") else ""
    return f"postgresql://{auth}{db.get('HOST') or 'localhost'}{port}/{db['NAME']}"


@pytest.fixture(scope="session")
def server_env(django_db_setup, shared_store: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The environment of a process that must see the test database and the shared store."""
    from django.conf import settings

    env = {**os.environ, "DATABASE_URL": _test_database_url(), "SECRET_KEY": settings.SECRET_KEY,
           "ARTIFACT_STORE": str(shared_store), "PYTHONUNBUFFERED": "1"}
    env.pop("SECRET_KEY_FILE", None)
    return env


@pytest.fixture(scope="session")
def asgi_server(server_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """uvicorn serving webapp.asgi on a free port; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("uvicorn") / "uvicorn.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "webapp.asgi:application", "--host", "127.0.0.1", "--port", str(port),
             "--timeout-graceful-shutdown", "2", "--log-level", "warning"],
            cwd=ROOT, env=server_env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log_path.read_text(errors="replace")
                assert time.monotonic() < deadline, f"uvicorn did not answer: {log_path.read_text(errors='replace')}"
                try:
                    if httpx.get(f"{url}/login/", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            yield url
        finally:
            stop(proc)


@pytest.fixture
def worker_process(transactional_db, asgi_server: str, server_env: dict[str, str],  # type: ignore[no-untyped-def]
                   shared_store: Path, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """A real worker (`tunedeck worker`) reporting to the ASGI server with WORKER_TOKEN.

    Its row is created first: the worker's first heartbeat must be accepted. One process per test,
    since the database (and so the worker's row) is flushed between tests.
    """
    from tests.webapp.factories import make_worker
    from tests.webapp.fleetprocs import with_worker_store

    make_worker(WORKER_NAME, token=WORKER_TOKEN)
    env = with_worker_store({**server_env, "TUNEDECK_SERVER": asgi_server, "TUNEDECK_WORKER_TOKEN": WORKER_TOKEN,
                             "TUNEDECK_HEARTBEAT_INTERVAL": "2"}, shared_store, tmp_path / "worker")
    for name in ("DATABASE_URL", "SECRET_KEY"):  # a worker never sees database credentials
        env.pop(name, None)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "webapp.cli", "worker"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        proc.log_path = log_path  # type: ignore[attr-defined]
        yield proc
        stop(proc)


@pytest.fixture
def scheduler(transactional_db) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """The scheduler loop (schedule_once, then the apps' passes such as the sweeps', every 0.3 s) in a thread of the
    test process, as the scheduler command runs it."""
    from django.db import OperationalError, connection

    from webapp.fleet.scheduler import run_extra_passes, schedule_once

    stop = threading.Event()

    def loop() -> None:
        try:
            while not stop.is_set():
                try:
                    schedule_once()
                    run_extra_passes()
                except OperationalError:  # SQLite busy under concurrent writers: try again next tick
                    pass
                stop.wait(0.3)
        finally:
            connection.close()

    thread = threading.Thread(target=loop, name="scheduler", daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=30)


@pytest.fixture
def demo(transactional_db, tiny_model_dir: Path, shared_store: Path, settings,  # type: ignore[no-untyped-def]
         local_models):
    """owner user, tiny base model, toy dataset, LoRA config: (user, base, dataset, config)."""
    from tests.webapp.factories import demo_objects

    settings.ARTIFACT_STORE = shared_store
    return demo_objects(tiny_model_dir)


@pytest.fixture
def context(chromium, asgi_server: str) -> Iterator[object]:  # type: ignore[no-untyped-def]
    ctx = chromium.new_context(base_url=asgi_server, accept_downloads=True, viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(20_000)
    ctx.set_default_navigation_timeout(45_000)
    yield ctx
    ctx.close()


def log_in(page, username: str = USERNAME, password: str = PASSWORD) -> None:  # type: ignore[no-untyped-def]
    page.goto("/login/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(lambda url: "/login/" not in url)


@pytest.fixture
def page(context, demo):  # type: ignore[no-untyped-def]
    """A page logged in as the demo owner, with every dialog recorded in page.dialogs (and dismissed)."""
    page = context.new_page()
    page.dialogs = []  # type: ignore[attr-defined]

    def on_dialog(dialog) -> None:  # type: ignore[no-untyped-def]
        page.dialogs.append(dialog.message)  # type: ignore[attr-defined]
        dialog.dismiss()

    page.on("dialog", on_dialog)
    log_in(page)
    return page


@pytest.fixture(scope="session")
def screenshot() -> Callable[..., Path]:
    """screenshot(page, "name") writes SCREENSHOTS/name.png (full page) and returns its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def take(page, name: str) -> Path:  # type: ignore[no-untyped-def]
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take


def fill_setting(field, value: str) -> None:  # type: ignore[no-untyped-def]
    """Fill a New run setting as a person does: open its folded group first (click the group's summary)."""
    group = field.locator("xpath=ancestor::details[1]")
    if group.count() and not group.evaluate("el => el.open"):
        group.locator("xpath=./summary").click()
    field.fill(value)
