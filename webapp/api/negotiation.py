"""Content negotiation for views whose answer does not depend on the Accept header.

DRF answers 406 when no renderer matches Accept. Two kinds of view must not: downloads and event streams
(their success is a streaming response no renderer touches, their errors JSON problems), and the
OpenAI-compatible /v1/ (OpenAI's API speaks JSON whatever a client accepts, and the `openai` package asks for
a file's content with `Accept: application/binary`). Parsers are still chosen by Content-Type as usual.
"""

from __future__ import annotations

from typing import Any

from rest_framework.negotiation import DefaultContentNegotiation


class FirstRenderer(DefaultContentNegotiation):
    """The view's first renderer, whatever the client accepts."""

    def select_renderer(self, request: Any, renderers: list[Any], format_suffix: str | None = None) -> tuple[Any, str]:
        return renderers[0], renderers[0].media_type
