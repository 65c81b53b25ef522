"""Streamed responses served as they are produced under ASGI too.

`tunedeck web` serves Django through ASGI (uvicorn). There Django reads a streaming response made from a
synchronous iterator (a FileResponse, a zip built while it is sent) whole into memory before it sends the first
byte: a 16 GB merged model would be held in the web server's memory, and an artifact download through the worker
API too. This middleware (outermost) hands such a response's chunks over one at a time from a thread of their own,
so memory stays at a chunk whatever the file's size. Under WSGI nothing changes: Django iterates there itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponseBase, StreamingHttpResponse
from django.utils.decorators import sync_and_async_middleware

END = object()


async def chunks_of(iterator: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A synchronous iterator's chunks, each read in a worker thread (not the one all sync views share: a slow
    disk must not hold up the pages)."""
    step = sync_to_async(next, thread_sensitive=False)
    while (chunk := await step(iterator, END)) is not END:
        yield chunk  # type: ignore[misc]


def as_async(response: HttpResponseBase) -> HttpResponseBase:
    if isinstance(response, StreamingHttpResponse) and not response.is_async:
        response.streaming_content = chunks_of(iter(response.streaming_content))
    return response


@sync_and_async_middleware
def stream_asynchronously(get_response: Callable[[HttpRequest], Any]) -> Callable[[HttpRequest], Any]:
    # Under ASGI the chain runs synchronously where a middleware below is sync-only (then this one is called
    # in a thread with an ASGIRequest), asynchronously otherwise.
    if iscoroutinefunction(get_response):

        async def async_middleware(request: HttpRequest) -> HttpResponseBase:
            return as_async(await get_response(request))

        return async_middleware

    def middleware(request: HttpRequest) -> HttpResponseBase:
        response = get_response(request)
        return as_async(response) if isinstance(request, ASGIRequest) else response

    return middleware
