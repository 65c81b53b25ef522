"""Adapters over the API (list, get, download, merge, export, push) and the adapter jobs started from them:
evaluations, combinations (comparisons: api/comparisons.py); merged models. Every job starts through playground.services, whose
refusals (JobError) come back as 400 problems naming the field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import serializers, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from webapp.api import access
from webapp.api.common import (
    NON_FIELD,
    NamedRef,
    Ref,
    VisibleObjectMixin,
    choice_param,
    int_param,
    owner_param,
    raise_field_errors,
)
from webapp.api.events import ZipRenderer
from webapp.api.idempotency import idempotent, run_idempotent
from webapp.api.jobs import JobSerializer, job_answer, job_queryset
from webapp.api.labels import LABEL_PARAMS, LabelsMixin, TagsField, filter_by_labels
from webapp.api.negotiation import FirstRenderer
from webapp.catalog.models import Dataset
from webapp.jobs.downloads import zip_response
from webapp.playground import services
from webapp.playground.forms import PushForm
from webapp.playground.kinds import JobKind
from webapp.playground.models import MergedModel
from webapp.playground.views import merged_files
from webapp.specfields import INT32
from webapp.training.models import Adapter, AdapterOrigin, TrainingRun
from workers.contract import jobspecs
from workers.contract.store import ArtifactStore

ZIP_RESPONSE = {(200, "application/zip"): OpenApiResponse(OpenApiTypes.BINARY, description="A zip of the files.")}


def job_error(exc: services.JobError) -> None:
    raise_field_errors(dict(exc.errors))


def adapters_field(**kwargs: Any) -> serializers.ListField:
    return serializers.ListField(child=Ref("adapter", queryset=Adapter.objects.all()), min_length=1,
                                 max_length=jobspecs.MAX_ADAPTERS, **kwargs)


# --- adapters ---------------------------------------------------------------------------------------------


class ParentSerializer(serializers.Serializer):
    adapter = serializers.IntegerField(source="parent_id", allow_null=True,
                                       help_text="The parent's id; null once it was deleted (with its run).")
    name = serializers.CharField(source="parent_name", help_text="The parent's name when the combination was made.")
    weight = serializers.FloatField()


class AdapterSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", allow_null=True, read_only=True, default=None)
    base_model_name = serializers.CharField(source="base_model.name", allow_null=True, read_only=True, default=None)
    parents = ParentSerializer(source="parent_links", many=True, read_only=True,
                               help_text="A combined adapter's parents and their weights.")
    init_adapter = serializers.IntegerField(
        source="run.init_adapter_id", allow_null=True, read_only=True, default=None,
        help_text="Warm start: the adapter its run started from (its weights, and DPO's reference); null for an "
                  "adapter trained from scratch, a combined one, or once that adapter was deleted.")
    init_adapter_name = serializers.CharField(
        source="run.init_adapter_name", read_only=True, default="",
        help_text="Warm start: the name of the adapter its run started from, kept when that adapter is deleted.")
    init_adapter_run = serializers.IntegerField(
        source="run.init_adapter.run_id", allow_null=True, read_only=True, default=None,
        help_text="Warm start: the run that trained the adapter its run started from.")
    metrics = serializers.DictField(read_only=True)
    tags = TagsField()

    class Meta:
        model = Adapter
        fields = ["id", "name", "owner", "base_model", "base_model_name", "origin", "run", "parents", "init_adapter",
                  "init_adapter_name", "init_adapter_run", "method", "rank", "quantization", "size_bytes", "sha256",
                  "trainable_params", "total_params", "final_loss", "metrics", "created_at", "tags", "note"]
        read_only_fields = fields


class MergeSerializer(serializers.Serializer):
    dtype = serializers.ChoiceField(choices=list(jobspecs.MERGE_DTYPES), default="auto",
                                    help_text="Dtype of the merged weights; auto keeps the base checkpoint's own.")


class ExportSerializer(serializers.Serializer):
    target = serializers.ChoiceField(
        choices=list(jobspecs.EXPORT_TARGETS), default="ollama",
        help_text="The runtime the folder is for. ollama: a folder with a Modelfile. vllm: the folder vLLM serves, "
        "checked on a worker that has vLLM installed (vLLM loads it and answers `check_prompts` beside Tunedeck; the "
        "job waits for such a worker).",
    )
    form = serializers.ChoiceField(
        choices=list(jobspecs.EXPORT_FORMS), default="merged",
        help_text="merged: the base with the adapter merged, in safetensors (Modelfile FROM .). adapter: the "
        "adapter's safetensors under a Modelfile naming the base (FROM <base>, ADAPTER ./adapter).",
    )
    name = serializers.CharField(max_length=200, default="tunedeck-model",
                                 help_text="The model's name in Ollama: [namespace/]name[:tag].")
    quantize = serializers.ChoiceField(choices=["", *jobspecs.OLLAMA_QUANTIZE], default="", allow_blank=True,
                                       help_text="Passed to ollama create --quantize (merged form only).")
    system = serializers.CharField(default="", allow_blank=True, max_length=10_000,
                                   help_text="A default system prompt (SYSTEM).")
    base_name = serializers.CharField(max_length=200, default="", allow_blank=True,
                                      help_text="Adapter form: the name Ollama knows the base by (default: its source).")
    temperature = serializers.FloatField(required=False, allow_null=True, default=None, min_value=0.0, max_value=5.0,
                                         help_text="PARAMETER temperature, only if set.")
    top_p = serializers.FloatField(required=False, allow_null=True, default=None, min_value=0.0, max_value=1.0,
                                   help_text="PARAMETER top_p, only if set (above 0).")
    dtype = serializers.ChoiceField(choices=list(jobspecs.MERGE_DTYPES), default="auto",
                                    help_text="Merged form: dtype of the merged weights.")
    check_prompts = serializers.ListField(
        child=serializers.CharField(max_length=4000), required=False, max_length=jobspecs.VLLM_MAX_PROMPTS,
        help_text="vllm: the check's prompts (user turns; default: three short general ones).",
    )
    max_new_tokens = serializers.IntegerField(default=32, min_value=1, max_value=512,
                                              help_text="vllm: tokens per check answer.")


class PushSerializer(serializers.Serializer):
    repo_id = serializers.CharField(max_length=200, help_text="namespace/name on the Hub.")
    private = serializers.BooleanField(default=True)
    merged = Ref("merged model of this adapter", queryset=MergedModel.objects.all(), required=False, allow_null=True,
                 help_text="Push this merged model of the adapter instead of the adapter.")


def adapter_zip(adapter: Adapter) -> Any:
    """The adapter's files as a streamed zip (a 404 problem when the store lost them)."""
    folder = ArtifactStore(settings.ARTIFACT_STORE).path(adapter.uri)
    if not folder.is_dir():
        raise NotFound("the adapter's files are missing from the artifact store")
    return zip_response(folder, f"tunedeck-adapter-{adapter.pk}.zip")


def request_body(request: Request) -> Any:
    return request.data if isinstance(request.data, Mapping) else {}


@extend_schema_view(list=extend_schema(parameters=[
    OpenApiParameter("base_model", OpenApiTypes.INT, required=False),
    OpenApiParameter("run", OpenApiTypes.INT, required=False),
    OpenApiParameter("origin", OpenApiTypes.STR, enum=AdapterOrigin.values, required=False),
    OpenApiParameter("owner", OpenApiTypes.STR, required=False, description="A username, or `me`."),
    *LABEL_PARAMS,
]))
class AdapterViewSet(LabelsMixin, VisibleObjectMixin, viewsets.ReadOnlyModelViewSet):
    serializer_class = AdapterSerializer
    noun = "adapter"

    def get_queryset(self) -> Any:
        rows = (Adapter.objects.select_related("owner", "base_model", "run__init_adapter")
                .prefetch_related("parent_links", "tags"))
        return access.visible(self.request.user, rows)

    def filter_queryset(self, queryset: Any) -> Any:
        if self.action != "list":
            return queryset
        for name in ("base_model", "run"):
            number = int_param(self.request, name)
            if number is not None:
                queryset = queryset.filter(**{f"{name}_id": number})
        origin = choice_param(self.request, "origin", AdapterOrigin.values)
        if origin:
            queryset = queryset.filter(origin=origin)
        return filter_by_labels(self.request, owner_param(self.request, queryset))

    @extend_schema(responses=ZIP_RESPONSE, description="The adapter's files as a zip (PeftModel.from_pretrained loads it).")
    @action(detail=True, methods=["get"], renderer_classes=[JSONRenderer, ZipRenderer],
            content_negotiation_class=FirstRenderer)
    def download(self, request: Request, pk: str) -> Any:
        return adapter_zip(self.get_object())

    @extend_schema(request=MergeSerializer, responses={201: JobSerializer},
                   description="Merge the adapter into its base (a merge job; the merged model appears under merges/).")
    @action(detail=True, methods=["post"])
    @idempotent
    def merge(self, request: Request, pk: str) -> Response:
        adapter = self.get_object()
        body = MergeSerializer(data=request_body(request))
        body.is_valid(raise_exception=True)
        try:
            job = services.start_merge(request.user, adapter, body.validated_data["dtype"])
        except services.JobError as exc:
            job_error(exc)
        return job_answer(request.user, job.pk)

    @extend_schema(request=ExportSerializer, responses={201: JobSerializer},
                   description="Export the adapter for Ollama or vLLM (an export job; its folder, with a Modelfile or "
                   "vLLM's check report, and a README, appears under merges/ with its target and form).")
    @action(detail=True, methods=["post"])
    @idempotent
    def export(self, request: Request, pk: str) -> Response:
        adapter = self.get_object()
        body = ExportSerializer(data=request_body(request))
        body.is_valid(raise_exception=True)
        try:
            job = services.start_export(request.user, adapter, **body.validated_data)
        except services.JobError as exc:
            job_error(exc)
        return job_answer(request.user, job.pk)

    @extend_schema(request=PushSerializer, responses={201: JobSerializer},
                   description="Push the adapter (or one of its merged models) to the Hugging Face Hub (owner or staff).")
    @action(detail=True, methods=["post"])
    @idempotent
    def push(self, request: Request, pk: str) -> Response:
        adapter = self.get_object()
        access.check_can_change(request.user, adapter.owner_id, "adapter")
        body = PushSerializer(data=request_body(request), context={"request": request})
        body.is_valid(raise_exception=True)
        data = body.validated_data
        merged = data.get("merged")
        if merged is not None and merged.adapter_id != adapter.pk:
            raise ValidationError({"merged": [f"merged model {merged.pk} is not a merge of adapter {adapter.pk}"]})
        form = PushForm(data={"repo_id": data["repo_id"], "private": data["private"], "what": "adapter"})
        if not form.is_valid():
            raise_field_errors({k: list(v) for k, v in form.errors.items()})
        try:
            job = services.start_push(request.user, adapter, merged.uri if merged else adapter.uri,
                                      form.cleaned_data["repo_id"], form.cleaned_data["private"])
        except services.JobError as exc:
            job_error(exc)
        return job_answer(request.user, job.pk)


# --- merged models ----------------------------------------------------------------------------------------


class MergedFileSerializer(serializers.Serializer):
    name = serializers.CharField()
    size = serializers.IntegerField()


class MergedModelSerializer(serializers.ModelSerializer):
    figures = serializers.DictField(read_only=True, help_text="The check after the merge: logit differences, agreement.")
    files = serializers.SerializerMethodField()

    class Meta:
        model = MergedModel
        fields = ["id", "adapter", "job", "target", "form", "name", "dtype", "size_bytes", "sha256", "verified", "figures",
                  "files", "created_at"]
        read_only_fields = fields

    @extend_schema_field(MergedFileSerializer(many=True))
    def get_files(self, merged: MergedModel) -> list[dict[str, Any]]:
        return merged_files(merged)


class MergedModelViewSet(VisibleObjectMixin, viewsets.ReadOnlyModelViewSet):
    """Full models: an adapter merged into its base, with the figures of the check that followed; and exports
    (target ollama), folders Ollama imports, holding such a merged model or the adapter (form)."""

    serializer_class = MergedModelSerializer
    noun = "merged model"

    def get_queryset(self) -> Any:
        return access.visible(self.request.user, MergedModel.objects.all())

    @extend_schema(responses=ZIP_RESPONSE, description="The merged model's files as a zip (shards stored, not deflated).")
    @action(detail=True, methods=["get"], renderer_classes=[JSONRenderer, ZipRenderer],
            content_negotiation_class=FirstRenderer)
    def download(self, request: Request, pk: str) -> Any:
        merged = self.get_object()
        folder = ArtifactStore(settings.ARTIFACT_STORE).path(merged.uri)
        if not folder.is_dir():
            raise NotFound("the merged model's files are missing from the artifact store")
        return zip_response(folder, f"tunedeck-merged-{merged.pk}.zip")


# --- evaluations and combinations: adapter jobs of one kind -----------------------------------------------


class EvaluateSerializer(serializers.Serializer):
    adapters = adapters_field()
    dataset = NamedRef("dataset", "datasets", queryset=Dataset.objects.all(), required=False, allow_null=True,
                       help_text="A dataset with reference answers...")
    held_out_of = Ref("run", queryset=TrainingRun.objects.all(), required=False, allow_null=True,
                      help_text="...or the rows a run held out of its own training (same fraction and seed).")
    include_base = serializers.BooleanField(default=True, help_text="Score the base model too.")
    max_rows = serializers.IntegerField(min_value=0, max_value=100_000, default=200, help_text="0 scores every row.")
    max_new_tokens = serializers.IntegerField(min_value=1, max_value=4096, default=64)

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        if bool(data.get("dataset")) == bool(data.get("held_out_of")):
            raise ValidationError({NON_FIELD: ["give a dataset or a run's held-out split (held_out_of), one of the two"]})
        return data


class CombineSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="",
                                 help_text="The new adapter's name.")
    adapters = adapters_field()
    weights = serializers.ListField(child=serializers.FloatField(min_value=-1000, max_value=1000), min_length=1,
                                    max_length=jobspecs.MAX_ADAPTERS, help_text="One weight per adapter, in order.")
    combination_type = serializers.ChoiceField(choices=list(jobspecs.COMBINATIONS), default="linear")
    density = serializers.FloatField(min_value=0.0, max_value=1.0, required=False, allow_null=True, default=None,
                                     help_text="ties, dare and magnitude_prune: the fraction of entries kept.")
    majority_sign_method = serializers.ChoiceField(choices=["total", "frequency"], default="total")
    svd_rank = serializers.IntegerField(min_value=1, max_value=INT32, required=False, allow_null=True, default=None,
                                        help_text="svd types: the rank of the result.")


class KindJobViewSet(VisibleObjectMixin, viewsets.ReadOnlyModelViewSet):
    """The adapter jobs of one kind, and POST to start one (cancel, retry and events are under jobs/{id}/)."""

    serializer_class = JobSerializer
    noun = "job"
    kind = ""

    def get_queryset(self) -> Any:
        return job_queryset(self.request.user, self.kind)

    def start(self, request: Request, data: dict[str, Any]) -> Any:
        raise NotImplementedError

    def create(self, request: Request) -> Any:
        def handler() -> Response:
            body = self.get_serializer(data=request.data)
            body.is_valid(raise_exception=True)
            try:
                job = self.start(request, body.validated_data)
            except services.JobError as exc:
                job_error(exc)
            return job_answer(request.user, job.pk)

        return run_idempotent(request, handler)


@extend_schema_view(create=extend_schema(request=EvaluateSerializer, responses={201: JobSerializer}))
class EvaluationViewSet(KindJobViewSet):
    """Scores (loss, perplexity, exact match, ROUGE-L) of adapters and their base on reference answers."""

    kind = JobKind.EVALUATE

    def get_serializer_class(self) -> Any:
        return EvaluateSerializer if self.action == "create" else JobSerializer

    def start(self, request: Request, data: dict[str, Any]) -> Any:
        return services.start_evaluate(
            request.user, data["adapters"], dataset=data.get("dataset"), held_out_of=data.get("held_out_of"),
            include_base=data["include_base"], max_rows=data["max_rows"],
            generation=jobspecs.GenerationParams(max_new_tokens=data["max_new_tokens"]))


@extend_schema_view(create=extend_schema(request=CombineSerializer, responses={201: JobSerializer}))
class CombinationViewSet(KindJobViewSet):
    """Weighted combinations of adapters of one base (PEFT's add_weighted_adapter): a new adapter."""

    kind = JobKind.COMBINE

    def get_serializer_class(self) -> Any:
        return CombineSerializer if self.action == "create" else JobSerializer

    def start(self, request: Request, data: dict[str, Any]) -> Any:
        return services.start_combine(
            request.user, data["adapters"], data["weights"], data["combination_type"], density=data["density"],
            majority_sign_method=data["majority_sign_method"], svd_rank=data["svd_rank"], name=data["name"])
