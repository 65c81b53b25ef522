from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from webapp.catalog import views as catalog
from webapp.fleet import api as worker_api
from webapp.training import views as training

urlpatterns = [
    path("", training.runs_list, name="runs"),
    path("runs/new/", training.run_new, name="run-new"),
    path("runs/<int:pk>/", training.run_detail, name="run-detail"),
    path("runs/<int:pk>/status/", training.run_status, name="run-status"),
    path("runs/<int:pk>/stream/", training.run_stream, name="run-stream"),
    path("runs/<int:pk>/cancel/", training.run_cancel, name="run-cancel"),
    path("runs/<int:pk>/adapter.zip", training.adapter_download, name="adapter-download"),
    path("datasets/", catalog.datasets, name="datasets"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/worker/v1/jobs/<int:job_id>/claim", worker_api.claim, name="worker-claim"),
    path("api/worker/v1/jobs/<int:job_id>/events", worker_api.events, name="worker-events"),
    path("api/worker/v1/jobs/<int:job_id>/status", worker_api.status, name="worker-status"),
    path("api/worker/v1/heartbeat", worker_api.heartbeat, name="worker-heartbeat"),
]
