from django.contrib import admin

from webapp.training.models import Adapter, RunEvent, TrainingRun


@admin.register(TrainingRun)
class TrainingRunAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "owner", "base_model", "dataset", "state", "attempt", "worker", "created_at"]
    list_filter = ["state"]
    readonly_fields = ["attempt", "worker", "dispatched_at", "claimed_at", "started_at", "finished_at", "last_report_at"]


@admin.register(RunEvent)
class RunEventAdmin(admin.ModelAdmin):
    list_display = ["id", "run", "attempt", "seq", "kind", "level", "message"]
    list_filter = ["kind", "level"]


@admin.register(Adapter)
class AdapterAdmin(admin.ModelAdmin):
    list_display = ["run", "uri", "size_bytes", "trainable_params", "final_loss", "created_at"]
