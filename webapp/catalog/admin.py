from django.contrib import admin

from webapp.catalog.models import BaseModel, Dataset, LoraConfig


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    list_display = ["name", "source", "architecture", "num_parameters", "max_positions", "created_at"]
    search_fields = ["name", "source"]


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ["name", "format", "row_count", "size_bytes", "created_at"]
    search_fields = ["name"]
    readonly_fields = ["uri", "sha256", "size_bytes", "row_count", "format", "preview"]


@admin.register(LoraConfig)
class LoraConfigAdmin(admin.ModelAdmin):
    list_display = ["name", "method", "r", "alpha", "dropout", "quantization", "target_modules"]
