from django.urls import path

from webapp.catalog import views

urlpatterns = [
    path("datasets/", views.datasets, name="datasets"),
    path("datasets/<int:pk>/", views.dataset_detail, name="dataset-detail"),
    path("base-models/", views.base_models, name="base-models"),
    path("lora-configs/", views.lora_configs, name="lora-configs"),
    path("lora-configs/estimate/", views.lora_config_estimate, name="lora-config-estimate"),
]
