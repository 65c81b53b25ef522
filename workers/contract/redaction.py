"""Secrets of the worker's environment kept out of what a job reports.

A job's log carries its runner's lines, the ML libraries' warnings and tracebacks; a tracker's client may print its
server's address, and a traceback may hold a token. The worker's credentials (W&B and MLflow keys, a token inside a
tracking URI, the Hub token) come from its environment only, so every value that looks like one is known before the
job starts: `Reporter` replaces each with REDACTED in log lines and failure reasons.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit

REDACTED = "[redacted]"
# Variables whose whole value is a secret, by the end of their name (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN,
# MLFLOW_TRACKING_PASSWORD, TUNEDECK_HF_TOKEN, AWS_SECRET_ACCESS_KEY…).
SECRET_SUFFIXES = ("_KEY", "_TOKEN", "_PASSWORD", "_SECRET")
# Variables holding an address that may carry a password or a token (MLFLOW_TRACKING_URI, DATABASE_URL…).
ADDRESS_SUFFIXES = ("_URI", "_URL")
SECRET_QUERY = re.compile(r"token|key|secret|password|signature|sig|auth", re.I)
MIN_SECRET = 6  # shorter values ("1", "true") would blank out ordinary words


def secret_values(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The secrets found in `environ`, longest first (so that one inside another is replaced whole)."""
    found: set[str] = set()
    for name, value in environ.items():
        upper = name.upper()
        if upper.endswith(SECRET_SUFFIXES):
            found.add(value.strip())
        elif upper.endswith(tuple(s + "_FILE" for s in SECRET_SUFFIXES)):  # Docker secrets: the file holds it
            found.add(_read_secret(value))
        elif upper.endswith(ADDRESS_SUFFIXES):
            found.update(address_secrets(value))
    return tuple(sorted((s for s in found if len(s) >= MIN_SECRET), key=len, reverse=True))


def _read_secret(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(4096).strip()
    except OSError:
        return ""


def address_secrets(address: str) -> list[str]:
    """The password of `scheme://user:password@host` and the values of token-like query parameters."""
    try:
        parts = urlsplit(address.strip())
        password = parts.password
    except ValueError:
        return []
    found = [password] if password else []
    found += [value for key, value in parse_qsl(parts.query) if SECRET_QUERY.search(key) and value]
    return found


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text
