"""A small HTTP client of /api/v1/: bearer key, retries that are safe, RFC 9457 problems turned into exit codes.

Only reads and POSTs carrying an Idempotency-Key are retried (after a network error, a 502/503/504, a 429
once its Retry-After has passed, or a 409 while the first request with that key is still in flight):
the server replays a keyed POST's first response, so a retry never creates anything twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from tunedeck_cli.config import Settings
from tunedeck_cli.errors import AUTH, SERVER, CliError, code_for_status

API_PREFIX = "/api/v1/"
RETRIES = 3
MAX_RETRY_AFTER_S = 60.0


def flatten_errors(errors: Any, prefix: str = "") -> list[str]:
    """`{"hyperparameters": {"learning_rate": ["…"]}}` → ["hyperparameters.learning_rate: …"]."""
    lines: list[str] = []
    if isinstance(errors, dict):
        for key, value in errors.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            lines += flatten_errors(value, "" if key == "non_field_errors" and not prefix else name)
    elif isinstance(errors, list):
        if all(not isinstance(item, dict | list) for item in errors):
            lines += [f"{prefix}: {item}" if prefix else str(item) for item in errors]
        else:
            for index, item in enumerate(errors):
                lines += flatten_errors(item, f"{prefix}[{index}]")
    elif errors not in (None, ""):
        lines.append(f"{prefix}: {errors}" if prefix else str(errors))
    return lines


def problem_error(response: httpx.Response) -> CliError:
    """The CLI error for a failed response: the problem's detail, then each field error on its own line."""
    status = response.status_code
    body: Any = None
    if "json" in response.headers.get("content-type", ""):
        try:
            body = response.json()
        except ValueError:
            body = None
    if isinstance(body, dict):
        title = str(body.get("title") or response.reason_phrase or f"HTTP {status}")
        detail = str(body.get("detail") or "")
        details = flatten_errors(body.get("errors"))
        # A detail that only summarises the field errors listed below is not repeated.
        summarised = details and all(any(part in line for line in details) for part in detail.split("; "))
        message = f"{title}: {detail}" if detail and detail != title and not summarised else title
    else:
        text = " ".join(response.text.split())[:300]
        message = f"HTTP {status} {response.reason_phrase}" + (f": {text}" if text and "<" not in text[:1] else "")
        details = []
    message += f" ({response.request.method} {response.request.url.path}, HTTP {status})"
    return CliError(message, code_for_status(status), details)


def _retry_after(response: httpx.Response, attempt: int) -> float:
    value = response.headers.get("retry-after", "").strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    return min(0.5 * 2**attempt, 8.0)


class Api:
    def __init__(self, settings: Settings, timeout: float = 30.0):
        self.server = settings.server
        self.http = httpx.Client(
            base_url=settings.server + API_PREFIX,
            headers={"Accept": "application/json", "User-Agent": "tunedeck-cli",
                     **({"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {})},
            # Reads wait long: registering a base model inspects it, an upload is validated whole.
            timeout=httpx.Timeout(timeout, read=600.0, write=600.0),
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, ok: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        """Send, retrying where that is safe; raise CliError for any status >= 400 not listed in `ok`."""
        headers = kwargs.get("headers") or {}
        keyed = method == "POST" and "Idempotency-Key" in headers
        retryable = method in ("GET", "HEAD") or keyed
        attempt = 0
        while True:
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if retryable and attempt < RETRIES:
                    time.sleep(min(0.5 * 2**attempt, 8.0))
                    attempt += 1
                    continue
                raise CliError(f"cannot reach {self.server}: {exc or type(exc).__name__}", SERVER) from exc
            status = response.status_code
            again = status in (429, 502, 503, 504) or (keyed and status == 409)
            if retryable and again and attempt < RETRIES:
                time.sleep(_retry_after(response, attempt))
                attempt += 1
                continue
            if status >= 400 and status not in ok:
                raise problem_error(response)
            return response

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, body: Any = None, idempotency_key: str | None = None) -> httpx.Response:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self.request("POST", path, json=body if body is not None else {}, headers=headers)

    def pages(self, path: str, limit: int | None = None, **params: Any) -> Iterator[dict[str, Any]]:
        """Every item of a cursor-paged list, following `next` until `limit` items (None: all)."""
        query = {k: v for k, v in params.items() if v is not None}
        if limit:
            query["page_size"] = min(limit, 200)
        url: str | None = path
        count = 0
        while url:
            page = self.request("GET", url, params=query).json()
            query = {}  # the next URL carries the cursor and every filter
            items = page.get("results", page) if isinstance(page, dict) else page
            for item in items:
                yield item
                count += 1
                if limit and count >= limit:
                    return
            url = page.get("next") if isinstance(page, dict) else None

    @contextmanager
    def stream(self, path: str) -> Iterator[httpx.Response]:
        """A streamed GET (downloads); errors are read whole and raised as CliError."""
        try:
            with self.http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    raise problem_error(response)
                yield response
        except httpx.TransportError as exc:
            raise CliError(f"lost the connection to {self.server}: {exc or type(exc).__name__}", SERVER) from exc


def whoami(api: Api) -> dict[str, Any]:
    """Who the key belongs to (GET me/: user, key name, scopes, expiry); a refused key raises CliError with the
    AUTH code."""
    try:
        return dict(api.get("me/"))
    except CliError as exc:
        if exc.code == AUTH:
            exc.message = f"the server refused the API key: {exc.message}"
        raise
