from django.urls import path

from webapp.fleet import api, views
from webapp.playground.models import AdapterJob

urlpatterns = [
    path("workers/", views.workers, name="workers"),
    path("workers/register/", views.worker_register, name="worker-register"),
    path("workers/<int:pk>/", views.worker_detail, name="worker-detail"),
    path("workers/<int:pk>/rotate/", views.worker_rotate, name="worker-rotate"),
    path("workers/<int:pk>/revoke/", views.worker_revoke, name="worker-revoke"),
    path("workers/<int:pk>/drain/", views.worker_drain, name="worker-drain"),
    path("workers/<int:pk>/resume/", views.worker_resume, name="worker-resume"),
    path("workers/<int:pk>/delete/", views.worker_delete, name="worker-delete"),
    path("api/worker/v1/jobs/<int:job_id>/claim", api.claim, name="worker-claim"),
    path("api/worker/v1/jobs/<int:job_id>/events", api.events, name="worker-events"),
    path("api/worker/v1/jobs/<int:job_id>/status", api.status, name="worker-status"),
    path("api/worker/v1/heartbeat", api.heartbeat, name="worker-heartbeat"),
]
# Adapter jobs (compare, merge, combine, evaluate, push): the same three calls, fenced the same way.
urlpatterns += [
    path(f"api/worker/v1/adapter-jobs/<int:job_id>/{name}", view, {"model": AdapterJob}, name=f"worker-adapter-job-{name}")
    for name, view in (("claim", api.claim), ("events", api.events), ("status", api.status))
]
