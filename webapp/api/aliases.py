"""Aliases of adapters over the API: list and read them with their history, move one (POST, optionally requiring
an evaluation the new adapter must win), and download the adapter an alias points at, for deployment scripts.
The rules are in playground/aliases.py."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import serializers, status, viewsets
from rest_framework.exceptions import NotFound
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from webapp.api import access
from webapp.api.adapters import ZIP_RESPONSE, adapter_zip
from webapp.api.common import NamedRef, Ref, VisibleObjectMixin, int_param, raise_field_errors
from webapp.api.events import ZipRenderer
from webapp.api.negotiation import FirstRenderer
from webapp.api.problems import problem
from webapp.catalog.models import BaseModel, Dataset
from webapp.ids import whole
from webapp.playground import aliases
from webapp.playground.models import AdapterAlias, AliasMove
from webapp.training.models import Adapter

HISTORY_SHOWN = 50


class AliasMoveSerializer(serializers.ModelSerializer):
    from_adapter = serializers.IntegerField(source="from_adapter_id", allow_null=True, read_only=True,
                                            help_text="The adapter it pointed at before; null for its first move, or "
                                                      "once that adapter was deleted (from_name stays).")
    to_adapter = serializers.IntegerField(source="to_adapter_id", allow_null=True, read_only=True)
    by = serializers.CharField(source="by.username", allow_null=True, read_only=True, default=None)
    requirement = serializers.DictField(read_only=True, help_text=(
        "The evaluation the move required, with the scores compared (dataset, metric, margin, holder_score, "
        "candidate_score, the evaluate jobs they came from); empty when none was required."))

    class Meta:
        model = AliasMove
        fields = ["id", "at", "by", "outcome", "from_adapter", "from_name", "to_adapter", "to_name", "requirement",
                  "message"]
        read_only_fields = fields


class AliasSerializer(serializers.ModelSerializer):
    base_model_name = serializers.CharField(source="base_model.name", read_only=True)
    adapter = serializers.IntegerField(source="adapter_id", allow_null=True, read_only=True,
                                       help_text="The adapter it points at; null once that adapter was deleted.")
    adapter_name = serializers.CharField(source="adapter.name", allow_null=True, read_only=True, default=None)
    updated_by = serializers.CharField(source="updated_by.username", allow_null=True, read_only=True, default=None)
    download = serializers.SerializerMethodField(help_text="Where a deployment script downloads what it points at.")
    history = serializers.SerializerMethodField(help_text=f"Its moves and refused moves, newest first (at most "
                                                          f"{HISTORY_SHOWN}).")

    class Meta:
        model = AdapterAlias
        fields = ["id", "base_model", "base_model_name", "name", "adapter", "adapter_name", "updated_by",
                  "updated_at", "download", "history"]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.STR)
    def get_download(self, alias: AdapterAlias) -> str:
        return f"/api/v1/adapters/by-alias/{alias.base_model.name}/{alias.name}/download"

    @extend_schema_field(AliasMoveSerializer(many=True))
    def get_history(self, alias: AdapterAlias) -> list[dict[str, Any]]:
        moves = alias.moves.select_related("by")[:HISTORY_SHOWN]
        return AliasMoveSerializer(moves, many=True).data  # type: ignore[return-value]


class RequirementSerializer(serializers.Serializer):
    dataset = NamedRef("dataset", "datasets", queryset=Dataset.objects.all(),
                       help_text="The evaluation set: the dataset both adapters were evaluated on (all its rows).")
    metric = serializers.ChoiceField(choices=list(aliases.METRICS), default="rouge_l",
                                     help_text="rouge_l and exact_match: higher is better; loss and perplexity: lower.")
    margin = serializers.FloatField(min_value=0.0, max_value=1e9, default=0.0,
                                    help_text="By how much the new adapter must beat the current holder.")


class MoveSerializer(serializers.Serializer):
    base_model = NamedRef("base model", "base-models", "models", queryset=BaseModel.objects.all(),
                          help_text="The base model whose alias this is (a name or an id); default: the adapter's.",
                          required=False, allow_null=True, default=None)
    name = serializers.CharField(max_length=200, help_text="The alias, e.g. production (unique per base model).")
    adapter = Ref("adapter", queryset=Adapter.objects.select_related("base_model"),
                  help_text="The adapter it is to point at.")
    require = RequirementSerializer(required=False, allow_null=True, default=None, help_text=(
        "Move only if the new adapter beats the current holder on this evaluation (the scores recorded by "
        "evaluate jobs); a refusal is a 409 naming both scores, and is kept in the history."))


@extend_schema_view(
    list=extend_schema(parameters=[
        OpenApiParameter("base_model", OpenApiTypes.INT, required=False),
        OpenApiParameter("name", OpenApiTypes.STR, required=False),
        OpenApiParameter("adapter", OpenApiTypes.INT, required=False, description="Aliases pointing at it."),
    ]),
    create=extend_schema(request=MoveSerializer, responses={
        200: AliasSerializer, 201: AliasSerializer,
        409: OpenApiResponse(description="The required evaluation was not met: the problem's detail names both "
                                         "scores; `move` is the refusal as the history keeps it.")},
        description="Move an alias to an adapter (creating the alias on its first move: 201)."),
)
class AliasViewSet(VisibleObjectMixin, viewsets.ReadOnlyModelViewSet):
    """Aliases of adapters (production, candidate…), one per name and base model, with their history."""

    serializer_class = AliasSerializer
    noun = "alias"

    def get_queryset(self) -> Any:
        rows = AdapterAlias.objects.select_related("base_model", "adapter", "updated_by").order_by("id")
        return access.visible(self.request.user, rows)

    def filter_queryset(self, queryset: Any) -> Any:
        if self.action != "list":
            return queryset
        for name in ("base_model", "adapter"):
            number = int_param(self.request, name)
            if number is not None:
                queryset = queryset.filter(**{f"{name}_id": number})
        name = self.request.query_params.get("name", "").strip().lower()
        return queryset.filter(name=name) if name else queryset

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        body = MoveSerializer(data=request.data, context={"request": request})
        body.is_valid(raise_exception=True)
        data = body.validated_data
        adapter = data["adapter"]
        base = data["base_model"] or adapter.base_model
        need = data["require"]
        requirement = aliases.Requirement(need["dataset"], need["metric"], need["margin"]) if need else None
        existed = AdapterAlias.objects.filter(base_model=base, name=str(data["name"]).strip().lower()).exists()
        try:
            alias = aliases.move(base, data["name"], adapter, request.user, requirement)
        except aliases.AliasError as refused:
            raise_field_errors(refused.errors)
            raise  # not reached
        except aliases.MoveRefused as refused:
            return problem(409, refused.move.message, instance=request.path,
                           extra={"move": AliasMoveSerializer(refused.move).data})
        answer = AliasSerializer(self.get_queryset().get(pk=alias.pk)).data
        return Response(answer, status=status.HTTP_200_OK if existed else status.HTTP_201_CREATED)


class ByAliasDownload(APIView):
    """The adapter an alias points at, as a zip: for the scripts that deploy the current `production`."""

    renderer_classes = [JSONRenderer, ZipRenderer]
    content_negotiation_class = FirstRenderer

    @extend_schema(responses=ZIP_RESPONSE, operation_id="adapters_by_alias_download", description=(
        "The files of the adapter that the alias `alias` of base model `base` (its name or id) points at, as the "
        "adapter's own download gives them. 404 naming what is missing: no such base, alias, or adapter."))
    def get(self, request: Request, base: str, alias: str) -> Any:
        found = aliases.resolve(base, alias)
        if found is None:
            pk = whole(base)
            known = BaseModel.objects.filter(name=base).exists() or (pk is not None and
                                                                      BaseModel.objects.filter(pk=pk).exists())
            what = f"no alias {alias!r} of base model {base!r}" if known else f"no base model named {base!r}"
            raise NotFound(f"{what} (GET /api/v1/aliases/ lists them)")
        if found.adapter is None:
            raise NotFound(f"the adapter alias {alias!r} pointed at was deleted: move the alias to another adapter")
        return adapter_zip(found.adapter)
