"""The chat playground over the API: sessions (a base and up to four adapters side by side, the model kept loaded on
a worker while in use), messages with their answers streamed as Server-Sent Events, stop, close, settings,
thumbs, and the conversation saved as a prompt set. Everything goes through playground.chat, as the pages do."""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_field
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from webapp.api import access
from webapp.api.adapters import job_error, request_body
from webapp.api.common import NamedRef, Ref, VisibleObjectMixin
from webapp.api.comparisons import checked_base
from webapp.api.events import EventStreamRenderer
from webapp.api.idempotency import idempotent, run_idempotent
from webapp.api.negotiation import FirstRenderer
from webapp.api.problems import problem
from webapp.catalog.models import BaseModel
from webapp.jobs.stream import sse_response
from webapp.playground import chat, votedata
from webapp.playground.models import ChatSession
from webapp.playground.services import JobError
from webapp.specfields import INT32
from webapp.training.models import Adapter
from workers.contract import jobspecs


class ChatGenerationSerializer(serializers.Serializer):
    max_new_tokens = serializers.IntegerField(min_value=1, max_value=4096, required=False)
    temperature = serializers.FloatField(min_value=0.0, max_value=5.0, required=False, help_text="0 is greedy.")
    top_p = serializers.FloatField(min_value=0.01, max_value=1.0, required=False)
    seed = serializers.IntegerField(min_value=0, max_value=INT32, required=False)


class ChatCreateSerializer(ChatGenerationSerializer):
    title = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    base_model = NamedRef("base model", "base-models", "models", queryset=BaseModel.objects.all(), required=False,
                          allow_null=True, help_text="Needed to chat with a base alone; checked against the adapters'.")
    adapters = serializers.ListField(child=Ref("adapter", queryset=Adapter.objects.all()), required=False,
                                     default=list, max_length=chat.MAX_ADAPTERS,
                                     help_text=f"Up to {chat.MAX_ADAPTERS} adapters of one base, in column order.")
    include_base = serializers.BooleanField(default=True, help_text="The base answers too, in its own column.")
    system_prompt = serializers.CharField(required=False, allow_blank=True, default="", max_length=20_000)
    base_precision = serializers.ChoiceField(choices=list(jobspecs.BASE_PRECISIONS), default="auto",
                                             help_text=jobspecs.BASE_PRECISION_HELP)


class ChatSettingsSerializer(ChatGenerationSerializer):
    title = serializers.CharField(max_length=200, required=False, allow_blank=True)
    system_prompt = serializers.CharField(required=False, allow_blank=True, max_length=20_000)


class ChatAnswerSerializer(serializers.Serializer):
    column = serializers.CharField()
    text = serializers.CharField(allow_blank=True)
    done = serializers.BooleanField(help_text="The answer is complete (ended, stopped, or its job ended).")
    stopped = serializers.BooleanField(help_text="Ended by a stop (yours, or the session's close) before its end.")
    tokens = serializers.IntegerField()
    first_token_s = serializers.FloatField(allow_null=True, help_text="Seconds from the message's arrival at the "
                                           "worker to this answer's first token.")
    seconds = serializers.FloatField(allow_null=True)
    error = serializers.CharField(allow_blank=True, help_text="Why the column did not answer (e.g. the message is "
                                  "longer than the model's context); empty otherwise.")
    thumbs = serializers.DictField(required=False, help_text="{up, down, mine}")


class ChatMessageSerializer(serializers.Serializer):
    index = serializers.IntegerField(help_text="The message's number in the chat, from 1.")
    content = serializers.CharField()
    stop_requested = serializers.BooleanField()
    system_prompt = serializers.CharField(allow_blank=True)
    generation = serializers.DictField()
    answers = ChatAnswerSerializer(many=True)


class ChatStatusSerializer(serializers.Serializer):
    state = serializers.ChoiceField(choices=["unloaded", "queued", "loading", "ready", "released", "closed", "failed"])
    text = serializers.CharField()
    job = serializers.IntegerField(allow_null=True, help_text="The job that holds (or held) the model.")
    job_state = serializers.CharField(allow_null=True)
    load_s = serializers.FloatField(allow_null=True, required=False, help_text="How long the model took to load.")
    since = serializers.CharField(required=False, help_text="While loading: since when (ISO 8601).")


class ChatColumnSerializer(serializers.Serializer):
    key = serializers.CharField()
    label = serializers.CharField()
    base = serializers.BooleanField()


class ChatSessionSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    columns = serializers.SerializerMethodField()
    status = serializers.SerializerMethodField()

    class Meta:
        model = ChatSession
        fields = ["id", "title", "owner", "base_model", "include_base", "columns", "system_prompt", "generation",
                  "base_precision", "idle_timeout_s", "closed", "status", "created_at", "updated_at"]
        read_only_fields = fields

    @extend_schema_field(ChatColumnSerializer(many=True))
    def get_columns(self, session: ChatSession) -> list[dict[str, Any]]:
        return chat.columns_json(session)

    @extend_schema_field(ChatStatusSerializer)
    def get_status(self, session: ChatSession) -> dict[str, Any]:
        return chat.status(session)


class ChatSessionDetailSerializer(ChatSessionSerializer):
    messages = serializers.SerializerMethodField()

    class Meta(ChatSessionSerializer.Meta):
        fields = [*ChatSessionSerializer.Meta.fields, "messages"]
        read_only_fields = fields

    @extend_schema_field(ChatMessageSerializer(many=True))
    def get_messages(self, session: ChatSession) -> list[dict[str, Any]]:
        user = self.context["request"].user
        tallies = chat.thumb_tallies(session, user)
        return [chat.message_json(m, tallies) for m in session.messages.prefetch_related("answers")]


class ChatSendSerializer(serializers.Serializer):
    content = serializers.CharField(max_length=chat.MAX_MESSAGE_CHARS, trim_whitespace=False)
    stream = serializers.BooleanField(default=False, help_text="Answer with the answers' Server-Sent Events (as "
                                      "messages/{index}/stream/) instead of the message.")


class ChatThumbSerializer(serializers.Serializer):
    index = serializers.IntegerField(min_value=1, max_value=INT32)
    column = serializers.CharField(max_length=64)
    value = serializers.ChoiceField(choices=["up", "down", "none"])


class SavePromptSetSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")
    column = serializers.CharField(max_length=64, required=False, allow_blank=True, default="",
                                   help_text="Whose answers the conversation keeps (default: the first column's).")


class ChatDatasetSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="",
                                 help_text="The dataset's name (default: `thumbs of <chat>`).")


STREAM_DOC = ("Server-Sent Events of one message's answers: `event: delta` ({column, text}: text appended to the "
              "column's answer, or {column, replace}: its whole text), then `event: answer` per column (the final "
              "answer with its figures) and `event: done`; `event: error` if the session's job ended first.")


class ChatSessionViewSet(VisibleObjectMixin, viewsets.ReadOnlyModelViewSet):
    """Chat sessions: a base and up to four of its adapters answering side by side, the model loaded once on a
    worker and released after the idle timeout (the next message loads it again)."""

    noun = "chat session"

    def get_queryset(self) -> Any:
        rows = ChatSession.objects.select_related("owner", "base_model", "job")
        if self.action == "list":
            rows = rows.filter(owner=self.request.user)
        return access.visible(self.request.user, rows)

    def get_serializer_class(self) -> Any:
        return ChatSessionDetailSerializer if self.action == "retrieve" else ChatSessionSerializer

    def _owned(self) -> ChatSession:
        session: ChatSession = self.get_object()
        access.check_can_change(self.request.user, session.owner_id, "chat session")
        return session

    def _detail(self, session: ChatSession, code: int = status.HTTP_200_OK) -> Response:
        fresh = self.get_queryset().get(pk=session.pk)
        return Response(ChatSessionDetailSerializer(fresh, context={"request": self.request}).data, status=code)

    @extend_schema(request=ChatCreateSerializer, responses={201: ChatSessionDetailSerializer},
                   description="Start a chat: its model starts loading on a worker at once.")
    def create(self, request: Request) -> Any:
        def handler() -> Response:
            body = ChatCreateSerializer(data=request.data, context={"request": request})
            body.is_valid(raise_exception=True)
            data = body.validated_data
            base = checked_base(data)
            try:
                session = chat.start_session(
                    request.user, list(dict.fromkeys(data["adapters"])), include_base=data["include_base"],
                    system_prompt=data["system_prompt"], base=base, base_precision=data["base_precision"],
                    generation={k: data[k] for k in chat.GENERATION_FIELDS if k in data}, title=data["title"])
            except JobError as exc:
                job_error(exc)
            return self._detail(session, status.HTTP_201_CREATED)

        return run_idempotent(request, handler)

    @extend_schema(request=ChatSendSerializer,
                   responses={201: ChatMessageSerializer,
                              (200, "text/event-stream"): OpenApiResponse(OpenApiTypes.STR, description=STREAM_DOC)},
                   description="Send a message: every column answers it (409 while the last one is still being "
                               "answered). The model is loaded again first where it was released or closed.")
    @action(detail=True, methods=["post"], renderer_classes=[JSONRenderer, EventStreamRenderer],
            content_negotiation_class=FirstRenderer)
    @idempotent
    def messages(self, request: Request, pk: str) -> Any:
        session = self._owned()
        body = ChatSendSerializer(data=request_body(request))
        body.is_valid(raise_exception=True)
        try:
            message = chat.send(session, body.validated_data["content"])
        except chat.Busy as exc:
            return problem(409, "; ".join(exc.errors.values()), instance=request.path)
        except JobError as exc:
            job_error(exc)
        if body.validated_data["stream"]:
            return sse_response(chat.turn_stream(session.pk, message.index))
        return Response(chat.message_json(message, {}), status=status.HTTP_201_CREATED)

    @extend_schema(summary="One message's answers as Server-Sent Events", description=STREAM_DOC,
                   responses={(200, "text/event-stream"): OpenApiTypes.STR})
    @action(detail=True, methods=["get"], url_path=r"messages/(?P<index>\d+)/stream",
            renderer_classes=[JSONRenderer, EventStreamRenderer], content_negotiation_class=FirstRenderer)
    def stream(self, request: Request, pk: str, index: str) -> Any:
        session = self.get_object()
        if not session.messages.filter(index=int(index)).exists():
            raise ValidationError({"index": [f"the chat has no message {index}"]})
        return sse_response(chat.turn_stream(session.pk, int(index)))

    @extend_schema(request=None, responses={200: ChatSessionDetailSerializer},
                   description="Stop the answers being written (they keep what they have).")
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str) -> Response:
        session = self._owned()
        chat.stop(session)
        return self._detail(session)

    @extend_schema(request=None, responses={200: ChatSessionDetailSerializer},
                   description="Close the chat: its model is unloaded and its GPU freed. The conversation stays; a "
                               "new message loads the model again.")
    @action(detail=True, methods=["post"])
    def close(self, request: Request, pk: str) -> Response:
        session = self._owned()
        chat.close(session)
        return self._detail(session)

    @extend_schema(request=ChatSettingsSerializer, responses={200: ChatSessionDetailSerializer},
                   description="Title, system prompt and sampling settings: they apply from the next message.")
    @action(detail=True, methods=["post"], url_path="settings", url_name="settings")
    def change_settings(self, request: Request, pk: str) -> Response:  # (not `settings`: DRF's views have one)
        session = self._owned()
        body = ChatSettingsSerializer(data=request_body(request))
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            chat.update_settings(session, system_prompt=data.get("system_prompt"), title=data.get("title"),
                                 generation={k: data[k] for k in chat.GENERATION_FIELDS if k in data})
        except JobError as exc:
            job_error(exc)
        return self._detail(session)

    @extend_schema(request=ChatThumbSerializer, responses={200: OpenApiTypes.OBJECT},
                   description="Your thumb on one finished answer: up, down, or none to take it back. Its tally.")
    @action(detail=True, methods=["post"])
    def thumbs(self, request: Request, pk: str) -> Response:
        session = self.get_object()
        body = ChatThumbSerializer(data=request_body(request))
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            tally = chat.thumb(session, request.user, data["index"], data["column"], data["value"])
        except JobError as exc:
            job_error(exc)
        return Response(tally)

    @extend_schema(request=SavePromptSetSerializer, responses={201: OpenApiTypes.OBJECT},
                   description="The conversation as a prompt set (a row per message, with its conversation so far "
                               "as chat turns), to compare or evaluate adapters on later. Answers {id, name, rows}.")
    @action(detail=True, methods=["post"], url_path="prompt-set")
    def prompt_set(self, request: Request, pk: str) -> Response:
        session = self.get_object()
        body = SavePromptSetSerializer(data=request_body(request))
        body.is_valid(raise_exception=True)
        try:
            saved = chat.save_prompt_set(session, request.user, body.validated_data["name"],
                                         body.validated_data["column"])
        except JobError as exc:
            job_error(exc)
        return Response({"id": saved.pk, "name": saved.name, "rows": len(saved.rows)}, status=status.HTTP_201_CREATED)

    @extend_schema(request=ChatDatasetSerializer, responses={201: OpenApiTypes.OBJECT},
                   description="A feedback dataset (for KTO) of the chat's thumbs: each thumbed answer with the "
                               "conversation it answered, labelled by the majority (as a comparison's thumbs give). "
                               "Answers {dataset, summary, figures}; 409 when the thumbs give no row.")
    @action(detail=True, methods=["post"], url_path="to-dataset")
    def to_dataset(self, request: Request, pk: str) -> Response:
        session = self.get_object()
        body = ChatDatasetSerializer(data=request_body(request))
        body.is_valid(raise_exception=True)
        name = body.validated_data["name"]
        try:
            source = votedata.make_chat_dataset(session, request.user, name)
        except votedata.DatasetRefused as refused:
            if refused.field:
                raise ValidationError({refused.field: [refused.message]}) from None
            return problem(refused.status, refused.message, instance=request.path)
        return Response({"dataset": source.dataset_id, "summary": source.summary, "figures": source.figures,
                         "train": source.train_url()}, status=status.HTTP_201_CREATED)
