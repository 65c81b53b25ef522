from django.urls import path

from webapp.fleet import api, artifacts, views
from webapp.jobs.registry import worker_paths

urlpatterns = [
    path("workers/", views.workers, name="workers"),
    path("workers/register/", views.worker_register, name="worker-register"),
    path("workers/<int:pk>/", views.worker_detail, name="worker-detail"),
    path("workers/<int:pk>/telemetry.json", views.worker_telemetry, name="worker-telemetry"),
    path("workers/<int:pk>/rotate/", views.worker_rotate, name="worker-rotate"),
    path("workers/<int:pk>/revoke/", views.worker_revoke, name="worker-revoke"),
    path("workers/<int:pk>/drain/", views.worker_drain, name="worker-drain"),
    path("workers/<int:pk>/resume/", views.worker_resume, name="worker-resume"),
    path("workers/<int:pk>/delete/", views.worker_delete, name="worker-delete"),
    path("api/worker/v1/heartbeat", api.heartbeat, name="worker-heartbeat"),
]
# Every kind of job (training runs at jobs/, adapter jobs at adapter-jobs/): the same three calls, fenced the
# same way.
urlpatterns += [
    path(f"api/worker/v1/{kind}/<int:job_id>/{name}", view, {"path": kind}, name=f"worker-{kind}-{name}")
    for kind in worker_paths()
    for name, view in (("claim", api.claim), ("events", api.events), ("status", api.status))
]
# The artifact calls of a worker without the shared store (protocol: workers.contract.artifacts).
ARTIFACT_CALLS = (
    ("manifest", artifacts.manifest),
    ("file", artifacts.file),
    ("offset", artifacts.offset),
    ("upload", artifacts.upload),
    ("commit", artifacts.commit),
)
urlpatterns += [
    path(
        f"api/worker/v1/{kind}/<int:job_id>/artifacts/{name}",
        view,
        {"path": kind},
        name=f"worker-{kind}-artifacts-{name}",
    )
    for kind in worker_paths()
    for name, view in ARTIFACT_CALLS
]
