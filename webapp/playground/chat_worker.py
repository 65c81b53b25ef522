"""The worker API's one call of chat jobs: the long poll for a session's next message (playground.chat.next_turn).

Asynchronous: a waiting worker holds no thread and no database connection between its looks, so a session idle
for minutes costs the site nothing. Authenticated and fenced as every worker call (webapp.fleet.api).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from webapp.fleet.api import authenticate
from webapp.jobs import ledger
from webapp.jobs.live import released
from webapp.jobs.models import ACTIVE_STATES
from webapp.playground import chat
from webapp.playground.models import AdapterJob
from webapp.problem_details import problem_response

LOOK_S = 0.2  # how often a waiting poll looks for a new message
MAX_WAIT_S = 30.0


class _Unauthorized(Exception):
    pass


def _problem(request: HttpRequest, status: int, detail: str, code: str = "") -> JsonResponse:
    return problem_response(status, detail, instance=request.path, code=code or None)


@csrf_exempt
async def chat_next(request: HttpRequest, job_id: int) -> JsonResponse:
    """`POST {attempt, after, wait}`: {"turn": …} as soon as a message after turn `after` is sent, {"close": true}
    once the session is closed, or {} after `wait` seconds (at most 30) with none (the worker asks again)."""
    if request.method != "POST":
        return _problem(request, 405, "use POST")
    look = sync_to_async(released(_look), thread_sensitive=False)
    try:
        payload = json.loads(request.body or b"{}")
        if not isinstance(payload, dict):
            raise ValueError("the body must be a JSON object")
        attempt, after = int(payload["attempt"]), int(payload.get("after", 0))
        wait = min(max(float(payload.get("wait", 0)), 0.0), MAX_WAIT_S)
        deadline = time.monotonic() + wait
        while True:
            reply = await look(request, job_id, attempt, after)
            if reply or time.monotonic() >= deadline:
                return JsonResponse(reply)
            await asyncio.sleep(LOOK_S)
    except _Unauthorized:
        return _problem(request, 401, "invalid worker token")
    except (ValueError, KeyError, TypeError) as exc:
        return _problem(request, 400, f"bad request: {exc}")
    except ledger.Rejected as exc:
        return _problem(request, exc.status, exc.detail, exc.code)


def _look(request: HttpRequest, job_id: int, attempt: int, after: int) -> dict[str, Any]:
    worker = authenticate(request)
    if worker is None:
        raise _Unauthorized()
    job = ledger.fenced_job(worker, AdapterJob, job_id, attempt)
    if job.kind != "chat":
        raise ledger.Rejected(400, f"job {job_id} is a {job.kind} job, not a chat session")
    if job.state not in ACTIVE_STATES:
        raise ledger.Rejected(409, f"the job is {job.state}")
    return chat.next_turn(job, after)
