from django.contrib import admin

from webapp.fleet.models import Worker


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    list_display = ["name", "state", "labels", "last_heartbeat"]
    # Tokens change only through the workers page (register, rotate, revoke); heartbeats own the rest.
    readonly_fields = ["token_hash", "previous_token_hash", "previous_token_expires", "token_issued_at",
                       "last_heartbeat", "inventory", "telemetry", "created_by"]
