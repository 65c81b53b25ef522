"""/api/v1/sweeps/: create a sweep from its spec (the YAML spec's keys, as JSON), list, read with its trials, stop."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from webapp.api import access
from webapp.api.common import VisibleObjectMixin, parse_id
from webapp.sweeps import services
from webapp.sweeps.models import Sweep, Trial
from webapp.training.models import TrainingRun


class TrialSerializer(serializers.ModelSerializer):
    run_state = serializers.CharField(source="run.state", read_only=True)
    step = serializers.IntegerField(source="run.step", read_only=True, allow_null=True)
    state = serializers.CharField(read_only=True, help_text="active, complete, pruned or failed")

    class Meta:
        model = Trial
        fields = ["number", "run", "params", "state", "value", "pruned_at_step", "run_state", "step"]
        read_only_fields = fields


class SweepSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    trials_ended = serializers.SerializerMethodField()
    best_run = serializers.SerializerMethodField()
    best_value = serializers.SerializerMethodField()
    state = serializers.CharField(read_only=True, help_text="running, finished or stopped")

    class Meta:
        model = Sweep
        fields = ["id", "name", "owner", "state", "base_run", "base_settings", "space", "first_trials", "num_runs",
                  "runs_at_once", "metric", "direction", "sampler", "pruner", "created_at", "trials_ended", "best_run", "best_value"]
        read_only_fields = fields

    def _best(self, sweep: Sweep) -> Trial | None:
        return services.best_trial(sweep, list(sweep.trials.all()))

    def get_trials_ended(self, sweep: Sweep) -> int:
        return sweep.trials.exclude(state="active").count()

    def get_best_run(self, sweep: Sweep) -> int | None:
        best = self._best(sweep)
        return best.run_id if best else None

    def get_best_value(self, sweep: Sweep) -> float | None:
        best = self._best(sweep)
        return best.value if best else None


class SweepDetailSerializer(SweepSerializer):
    trials = TrialSerializer(many=True, read_only=True)

    class Meta(SweepSerializer.Meta):
        fields = [*SweepSerializer.Meta.fields, "trials"]
        read_only_fields = fields


class SweepCreateSerializer(serializers.Serializer):
    """The sweep spec: the same keys as examples/sweep.yaml."""

    name = serializers.CharField(max_length=200)
    base_run = serializers.IntegerField(help_text="The run whose inputs every trial clones.")
    base_settings = serializers.DictField(required=False, help_text="Settings fixed for every trial.")
    space = serializers.DictField(help_text='{setting: {"type": "float"|"int", "low", "high", "log", "step"} or '
                                            '{"type": "categorical", "choices": [...]}}')
    first_trials = serializers.ListField(
        child=serializers.DictField(), required=False,
        help_text="Settings to try first, in order, before the sampler chooses: [{setting: value}] over the space.")
    num_runs = serializers.IntegerField(default=8)
    runs_at_once = serializers.IntegerField(default=1)
    metric = serializers.CharField(default="eval_loss", max_length=100)
    direction = serializers.ChoiceField(choices=["minimize", "maximize"], default="minimize")
    sampler = serializers.ChoiceField(choices=Sweep.SAMPLERS, default="tpe")
    pruner = serializers.ChoiceField(choices=Sweep.PRUNERS, default="none")


@extend_schema_view(
    create=extend_schema(request=SweepCreateSerializer, responses={201: SweepDetailSerializer}),
    retrieve=extend_schema(responses={200: SweepDetailSerializer}),
)
class SweepViewSet(VisibleObjectMixin, mixins.CreateModelMixin, viewsets.ReadOnlyModelViewSet):
    serializer_class = SweepSerializer
    noun = "sweep"

    def get_queryset(self) -> Any:
        return access.visible(self.request.user, Sweep.objects.select_related("owner"))

    def get_serializer_class(self) -> Any:
        return SweepDetailSerializer if self.action in ("retrieve", "stop") else SweepSerializer

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        sweep = self.get_object()
        try:
            services.advance(sweep)
        except services.SweepRefused:
            pass  # stopped; its state says so
        sweep.refresh_from_db()
        return Response(SweepDetailSerializer(sweep).data)

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = SweepCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        spec = dict(data.validated_data)
        number = parse_id(spec["base_run"])
        base = access.visible(request.user, TrainingRun.objects.all()).filter(pk=number).first() if number else None
        if base is None:
            raise ValidationError({"base_run": [f"no run with id {spec['base_run']}"]})
        try:
            sweep = services.create_sweep(request.user, spec, base)
        except services.SweepRefused as refused:
            raise ValidationError(refused.errors) from None
        return Response(SweepDetailSerializer(sweep).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: SweepDetailSerializer},
                   description="Stop the sweep: no new trials; runs already going finish and are still recorded.")
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str) -> Response:
        sweep = self.get_object()
        access.check_can_change(request.user, sweep.owner_id, "sweep")
        services.stop(sweep)
        sweep.refresh_from_db()
        return Response(SweepDetailSerializer(sweep).data)
