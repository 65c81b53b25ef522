from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import QuerySet

from webapp.catalog.models import BaseModel, Dataset, LoraConfig
from webapp.jobs.models import LedgerEvent, LedgerJob
from webapp.training.metrics import merge_points
from workers.contract import spec
from workers.contract.store import ArtifactStore


class Tag(models.Model):
    """A label people put on runs and adapters (lowercase, see organise.clean_tags). A table with a unique name
    rather than a JSON list per row: `tag=a` is an indexed join on both PostgreSQL and SQLite (SQLite has no JSON
    containment lookup), and the lists can offer every tag in use."""

    name = models.CharField(max_length=50, unique=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class TrainingRun(LedgerJob):
    NOUN = "run"
    TASK = "tunedeck.run_job"  # the worker's Celery task for this kind of job
    WORKER_PATH = "jobs"
    RETRY_NOTE = "the next attempt resumes from the latest checkpoint"
    ON_WORKER, SUMMARY_FIELDS = "current_run", ("name",)
    name = models.CharField(max_length=200, blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="runs")
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="runs")
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="runs")
    # Rows to evaluate on instead of a held-out fraction of `dataset` (None: eval_fraction decides).
    eval_dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.PROTECT, related_name="eval_runs")
    lora_config = models.ForeignKey(LoraConfig, on_delete=models.PROTECT, related_name="runs")
    # Warm start: the adapter the run's adapter starts from (and an objective's reference, for one that has one).
    # The run outlives a parent deleted with its own run: the link goes, the name it had stays (as AdapterParent).
    init_adapter = models.ForeignKey("Adapter", null=True, blank=True, on_delete=models.SET_NULL,
                                     related_name="warm_started_runs")
    init_adapter_name = models.CharField(max_length=200, blank=True)
    hyperparameters = models.JSONField(default=dict)
    worker = models.ForeignKey("fleet.Worker", null=True, blank=True, on_delete=models.SET_NULL, related_name="runs")
    last_loss = models.FloatField(null=True, blank=True)
    # The run's metric curve, kept compact for the charts (see metrics.merge_points): reading a page
    # never scans the run's events, however long it trained.
    metric_points = models.JSONField(default=list, blank=True)
    tags = models.ManyToManyField(Tag, blank=True, related_name="runs")
    note = models.TextField(blank=True)
    # What the New run page estimated when the run was queued (estimates.RunEstimate.stored): peak GPU memory,
    # duration and plan, set beside what the run measured on its page. Empty for runs queued otherwise.
    estimates = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            # The scheduler's scan: queued runs oldest first; and the active runs of a worker.
            models.Index(fields=["state", "id"], name="run_state_id"),
            # The runs list filtered by owner, newest first.
            models.Index(fields=["owner", "-id"], name="run_owner_id"),
            # The runs list filtered by base model or dataset, newest first.
            models.Index(fields=["base_model", "-id"], name="run_base_id"),
            models.Index(fields=["dataset", "-id"], name="run_dataset_id"),
            # The runs list sorted by name, step or loss (id breaks ties so pages are stable).
            models.Index(fields=["name", "id"], name="run_name_id"),
            models.Index(fields=["step", "id"], name="run_step_id"),
            models.Index(fields=["last_loss", "id"], name="run_loss_id"),
        ]

    def __str__(self) -> str:
        return self.name or f"run {self.pk}"

    def train_params(self) -> spec.TrainParams:
        return spec.build(spec.TrainParams, self.hyperparameters)

    def output_uri(self, attempt: int) -> str:
        return ArtifactStore.uri("runs", self.pk, f"attempt-{attempt}", "adapter")

    def tracking_uri(self) -> str:
        """The folder of the run's trackers' files (workers/training/tracking.py), shared by its attempts."""
        return ArtifactStore.uri("runs", self.pk, "tracking")

    def record_result(self, result: dict[str, Any]) -> None:
        """A succeeded attempt's adapter (called by the ledger inside the state change's transaction)."""
        lora = self.lora_config.lora_params()
        Adapter.objects.update_or_create(
            run=self,
            defaults={
                "name": self.name or f"run {self.pk}",
                "owner_id": self.owner_id,
                "base_model_id": self.base_model_id,
                "method": lora.method,
                "rank": lora.r if lora.is_lora else 0,
                "quantization": lora.quantization,
                "uri": result["adapter_uri"],
                "size_bytes": int(result["size_bytes"]),
                "sha256": str(result["sha256"]),
                "trainable_params": int(result["trainable_params"]),
                "total_params": int(result["total_params"]),
                "final_loss": result.get("final_loss"),
                "metrics": result,
            },
        )

    def fold_metrics(self, fenced: QuerySet[Any], metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """The latest loss, and the metric points folded into the run's curve (its row locked meanwhile)."""
        fields: dict[str, Any] = {}
        losses = [float(data["loss"]) for data in metrics if data.get("loss") is not None]
        if losses:
            fields["last_loss"] = losses[-1]
        points = fenced.select_for_update().values_list("metric_points", flat=True).first()
        if points is not None:
            fields["metric_points"] = merge_points(points, metrics)
        return fields

    def latest_samples(self) -> dict[str, Any] | None:
        """The answers a reinforcement run's latest logged step sampled, with their rewards ({"step", "rows"}: its
        newest `samples` event), or None."""
        event = RunEvent.objects.filter(run=self, kind="samples").order_by("-id").values_list("data", flat=True).first()
        return event if isinstance(event, dict) and isinstance(event.get("rows"), list) else None

    def job_spec(self) -> spec.TrainSpec:
        return spec.TrainSpec(
            run_id=self.pk,
            attempt=self.attempt,
            base_model=self.base_model.model_ref(),
            dataset=dataset_ref(self.dataset),
            lora=self.lora_config.lora_params(),
            train=self.train_params(),
            output_uri=self.output_uri(self.attempt),
            checkpoint_uri=ArtifactStore.uri("runs", self.pk, "checkpoints"),
            eval_dataset=dataset_ref(self.eval_dataset) if self.eval_dataset else None,
            init_adapter_uri=self.init_adapter.uri if self.init_adapter else "",
            init_adapter_name=self.init_adapter_name,
            run_name=str(self),
            tracking_uri=self.tracking_uri(),
            gpu_memory_bytes=(self.worker.max_gpu_bytes or 0) if self.worker_id else 0,
        )


def dataset_ref(dataset: Dataset) -> spec.DatasetRef:
    return spec.DatasetRef(uri=dataset.uri, format=dataset.format)


class RunEvent(LedgerEvent):
    """A run's log lines, metric points and checkpoints (see LedgerEvent)."""

    JOB_FIELD = "run"

    run = models.ForeignKey(TrainingRun, on_delete=models.CASCADE, related_name="events")

    class Meta(LedgerEvent.Meta):
        constraints = [
            models.UniqueConstraint(fields=["run", "attempt", "seq"], name="event_unique_seq"),
        ]
        indexes = [
            # The live tail: events of a run after a cursor id.
            models.Index(fields=["run", "id"], name="event_run_id"),
            # The loss chart: metric points of a run.
            models.Index(fields=["run", "kind", "id"], name="event_run_kind_id"),
        ]


class AdapterOrigin(models.TextChoices):
    TRAINED = "trained"
    COMBINED = "combined"


class Adapter(models.Model):
    """An adapter in the artifact store: the output of a run, or a weighted combination of others."""

    name = models.CharField(max_length=200, blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.PROTECT, related_name="adapters")
    base_model = models.ForeignKey(BaseModel, null=True, on_delete=models.PROTECT, related_name="adapters")
    origin = models.CharField(max_length=16, choices=AdapterOrigin.choices, default=AdapterOrigin.TRAINED)
    run = models.OneToOneField(TrainingRun, null=True, blank=True, on_delete=models.CASCADE, related_name="adapter")
    # Lineage of a combined adapter: its parents and their weights (see AdapterParent).
    parents = models.ManyToManyField("self", symmetrical=False, through="AdapterParent", related_name="children")
    method = models.CharField(max_length=32, default="lora")
    rank = models.PositiveIntegerField(default=0)
    quantization = models.CharField(max_length=8, default="none")  # the base's quantization during training
    uri = models.CharField(max_length=500)
    size_bytes = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    trainable_params = models.BigIntegerField()
    total_params = models.BigIntegerField()
    final_loss = models.FloatField(null=True, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    tags = models.ManyToManyField(Tag, blank=True, related_name="adapters")
    note = models.TextField(blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return self.name or (f"run {self.run_id}" if self.run_id else f"adapter {self.pk}")

    @property
    def key(self) -> str:
        """Its name inside a job (a PEFT adapter name, a comparison column)."""
        return f"a{self.pk}"

    def ref(self) -> Any:
        from workers.contract.jobspecs import AdapterRef

        return AdapterRef(
            key=self.key, label=str(self), uri=self.uri, method=self.method, r=self.rank, quantization=self.quantization
        )


class AdapterParent(models.Model):
    """One parent of a combined adapter and its weight. The child holds its own weights, so it outlives a parent
    that is deleted (with its run): the link stays, without the parent, under the name it had."""

    child = models.ForeignKey(Adapter, on_delete=models.CASCADE, related_name="parent_links")
    parent = models.ForeignKey(Adapter, null=True, on_delete=models.SET_NULL, related_name="child_links")
    parent_name = models.CharField(max_length=200, blank=True)
    weight = models.FloatField()

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["child", "parent"], name="adapter_parent_unique")]

    def __str__(self) -> str:
        return f"{self.parent_id} x {self.weight} -> {self.child_id}"
