"""Django settings, read from the environment only (see the README's configuration table)."""

from __future__ import annotations

import re
import secrets
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
    var_dir,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = var_dir()


def _secret_key(debug: bool) -> str:
    """SECRET_KEY from the environment; the embedded default generates one once under var/."""
    key = env_secret("SECRET_KEY")
    if key:
        return key
    if env_str("DATABASE_URL") and not debug:
        raise ImproperlyConfigured("SECRET_KEY (or SECRET_KEY_FILE) is required when DATABASE_URL is set and DEBUG is off")
    path = VAR_DIR / "secret_key"
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50), encoding="utf-8")
        path.chmod(0o600)
    return path.read_text(encoding="utf-8").strip()


def _database(url: str) -> dict[str, Any]:
    if not url:
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{VAR_DIR / 'tunedeck.sqlite3'}"
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
    elif config["ENGINE"] != "django.db.backends.postgresql":
        raise ImproperlyConfigured(f"DATABASE_URL: use postgresql:// or sqlite:// (got {config['ENGINE']})")
    return config


def _api_rate(name: str, default: str) -> str:
    value = env_str(name, default).strip()
    if not re.fullmatch(r"[1-9][0-9]*/(second|minute|hour|day)", value):
        raise ConfigError(f"{name} must look like 600/minute (a count, then second, minute, hour or day); got {value!r}")
    return value


try:
    DEBUG = env_bool("DEBUG", False)
    SECRET_KEY = _secret_key(DEBUG)
    ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
    CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
    DATABASES = {"default": _database(env_str("DATABASE_URL"))}
    ARTIFACT_STORE = artifact_store_root()
    _celery = celery_settings()
    DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("TUNEDECK_MAX_UPLOAD_MB", 512, minimum=1) * 1024 * 1024
    # Workers silent for this long are marked offline and their runs go back to the queue.
    WORKER_OFFLINE_AFTER = env_int("TUNEDECK_WORKER_OFFLINE_AFTER", 120, minimum=10)
    # A dispatched run not claimed within this many seconds gets its wake-up sent again.
    DISPATCH_RESEND_AFTER = env_int("TUNEDECK_DISPATCH_RESEND_AFTER", 30, minimum=5)
    MAX_ATTEMPTS = env_int("TUNEDECK_MAX_ATTEMPTS", 3, minimum=1)
    # A queued job that cannot be placed after this many seconds reserves a worker (0: at once); see fleet/placement.py.
    RESERVE_AFTER = env_int("TUNEDECK_RESERVE_AFTER", 600, minimum=0)
    # After a worker's token is rotated, the old one keeps working for this many seconds.
    TOKEN_OVERLAP = env_int("TUNEDECK_TOKEN_OVERLAP", 3600, minimum=0)
    # Pushing adapters and merged models to the Hugging Face Hub is offered when a token is set.
    HF_TOKEN = env_secret("TUNEDECK_HF_TOKEN")
    HF_ENDPOINT = env_str("TUNEDECK_HF_ENDPOINT", "https://huggingface.co")
    # REST API request rates: per user (API key or session), and per address for anonymous calls.
    TUNEDECK_API_RATE = _api_rate("TUNEDECK_API_RATE", "600/minute")
    TUNEDECK_API_ANON_RATE = _api_rate("TUNEDECK_API_ANON_RATE", "60/minute")
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
    "webapp.api",
    "webapp.catalog",
    "webapp.training",
    "webapp.fleet",
    "webapp.dashboard",
    "webapp.playground",
]

MIDDLEWARE = [
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
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
WHITENOISE_USE_FINDERS = True  # serve straight from static/ without a collectstatic step

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "overview"
LOGOUT_REDIRECT_URL = "login"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

SESSION_COOKIE_HTTPONLY = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

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
                   "Authenticate with `Authorization: Bearer <API key>`; errors are RFC 9457 problems.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": r"/api/v1",
    "SWAGGER_UI_DIST": "SIDECAR",  # served from our own static files: the docs work offline and under the CSP
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Choice sets shared by several fields (job states, the engine's auto/on/off switches) get one name each.
    "ENUM_NAME_OVERRIDES": {"RunStateEnum": "webapp.training.models.RunState", "WorkerStateEnum": "webapp.fleet.models.WorkerState",
                            "AutoOnOffEnum": "workers.spec.AUTO_ON_OFF",
                            "BasePrecisionEnum": "workers.jobspecs.BASE_PRECISIONS"},
    "PREPROCESSING_HOOKS": ["webapp.api.schema.only_api_v1"],
}
