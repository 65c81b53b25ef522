"""Usage over the API: GPU-hours, tokens trained and runs per person or per ISO week (training/usage.py counts)."""

from __future__ import annotations

import datetime as dt

from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from webapp.training.usage import GROUPS, usage


class UsageRowSerializer(serializers.Serializer):
    user = serializers.CharField(required=False, help_text="group=user: the runs' owner.")
    week = serializers.CharField(required=False, help_text="group=week: the ISO week, e.g. 2026-W49.")
    gpu_hours = serializers.FloatField(help_text="Wall time of each attempt × the GPUs it held.")
    tokens = serializers.IntegerField(help_text="Tokens trained by runs that succeeded (padding excluded).")
    runs = serializers.IntegerField(help_text="Runs created.")


class UsageSerializer(serializers.Serializer):
    since = serializers.DateTimeField(allow_null=True)
    group = serializers.ChoiceField(choices=list(GROUPS))
    results = UsageRowSerializer(many=True)


def since_param(request: Request) -> dt.datetime | None:
    raw = request.query_params.get("since", "").strip()
    if not raw:
        return None
    moment = parse_datetime(raw)
    if moment is None:
        day = parse_date(raw) if len(raw) == 10 else None
        moment = dt.datetime.combine(day, dt.time.min) if day else None
    if moment is None:
        raise ValidationError({"since": [f"must be a date or a date and time (ISO 8601, e.g. 2026-11-30); got "
                                         f"{raw[:40]!r}"]})
    return timezone.make_aware(moment) if timezone.is_naive(moment) else moment


class Usage(APIView):
    """What training used, per person or per ISO week."""

    @extend_schema(
        parameters=[
            OpenApiParameter("since", OpenApiTypes.STR, required=False,
                             description="Count from this date or date-time on (ISO 8601); default: everything."),
            OpenApiParameter("group", OpenApiTypes.STR, enum=list(GROUPS), required=False,
                             description="Per person (default, most GPU-hours first) or per ISO week (oldest first)."),
        ],
        responses={200: UsageSerializer},
        description="GPU-hours (each attempt's running time × the GPUs it held, the running one up to now), tokens "
                    "trained (runs that succeeded) and runs created.")
    def get(self, request: Request) -> Response:
        group = request.query_params.get("group", "user") or "user"
        if group not in GROUPS:
            raise ValidationError({"group": [f"must be one of {', '.join(GROUPS)}; got {group[:40]!r}"]})
        since = since_param(request)
        return Response({"since": since, "group": group, "results": usage(since, group)})
