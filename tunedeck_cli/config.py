"""Where the client finds its server and API key: the environment first, then the config file.

The file is `$TUNEDECK_CONFIG`, else `~/.config/tunedeck/config.toml` (`$XDG_CONFIG_HOME` is honoured),
written with mode 0600 because it holds a secret:

    server = "https://tunedeck.example.com"
    api_key = "tdk_…"
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tunedeck_cli.errors import AUTH, USAGE, CliError


def config_path() -> Path:
    explicit = os.environ.get("TUNEDECK_CONFIG", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME", "").strip() or str(Path.home() / ".config")
    return Path(base) / "tunedeck" / "config.toml"


def read_file(path: Path | None = None) -> dict[str, str]:
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CliError(f"cannot read the config file {path}: {exc.strerror}", USAGE) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"the config file {path} is not valid TOML: {exc}", USAGE) from exc
    return {k: v for k, v in data.items() if isinstance(v, str)}


def write_file(values: dict[str, str], path: Path | None = None) -> Path:
    """Write the file readable by its owner only (the directory too, where we create it)."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A TOML basic string accepts JSON's escapes, so json.dumps quotes any value safely.
    text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply to a file left over from an earlier try
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Settings:
    server: str
    api_key: str
    source: str  # where the key came from, for messages


def normalize_server(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise CliError(f"the server URL must start with http:// or https://; got {url!r}", USAGE)
    return url


def load(need_key: bool = True) -> Settings:
    """The server and key to use: TUNEDECK_SERVER / TUNEDECK_API_KEY override the config file."""
    stored = read_file()
    server = os.environ.get("TUNEDECK_SERVER", "").strip() or stored.get("server", "")
    key = os.environ.get("TUNEDECK_API_KEY", "").strip()
    source = "TUNEDECK_API_KEY"
    if not key:
        key, source = stored.get("api_key", ""), str(config_path())
    if not server:
        raise CliError("no server: run `tunedeck login --server URL` or set TUNEDECK_SERVER", USAGE)
    if need_key and not key:
        raise CliError("no API key: run `tunedeck login` or set TUNEDECK_API_KEY "
                       "(create a key on your account page in the browser)", AUTH)
    return Settings(normalize_server(server), key, source)
