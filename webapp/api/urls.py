"""The REST API at /api/v1/: the router, the OpenAPI schema and its docs page."""

from __future__ import annotations

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework.permissions import AllowAny
from rest_framework.routers import DefaultRouter

import webapp.api.schema  # noqa: F401  (registers the bearer-key security scheme)


class Schema(SpectacularAPIView):
    permission_classes = [AllowAny]  # the API's shape is no secret; every endpoint in it needs a key
    throttle_classes = []


class Docs(SpectacularSwaggerSplitView):
    """Swagger UI from our own static files, its start-up script a separate same-origin file (the site's CSP
    allows no inline script or style)."""

    permission_classes = [AllowAny]
    throttle_classes = []
    template_name = "api/docs.html"


router = DefaultRouter()

urlpatterns = [
    path("schema/", Schema.as_view(), name="api-schema"),
    path("docs/", Docs.as_view(url_name="api-schema"), name="api-docs"),
    path("", include(router.urls)),
]
