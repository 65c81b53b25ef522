"""Runs over the API: list with filters, create (queued by the run service, as every way in is), get, cancel, pause,
resume, retry, clone, delete; their events (JSON pages and an SSE stream), metric curve and checkpoints."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from django.db.models import OuterRef, Subquery
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from webapp.api import access
from webapp.api.common import (
    NamedRef,
    Ref,
    VisibleObjectMixin,
    cancel_refused,
    choice_param,
    int_param,
    owner_param,
    raise_field_errors,
    retry_refused,
)
from webapp.api.events import (
    EventPageSerializer,
    EventStreamRenderer,
    ZipRenderer,
    events_page,
    json_batch,
    stream_response,
)
from webapp.api.idempotency import idempotent, run_idempotent
from webapp.api.labels import LABEL_PARAMS, LabelsMixin, TagsField, filter_by_labels
from webapp.api.negotiation import FirstRenderer
from webapp.api.problems import problem
from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.ids import whole
from webapp.jobs import ledger
from webapp.jobs.downloads import zip_response
from webapp.jobs.models import RunState
from webapp.playground import deletion
from webapp.specfields import default, serializer_field
from webapp.training.charts import metrics_after
from webapp.training.checkpoints import run_checkpoints
from webapp.training.models import Adapter, RunEvent, TrainingRun
from webapp.training.services import (
    INIT_ADAPTER_HELP,
    RunRefused,
    RunRequest,
    clone_request,
    queue_run,
    train_params,
)
from webapp.training.tracking import tracking_folder
from workers.contract import spec
from workers.contract.spec import TrainParams

TRACKING_ZIP = {(200, "application/zip"): OpenApiResponse(OpenApiTypes.BINARY, description="A zip of the files.")}


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not know, naming each (a misspelt setting must not be silently ignored)."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = sorted(str(k) for k in data if k not in self.fields)
            if unknown:
                known = ", ".join(self.fields)
                raise serializers.ValidationError({k[:100]: [f"unknown field (known: {known})"] for k in unknown[:20]})
        return super().to_internal_value(data)


# Every TrainParams field, optional: what is left out takes the value suggested for the base model's size.
HyperparametersSerializer = type("Hyperparameters", (StrictSerializer,), {
    f.name: serializer_field(f, spec.CHOICES, note=f"Default: {default(f)!r} (tiny models get larger steps).")
    for f in dataclasses.fields(TrainParams)
})


# A RunRequest's fields (training/services.py), named as it names them; the CLI's YAML run specs are this body.
class RunCreateSerializer(StrictSerializer):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    base_model = NamedRef("base model", "base-models", "models", queryset=BaseModel.objects.all())
    dataset = NamedRef("dataset", "datasets", queryset=Dataset.objects.all())
    eval_dataset = NamedRef(
        "dataset", "datasets", queryset=Dataset.objects.all(), required=False, allow_null=True, default=None,
        help_text="Optional: a dataset to evaluate on instead of a held-out fraction (eval_fraction must be 0).")
    lora_config = NamedRef("LoRA config", "lora-configs", queryset=LoraConfig.objects.all())
    hyperparameters = HyperparametersSerializer(required=False)
    priority = serializers.IntegerField(
        required=False, default=0, min_value=-100, max_value=100,
        help_text="Higher runs first; 0 is normal. Only staff may set it above 0.")
    labels = serializers.ListField(
        child=serializers.CharField(max_length=50), required=False, default=list, max_length=20,
        help_text="Only a worker with all of these labels takes the run (lowercase slugs, e.g. a100).")
    init_adapter = Ref("adapter", queryset=Adapter.objects.select_related("base_model", "run__lora_config"),
                       required=False, allow_null=True, default=None,
                       help_text=f"An adapter's id (GET /api/v1/adapters/). {INIT_ADAPTER_HELP}")


class CloneSerializer(StrictSerializer):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True,
                                 help_text="The new run's name; default: the source's name with (copy).")


class RunSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    base_model_name = serializers.CharField(source="base_model.name", read_only=True)
    dataset_name = serializers.CharField(source="dataset.name", read_only=True)
    eval_dataset = serializers.IntegerField(source="eval_dataset_id", allow_null=True, read_only=True,
                                            help_text="The dataset it evaluates on; null: eval_fraction decides.")
    eval_dataset_name = serializers.CharField(source="eval_dataset.name", allow_null=True, read_only=True, default=None)
    lora_config_name = serializers.CharField(source="lora_config.name", read_only=True)
    labels = serializers.ListField(source="needs_labels", child=serializers.CharField(), read_only=True)
    worker = serializers.CharField(source="worker.name", allow_null=True, read_only=True, default=None)
    adapter = serializers.IntegerField(source="adapter_id", allow_null=True, read_only=True,
                                       help_text="The id of the run's adapter, once it has succeeded.")
    init_adapter = serializers.IntegerField(source="init_adapter_id", allow_null=True, read_only=True,
                                            help_text="Warm start: the id of the adapter the run started from; null "
                                                      "for a new adapter, or once that adapter was deleted.")
    init_adapter_name = serializers.CharField(read_only=True, help_text="Warm start: the name of the adapter the run "
                                              "started from, kept when it is deleted; empty for a new adapter.")
    progress = serializers.FloatField(read_only=True)
    hyperparameters = serializers.DictField(read_only=True)
    attempt_log = serializers.ListField(child=serializers.DictField(), read_only=True)
    tags = TagsField()

    class Meta:
        model = TrainingRun
        fields = [
            "id", "name", "state", "owner", "base_model", "base_model_name", "dataset", "dataset_name",
            "eval_dataset", "eval_dataset_name", "lora_config", "lora_config_name", "hyperparameters", "priority", "labels", "needs_gpu_bytes",
            "needs_gpus", "attempt", "cancel_requested", "pause_requested", "error", "step", "total_steps",
            "progress", "last_loss", "worker", "wait_reason", "attempt_log", "adapter", "init_adapter",
            "init_adapter_name", "created_at", "dispatched_at", "started_at", "finished_at", "tags", "note",
        ]
        read_only_fields = fields


class MetricsSerializer(serializers.Serializer):
    run = serializers.IntegerField()
    points = serializers.ListField(
        child=serializers.DictField(child=serializers.FloatField()),
        help_text="One point per step, oldest first: step, loss, eval_loss, learning_rate, grad_norm, tokens_per_s "
                  "and every other number the objective's trainer logs, e.g. rewards/margins (each where reported); "
                  "num_tokens (tokens trained on so far) and time (the worker's clock at the report, Unix seconds) "
                  "where known; long curves are thinned, eval points kept.")


class CheckpointSerializer(serializers.Serializer):
    id = serializers.IntegerField(help_text="The checkpoint event's id.")
    attempt = serializers.IntegerField()
    step = serializers.IntegerField(allow_null=True)
    data = serializers.JSONField()
    created_at = serializers.DateTimeField()


class CheckpointListSerializer(serializers.Serializer):
    results = CheckpointSerializer(many=True, help_text="The checkpoints still on disk, oldest step first: those "
                                   "keep_checkpoints deleted are left out.")


# --- creating a run -------------------------------------------------------------------------------------


def run_request(data: dict[str, Any]) -> RunRequest:
    """The RunRequest of a valid RunCreateSerializer's data; settings not given take the values suggested for
    the base model."""
    return RunRequest(**{**data, "hyperparameters": train_params(data["base_model"], data.get("hyperparameters") or {})})


def queue(user: Any, request: RunRequest) -> TrainingRun:
    """The queued run; a refusal is a 400 naming each field as the request body names it."""
    try:
        return queue_run(user, request)
    except RunRefused as refused:
        raise_field_errors(refused.errors)  # the 400
        raise  # not reached: raise_field_errors always raises


# --- the endpoints -------------------------------------------------------------------------------------

RUN_BATCH = json_batch(TrainingRun)

ID_FILTER = OpenApiTypes.INT
METRICS_PARAMS = [
    OpenApiParameter("after", OpenApiTypes.INT, required=False,
                     description="Only points of later steps: what a live chart has not drawn yet."),
]
EVENT_PARAMS = [
    OpenApiParameter("after", OpenApiTypes.INT, description="Only events with a larger id (the cursor).", required=False),
    OpenApiParameter("limit", OpenApiTypes.INT, description="At most this many (1-1000, default 200).", required=False),
    OpenApiParameter("kind", OpenApiTypes.STR, description="Only events of this kind (log, metric, status, …).",
                     required=False),
]
STREAM_DOC = extend_schema(
    summary="The job's events as Server-Sent Events",
    description="`event: event` per stored event (JSON, `id:` the event id), `event: state` when the state "
                "changes, `event: done` once the job has finished and every event is sent. Resume with "
                "`Last-Event-ID` (or `?after=`): nothing is lost and nothing repeated.",
    parameters=[OpenApiParameter("after", OpenApiTypes.INT, required=False,
                                 description="Start after this event id (as Last-Event-ID).")],
    responses={(200, "text/event-stream"): OpenApiResponse(OpenApiTypes.STR, description="An event stream.")},
)


class DeletedFolderSerializer(serializers.Serializer):
    uri = serializers.CharField(help_text="A folder of the artifact store, removed with the run.")
    bytes = serializers.IntegerField(help_text="Its size on disk (links not followed).")
    what = serializers.CharField(help_text="What it held.")


class DeletedAdapterSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()


class DeletedMergeSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    dtype = serializers.CharField()
    verified = serializers.BooleanField()
    size_bytes = serializers.IntegerField()


class RunDeletionKeptSerializer(serializers.Serializer):
    comparisons = serializers.ListField(child=serializers.IntegerField(), help_text="Kept; the column names the adapter as deleted.")
    evaluations = serializers.ListField(child=serializers.IntegerField(), help_text="Jobs kept with their scores.")
    combined_adapters = serializers.ListField(child=serializers.IntegerField(), help_text="Kept; lineage names the parent.")
    jobs = serializers.ListField(child=serializers.IntegerField(), help_text="Combinations and pushes, kept with their log.")


class RunDeletionSerializer(serializers.Serializer):
    run = serializers.IntegerField(help_text="The deleted run's id.")
    events = serializers.IntegerField(help_text="Log lines and metric points deleted.")
    checkpoints = serializers.IntegerField(help_text="Checkpoints removed from the artifact store.")
    adapter = DeletedAdapterSerializer(allow_null=True)
    merged_models = DeletedMergeSerializer(many=True)
    jobs = serializers.ListField(child=serializers.IntegerField(), help_text="The adapter's merge jobs, deleted.")
    files = DeletedFolderSerializer(many=True)
    freed_bytes = serializers.IntegerField()
    kept = RunDeletionKeptSerializer()


@extend_schema_view(
    list=extend_schema(parameters=[
        OpenApiParameter("state", OpenApiTypes.STR, enum=RunState.values, required=False),
        OpenApiParameter("owner", OpenApiTypes.STR, required=False, description="A username, or `me`."),
        OpenApiParameter("base_model", ID_FILTER, required=False),
        OpenApiParameter("dataset", ID_FILTER, required=False),
        *LABEL_PARAMS,
    ]),
    create=extend_schema(request=RunCreateSerializer, responses={201: RunSerializer}),
    destroy=extend_schema(responses={200: RunDeletionSerializer}, description=(
        "Delete a finished run with its events, checkpoints, adapter, the adapter's merge jobs and merged models, "
        "and their folders in the artifact store (removed once the deletion has committed). Comparisons, "
        "evaluations, combined adapters and pushes that used the adapter are kept and name it as deleted. 409 "
        "while the run is not finished, or while a job still reads its adapter. The answer says what went and "
        "what stayed.")),
)
class RunViewSet(LabelsMixin, VisibleObjectMixin, viewsets.ReadOnlyModelViewSet):
    serializer_class = RunSerializer
    noun = "run"

    def get_queryset(self) -> Any:
        adapter = Adapter.objects.filter(run=OuterRef("pk")).values("pk")[:1]
        rows = (TrainingRun.objects.select_related("owner", "base_model", "dataset", "eval_dataset", "lora_config", "worker")
                .defer("metric_points").annotate(adapter_id=Subquery(adapter)).prefetch_related("tags"))
        return access.visible(self.request.user, rows)

    def filter_queryset(self, queryset: Any) -> Any:
        if self.action != "list":
            return queryset
        request = self.request
        state = choice_param(request, "state", RunState.values)
        if state:
            queryset = queryset.filter(state=state)
        for name in ("base_model", "dataset"):
            number = int_param(request, name)
            if number is not None:
                queryset = queryset.filter(**{f"{name}_id": number})
        return filter_by_labels(request, owner_param(request, queryset))

    def _answer(self, run_id: int, code: int = status.HTTP_200_OK) -> Response:
        return Response(RunSerializer(self.get_queryset().get(pk=run_id)).data, status=code)

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        def handler() -> Response:
            data = RunCreateSerializer(data=request.data, context={"request": request})
            data.is_valid(raise_exception=True)
            run = queue(request.user, run_request(data.validated_data))
            return self._answer(run.pk, status.HTTP_201_CREATED)

        return run_idempotent(request, handler)  # type: ignore[return-value]

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        run = self.get_object()
        access.check_can_change(request.user, run.owner_id, "run")
        try:
            gone = deletion.delete_run(run)
        except deletion.DeleteRefused as refused:
            return problem(refused.status, refused.message, instance=request.path)
        return Response(RunDeletionSerializer(gone.report()).data)

    @extend_schema(request=None, responses={200: RunSerializer},
                   description="Cancel a queued run at once; an active run stops at its next step (409 once finished).")
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        run = self.get_object()
        return cancel_refused(request, run) or self._answer(run.pk)

    @extend_schema(request=None, responses={200: RunSerializer},
                   description="Pause a run: a queued one is held at once, in its place; a running one saves a checkpoint "
                               "at its next step and frees its GPU (pause_requested until then). 409 unless queued or "
                               "active.")
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, pk: str) -> Response:
        run = self.get_object()
        access.check_can_change(request.user, run.owner_id, "run")
        if not ledger.request_pause(run, request.user):
            return problem(409, f"only a queued or running run can be paused; this one is {run.state}",
                           instance=request.path)
        return self._answer(run.pk)

    @extend_schema(request=None, responses={200: RunSerializer},
                   description="Queue a paused run again, in the place it held; it continues from its latest "
                               "checkpoint (a pending pause is withdrawn instead). 409 unless paused.")
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str) -> Response:
        run = self.get_object()
        access.check_can_change(request.user, run.owner_id, "run")
        if not ledger.resume(run, request.user):
            return problem(409, f"only a paused run can be resumed; this one is {run.state}", instance=request.path)
        return self._answer(run.pk)

    @extend_schema(request=None, responses={200: RunSerializer},
                   description="Queue a failed or cancelled run again; it resumes from its latest checkpoint.")
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str) -> Response:
        run = self.get_object()
        return retry_refused(request, run) or self._answer(run.pk)

    @extend_schema(request=CloneSerializer, responses={201: RunSerializer},
                   description="A new queued run with the same base model, datasets, LoRA config, settings, labels "
                               "and warm start (400 on init_adapter when the adapter it started from was deleted).")
    @action(detail=True, methods=["post"])
    @idempotent
    def clone(self, request: Request, pk: str) -> Response:
        source = self.get_object()
        body = CloneSerializer(data=request.data if isinstance(request.data, Mapping) else {})
        body.is_valid(raise_exception=True)
        try:
            copy = clone_request(source, body.validated_data.get("name") or "", owner=request.user)
        except RunRefused as refused:
            raise_field_errors(refused.errors)  # the 400
            raise  # not reached: raise_field_errors always raises
        run = queue(request.user, copy)
        return self._answer(run.pk, status.HTTP_201_CREATED)

    @extend_schema(parameters=EVENT_PARAMS, responses={200: EventPageSerializer})
    @action(detail=True, methods=["get"])
    def events(self, request: Request, pk: str) -> Response:
        run = self.get_object()
        return Response(events_page(request, RunEvent.objects.filter(run=run), run.state))

    @STREAM_DOC
    @action(detail=True, methods=["get"], url_path="events/stream", renderer_classes=[JSONRenderer, EventStreamRenderer],
            content_negotiation_class=FirstRenderer, pagination_class=None)
    def stream(self, request: Request, pk: str) -> Any:
        run = self.get_object()
        return stream_response(request, RUN_BATCH, TrainingRun, run.pk)

    @extend_schema(parameters=METRICS_PARAMS, responses={200: MetricsSerializer})
    @action(detail=True, methods=["get"])
    def metrics(self, request: Request, pk: str) -> Response:
        run = self.get_object()
        after = request.query_params.get("after", "")
        if after and whole(after, signed=True) is None:
            return problem(400, "after must be a step number", errors={"after": ["must be a step number"]},
                           instance=request.path)
        points = TrainingRun.objects.values_list("metric_points", flat=True).get(pk=run.pk)
        return Response({"run": run.pk, "points": metrics_after(points or [], int(after) if after else None)})

    @extend_schema(responses=TRACKING_ZIP,
                   description="The run's trackers' files as a zip, as written so far: TensorBoard event files "
                               "(tensorboard/), offline W&B runs (wandb/) and a local MLflow store (mlruns/); 404 "
                               "when it has none (report_to names no tracker, or it has not started).")
    @action(detail=True, methods=["get"], renderer_classes=[JSONRenderer, ZipRenderer],
            content_negotiation_class=FirstRenderer)
    def tracking(self, request: Request, pk: str) -> Any:
        folder = tracking_folder(self.get_object())
        if not folder.is_dir():
            raise NotFound("this run has no tracker files")
        return zip_response(folder, f"tunedeck-run-{pk}-tracking.zip")

    @extend_schema(responses={200: CheckpointListSerializer})
    @action(detail=True, methods=["get"])
    def checkpoints(self, request: Request, pk: str) -> Response:
        run = self.get_object()
        return Response({"results": CheckpointSerializer(run_checkpoints(run).kept, many=True).data})


