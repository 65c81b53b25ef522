"""Django settings, read from the environment only (see the README's configuration table)."""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from workers.config import (
    ConfigError,
    artifact_store_root,
    celery_settings,
    env_bool,
    env_int,
    env_list,
    env_secret,
    env_str,
    model_roots,
    private_dir,
    private_file,
    private_var_dir,
)
from workers.contract.spec import TrainParams
from workers.data.bounds import Limits

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = private_var_dir()  # this user's only: it holds the database, the secret key and the artifacts


def _secret_key(debug: bool) -> str:
    """SECRET_KEY from the environment; the embedded default generates one once under var/."""
    key = env_secret("SECRET_KEY")
    if key:
        return key
    if env_str("DATABASE_URL") and not debug:
        raise ImproperlyConfigured("SECRET_KEY (or SECRET_KEY_FILE) is required when DATABASE_URL is set and DEBUG is off")
    path = VAR_DIR / "secret_key"
    if not path.exists():
        _write_once(path, secrets.token_urlsafe(50))
    return path.read_text(encoding="utf-8").strip()


def _write_once(path: Path, text: str) -> None:
    """Write a new file of mode 0600 whole, or leave the one another process wrote first: it never exists half
    written, nor readable by others."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def _database(url: str) -> dict[str, Any]:
    if not url:
        # Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the database's own mode.
        url = f"sqlite:///{private_file(VAR_DIR / 'tunedeck.sqlite3')}"
    try:
        config: dict[str, Any] = dict(dj_database_url.parse(url, conn_max_age=0))
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a database URL Tunedeck understands: {exc}") from exc
    if config["ENGINE"] == "django.db.backends.sqlite3":
        config["OPTIONS"] = {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
        }
        config["TEST"] = {"NAME": str(VAR_DIR / "test-tunedeck.sqlite3")}
    elif config["ENGINE"] == "django.db.backends.postgresql":
        config["OPTIONS"] = {**config.get("OPTIONS", {}), "pool": _pool()}
        config["CONN_HEALTH_CHECKS"] = True  # the pool hands out only connections that still answer
    else:
        raise ImproperlyConfigured(f"DATABASE_URL: use postgresql:// or sqlite:// (got {config['ENGINE']})")
    return config


def _pool() -> dict[str, Any]:
    """A bounded pool of PostgreSQL connections per process: a thread takes one for a request or one poll of
    a live stream and gives it back, so open streams and bursts of requests wait for a connection (at most
    the timeout, then 503) instead of exhausting the server's max_connections."""
    size = env_int("TUNEDECK_DB_POOL_SIZE", 20, minimum=1)
    return {"min_size": min(2, size), "max_size": size,
            "timeout": float(env_int("TUNEDECK_DB_POOL_TIMEOUT", 10, minimum=1))}


def _api_rate(name: str, default: str) -> str:
    value = env_str(name, default).strip()
    if not re.fullmatch(r"[1-9][0-9]*/(second|minute|hour|day)", value):
        raise ConfigError(f"{name} must look like 600/minute (a count, then second, minute, hour or day); got {value!r}")
    return value


ONE_YEAR = 365 * 24 * 3600


def report_to_default() -> list[str]:
    """TUNEDECK_REPORT_TO: the trackers of a run whose report_to is empty (comma-separated; none or empty: none)."""
    names = env_list("TUNEDECK_REPORT_TO", [])
    problem = TrainParams(report_to=names).validate().get("report_to")
    if problem:
        raise ConfigError(f"TUNEDECK_REPORT_TO={','.join(names)}: {problem}")
    return [name for name in names if name != "none"]


def https_settings() -> dict[str, Any]:
    """TUNEDECK_HTTPS=1: the site is served over HTTPS only (Django's deployment checklist): plain HTTP is
    redirected, cookies are Secure and browsers are told (HSTS) to use HTTPS only, for a year by default.
    includeSubDomains and preload bind every subdomain, and preload is hard to undo: only when asked."""
    on = env_bool("TUNEDECK_HTTPS", False)
    return {
        "SECURE_SSL_REDIRECT": on,
        "SESSION_COOKIE_SECURE": on,
        "CSRF_COOKIE_SECURE": on,
        "SECURE_HSTS_SECONDS": env_int("TUNEDECK_HSTS_SECONDS", ONE_YEAR if on else 0, minimum=0),
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": env_bool("TUNEDECK_HSTS_INCLUDE_SUBDOMAINS", False),
        "SECURE_HSTS_PRELOAD": env_bool("TUNEDECK_HSTS_PRELOAD", False),
        "SECURE_PROXY_SSL_HEADER": _proxy_ssl_header("TUNEDECK_PROXY_SSL_HEADER"),
    }


def _proxy_ssl_header(name: str) -> tuple[str, str] | None:
    """The header by which a TLS-terminating proxy says a request came over HTTPS (`<header>: https`). Any
    client can send it, so it is believed only when declared: when every request comes through a proxy
    that sets it, replacing the client's own."""
    header = env_str(name)
    if not header:
        return None
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", header):
        raise ConfigError(f"{name} must be a header name such as X-Forwarded-Proto; got {header!r}")
    return f"HTTP_{header.upper().replace('-', '_')}", "https"


try:
    DEBUG = env_bool("DEBUG", False)
    SECRET_KEY = _secret_key(DEBUG)
    ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
    CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
    DATABASES = {"default": _database(env_str("DATABASE_URL"))}
    ARTIFACT_STORE = artifact_store_root()
    # Base models given by local path are read only under these folders and ARTIFACT_STORE/models.
    MODEL_ROOTS = model_roots()
    _celery = celery_settings()
    DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("TUNEDECK_MAX_UPLOAD_MB", 512, minimum=1) * 1024 * 1024
    # What an uploaded dataset may hold and decode to (rows, decoded MB, KB a row, MB a Parquet row group, nesting).
    DATASET_LIMITS = Limits.from_env()
    # Workers silent for this long are marked offline and their runs go back to the queue.
    WORKER_OFFLINE_AFTER = env_int("TUNEDECK_WORKER_OFFLINE_AFTER", 120, minimum=10)
    # A dispatched run not claimed within this many seconds gets its wake-up sent again.
    DISPATCH_RESEND_AFTER = env_int("TUNEDECK_DISPATCH_RESEND_AFTER", 30, minimum=5)
    MAX_ATTEMPTS = env_int("TUNEDECK_MAX_ATTEMPTS", 3, minimum=1)
    # A chat keeps its model loaded on a worker this long without a message (playground/chat.py).
    TUNEDECK_CHAT_IDLE_S = env_int("TUNEDECK_CHAT_IDLE_S", 600, minimum=10)
    # A queued job that cannot be placed after this many seconds reserves a worker (0: at once); see fleet/placement.py.
    RESERVE_AFTER = env_int("TUNEDECK_RESERVE_AFTER", 600, minimum=0)
    # After a worker's token is rotated, the old one keeps working for this many seconds.
    TOKEN_OVERLAP = env_int("TUNEDECK_TOKEN_OVERLAP", 3600, minimum=0)
    # GRPO runs may score answers with python graders (user code, run by workers in a limited subprocess) only when
    # an admin allows them here; each worker must allow them in its own environment too.
    ALLOW_PYTHON_GRADERS = env_bool("TUNEDECK_ALLOW_PYTHON_GRADERS", False)
    # Pushing adapters and merged models to the Hugging Face Hub is offered when a token is set.
    HF_TOKEN = env_secret("TUNEDECK_HF_TOKEN")
    HF_ENDPOINT = env_str("TUNEDECK_HF_ENDPOINT", "https://huggingface.co")
    # The trackers (tensorboard, mlflow, wandb) of runs that name none themselves; their workers say where they write.
    TUNEDECK_REPORT_TO = report_to_default()
    # REST API request rates: per user (API key or session), and per address for anonymous calls.
    TUNEDECK_API_RATE = _api_rate("TUNEDECK_API_RATE", "600/minute")
    TUNEDECK_API_ANON_RATE = _api_rate("TUNEDECK_API_ANON_RATE", "60/minute")
    # Failed password logins for an API key (POST /api/v1/login/), counted per user name and per address.
    TUNEDECK_LOGIN_FAILURE_RATE = _api_rate("TUNEDECK_LOGIN_FAILURE_RATE", "10/hour")
    # SECURE_SSL_REDIRECT, SESSION_COOKIE_SECURE, CSRF_COOKIE_SECURE, SECURE_HSTS_*, SECURE_PROXY_SSL_HEADER.
    globals().update(https_settings())
except ConfigError as exc:
    raise ImproperlyConfigured(str(exc)) from exc

FILE_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
CELERY_BROKER_URL = _celery["broker_url"]
CELERY = _celery

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "webapp.jobs",
    "webapp.api",
    "webapp.catalog",
    "webapp.training",
    "webapp.fleet",
    "webapp.dashboard",
    "webapp.playground",
    "webapp.sweeps",
]

MIDDLEWARE = [
    "webapp.streaming.stream_asynchronously",  # outermost: a streamed body is sent as it is read, under ASGI too
    "webapp.health.HealthMiddleware",  # /healthz and /readyz, before anything that could fail
    "webapp.errors.ErrorShapesMiddleware",  # sees every response: API errors in their API's shape
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "webapp.security.SecurityHeadersMiddleware",
    "webapp.api.etag.ApiETagMiddleware",
]

ROOT_URLCONF = "webapp.urls"
ASGI_APPLICATION = "webapp.asgi.application"
WSGI_APPLICATION = "webapp.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
            # Figures, sizes and times read the same on every page (workers/formatting.py's rules).
            "builtins": ["webapp.templatetags.formatting"],
        },
    }
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "static"  # for collectstatic; WhiteNoise serves static/ directly via finders
private_dir(STATIC_ROOT)
WHITENOISE_USE_FINDERS = True  # serve straight from static/ without a collectstatic step

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "overview"
LOGOUT_REDIRECT_URL = "login"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# Under TUNEDECK_HTTPS, what must answer plain HTTP: the worker API, whose clients do not follow a redirect of a
# POST (compose's workers call http://web:8000 inside its network). Health checks (a container's own probe) need
# no entry: HealthMiddleware answers /healthz and /readyz before SecurityMiddleware could redirect them.
SECURE_REDIRECT_EXEMPT = [r"^api/worker/"]
# HSTS includeSubDomains (W005) and preload (W021) are choices for the whole domain, made with
# TUNEDECK_HSTS_INCLUDE_SUBDOMAINS / TUNEDECK_HSTS_PRELOAD, not defaults of one site on it.
SILENCED_SYSTEM_CHECKS = ["security.W005", "security.W021"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO").upper()},
}

# Dataset uploads: the upload form refuses larger files (the same setting as DATA_UPLOAD_MAX_MEMORY_SIZE above).
TUNEDECK_MAX_UPLOAD_MB = DATA_UPLOAD_MAX_MEMORY_SIZE // (1024 * 1024)

# REST API (/api/v1/): API keys or the session, scopes, cursor pages, RFC 9457 problems, rates, OpenAPI.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "webapp.api.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["webapp.api.auth.ScopePermission"],
    "DEFAULT_PAGINATION_CLASS": "webapp.api.pagination.CursorPage",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "webapp.api.problems.exception_handler",
    "DEFAULT_THROTTLE_CLASSES": ["webapp.api.throttling.UserRate", "webapp.api.throttling.AnonRate"],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DATETIME_FORMAT": "iso-8601",  # UTC (TIME_ZONE) with a Z suffix
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Tunedeck API",
    "DESCRIPTION": "LoRA/QLoRA fine-tuning: catalog, runs, adapters, jobs and workers. "
                   "Authenticate with `Authorization: Bearer <API key>`; errors are RFC 9457 problems. "
                   "Values are raw: times ISO 8601 in UTC with a `Z`, sizes in bytes (`*_bytes`), shares and "
                   "agreements as fractions from 0 to 1, losses and logit differences as full floats. The pages and "
                   "the `tunedeck` CLI write them for people (3 significant digits, `1.96e-5`, `29.0%`, `4.9 GiB`, "
                   "`2026-12-05 07:10 UTC`).",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "SWAGGER_UI_DIST": "SIDECAR",  # served from our own static files: the docs work offline and under the CSP
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Choice sets shared by several fields (job states, the engine's auto/on/off switches) get one name each.
    "ENUM_NAME_OVERRIDES": {"RunStateEnum": "webapp.jobs.models.RunState", "WorkerStateEnum": "webapp.fleet.models.WorkerState",
                            "AutoOnOffEnum": "workers.contract.spec.AUTO_ON_OFF",
                            "BasePrecisionEnum": "workers.contract.jobspecs.BASE_PRECISIONS"},
    "PREPROCESSING_HOOKS": ["webapp.api.schema.only_api_v1"],
}
