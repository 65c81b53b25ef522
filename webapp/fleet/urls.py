from django.urls import path

from webapp.fleet import api, views

urlpatterns = [
    path("workers/", views.workers, name="workers"),
    path("api/worker/v1/jobs/<int:job_id>/claim", api.claim, name="worker-claim"),
    path("api/worker/v1/jobs/<int:job_id>/events", api.events, name="worker-events"),
    path("api/worker/v1/jobs/<int:job_id>/status", api.status, name="worker-status"),
    path("api/worker/v1/heartbeat", api.heartbeat, name="worker-heartbeat"),
]
