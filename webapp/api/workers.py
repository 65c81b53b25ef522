"""Workers over the API (staff with an admin-scoped key): register (the token shown in that response only),
rotate and revoke tokens, drain, resume, change labels and limits, delete. The same forms and model methods
as the workers page."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from webapp.api import access
from webapp.api.common import VisibleObjectMixin, form_errors, raise_field_errors
from webapp.api.problems import problem
from webapp.fleet.forms import RegisterWorkerForm, WorkerSettingsForm
from webapp.fleet.models import Worker, WorkerState
from webapp.fleet.views import annotate_current_run, gpu_rows
from webapp.jobs.models import ACTIVE_STATES


class GpuSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    name = serializers.CharField()
    memory_total = serializers.FloatField(allow_null=True)
    memory_used = serializers.FloatField(allow_null=True)
    memory_percent = serializers.IntegerField(allow_null=True)
    utilization = serializers.IntegerField(allow_null=True)


class WorkerSerializer(serializers.ModelSerializer):
    labels = serializers.ListField(child=serializers.CharField(), read_only=True)
    inventory = serializers.DictField(read_only=True, help_text="What the worker reported at its last heartbeat.")
    gpus = serializers.SerializerMethodField()
    revoked = serializers.BooleanField(read_only=True, help_text="No token is accepted until one is rotated in.")
    previous_token_valid_until = serializers.SerializerMethodField(
        help_text="When the token replaced by the last rotation stops working (null: none does).")
    current_run = serializers.IntegerField(source="current_run_id", allow_null=True, read_only=True, default=None)
    current_job = serializers.IntegerField(source="current_job_id", allow_null=True, read_only=True, default=None)

    class Meta:
        model = Worker
        fields = ["id", "name", "state", "labels", "max_gpu_bytes", "max_jobs", "last_heartbeat", "inventory", "gpus",
                  "token_issued_at", "revoked", "previous_token_valid_until", "current_run", "current_job",
                  "created_at"]
        read_only_fields = fields

    @extend_schema_field(GpuSerializer(many=True))
    def get_gpus(self, worker: Worker) -> list[dict[str, Any]]:
        return gpu_rows(worker.inventory)

    @extend_schema_field(serializers.DateTimeField(allow_null=True))
    def get_previous_token_valid_until(self, worker: Worker) -> Any:
        until = worker.previous_token_valid_until()
        return serializers.DateTimeField().to_representation(until) if until else None


class WorkerTokenSerializer(WorkerSerializer):
    token = serializers.CharField(read_only=True, help_text="The worker's token: shown in this response only.")

    class Meta(WorkerSerializer.Meta):
        fields = [*WorkerSerializer.Meta.fields, "token"]
        read_only_fields = fields


class WorkerSettingsSerializer(serializers.Serializer):
    labels = serializers.ListField(child=serializers.CharField(max_length=50), max_length=20, required=False,
                                   help_text="Jobs asking for labels run only where all match (lowercase slugs).")
    max_gpu_gib = serializers.DecimalField(max_digits=9, decimal_places=2, min_value=Decimal("0.1"),
                                           max_value=Decimal(100_000), required=False, allow_null=True,
                                           help_text="Jobs estimated to need more GPU memory are not placed here.")
    max_jobs = serializers.IntegerField(min_value=1, max_value=1000, required=False, allow_null=True,
                                        help_text="At most this many jobs at once (default: one per GPU).")


class RegisterSerializer(WorkerSettingsSerializer):
    name = serializers.CharField(max_length=100, help_text="A slug naming the machine, e.g. gpu-a100-1.")


def _form_data(data: dict[str, Any]) -> dict[str, Any]:
    gib = data.get("max_gpu_gib")
    return {**({"name": data["name"]} if "name" in data else {}), "labels": ", ".join(data.get("labels") or []),
            "max_gpu_gib": "" if gib is None else str(gib),
            "max_jobs": "" if data.get("max_jobs") is None else data["max_jobs"]}


def _token_answer(worker: Worker, token: str, code: int) -> Response:
    row = annotate_current_run(Worker.objects.filter(pk=worker.pk)).get()
    response = Response({**WorkerSerializer(row).data, "token": token}, status=code)
    add_never_cache_headers(response)
    return response


@extend_schema(description="Staff only, with an API key of the admin scope.")
class WorkerViewSet(VisibleObjectMixin, viewsets.ReadOnlyModelViewSet):
    admin_scope = True
    serializer_class = WorkerSerializer
    noun = "worker"
    pagination_class = None  # a fleet is small; the workers page lists them all too

    def get_queryset(self) -> Any:
        return access.visible(self.request.user, annotate_current_run(Worker.objects.order_by("name")))

    def _answer(self, worker_id: int, code: int = status.HTTP_200_OK) -> Response:
        return Response(WorkerSerializer(self.get_queryset().get(pk=worker_id)).data, status=code)

    # Registering is not replayed by Idempotency-Key: a replay would show the token again (and keep it in
    # the database). The name is unique, so a retried registration is refused, naming the existing worker.
    @extend_schema(request=RegisterSerializer, responses={201: WorkerTokenSerializer})
    def create(self, request: Request) -> Response:
        body = RegisterSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        form = RegisterWorkerForm(data=_form_data(body.validated_data))
        registered = form.register(created_by=request.user) if form.is_valid() else None
        if registered is None:
            raise_field_errors(form_errors(form))
        worker, token = registered  # type: ignore[misc]
        return _token_answer(worker, token, status.HTTP_201_CREATED)

    @extend_schema(request=WorkerSettingsSerializer, responses={200: WorkerSerializer},
                   description="Change labels and limits (fields left out keep their values).")
    def partial_update(self, request: Request, pk: str) -> Response:
        worker = self.get_object()
        body = WorkerSettingsSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        current = {"labels": worker.labels, "max_jobs": worker.max_jobs,
                   "max_gpu_gib": WorkerSettingsForm.initial_for(worker)["max_gpu_gib"]}
        form = WorkerSettingsForm(data=_form_data({**current, **body.validated_data}))
        if not form.is_valid():
            raise_field_errors(form_errors(form))
        form.apply(worker)
        worker.save(update_fields=["labels", "max_gpu_bytes", "max_jobs"])
        return self._answer(worker.pk)

    def destroy(self, request: Request, pk: str) -> Response:
        worker = self.get_object()
        with transaction.atomic():
            locked = Worker.objects.select_for_update().filter(pk=worker.pk).first()
            if locked is None:
                return problem(404, f"no worker with id {worker.pk}", instance=request.path)
            if locked.runs.filter(state__in=ACTIVE_STATES).exists() or locked.adapter_jobs.filter(
                    state__in=ACTIVE_STATES).exists():
                return problem(409, f"{worker.name} has an active job: drain it and wait until the job ends",
                               instance=request.path)
            locked.delete()
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=None, responses={200: WorkerTokenSerializer},
                   description="A new token, in this response only; the old one keeps working for TUNEDECK_TOKEN_OVERLAP "
                               "seconds (none does after a revoke).")
    @action(detail=True, methods=["post"])
    def rotate(self, request: Request, pk: str) -> Response:
        worker = self.get_object()
        with transaction.atomic():
            locked = Worker.objects.select_for_update().get(pk=worker.pk)
            token = locked.rotate_token(settings.TOKEN_OVERLAP)
            locked.save(update_fields=["token_hash", "token_issued_at", "previous_token_hash", "previous_token_expires"])
        return _token_answer(locked, token, status.HTTP_200_OK)

    @extend_schema(request=None, responses={200: WorkerSerializer},
                   description="Refuse the worker's tokens from now on (rotate to give it a new one).")
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str) -> Response:
        worker = self.get_object()
        worker.revoke_token()
        worker.save(update_fields=["token_hash", "previous_token_hash", "previous_token_expires"])
        return self._answer(worker.pk)

    @extend_schema(request=None, responses={200: WorkerSerializer},
                   description="An online worker finishes its jobs and takes no new ones until resumed (409 otherwise).")
    @action(detail=True, methods=["post"])
    def drain(self, request: Request, pk: str) -> Response:
        worker = self.get_object()
        if not Worker.objects.filter(pk=worker.pk, state=WorkerState.ONLINE).update(state=WorkerState.DRAINING):
            return problem(409, f"only an online worker can be drained; {worker.name} is {worker.state}",
                           instance=request.path)
        return self._answer(worker.pk)

    @extend_schema(request=None, responses={200: WorkerSerializer},
                   description="A draining worker takes jobs again: online if heard from lately, else offline until it is.")
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str) -> Response:
        worker = self.get_object()
        cutoff = timezone.now() - timedelta(seconds=settings.WORKER_OFFLINE_AFTER)
        alive = worker.last_heartbeat is not None and worker.last_heartbeat >= cutoff
        target = WorkerState.ONLINE if alive else WorkerState.OFFLINE
        if not Worker.objects.filter(pk=worker.pk, state=WorkerState.DRAINING).update(state=target):
            return problem(409, f"{worker.name} is not draining (it is {worker.state})", instance=request.path)
        return self._answer(worker.pk)
