"""OpenAPI (drf-spectacular) descriptions of what the API adds to DRF: bearer API keys, problem responses."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "webapp.api.auth.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "tdk_…",
            "description": "An API key made on the API keys page (scopes: read, write, admin).",
        }


def only_api_v1(endpoints: list[tuple[str, Any, Any, Any]], **kwargs: Any) -> list[tuple[str, Any, Any, Any]]:
    """The schema describes /api/v1/; the OpenAI-compatible /v1/ follows OpenAI's own published description."""
    return [endpoint for endpoint in endpoints if endpoint[0].startswith("/api/v1/")]
