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
