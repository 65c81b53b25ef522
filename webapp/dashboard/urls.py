from django.urls import path

from webapp.dashboard import usage_views, views

urlpatterns = [
    path("", views.overview, name="overview"),
    path("usage/", usage_views.usage_panel, name="usage"),
]
