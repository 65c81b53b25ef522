"""Catalog endpoints: base models, datasets and LoRA configs.

Registration goes through the same checks as the catalog pages (the page forms, register_base_model,
register_dataset, LoraParams.validate), so the API accepts exactly what the pages accept.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from django.core.exceptions import ObjectDoesNotExist
from django.db import IntegrityError
from django.db.models import ProtectedError
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from webapp.api.idempotency import idempotent
from webapp.api.problems import problem
from webapp.catalog.forms import LORA_FIELDS, BaseModelForm, DatasetUploadForm, LoraConfigForm
from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.catalog.services import register_base_model, register_dataset
from workers.contract import spec
from workers.data.datasets import DatasetError
from workers.training.modelinfo import ModelNotFound

PROBLEM = OpenApiResponse(description="An RFC 9457 problem (application/problem+json); `errors` names the fields.")
BY_NAME = extend_schema(parameters=[OpenApiParameter(
    "name", OpenApiTypes.STR, required=False,
    description="Only the one with exactly this name (names are unique): how a client turns a name into an id.")])


def _form_errors(form: Any, rename: dict[str, str] | None = None) -> dict[str, list[str]]:
    rename = rename or {}
    return {rename.get(name, "non_field_errors" if name == "__all__" else name): [str(m) for m in messages]
            for name, messages in form.errors.items()}


def _invalid(request: Request, errors: dict[str, list[str]], **extra: Any) -> Response:
    from webapp.api.problems import summary

    return problem(400, summary(errors), errors=errors, code="invalid", instance=request.path, extra=extra)


class _ByName:
    """Lists filtered by `?name=`, exactly (the CLI's `show NAME` and run specs look names up with it)."""

    def filter_queryset(self, queryset: Any) -> Any:
        queryset = super().filter_queryset(queryset)  # type: ignore[misc]
        name = self.request.query_params.get("name")  # type: ignore[attr-defined]
        if name is None:
            return queryset
        return queryset.filter(name=name) if "\x00" not in name else queryset.none()  # PostgreSQL refuses NUL


class _OwnedDestroy:
    """DELETE for the row's creator or staff, and only while nothing refers to it (409 says what does)."""

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        obj = self.get_object()  # type: ignore[attr-defined]
        if not (request.user.is_staff or obj.created_by_id == request.user.pk):
            return problem(403, f"only its creator or staff may delete {obj.name}", instance=request.path)
        try:
            obj.delete()
        except ProtectedError as exc:
            users = sorted({f"{type(o)._meta.verbose_name} {o.pk}" for o in list(exc.protected_objects)[:5]})
            return problem(409, f"{obj.name} is in use ({', '.join(users)}) and cannot be deleted",
                           instance=request.path)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- Base models -------------------------------------------------------------------------------------------


class BaseModelSerializer(serializers.ModelSerializer):
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = BaseModel
        fields = ["id", "name", "source", "revision", "trust_remote_code", "architecture", "model_type",
                  "num_parameters", "max_positions", "linear_modules", "has_chat_template", "created_by",
                  "created_at"]
        read_only_fields = fields


class BaseModelCreateSerializer(serializers.Serializer):
    source = serializers.CharField(max_length=500, help_text="A Hugging Face hub id (owner/name), or the absolute "
                                                             "path of a folder under the server's local model roots "
                                                             "(TUNEDECK_MODEL_ROOTS), the same on the workers.")
    revision = serializers.CharField(max_length=200, required=False, allow_blank=True,
                                     help_text="A branch, tag or commit on the hub.")
    name = serializers.CharField(max_length=200, required=False, allow_blank=True,
                                 help_text="Default: the last part of the source.")


@extend_schema_view(
    list=BY_NAME,
    create=extend_schema(request=BaseModelCreateSerializer, responses={201: BaseModelSerializer, 400: PROBLEM}),
    destroy=extend_schema(responses={204: None, 403: PROBLEM, 409: PROBLEM}),
)
class BaseModelViewSet(_ByName, _OwnedDestroy, mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin,
                       viewsets.GenericViewSet):
    """Base models: register a hub id or a local path (inspected first, as on the Base models page)."""

    queryset = BaseModel.objects.select_related("created_by")
    serializer_class = BaseModelSerializer

    @idempotent
    def create(self, request: Request) -> Response:
        payload = BaseModelCreateSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        form = BaseModelForm(payload.validated_data)
        if not form.is_valid():
            return _invalid(request, _form_errors(form))
        data = form.cleaned_data
        try:
            base = register_base_model(data["name"], data["source"], data["revision"], request.user)
        except ModelNotFound as exc:
            return _invalid(request, {"source": [str(exc)]})
        except IntegrityError:
            return _invalid(request, {"name": [f"a base model named {data['name']} already exists"]})
        return Response(BaseModelSerializer(base).data, status=status.HTTP_201_CREATED,
                        headers={"Location": f"{request.path}{base.pk}/"})


# --- Datasets ----------------------------------------------------------------------------------------------


class DatasetSerializer(serializers.ModelSerializer):
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = Dataset
        fields = ["id", "name", "format", "row_count", "size_bytes", "sha256", "original_filename", "created_by",
                  "created_at"]
        read_only_fields = fields


class DatasetDetailSerializer(DatasetSerializer):
    report = serializers.SerializerMethodField(help_text="The validation report: format, rows, problems "
                                                         "(none: a dataset is stored only when clean), preview.")
    stats = serializers.SerializerMethodField(help_text="Size figures of the stored file.")
    made_from = serializers.SerializerMethodField(
        help_text="For a dataset made from a comparison's judgements (`comparisons/{id}/to-dataset/`) or a chat's "
                  "thumbs (`playground/sessions/{id}/to-dataset/`): the comparison (or chat), what was counted (blind votes or thumbs), what was kept and left out, and the adapter "
                  "that won; null for an upload.")

    class Meta(DatasetSerializer.Meta):
        fields = [*DatasetSerializer.Meta.fields, "report", "stats", "made_from"]
        read_only_fields = fields

    @extend_schema_field(serializers.DictField(allow_null=True))  # null for an upload: the schema says so
    def get_made_from(self, dataset: Dataset) -> dict[str, Any] | None:
        try:
            source = dataset.vote_source  # the playground's provenance record, where there is one
        except ObjectDoesNotExist:
            return None
        return {"comparison": source.comparison_id, "chat": source.chat_id, "comparison_name": source.comparison_name,
                "kind": source.kind,
                "judgements": source.judgements, "figures": source.figures, "summary": source.summary,
                "winner": source.winner_id}

    def get_report(self, dataset: Dataset) -> dict[str, Any]:
        return {"ok": True, "format": dataset.format, "row_count": dataset.row_count, "problems": [],
                "preview": dataset.preview_rows()}

    def get_stats(self, dataset: Dataset) -> dict[str, Any]:
        rows = dataset.row_count or 0
        return {"row_count": rows, "size_bytes": dataset.size_bytes,
                "mean_row_bytes": round(dataset.size_bytes / rows, 1) if rows else None}


class DatasetUploadSerializer(serializers.Serializer):
    """The upload's fields, for the schema: the upload page's form checks them."""

    name = serializers.SlugField(max_length=200, help_text="A unique name (letters, digits, - and _).")
    file = serializers.FileField(help_text="JSONL, JSON, CSV or Parquet.")


def problems_of(filename: str, error: DatasetError) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    """A refused file's problems: as field messages (under "file") and one by one with file, line and field."""
    listed = [{"file": filename, "line": p.line, "unit": p.unit, "field": p.field, "message": p.message}
              for p in error.report.problems]
    messages = [f"{filename}, {p}" for p in error.report.problems]
    if error.report.truncated:
        messages.append("… more problems not shown")
    return {"file": messages}, listed


@extend_schema_view(
    list=BY_NAME,
    retrieve=extend_schema(responses=DatasetDetailSerializer),
    create=extend_schema(request={"multipart/form-data": DatasetUploadSerializer},
                         responses={201: DatasetDetailSerializer, 400: PROBLEM}),
)
class DatasetViewSet(_ByName, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Datasets: upload a file (multipart `name`, `file`), validated whole before anything is stored."""

    queryset = Dataset.objects.select_related("created_by")
    serializer_class = DatasetSerializer
    parser_classes = [MultiPartParser, FormParser]

    def get_serializer_class(self) -> type[serializers.BaseSerializer]:
        return DatasetDetailSerializer if self.action == "retrieve" else DatasetSerializer

    @idempotent
    def create(self, request: Request) -> Response:
        form = DatasetUploadForm(request.data, request.FILES)
        if not form.is_valid():
            return _invalid(request, _form_errors(form))
        upload = form.cleaned_data["file"]
        try:
            dataset = register_dataset(form.cleaned_data["name"], upload.name, upload.file, request.user)
        except DatasetError as exc:
            errors, listed = problems_of(upload.name, exc)
            return problem(400, f"{upload.name} was not saved: {len(exc.report.problems)} problem(s) found",
                           errors=errors, code="invalid_dataset", instance=request.path,
                           extra={"problems": listed, "truncated": exc.report.truncated})
        except ValueError as exc:
            return _invalid(request, {"file": [str(exc)]})
        except IntegrityError:
            return _invalid(request, {"name": ["a dataset with this name already exists"]})
        return Response(DatasetDetailSerializer(dataset).data, status=status.HTTP_201_CREATED,
                        headers={"Location": f"{request.path}{dataset.pk}/"})


# --- LoRA configs ------------------------------------------------------------------------------------------


class LoraConfigSerializer(serializers.ModelSerializer):
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)
    summary = serializers.CharField(read_only=True)

    class Meta:
        model = LoraConfig
        fields = ["id", "name", "method", "params", "summary", "created_by", "created_at"]
        read_only_fields = fields


class LoraConfigCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200)
    params = serializers.DictField(required=False, default=dict,
                                   help_text="LoraParams fields (r, alpha, dropout, target_modules, method, "
                                             "quantization, …); missing ones get their defaults.")


def _form_value(value: Any) -> Any:
    # The form reads module lists as "q_proj, v_proj" and booleans from a checkbox (absent = off).
    return ", ".join(str(v) for v in value) if isinstance(value, list) else value


@extend_schema_view(
    list=BY_NAME,
    create=extend_schema(request=LoraConfigCreateSerializer, responses={201: LoraConfigSerializer, 400: PROBLEM}),
    destroy=extend_schema(responses={204: None, 403: PROBLEM, 409: PROBLEM}),
)
class LoraConfigViewSet(_ByName, _OwnedDestroy, mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin,
                        viewsets.GenericViewSet):
    """LoRA configs: named adapter presets, checked by the same code as the LoRA config form."""

    queryset = LoraConfig.objects.select_related("created_by")
    serializer_class = LoraConfigSerializer
    parser_classes = [JSONParser]

    @idempotent
    def create(self, request: Request) -> Response:
        payload = LoraConfigCreateSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        params: dict[str, Any] = payload.validated_data["params"]
        unknown = sorted(set(params) - set(LORA_FIELDS))
        if unknown:
            return _invalid(request, {f"params.{name}": ["unknown field (LoraParams has: "
                                                         f"{', '.join(LORA_FIELDS)})"] for name in unknown})
        merged = {**dataclasses.asdict(spec.LoraParams()), **params}
        data = {"name": payload.validated_data["name"]}
        data.update({name: _form_value(value) for name, value in merged.items() if value is not False})
        form = LoraConfigForm(data)
        if not form.is_valid():
            return _invalid(request, _form_errors(form, {name: f"params.{name}" for name in LORA_FIELDS}))
        config = form.save(commit=False)
        config.created_by = request.user
        try:
            config.save()
        except IntegrityError:
            return _invalid(request, {"name": [f"a LoRA config named {config.name} already exists"]})
        return Response(LoraConfigSerializer(config).data, status=status.HTTP_201_CREATED,
                        headers={"Location": f"{request.path}{config.pk}/"})
