"""Tags and notes over the API: the fields runs and adapters show, PATCH to change them, and the lists' `?tag=` and
`?q=` filters (training/organise.py holds the rules)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from webapp.api import access
from webapp.api.common import raise_field_errors
from webapp.training.organise import MAX_NOTE_LENGTH, MAX_TAGS, TAG_RULE, LabelError, filter_labels, set_labels

LABEL_PARAMS = [
    OpenApiParameter("tag", OpenApiTypes.STR, many=True, required=False,
                     description="Only those carrying this tag; repeat for several (all of them)."),
    OpenApiParameter("q", OpenApiTypes.STR, required=False,
                     description="Free-text search in the name, the note and the tags (case-insensitive)."),
]


class TagsField(serializers.ListField):
    """A row's tag names, alphabetical (read from the prefetched `tags`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(child=serializers.CharField(), read_only=True,
                         help_text=f"Its tags: {TAG_RULE}; at most {MAX_TAGS}.", **kwargs)

    def get_attribute(self, instance: Any) -> Any:
        return instance

    def to_representation(self, data: Any) -> list[str]:
        return sorted(tag.name for tag in data.tags.all())


class LabelsSerializer(serializers.Serializer):
    """PATCH body: either or both; what is left out stays as it is."""

    tags = serializers.ListField(child=serializers.CharField(max_length=200), max_length=200, required=False,
                                 help_text=f"Replaces every tag: {TAG_RULE}; at most {MAX_TAGS}.")
    note = serializers.CharField(required=False, allow_blank=True, trim_whitespace=False,
                                 help_text=f"Free text, at most {MAX_NOTE_LENGTH} characters; empty clears it.")

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = sorted(str(k) for k in data if k not in self.fields)
            if unknown:
                raise serializers.ValidationError({k[:100]: ["unknown field: only tags and note can be changed"]
                                                   for k in unknown[:20]})
        return super().to_internal_value(data)


def filter_by_labels(request: Request, queryset: Any) -> Any:
    return filter_labels(queryset, request.query_params.getlist("tag"), request.query_params.get("q", ""))


class LabelsMixin:
    """PATCH /<rows>/{id}/: change a row's tags and note (its owner or staff); answers the row as GET does."""

    noun = ""

    @extend_schema(request=LabelsSerializer, description="Change its tags and/or note (its owner or an admin); "
                   "a bad tag or an over-long note is a 400 naming the field, and changes nothing.")
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        row = self.get_object()  # type: ignore[attr-defined]
        access.check_can_change(request.user, row.owner_id, self.noun)
        body = LabelsSerializer(data=request.data if isinstance(request.data, Mapping) else {})
        body.is_valid(raise_exception=True)
        try:
            set_labels(row, body.validated_data.get("tags"), body.validated_data.get("note"))
        except LabelError as refused:
            raise_field_errors(refused.errors)
        fresh = self.get_queryset().get(pk=row.pk)  # type: ignore[attr-defined]
        return Response(self.get_serializer(fresh).data)  # type: ignore[attr-defined]
