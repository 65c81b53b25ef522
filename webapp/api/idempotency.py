"""Idempotency-Key for POSTs: a retry of the same request gets the first response again, not a second object.

A POST with an `Idempotency-Key` header stores its first successful response per user and key; a retry with
the same key and the same request (method, path, body) replays it with `Idempotent-Replayed: true`. The same
key with another request is refused (422); a retry that arrives while the first is still running gets 409.
A failed first attempt (4xx/5xx or an exception) leaves nothing behind: nothing was created, so a retry runs
again. The handler and the stored response commit together, so a crash in between leaves neither.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from django.core.files.uploadedfile import UploadedFile
from django.db import IntegrityError, transaction
from django.http import HttpResponse, HttpResponseBase, QueryDict
from django.utils import timezone
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.encoders import JSONEncoder

from webapp.api.models import IdempotencyRecord
from webapp.api.problems import problem

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
KEEP_FOR = timedelta(hours=24)  # how long a key is remembered
# A first attempt still marked in flight after this long died without committing anything: a retry takes over.
ABANDONED_AFTER = timedelta(minutes=10)
REPLAYED_HEADERS = ("Location",)


def fingerprint(request: Request) -> str:
    """A digest of what the request asks for: method, path and body (uploaded files by their contents)."""
    digest = hashlib.sha256(f"{request.method} {request.path}\n".encode())
    data = request.data
    if isinstance(data, QueryDict):
        items: list[tuple[str, list[Any]]] = sorted(data.lists(), key=lambda item: item[0])
    elif isinstance(data, dict):
        items = sorted(((str(k), [v]) for k, v in data.items()), key=lambda item: item[0])
    else:
        items = [("", [data])]
    for name, values in items:
        for value in values:
            digest.update(f"\n{name}=".encode())
            if isinstance(value, UploadedFile):
                digest.update(f"file:{value.name}:".encode())
                for chunk in value.chunks():
                    digest.update(chunk)
                value.seek(0)
            else:
                digest.update(json.dumps(value, sort_keys=True, cls=JSONEncoder).encode())
    return digest.hexdigest()


def _replay(record: IdempotencyRecord) -> HttpResponseBase:
    headers = {**record.headers, "Idempotent-Replayed": "true"}
    if record.content_type == "application/json":
        body = bytes(record.response_body)
        return Response(json.loads(body) if body else None, status=record.status_code, headers=headers)
    return HttpResponse(bytes(record.response_body), status=record.status_code, content_type=record.content_type,
                        headers=headers)


def _store(record: IdempotencyRecord, response: HttpResponseBase) -> None:
    if isinstance(response, Response):
        body = b"" if response.data is None else json.dumps(response.data, cls=JSONEncoder).encode()
        content_type = "application/json"
    else:
        body = response.content  # type: ignore[attr-defined]
        content_type = response.get("Content-Type", "application/octet-stream")
    record.status_code = response.status_code
    record.response_body = body
    record.content_type = content_type
    record.headers = {name: response[name] for name in REPLAYED_HEADERS if response.has_header(name)}
    record.save(update_fields=["status_code", "response_body", "content_type", "headers"])


def run_idempotent(request: Request, handler: Callable[[], HttpResponseBase]) -> HttpResponseBase:
    """Run `handler` once per (user, Idempotency-Key); without the header it simply runs."""
    key = request.headers.get(HEADER, "").strip()
    if not key or not request.user.is_authenticated:
        return handler()
    if len(key) > MAX_KEY_LENGTH:
        return problem(400, f"the {HEADER} header is longer than {MAX_KEY_LENGTH} characters",
                       errors={HEADER: [f"at most {MAX_KEY_LENGTH} characters"]}, instance=request.path)
    request_hash = fingerprint(request)
    now = timezone.now()
    IdempotencyRecord.objects.filter(user=request.user, created_at__lt=now - KEEP_FOR).delete()
    try:
        with transaction.atomic():
            record = IdempotencyRecord.objects.create(user=request.user, key=key, method=request.method or "",
                                                      path=request.path[:500], request_hash=request_hash)
    except IntegrityError:
        record = IdempotencyRecord.objects.get(user=request.user, key=key)
        if record.request_hash != request_hash:
            return problem(422, f"this {HEADER} was already used for another request ({record.method} "
                                f"{record.path} with a different body); use a new key for a new request",
                           errors={HEADER: ["already used for a different request"]}, instance=request.path)
        if record.status_code is not None:
            return _replay(record)
        if record.created_at > now - ABANDONED_AFTER:
            return problem(409, f"a request with this {HEADER} is still in progress; retry when it has finished",
                           instance=request.path, headers={"Retry-After": "1"})
        record.created_at = now  # abandoned: nothing of it was committed, so this attempt takes its place
        record.save(update_fields=["created_at"])
    try:
        with transaction.atomic():
            response = handler()
            if 200 <= response.status_code < 400:
                _store(record, response)
                return response
    except BaseException:
        IdempotencyRecord.objects.filter(pk=record.pk).delete()
        raise
    IdempotencyRecord.objects.filter(pk=record.pk).delete()
    return response


def idempotent(view: Callable[..., HttpResponseBase]) -> Callable[..., HttpResponseBase]:
    """For function views (@api_view) and viewset actions (@action): put it below those decorators."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> HttpResponseBase:
        request = args[0] if isinstance(args[0], Request) else args[1]
        return run_idempotent(request, lambda: view(*args, **kwargs))

    return wrapper


class IdempotentCreateMixin:
    """For viewsets: list it before CreateModelMixin/ModelViewSet so that create() goes through here."""

    def create(self, request: Request, *args: Any, **kwargs: Any) -> HttpResponseBase:
        parent = super().create  # type: ignore[misc]
        return run_idempotent(request, lambda: parent(request, *args, **kwargs))
