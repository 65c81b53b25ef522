"""Adapters over the API (list, get, download, merge, push) and the adapter jobs started from them:
comparisons, evaluations, combinations; merged models. Every job starts through playground.services, whose
refusals (JobError) come back as 400 problems naming the field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.db import transaction
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
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
from webapp.api.negotiation import FirstRenderer
from webapp.api.problems import problem
from webapp.catalog.models import BaseModel, Dataset
from webapp.playground import services, votes
from webapp.playground.downloads import zip_response
from webapp.playground.forms import PushForm
from webapp.playground.kinds import JobKind
from webapp.playground.models import Comparison, MergedModel, PromptSet
from webapp.playground.views import grid, merged_files
from webapp.training.models import Adapter, AdapterOrigin, TrainingRun
from workers.contract import jobspecs
from workers.contract.store import ArtifactStore

INT32 = 2**31 - 1
ZIP_RESPONSE = {(200, "application/zip"): OpenApiResponse(OpenApiTypes.BINARY, description="A zip of the files.")}


def _job_error(exc: services.JobError) -> None:
    raise_field_errors(dict(exc.errors))


def _adapters_field(**kwargs: Any) -> serializers.ListField:
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
    metrics = serializers.DictField(read_only=True)

    class Meta:
        model = Adapter
        fields = ["id", "name", "owner", "base_model", "base_model_name", "origin", "run", "parents", "method", "rank",
                  "quantization", "size_bytes", "sha256", "trainable_params", "total_params", "final_loss", "metrics",
                  "created_at"]
        read_only_fields = fields


class MergeSerializer(serializers.Serializer):
    dtype = serializers.ChoiceField(choices=list(jobspecs.MERGE_DTYPES), default="auto",
                                    help_text="Dtype of the merged weights; auto keeps the base checkpoint's own.")


class PushSerializer(serializers.Serializer):
    repo_id = serializers.CharField(max_length=200, help_text="namespace/name on the Hub.")
    private = serializers.BooleanField(default=True)
    merged = Ref("merged model of this adapter", queryset=MergedModel.objects.all(), required=False, allow_null=True,
                 help_text="Push this merged model of the adapter instead of the adapter.")


def _body(request: Request) -> Any:
    return request.data if isinstance(request.data, Mapping) else {}


@extend_schema_view(list=extend_schema(parameters=[
    OpenApiParameter("base_model", OpenApiTypes.INT, required=False),
    OpenApiParameter("run", OpenApiTypes.INT, required=False),
    OpenApiParameter("origin", OpenApiTypes.STR, enum=AdapterOrigin.values, required=False),
    OpenApiParameter("owner", OpenApiTypes.STR, required=False, description="A username, or `me`."),
]))
class AdapterViewSet(VisibleObjectMixin, viewsets.ReadOnlyModelViewSet):
    serializer_class = AdapterSerializer
    noun = "adapter"

    def get_queryset(self) -> Any:
        rows = Adapter.objects.select_related("owner", "base_model").prefetch_related("parent_links")
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
        return owner_param(self.request, queryset)

    @extend_schema(responses=ZIP_RESPONSE, description="The adapter's files as a zip (PeftModel.from_pretrained loads it).")
    @action(detail=True, methods=["get"], renderer_classes=[JSONRenderer, ZipRenderer],
            content_negotiation_class=FirstRenderer)
    def download(self, request: Request, pk: str) -> Any:
        adapter = self.get_object()
        folder = ArtifactStore(settings.ARTIFACT_STORE).path(adapter.uri)
        if not folder.is_dir():
            raise NotFound("the adapter's files are missing from the artifact store")
        return zip_response(folder, f"tunedeck-adapter-{adapter.pk}.zip")

    @extend_schema(request=MergeSerializer, responses={201: JobSerializer},
                   description="Merge the adapter into its base (a merge job; the merged model appears under merges/).")
    @action(detail=True, methods=["post"])
    @idempotent
    def merge(self, request: Request, pk: str) -> Response:
        adapter = self.get_object()
        body = MergeSerializer(data=_body(request))
        body.is_valid(raise_exception=True)
        try:
            job = services.start_merge(request.user, adapter, body.validated_data["dtype"])
        except services.JobError as exc:
            _job_error(exc)
        return job_answer(request.user, job.pk)

    @extend_schema(request=PushSerializer, responses={201: JobSerializer},
                   description="Push the adapter (or one of its merged models) to the Hugging Face Hub (owner or staff).")
    @action(detail=True, methods=["post"])
    @idempotent
    def push(self, request: Request, pk: str) -> Response:
        adapter = self.get_object()
        access.check_can_change(request.user, adapter.owner_id, "adapter")
        body = PushSerializer(data=_body(request), context={"request": request})
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
            _job_error(exc)
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
        fields = ["id", "adapter", "job", "dtype", "size_bytes", "sha256", "verified", "figures", "files", "created_at"]
        read_only_fields = fields

    @extend_schema_field(MergedFileSerializer(many=True))
    def get_files(self, merged: MergedModel) -> list[dict[str, Any]]:
        return merged_files(merged)


class MergedModelViewSet(VisibleObjectMixin, viewsets.ReadOnlyModelViewSet):
    """Full models: an adapter merged into its base, with the figures of the check that followed."""

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


# --- comparisons ------------------------------------------------------------------------------------------


class GenerationSerializer(serializers.Serializer):
    max_new_tokens = serializers.IntegerField(min_value=1, max_value=4096, default=128)
    temperature = serializers.FloatField(min_value=0.0, max_value=5.0, default=0.0)
    top_p = serializers.FloatField(min_value=0.01, max_value=1.0, default=1.0)
    seed = serializers.IntegerField(min_value=0, max_value=INT32, default=0)
    chat_template = serializers.BooleanField(default=True)

    def generation(self) -> jobspecs.GenerationParams:
        return jobspecs.GenerationParams(**{k: v for k, v in self.validated_data.items()
                                            if k in GenerationSerializer._declared_fields})


class CompareCreateSerializer(GenerationSerializer):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    base_model = NamedRef("base model", "base-models", "models", queryset=BaseModel.objects.all(), required=False,
                          allow_null=True, help_text="Optional: checked against the adapters' own base.")
    adapters = _adapters_field()
    include_base = serializers.BooleanField(default=True, help_text="The base model as a column too.")
    prompt_set = Ref("prompt set", queryset=PromptSet.objects.all(), required=False, allow_null=True)
    prompts = serializers.ListField(child=serializers.CharField(max_length=100_000), required=False, min_length=1,
                                    max_length=services.MAX_PROMPTS, help_text="Prompts typed here (a new prompt set).")
    dataset = NamedRef("dataset", "datasets", queryset=Dataset.objects.all(), required=False, allow_null=True,
                       help_text="Or the first rows of a dataset, with their reference answers.")
    dataset_rows = serializers.IntegerField(min_value=1, max_value=services.MAX_PROMPTS, default=32)
    prompt_set_name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    base_precision = serializers.ChoiceField(choices=list(jobspecs.BASE_PRECISIONS), default="auto",
                                             help_text=jobspecs.BASE_PRECISION_HELP)

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        sources = [name for name in ("prompt_set", "prompts", "dataset") if data.get(name)]
        if len(sources) != 1:
            raise ValidationError({NON_FIELD: ["give one of prompt_set, prompts or dataset"
                                               + (f" (got {', '.join(sources)})" if sources else "")]})
        return data


class CellSerializer(serializers.Serializer):
    key = serializers.CharField()
    label = serializers.CharField()
    text = serializers.CharField(allow_blank=True)
    tokens = serializers.IntegerField()
    done = serializers.BooleanField()


class GridRowSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    prompt = serializers.CharField(allow_blank=True)
    reference = serializers.CharField(allow_blank=True)
    cells = CellSerializer(many=True)


class WinRateSerializer(serializers.Serializer):
    key = serializers.CharField()
    label = serializers.CharField()
    wins = serializers.IntegerField()
    rate = serializers.FloatField(allow_null=True)


class ColumnSerializer(serializers.Serializer):
    key = serializers.CharField()
    label = serializers.CharField()


class BasePrecisionSerializer(serializers.Serializer):
    chosen = serializers.ChoiceField(choices=list(jobspecs.BASE_PRECISIONS), help_text=jobspecs.BASE_PRECISION_HELP)
    quantization = serializers.CharField(help_text="What the choice resolved to: none, 8bit or 4bit...")
    compute_dtype = serializers.CharField(help_text="...and the compute dtype (auto: the worker's best).")
    used = serializers.CharField(allow_null=True, help_text="The precision the worker loaded the base in (e.g. "
                                 "`4-bit NF4 double-quant (compute bfloat16)`, `float32`); null until the job succeeds.")


class StopTokenSerializer(serializers.Serializer):
    text = serializers.CharField()
    token_id = serializers.IntegerField(allow_null=True, help_text="null: text of several tokens, matched as text.")
    why = serializers.CharField(help_text="`end of turn` (what the chat template writes after an assistant's "
                                "message), `EOS`, or both.")


class ComparisonSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    state = serializers.CharField(source="job.state", allow_null=True, read_only=True, default=None,
                                  help_text="The comparison job's state.")
    generation = serializers.DictField(read_only=True)
    columns = serializers.SerializerMethodField()
    base_precision = serializers.SerializerMethodField(help_text="How the base is loaded: chosen, resolved, used.")
    stop_tokens = serializers.SerializerMethodField(help_text="Where the answers stopped (besides max_new_tokens); "
                                                    "null until the job succeeds.")

    class Meta:
        model = Comparison
        fields = ["id", "name", "owner", "base_model", "prompt_set", "include_base", "generation", "base_precision",
                  "stop_tokens", "job", "state", "columns", "created_at"]
        read_only_fields = fields

    @extend_schema_field(ColumnSerializer(many=True))
    def get_columns(self, comparison: Comparison) -> list[dict[str, str]]:
        return [{"key": key, "label": label} for key, label in comparison.columns()]

    @extend_schema_field(BasePrecisionSerializer(allow_null=True))
    def get_base_precision(self, comparison: Comparison) -> dict[str, Any] | None:
        return comparison.job.base_precision() if comparison.job else None

    @extend_schema_field(StopTokenSerializer(many=True, allow_null=True))
    def get_stop_tokens(self, comparison: Comparison) -> list[dict[str, Any]] | None:
        return (comparison.job.result or {}).get("stop_tokens") if comparison.job else None


class ComparisonDetailSerializer(ComparisonSerializer):
    rows = serializers.SerializerMethodField(help_text="Every prompt with each column's output so far.")
    win_rates = serializers.SerializerMethodField(help_text="Blind votes per column (ties count for nobody).")
    votes = serializers.IntegerField(source="votes.count", read_only=True)

    class Meta(ComparisonSerializer.Meta):
        fields = [*ComparisonSerializer.Meta.fields, "rows", "win_rates", "votes"]
        read_only_fields = fields

    @extend_schema_field(GridRowSerializer(many=True))
    def get_rows(self, comparison: Comparison) -> list[dict[str, Any]]:
        rows, _ = grid(comparison)
        return [{
            "index": row["index"], "prompt": row["prompt"], "reference": row["reference"],
            "cells": [{"key": c["key"], "label": c["label"], "text": c["cell"].text if c["cell"] else "",
                       "tokens": c["cell"].tokens if c["cell"] else 0, "done": bool(c["cell"] and c["cell"].done)}
                      for c in row["cells"]],
        } for row in rows]

    @extend_schema_field(WinRateSerializer(many=True))
    def get_win_rates(self, comparison: Comparison) -> list[dict[str, Any]]:
        return comparison.win_rates()


def _new_prompt_set(user: Any, data: dict[str, Any], name: str) -> PromptSet:
    """A prompt set from typed prompts (each with an optional reference) or from a dataset's first rows."""
    if data.get("dataset"):
        rows = services.dataset_prompts(data["dataset"], data["dataset_rows"])
        default_name = f"{len(rows)} rows of {data['dataset']}"
    else:
        references = data.get("references") or [""] * len(data["prompts"])
        rows = [{"prompt": p, "reference": r} for p, r in zip(data["prompts"], references, strict=True)]
        default_name = f"{len(rows)} prompts"
    return PromptSet.objects.create(name=name or default_name, owner=user, rows=rows, source_dataset=data.get("dataset"))


def _prompt_set(user: Any, data: dict[str, Any]) -> PromptSet:
    return data["prompt_set"] if data.get("prompt_set") else _new_prompt_set(user, data, data.get("prompt_set_name", ""))


# --- blind votes ----------------------------------------------------------------------------------------


class BallotOptionSerializer(serializers.Serializer):
    option = serializers.CharField(help_text="A neutral letter (A, B, …) in your own shuffled order for this row.")
    text = serializers.CharField(allow_blank=True)
    done = serializers.BooleanField(help_text="The output is complete.")
    key = serializers.CharField(allow_null=True, help_text="The column's key: null until you have voted on the row.")
    label = serializers.CharField(allow_null=True, help_text="The column's name: null until you have voted on the row.")


class BallotRowSerializer(serializers.Serializer):
    row = serializers.IntegerField(help_text="The row's index (from 0), as in the comparison's rows.")
    prompt = serializers.CharField(allow_blank=True)
    reference = serializers.CharField(allow_blank=True)
    options = BallotOptionSerializer(many=True)
    choice = serializers.CharField(allow_null=True, help_text="Your vote: an option letter or `tie`; null until you vote.")
    choice_key = serializers.CharField(allow_null=True, help_text="The column you voted for (`tie` for a tie).")
    choice_label = serializers.CharField(allow_null=True, help_text="The name of the column you voted for.")


class BallotSerializer(serializers.Serializer):
    comparison = serializers.IntegerField()
    state = serializers.CharField(allow_null=True, help_text="The comparison job's state.")
    open = serializers.BooleanField(help_text="Voting is open: every output is complete (the job succeeded).")
    voted = serializers.IntegerField(help_text="How many rows you have voted on.")
    rows = BallotRowSerializer(many=True)


class VoteSerializer(serializers.Serializer):
    row = serializers.IntegerField(min_value=0, max_value=INT32, help_text="The row's index (from 0).")
    option = serializers.CharField(max_length=16, help_text="An option letter of your ballot's row, or `tie`.")


def ballot_row(comparison: Comparison, row: dict[str, Any]) -> dict[str, Any]:
    """A row of the caller's ballot: options by letter; keys and names only once the caller voted on it."""
    voted = row["choice"] is not None
    letters = {o["key"]: o["letter"] for o in row["options"]}
    return {
        "row": row["index"], "prompt": row["prompt"], "reference": row["reference"],
        "options": [{"option": o["letter"], "text": o["cell"].text if o["cell"] else "",
                     "done": bool(o["cell"] and o["cell"].done),
                     "key": o["key"] if voted else None, "label": o["label"] if voted else None}
                    for o in row["options"]],
        "choice": letters.get(row["choice"], row["choice"]) if voted else None,
        "choice_key": row["choice"], "choice_label": row["choice_label"] if voted else None,
    }


def _vote_refused(request: Request, refused: votes.VoteRefused) -> Response:
    if refused.field:
        raise ValidationError({refused.field: [refused.message]})
    if refused.status == status.HTTP_403_FORBIDDEN:
        raise PermissionDenied(refused.message)
    return problem(refused.status, refused.message, instance=request.path)


class ComparisonViewSet(VisibleObjectMixin, viewsets.ReadOnlyModelViewSet):
    """Side-by-side outputs of adapters (and their base) on a prompt set; blind votes give win rates."""

    noun = "comparison"

    def get_queryset(self) -> Any:
        rows = Comparison.objects.select_related("owner", "base_model", "prompt_set", "job")
        return access.visible(self.request.user, rows)

    def get_serializer_class(self) -> Any:
        return ComparisonDetailSerializer if self.action == "retrieve" else ComparisonSerializer

    @extend_schema(request=CompareCreateSerializer, responses={201: ComparisonDetailSerializer})
    def create(self, request: Request) -> Any:
        def handler() -> Response:
            body = CompareCreateSerializer(data=request.data, context={"request": request})
            body.is_valid(raise_exception=True)
            data = body.validated_data
            base = data.get("base_model")
            wrong = [a for a in data["adapters"] if base is not None and a.base_model_id != base.pk]
            if wrong:
                raise ValidationError({"adapters": [f"{a} was trained on {a.base_model}, not {base}" for a in wrong]})
            try:
                with transaction.atomic():
                    comparison = services.start_compare(
                        request.user, _prompt_set(request.user, data), data["adapters"], body.generation(),
                        include_base=data["include_base"], name=data["name"], base_precision=data["base_precision"])
            except services.JobError as exc:
                _job_error(exc)
            return Response(ComparisonDetailSerializer(self.get_queryset().get(pk=comparison.pk)).data,
                            status=status.HTTP_201_CREATED)

        return run_idempotent(request, handler)

    @extend_schema(responses={200: BallotSerializer},
                   description="Your blind ballot: each row's outputs under option letters in an order shuffled for "
                               "you; the columns' keys and names show only on the rows you have voted on.")
    @action(detail=True, methods=["get"])
    def ballot(self, request: Request, pk: str) -> Response:
        comparison = self.get_object()
        rows = [ballot_row(comparison, row) for row in votes.ballot(comparison, request.user)]
        return Response({"comparison": comparison.pk, "state": comparison.job.state if comparison.job else None,
                         "open": votes.is_open(comparison), "voted": sum(r["choice"] is not None for r in rows),
                         "rows": rows})

    @extend_schema(request=VoteSerializer, responses={201: BallotRowSerializer},
                   description="Vote on one row of your ballot: an option letter or `tie`. The answer is the row with "
                               "the names revealed. One vote per person per row (409 for a second one, and while the "
                               "comparison has not finished); win rates are on the comparison.")
    @action(detail=True, methods=["post"], url_path="votes", url_name="votes")
    @idempotent
    def vote(self, request: Request, pk: str) -> Response:
        comparison = self.get_object()
        body = VoteSerializer(data=_body(request))
        body.is_valid(raise_exception=True)
        try:
            row = votes.check_row(comparison, body.validated_data["row"])
            choice = votes.key_of_option(comparison, request.user.pk, row, body.validated_data["option"])
            votes.cast(comparison, request.user, row, choice, choice_field="option")
        except votes.VoteRefused as refused:
            return _vote_refused(request, refused)
        return Response(ballot_row(comparison, votes.ballot(comparison, request.user, [row])[0]),
                        status=status.HTTP_201_CREATED)


# --- prompt sets --------------------------------------------------------------------------------------------


class TurnSerializer(serializers.Serializer):
    role = serializers.CharField()
    content = serializers.CharField(allow_blank=True)


class PromptRowSerializer(serializers.Serializer):
    prompt = serializers.CharField(allow_blank=True, help_text="As people read it (a conversation: a turn per line).")
    reference = serializers.CharField(allow_blank=True, default="")
    turns = TurnSerializer(many=True, default=list, help_text="A dataset row's conversation before its answer, "
                           "system prompt included: what the model is given. Empty for typed prompts.")


class PromptSetSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    size = serializers.SerializerMethodField(help_text="How many prompts it holds.")
    has_references = serializers.BooleanField(read_only=True, help_text="Some prompts have a reference answer.")

    class Meta:
        model = PromptSet
        fields = ["id", "name", "owner", "size", "has_references", "source_dataset", "created_at"]
        read_only_fields = fields

    def get_size(self, prompt_set: PromptSet) -> int:
        return len(prompt_set.rows)


class PromptSetDetailSerializer(PromptSetSerializer):
    rows = PromptRowSerializer(many=True, read_only=True, help_text="Every prompt with its reference ('' for none).")

    class Meta(PromptSetSerializer.Meta):
        fields = [*PromptSetSerializer.Meta.fields, "rows"]
        read_only_fields = fields


class PromptSetCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="",
                                 help_text="Default: how many prompts, and from where.")
    prompts = serializers.ListField(child=serializers.CharField(max_length=100_000), required=False, min_length=1,
                                    max_length=services.MAX_PROMPTS, help_text="Prompts typed here...")
    references = serializers.ListField(
        child=serializers.CharField(max_length=100_000, allow_blank=True), required=False,
        max_length=services.MAX_PROMPTS, help_text="...with their reference answers: one per prompt, in order ('' for none).")
    dataset = NamedRef("dataset", "datasets", queryset=Dataset.objects.all(), required=False, allow_null=True,
                       help_text="Or the first rows of a dataset, with their reference answers.")
    dataset_rows = serializers.IntegerField(min_value=1, max_value=services.MAX_PROMPTS, default=32)

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        sources = [name for name in ("prompts", "dataset") if data.get(name)]
        if len(sources) != 1:
            raise ValidationError({NON_FIELD: ["give one of prompts or dataset"
                                               + (f" (got {', '.join(sources)})" if sources else "")]})
        references = data.get("references")
        if references is not None and not data.get("prompts"):
            raise ValidationError({"references": ["references go with typed prompts (a dataset brings its own)"]})
        if references is not None and len(references) != len(data["prompts"]):
            raise ValidationError({"references": [f"one per prompt: {len(data['prompts'])} prompts, "
                                                  f"{len(references)} references"]})
        return data


@extend_schema_view(
    list=extend_schema(parameters=[OpenApiParameter("owner", OpenApiTypes.STR, required=False,
                                                    description="A username, or `me`.")]),
    create=extend_schema(request=PromptSetCreateSerializer, responses={201: PromptSetDetailSerializer}),
)
class PromptSetViewSet(VisibleObjectMixin, viewsets.ReadOnlyModelViewSet):
    """Reusable lists of prompts (each with an optional reference answer): a comparison runs on one."""

    noun = "prompt set"

    def get_queryset(self) -> Any:
        return access.visible(self.request.user, PromptSet.objects.select_related("owner"))

    def get_serializer_class(self) -> Any:
        return PromptSetSerializer if self.action == "list" else PromptSetDetailSerializer

    def filter_queryset(self, queryset: Any) -> Any:
        return owner_param(self.request, queryset) if self.action == "list" else queryset

    def create(self, request: Request) -> Any:
        def handler() -> Response:
            body = PromptSetCreateSerializer(data=request.data, context={"request": request})
            body.is_valid(raise_exception=True)
            data = body.validated_data
            try:
                prompt_set = _new_prompt_set(request.user, data, data["name"])
            except services.JobError as exc:
                _job_error(exc)
            return Response(PromptSetDetailSerializer(prompt_set).data, status=status.HTTP_201_CREATED)

        return run_idempotent(request, handler)


# --- evaluations and combinations: adapter jobs of one kind -----------------------------------------------


class EvaluateSerializer(serializers.Serializer):
    adapters = _adapters_field()
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
    adapters = _adapters_field()
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
                _job_error(exc)
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
