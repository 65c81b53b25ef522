"""Routes of the OpenAI-compatible subset, mounted at /v1/ (no trailing slashes, as the `openai` package calls them)."""

from django.urls import path, re_path

from webapp.api.openai import views

urlpatterns = [
    path("files", views.FileList.as_view(), name="openai-files"),
    path("files/<str:file_id>", views.FileDetail.as_view(), name="openai-file"),
    path("files/<str:file_id>/content", views.FileContent.as_view(), name="openai-file-content"),
    path("fine_tuning/jobs", views.JobList.as_view(), name="openai-jobs"),
    path("fine_tuning/jobs/<str:job_id>", views.JobDetail.as_view(), name="openai-job"),
    path("fine_tuning/jobs/<str:job_id>/cancel", views.JobCancel.as_view(), name="openai-job-cancel"),
    path("fine_tuning/jobs/<str:job_id>/pause", views.JobPause.as_view(), name="openai-job-pause"),
    path("fine_tuning/jobs/<str:job_id>/resume", views.JobResume.as_view(), name="openai-job-resume"),
    path("fine_tuning/jobs/<str:job_id>/events", views.JobEvents.as_view(), name="openai-job-events"),
    path("fine_tuning/jobs/<str:job_id>/checkpoints", views.JobCheckpoints.as_view(), name="openai-job-checkpoints"),
    re_path(r"^.*$", views.NotFound.as_view(), name="openai-not-found"),
]
