"""HTTP client of the worker API: the only way a worker changes anything in the control plane."""

from __future__ import annotations

import os
import time
from typing import Any

import httpx

from workers.config import ConfigError, env_secret, env_str
from workers.contract.refusals import CancelledBeforeStart, NotAssigned, StaleAttempt
from workers.contract.reporter import Reporter

API_PREFIX = "/api/worker/v1"
_clients: dict[int, WorkerClient] = {}


class WorkerClient:
    def __init__(self, server: str, token: str, timeout: float = 30.0, retries: int = 4,
                 transport: httpx.BaseTransport | None = None):
        self.server = server.rstrip("/")
        self.retries = retries
        self._http = httpx.Client(
            base_url=self.server + API_PREFIX,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "tunedeck-worker"},
            timeout=timeout,
            transport=transport,
        )

    def __repr__(self) -> str:  # never show the token
        return f"WorkerClient({self.server!r})"

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, payload: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """POST with retries on transport errors and 5xx; posts are idempotent on the server side."""
        response = self.request("POST", path, json=payload, **({"timeout": timeout} if timeout else {}))
        response.raise_for_status()
        return dict(response.json())

    def request(self, method: str, path: str, accept: tuple[int, ...] = (), **kwargs: Any) -> httpx.Response:
        """A call of the worker API with retries on transport errors and 5xx (every call is idempotent on the server
        side). 409 raises StaleAttempt (or CancelledBeforeStart), 403/404 NotAssigned, unless `accept` names the
        status; other answers are returned as they are."""
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
            else:
                if response.status_code in accept:
                    return response
                if response.status_code == 409:
                    body = response.json()
                    refusal = CancelledBeforeStart if body.get("code") == "cancelled" else StaleAttempt
                    raise refusal(body.get("detail", "stale attempt"))
                if response.status_code in (403, 404):
                    raise NotAssigned(response.json().get("detail", "not assigned"))
                if response.status_code < 500 or attempt == self.retries:
                    return response
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    def stream(self, path: str, **kwargs: Any) -> Any:
        """A streamed GET (a context manager of an httpx.Response), with no retries: the caller resumes by Range."""
        return self._http.stream("GET", path, **kwargs)

    # Training runs are under /jobs/, adapter jobs (compare, merge, combine, evaluate, push) under /adapter-jobs/.
    def claim(self, run_id: int, attempt: int, path: str = "jobs") -> dict[str, Any]:
        return self.claim_job(run_id, attempt, path)["spec"]  # type: ignore[no-any-return]

    def claim_job(self, job_id: int, attempt: int, path: str = "jobs") -> dict[str, Any]:
        """The whole claim reply: the spec, the job's kind and its cancel flag."""
        return self._post(f"/{path}/{job_id}/claim", {"attempt": attempt})

    def events(self, run_id: int, attempt: int, events: list[dict[str, Any]], path: str = "jobs") -> dict[str, Any]:
        return self._post(f"/{path}/{run_id}/events", {"attempt": attempt, "events": events})

    def chat_next(self, job_id: int, attempt: int, after: int, wait: float) -> dict[str, Any]:
        """A chat session's next message (a long poll: the server answers as soon as one comes, or after `wait`)."""
        return self._post(f"/adapter-jobs/{job_id}/chat-next", {"attempt": attempt, "after": after, "wait": wait},
                          timeout=wait + 30)

    def status(self, run_id: int, attempt: int, state: str, path: str = "jobs", **fields: Any) -> dict[str, Any]:
        return self._post(f"/{path}/{run_id}/status", {"attempt": attempt, "state": state, **fields})

    def heartbeat(self, **payload: Any) -> dict[str, Any]:
        """Say this worker is alive: `inventory`, `telemetry`, `running` jobs, `starting` or `shutting_down`.

        The reply names the worker and its labels, and lists jobs to cancel and jobs to stop (moved on)."""
        return self._post("/heartbeat", payload)


class HttpReporter(Reporter):
    def __init__(self, client: WorkerClient, run_id: int, attempt: int, path: str = "jobs") -> None:
        super().__init__()
        self.client, self.run_id, self.attempt, self.path = client, run_id, attempt, path

    def _send_events(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        return self.client.events(self.run_id, self.attempt, batch, path=self.path)

    def next_turn(self, after: int, wait: float) -> dict[str, Any]:
        reply = self.client.chat_next(self.run_id, self.attempt, after, wait)
        self.user_cancelled = self.user_cancelled or bool(reply.get("cancel"))
        return reply

    def _send_status(self, state: str, result: dict[str, Any], error: str) -> dict[str, Any]:
        return self.client.status(self.run_id, self.attempt, state, path=self.path, result=result, error=error)


def process_client() -> WorkerClient:
    """This process's client: a pool process must not share the main process's open connections."""
    pid = os.getpid()
    if pid not in _clients:
        server, token = env_str("TUNEDECK_SERVER"), env_secret("TUNEDECK_WORKER_TOKEN")
        if not server or not token:
            raise ConfigError("a worker needs TUNEDECK_SERVER and TUNEDECK_WORKER_TOKEN (or TUNEDECK_WORKER_TOKEN_FILE)")
        _clients[pid] = WorkerClient(server, token)
    return _clients[pid]
