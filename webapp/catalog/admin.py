import json

from django.contrib import admin
from django.http import HttpRequest

from webapp.catalog.forms import LoraConfigForm
from webapp.catalog.models import BaseModel, Dataset, LoraConfig


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    """Base models are registered on their page or through the APIs (register_base_model), which inspect the
    source and read a local path only under the model roots: here where a model is read from cannot change."""

    list_display = ["name", "source", "architecture", "num_parameters", "max_positions", "created_at"]
    search_fields = ["name", "source"]
    # trust_remote_code stays editable: enabling it for a base model is an admin's decision (DESIGN.md).
    readonly_fields = ["source", "revision", "architecture", "model_type", "num_parameters", "max_positions",
                       "linear_modules", "has_chat_template"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ["name", "format", "row_count", "size_bytes", "created_at"]
    search_fields = ["name"]
    readonly_fields = ["uri", "sha256", "size_bytes", "row_count", "format", "preview"]

    @admin.display(description="Preview")
    def preview(self, obj: Dataset) -> str:
        return json.dumps(obj.preview_rows(), indent=2, ensure_ascii=False)


@admin.register(LoraConfig)
class LoraConfigAdmin(admin.ModelAdmin):
    form = LoraConfigForm
    list_display = ["name", "method", "summary", "created_by", "created_at"]
    list_filter = ["method"]
    search_fields = ["name"]

    @admin.display(description="Adapter")
    def summary(self, obj: LoraConfig) -> str:
        return obj.summary()
