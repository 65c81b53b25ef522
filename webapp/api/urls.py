"""The REST API at /api/v1/: the router, the OpenAPI schema and its docs page."""

from __future__ import annotations

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework.permissions import AllowAny
from rest_framework.routers import DefaultRouter

import webapp.api.schema  # noqa: F401  (registers the bearer-key security scheme)
from webapp.api import adapters, catalog, jobs, runs, workers


class Schema(SpectacularAPIView):
    permission_classes = [AllowAny]  # the API's shape is no secret; every endpoint in it needs a key


class Docs(SpectacularSwaggerSplitView):
    """Swagger UI from our own static files, its start-up script a separate same-origin file (the site's CSP
    allows no inline script or style)."""

    permission_classes = [AllowAny]
    template_name = "api/docs.html"


router = DefaultRouter()
router.register("base-models", catalog.BaseModelViewSet, basename="api-base-model")
router.register("datasets", catalog.DatasetViewSet, basename="api-dataset")
router.register("lora-configs", catalog.LoraConfigViewSet, basename="api-lora-config")
router.register("runs", runs.RunViewSet, basename="api-run")
router.register("adapters", adapters.AdapterViewSet, basename="api-adapter")
router.register("comparisons", adapters.ComparisonViewSet, basename="api-comparison")
router.register("evaluations", adapters.EvaluationViewSet, basename="api-evaluation")
router.register("combinations", adapters.CombinationViewSet, basename="api-combination")
router.register("merges", adapters.MergedModelViewSet, basename="api-merge")
router.register("jobs", jobs.JobViewSet, basename="api-job")
router.register("workers", workers.WorkerViewSet, basename="api-worker")

urlpatterns = [
    path("schema/", Schema.as_view(), name="api-schema"),
    path("docs/", Docs.as_view(url_name="api-schema"), name="api-docs"),
    path("", include(router.urls)),
]
