"""Comparisons over the API (start, list, get with the grid, blind votes, thumbs, datasets made of them) and the
prompt sets they run on. A comparison starts through playground.services like every adapter job (see
api/adapters.py); votes, thumbs and their datasets follow playground.votes, .thumbs and .votedata."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from webapp.api import access
from webapp.api.adapters import adapters_field, job_error, request_body
from webapp.api.catalog import DatasetSerializer
from webapp.api.common import (
    NON_FIELD,
    NamedRef,
    Ref,
    VisibleObjectMixin,
    owner_param,
)
from webapp.api.idempotency import idempotent, run_idempotent
from webapp.api.problems import problem
from webapp.catalog.models import BaseModel, Dataset
from webapp.playground import services, thumbs, votedata, votes
from webapp.playground.models import Comparison, PromptSet, VoteDataset
from webapp.playground.views import grid
from webapp.specfields import INT32
from workers.contract import jobspecs

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
    adapters = adapters_field()
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


def checked_base(data: dict[str, Any]) -> BaseModel | None:
    """The body's `base_model`, where given, after checking that every adapter was trained on it."""
    base = data.get("base_model")
    wrong = [a for a in data.get("adapters") or [] if base is not None and a.base_model_id != base.pk]
    if wrong:
        raise ValidationError({"adapters": [f"{a} was trained on {a.base_model}, not {base}" for a in wrong]})
    return base


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


# --- thumbs and the datasets made of votes and thumbs ------------------------------------------------------


class ThumbSerializer(serializers.Serializer):
    row = serializers.IntegerField(min_value=0, max_value=INT32, help_text="The row's index (from 0).")
    column = serializers.CharField(max_length=64, help_text="The column's key, as in the comparison's columns.")
    value = serializers.ChoiceField(choices=list(thumbs.VALUES), help_text="`up`, `down`, or `none` to take "
                                    "your thumb back.")


class ThumbTallySerializer(serializers.Serializer):
    row = serializers.IntegerField()
    column = serializers.CharField()
    up = serializers.IntegerField(help_text="Thumbs up on this output, everyone's.")
    down = serializers.IntegerField(help_text="Thumbs down on this output, everyone's.")
    mine = serializers.ChoiceField(choices=[thumbs.UP, thumbs.DOWN], allow_null=True, help_text="Your own thumb.")


class ToDatasetSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=list(votedata.KINDS), default=VoteDataset.PREFERENCE,
                                   help_text="`preference`: pairs from the blind votes (prompt/chosen/rejected with "
                                   "a weight), for DPO. `feedback`: the thumbed outputs (prompt/completion/label), "
                                   "for KTO.")
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="",
                                 help_text="The new dataset's name; default `votes of <comparison>` (or `thumbs of`).")


class FiguresSerializer(serializers.Serializer):
    judgements = serializers.IntegerField(help_text="Votes (ties included) or thumbs counted.")
    examples = serializers.IntegerField(help_text="Rows of the dataset: pairs, or feedback rows.")
    rows = serializers.IntegerField(help_text="Prompts that gave at least one row.")
    tied_rows = serializers.IntegerField(help_text="Preference: rows left out, their votes deciding nothing "
                                         "(ties only, or every column level).")
    unvoted_rows = serializers.IntegerField(help_text="Preference: rows left out, nobody voted on them.")
    identical_pairs = serializers.IntegerField(help_text="Preference: pairs left out, both answers the same text.")
    empty_outputs = serializers.IntegerField(help_text="Pairs or outputs left out for an empty answer.")
    desirable = serializers.IntegerField(help_text="Feedback: rows labelled true.")
    undesirable = serializers.IntegerField(help_text="Feedback: rows labelled false.")
    split_outputs = serializers.IntegerField(help_text="Feedback: outputs left out, as many thumbs up as down.")


class TrainPrefillSerializer(serializers.Serializer):
    objective = serializers.CharField(help_text="dpo for preference pairs, kto for feedback.")
    dataset = serializers.IntegerField()
    base_model = serializers.IntegerField(allow_null=True, help_text="The comparison's base model.")
    init_adapter = serializers.IntegerField(allow_null=True, help_text="The adapter whose column won the most "
                                            "votes, to start from (null: the base won, or no votes).")


class VoteDatasetSerializer(serializers.ModelSerializer):
    dataset = DatasetSerializer(read_only=True)
    comparison = serializers.IntegerField(source="comparison_id", allow_null=True, read_only=True)
    created_by = serializers.CharField(source="created_by.username", allow_null=True, read_only=True, default=None)
    figures = serializers.SerializerMethodField()
    train = serializers.SerializerMethodField(help_text="What a run on this dataset takes: POST these to runs/ "
                                              "with a LoRA config (the page's `Train DPO on these votes`).")

    class Meta:
        model = VoteDataset
        fields = ["dataset", "comparison", "comparison_name", "kind", "judgements", "summary", "figures", "train",
                  "created_by", "created_at"]
        read_only_fields = fields

    @extend_schema_field(FiguresSerializer)
    def get_figures(self, source: VoteDataset) -> dict[str, Any]:
        return source.figures

    @extend_schema_field(TrainPrefillSerializer)
    def get_train(self, source: VoteDataset) -> dict[str, Any]:
        return {"objective": source.objective, "dataset": source.dataset_id,
                "base_model": source.comparison.base_model_id if source.comparison else None,
                "init_adapter": source.winner_id}


def _dataset_refused(request: Request, refused: votedata.DatasetRefused) -> Response:
    if refused.field:
        raise ValidationError({refused.field: [refused.message]})
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
            checked_base(data)
            try:
                with transaction.atomic():
                    comparison = services.start_compare(
                        request.user, _prompt_set(request.user, data), data["adapters"], body.generation(),
                        include_base=data["include_base"], name=data["name"], base_precision=data["base_precision"])
            except services.JobError as exc:
                job_error(exc)
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
        body = VoteSerializer(data=request_body(request))
        body.is_valid(raise_exception=True)
        try:
            row = votes.check_row(comparison, body.validated_data["row"])
            choice = votes.key_of_option(comparison, request.user.pk, row, body.validated_data["option"])
            votes.cast(comparison, request.user, row, choice, choice_field="option")
        except votes.VoteRefused as refused:
            return _vote_refused(request, refused)
        return Response(ballot_row(comparison, votes.ballot(comparison, request.user, [row])[0]),
                        status=status.HTTP_201_CREATED)

    @extend_schema(methods=["get"], responses={200: ThumbTallySerializer(many=True)},
                   description="Thumbs up and down on the comparison's outputs: per output with any, the counts and "
                               "your own.")
    @extend_schema(methods=["post"], request=ThumbSerializer, responses={200: ThumbTallySerializer},
                   description="Your thumb on one output: up, down, or none to take it back (one per person per "
                               "output; 409 while the comparison has not finished).")
    @action(detail=True, methods=["get", "post"], url_path="thumbs", url_name="thumbs")
    def output_thumbs(self, request: Request, pk: str) -> Response:
        comparison = self.get_object()
        if request.method == "GET":
            given = thumbs.tallies(comparison, request.user)
            return Response([{"row": row, "column": column, **tally} for (row, column), tally in sorted(given.items())])
        body = ThumbSerializer(data=request_body(request))
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            thumbs.give(comparison, request.user, data["row"], data["column"], data["value"])
        except votes.VoteRefused as refused:
            return _vote_refused(request, refused)
        return Response({"row": data["row"], "column": data["column"],
                         **thumbs.tally(comparison, request.user, data["row"], data["column"])})

    @extend_schema(request=ToDatasetSerializer, responses={201: VoteDatasetSerializer},
                   description="Make a dataset of the comparison's judgements: `preference` pairs from its blind votes "
                               "(every column that won votes on a row against every column with fewer; `weight` = "
                               "the difference) or `feedback` rows from its thumbs. Rows that give nothing (tied, "
                               "unvoted, identical or empty answers) are left out and counted in `figures`. 409 "
                               "when nothing is left, or the comparison has not finished.")
    @action(detail=True, methods=["post"], url_path="to-dataset", url_name="to-dataset")
    @idempotent
    def to_dataset(self, request: Request, pk: str) -> Response:
        comparison = self.get_object()
        body = ToDatasetSerializer(data=request_body(request))
        body.is_valid(raise_exception=True)
        try:
            source = votedata.make_dataset(comparison, request.user, body.validated_data["kind"],
                                           body.validated_data["name"])
        except votedata.DatasetRefused as refused:
            return _dataset_refused(request, refused)
        return Response(VoteDatasetSerializer(source).data, status=status.HTTP_201_CREATED)


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
                job_error(exc)
            return Response(PromptSetDetailSerializer(prompt_set).data, status=status.HTTP_201_CREATED)

        return run_idempotent(request, handler)
