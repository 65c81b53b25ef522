from django.contrib import admin

from webapp.fleet.models import Worker


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    list_display = ["name", "state", "labels", "last_heartbeat"]
    readonly_fields = ["token_hash", "last_heartbeat", "inventory"]
