"""Strict settings helpers shared by the control plane and the workers (no Django here).

Every value comes from the environment; a bad value stops the process with a message that
names the variable and says what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "filesystem", "memory")


class ConfigError(ValueError):
    pass


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_secret(name: str, default: str = "") -> str:
    """Read NAME, or the file named by NAME_FILE (Docker secrets)."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE={path!r} cannot be read: {exc.strerror}") from exc
    return env_str(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use one of: 1, 0, true, false, yes, no, on, off)")


def env_int(name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={value} must be at most {maximum}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return list(default)
    return [item.strip() for item in raw.split(",") if item.strip()]


def var_dir() -> Path:
    """Where the embedded default keeps its database, broker files, secret key and artifacts."""
    return Path(env_str("TUNEDECK_VAR", "var")).expanduser().resolve()


# What makes a folder a Tunedeck var/: one made before var/ was private is narrowed to 0700 when found.
VAR_STATE = ("tunedeck.sqlite3", "secret_key", "tunedeck.lock")


def private_var_dir() -> Path:
    """var/, for this user only: it holds the database, the secret key, the broker's messages and the artifacts.

    Created 0700; an existing one is narrowed to 0700 only where it holds Tunedeck's state (TUNEDECK_VAR, or
    ./var in whatever folder a command runs in, may name a folder that is not Tunedeck's own)."""
    existed = var_dir().exists()
    var = private_dir(var_dir())
    if existed and any((var / name).exists() for name in VAR_STATE):
        _narrow(var, 0o700)
    return var


def private_dir(path: Path) -> Path:
    """Create `path` for this user only (0700) if it does not exist; missing parents are created as usual."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty for this user only (0600) if it does not exist, or narrow it to that."""
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600))
    _narrow(path, 0o600)
    return path


def _narrow(path: Path, mode: int) -> None:
    if path.stat().st_uid == os.getuid():  # another user's folder (a shared mount) is left as its owner set it
        path.chmod(mode)


def artifact_store_root() -> Path:
    return Path(env_str("ARTIFACT_STORE") or var_dir() / "artifacts").expanduser().resolve()


def model_roots() -> list[Path]:
    """Folders, besides the artifact store's models folder, under which base models may be registered by local
    path (TUNEDECK_MODEL_ROOTS, comma-separated absolute paths)."""
    roots = []
    for item in env_list("TUNEDECK_MODEL_ROOTS", []):
        path = Path(item).expanduser()
        if not path.is_absolute():
            raise ConfigError(f"TUNEDECK_MODEL_ROOTS: {item!r} is not an absolute path")
        roots.append(path.resolve())
    return roots


def broker_url() -> str:
    url = env_str("CELERY_BROKER_URL") or env_str("REDIS_URL") or "filesystem://"
    scheme = urlsplit(url).scheme
    if scheme not in BROKER_SCHEMES:
        raise ConfigError(f"broker URL {url!r}: scheme must be one of {', '.join(BROKER_SCHEMES)}")
    return url


def broker_transport_options(url: str) -> dict[str, Any]:
    """The filesystem transport needs a folder that every process of the installation shares."""
    if not url.startswith("filesystem://"):
        return {"visibility_timeout": 3600}
    folder = private_dir(private_var_dir() / "broker")
    for sub in ("queue", "processed", "control"):
        private_dir(folder / sub)
    return {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
    }


def celery_settings() -> dict[str, Any]:
    """Celery settings fit for long GPU jobs: one at a time per process, JSON only, the message a mere wake-up."""
    url = broker_url()
    return {
        "broker_url": url,
        "broker_transport_options": broker_transport_options(url),
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
        "worker_prefetch_multiplier": 1,
        # Early ack: the database row is the ledger, the scheduler re-sends lost wake-ups, and a
        # late ack would let Redis redeliver a multi-hour job after its visibility timeout.
        "task_acks_late": False,
        "worker_hijack_root_logger": False,
    }


def queue_for(worker_name: str) -> str:
    """Each registered worker consumes its own queue; wake-ups for its jobs go there."""
    return f"tunedeck.worker.{worker_name}"


def label_queue(label: str) -> str:
    """A queue every worker with this label consumes (besides its own)."""
    return f"tunedeck.label.{label}"


WORKER_STORES = ("auto", "local", "remote")


def worker_store_mode() -> str:
    """How a worker has its artifacts (TUNEDECK_WORKER_STORE): `local`, the store shared with the web server
    (ARTIFACT_STORE, or var/artifacts on the web server's machine); `remote`, its own folder, everything moved
    through the worker API; `auto` (the default): local where ARTIFACT_STORE is set or var/artifacts exists."""
    mode = env_str("TUNEDECK_WORKER_STORE", "auto").lower()
    if mode not in WORKER_STORES:
        raise ConfigError(f"TUNEDECK_WORKER_STORE={mode!r} must be one of {', '.join(WORKER_STORES)}")
    if mode == "auto":
        return "local" if env_str("ARTIFACT_STORE") or (var_dir() / "artifacts").is_dir() else "remote"
    return mode


def worker_artifacts_dir() -> Path:
    """A remote-mode worker's own artifact folder (TUNEDECK_WORKER_DIR; default var/worker-artifacts)."""
    return Path(env_str("TUNEDECK_WORKER_DIR") or var_dir() / "worker-artifacts").expanduser().resolve()


def worker_cache_dir() -> Path:
    """A remote-mode worker's cache of read-only inputs by sha256 (TUNEDECK_WORKER_CACHE; default var/worker-cache)."""
    return Path(env_str("TUNEDECK_WORKER_CACHE") or var_dir() / "worker-cache").expanduser().resolve()


def worker_cache_bytes() -> int:
    """The cache's bound (TUNEDECK_WORKER_CACHE_GB, default 50): the least recently used inputs go first."""
    raw = env_str("TUNEDECK_WORKER_CACHE_GB", "50")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"TUNEDECK_WORKER_CACHE_GB={raw!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"TUNEDECK_WORKER_CACHE_GB={value} must be at least 0")
    return int(value * 2**30)
