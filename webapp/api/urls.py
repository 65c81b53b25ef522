"""The REST API at /api/v1/: the router, the OpenAPI schema and its docs page."""

from __future__ import annotations

from typing import Any

from django.urls import Resolver404, include, path, re_path, resolve
from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.routers import DefaultRouter
from rest_framework.views import APIView

import webapp.api.schema  # noqa: F401  (registers the bearer-key security scheme)
from webapp.api import adapters, aliases, catalog, chat, comparisons, jobs, runs, sweeps, usage, workers
from webapp.api.login import Login
from webapp.api.models import ApiKey
from webapp.api.problems import problem


class Schema(SpectacularAPIView):
    permission_classes = [AllowAny]  # the API's shape is no secret; every endpoint in it needs a key


class Docs(SpectacularSwaggerSplitView):
    """Swagger UI from our own static files, its start-up script a separate same-origin file (the site's CSP
    allows no inline script or style)."""

    permission_classes = [AllowAny]
    template_name = "api/docs.html"


@extend_schema(exclude=True)
class NotFound(APIView):
    """Any other path under /api/v1/: a 404 problem (saying where a missing trailing slash is the reason)."""

    permission_classes = [AllowAny]

    def http_method_not_allowed(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        detail = f"no API endpoint at {request.path}"
        if not request.path.endswith("/"):
            try:
                resolve(request.path + "/")
            except Resolver404:
                pass
            else:
                detail += f"; did you mean {request.path}/ (with the trailing slash)?"
        return problem(404, detail, instance=request.path)


router = DefaultRouter()
router.register("base-models", catalog.BaseModelViewSet, basename="api-base-model")
router.register("datasets", catalog.DatasetViewSet, basename="api-dataset")
router.register("lora-configs", catalog.LoraConfigViewSet, basename="api-lora-config")
router.register("runs", runs.RunViewSet, basename="api-run")
router.register("adapters", adapters.AdapterViewSet, basename="api-adapter")
router.register("comparisons", comparisons.ComparisonViewSet, basename="api-comparison")
router.register("playground/sessions", chat.ChatSessionViewSet, basename="api-chat-session")
router.register("sweeps", sweeps.SweepViewSet, basename="api-sweep")
router.register("prompt-sets", comparisons.PromptSetViewSet, basename="api-prompt-set")
router.register("evaluations", adapters.EvaluationViewSet, basename="api-evaluation")
router.register("combinations", adapters.CombinationViewSet, basename="api-combination")
router.register("merges", adapters.MergedModelViewSet, basename="api-merge")
router.register("jobs", jobs.JobViewSet, basename="api-job")
router.register("workers", workers.WorkerViewSet, basename="api-worker")
router.register("aliases", aliases.AliasViewSet, basename="api-alias")

class MeSerializer(serializers.Serializer):
    username = serializers.CharField()
    is_staff = serializers.BooleanField()
    auth = serializers.ChoiceField(choices=["api_key", "session"])
    key_name = serializers.CharField(allow_null=True)
    key_prefix = serializers.CharField(allow_null=True)
    scopes = serializers.ListField(child=serializers.CharField())
    expires_at = serializers.DateTimeField(allow_null=True)


class Me(APIView):
    """Who the caller is: the user, and the API key's name, scopes and expiry (for `tunedeck whoami`)."""

    @extend_schema(responses=MeSerializer)
    def get(self, request: Request) -> Response:
        key = request.auth if isinstance(request.auth, ApiKey) else None
        user = request.user
        data = {
            "username": user.get_username(),
            "is_staff": bool(user.is_staff),
            "auth": "api_key" if key else "session",
            "key_name": key.name if key else None,
            "key_prefix": key.prefix if key else None,
            "scopes": list(key.scopes) if key else ["read", "write", *(["admin"] if user.is_staff else [])],
            "expires_at": key.expires_at if key else None,
        }
        return Response(MeSerializer(data).data)


urlpatterns = [
    path("me/", Me.as_view(), name="api-me"),
    path("login/", Login.as_view(), name="api-login"),
    path("schema/", Schema.as_view(), name="api-schema"),
    path("docs/", Docs.as_view(url_name="api-schema"), name="api-docs"),
    path("usage/", usage.Usage.as_view(), name="api-usage"),
    # The base's name may hold a slash (a hub id); the alias never does.
    re_path(r"^adapters/by-alias/(?P<base>.+)/(?P<alias>[^/]+)/download/?$", aliases.ByAliasDownload.as_view(),
            name="api-adapter-by-alias"),
    path("", include(router.urls)),
    re_path(r"^.*$", NotFound.as_view()),  # last: everything the routes above did not match
]
