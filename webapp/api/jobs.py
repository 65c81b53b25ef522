"""Adapter jobs over the API (compare, merge, export, combine, evaluate, push): list, get, cancel, retry, events."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from webapp.api import access
from webapp.api.common import VisibleObjectMixin, cancel_refused, choice_param, int_param, owner_param, retry_refused
from webapp.api.events import (
    EventPageSerializer,
    EventStreamRenderer,
    events_page,
    json_batch,
    stream_response,
)
from webapp.api.negotiation import FirstRenderer
from webapp.jobs.models import RunState
from webapp.playground.kinds import JobKind
from webapp.playground.models import AdapterJob, JobEvent

# What the worker's spec carries that a reader needs not see (the adapters are listed by id instead).
HIDDEN_PARAMS = ("token",)


class JobSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    base_model_name = serializers.CharField(source="base_model.name", read_only=True)
    adapters = serializers.SerializerMethodField(help_text="Ids of the adapters the job reads, in column order.")
    params = serializers.SerializerMethodField(help_text="The job's settings (as the worker receives them).")
    result = serializers.DictField(read_only=True, help_text="What a succeeded job produced.")
    worker = serializers.CharField(source="worker.name", allow_null=True, read_only=True, default=None)
    progress = serializers.FloatField(read_only=True)
    labels = serializers.ListField(source="needs_labels", child=serializers.CharField(), read_only=True)
    attempt_log = serializers.ListField(child=serializers.DictField(), read_only=True)
    comparison = serializers.SerializerMethodField(help_text="A compare job's comparison id.")
    merged_model = serializers.SerializerMethodField(help_text="A succeeded merge or export job's merged model id.")
    adapter = serializers.SerializerMethodField(help_text="A succeeded combine job's new adapter id.")

    class Meta:
        model = AdapterJob
        fields = [
            "id", "kind", "state", "owner", "base_model", "base_model_name", "adapters", "params", "result",
            "priority", "labels", "needs_gpu_bytes", "needs_gpus", "attempt", "cancel_requested", "error", "step",
            "total_steps", "progress", "worker", "wait_reason", "attempt_log", "comparison", "merged_model",
            "adapter", "created_at", "dispatched_at", "started_at", "finished_at",
        ]
        read_only_fields = fields

    def get_adapters(self, job: AdapterJob) -> list[int]:
        by_key = {a.key: a.pk for a in job.adapters.all()}
        ordered = [by_key[a["key"]] for a in (job.params or {}).get("adapters", []) if a.get("key") in by_key]
        return ordered or sorted(by_key.values())

    def get_params(self, job: AdapterJob) -> dict[str, Any]:
        return {k: v for k, v in (job.params or {}).items() if k not in HIDDEN_PARAMS}

    def get_comparison(self, job: AdapterJob) -> int | None:
        comparison = getattr(job, "comparison", None) if job.kind == JobKind.COMPARE else None
        return comparison.pk if comparison is not None else None

    def get_merged_model(self, job: AdapterJob) -> int | None:
        merged = getattr(job, "merged_model", None) if job.kind in (JobKind.MERGE, JobKind.EXPORT) else None
        return merged.pk if merged is not None else None

    def get_adapter(self, job: AdapterJob) -> int | None:
        value = (job.result or {}).get("adapter_id") if job.kind == JobKind.COMBINE else None
        return value if isinstance(value, int) else None


def job_queryset(user: Any, kind: str | None = None) -> Any:
    rows = AdapterJob.objects.select_related("owner", "base_model", "worker", "comparison", "merged_model") \
        .prefetch_related("adapters")
    if kind:
        rows = rows.filter(kind=kind)
    return access.visible(user, rows)


def job_answer(user: Any, job_id: int, code: int = status.HTTP_201_CREATED) -> Response:
    return Response(JobSerializer(job_queryset(user).get(pk=job_id)).data, status=code)


JOB_BATCH = json_batch(AdapterJob)
JOB_EVENT_PARAMS = [
    OpenApiParameter("after", OpenApiTypes.INT, required=False, description="Only events with a larger id."),
    OpenApiParameter("limit", OpenApiTypes.INT, required=False, description="At most this many (1-1000)."),
    OpenApiParameter("kind", OpenApiTypes.STR, required=False, description="Only events of this kind."),
]


class JobActionsMixin(VisibleObjectMixin):
    """cancel, retry, events and the event stream of an adapter job (shared by jobs/ and evaluations/)."""

    noun = "job"

    @extend_schema(request=None, responses={200: JobSerializer},
                   description="Cancel a queued job at once, an active one at its next step (409 once finished).")
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        job = self.get_object()
        return cancel_refused(request, job) or job_answer(request.user, job.pk, status.HTTP_200_OK)

    @extend_schema(request=None, responses={200: JobSerializer},
                   description="Queue a failed or cancelled job again (409 otherwise).")
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str) -> Response:
        job = self.get_object()
        return retry_refused(request, job) or job_answer(request.user, job.pk, status.HTTP_200_OK)

    @extend_schema(parameters=JOB_EVENT_PARAMS, responses={200: EventPageSerializer})
    @action(detail=True, methods=["get"])
    def events(self, request: Request, pk: str) -> Response:
        job = self.get_object()
        return Response(events_page(request, JobEvent.objects.filter(job=job), job.state))

    @extend_schema(
        summary="The job's events as Server-Sent Events",
        description="As runs/{id}/events/stream/: `event: event` (JSON), `event: state`, `event: done`.",
        parameters=[OpenApiParameter("after", OpenApiTypes.INT, required=False)],
        responses={(200, "text/event-stream"): OpenApiTypes.STR},
    )
    @action(detail=True, methods=["get"], url_path="events/stream", renderer_classes=[JSONRenderer, EventStreamRenderer],
            content_negotiation_class=FirstRenderer)
    def stream(self, request: Request, pk: str) -> Any:
        job = self.get_object()
        return stream_response(request, JOB_BATCH, AdapterJob, job.pk)


@extend_schema_view(list=extend_schema(parameters=[
    OpenApiParameter("kind", OpenApiTypes.STR, enum=JobKind.values, required=False),
    OpenApiParameter("state", OpenApiTypes.STR, enum=RunState.values, required=False),
    OpenApiParameter("owner", OpenApiTypes.STR, required=False, description="A username, or `me`."),
    OpenApiParameter("adapter", OpenApiTypes.INT, required=False, description="Jobs that read this adapter."),
]))
class JobViewSet(JobActionsMixin, viewsets.ReadOnlyModelViewSet):
    """Every adapter job: compare, merge, export, combine, evaluate, push."""

    serializer_class = JobSerializer

    def get_queryset(self) -> Any:
        return job_queryset(self.request.user)

    def filter_queryset(self, queryset: Any) -> Any:
        if self.action != "list":
            return queryset
        request = self.request
        for name, choices in (("kind", JobKind.values), ("state", RunState.values)):
            value = choice_param(request, name, choices)
            if value:
                queryset = queryset.filter(**{name: value})
        adapter = int_param(request, "adapter")
        if adapter is not None:
            queryset = queryset.filter(adapters__id=adapter)
        return owner_param(request, queryset)
