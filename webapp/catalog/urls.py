from django.urls import path

from webapp.catalog import views

urlpatterns = [
    path("datasets/", views.datasets, name="datasets"),
]
urlpatterns += [
    path("base-models/", views.base_models, name="base-models"),
    path("lora-configs/", views.lora_configs, name="lora-configs"),
]
