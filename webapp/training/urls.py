from django.urls import path

from webapp.training import compare, label_views, views

urlpatterns = [
    path("runs/", views.runs_list, name="runs"),
    path("runs/new/", views.run_new, name="run-new"),
    path("runs/new/estimate/", views.run_estimate, name="run-estimate"),
    path("runs/<int:pk>/", views.run_detail, name="run-detail"),
    path("runs/<int:pk>/status/", views.run_status, name="run-status"),
    path("runs/<int:pk>/stream/", views.run_stream, name="run-stream"),
    path("runs/<int:pk>/cancel/", views.run_cancel, name="run-cancel"),
    path("runs/<int:pk>/adapter.zip", views.adapter_download, name="adapter-download"),
    path("runs/<int:pk>/tracking.zip", views.tracking_download, name="run-tracking-download"),
]
urlpatterns += [
    path("adapters/", views.adapters_list, name="adapters"),
]
urlpatterns += [
    path("runs/<int:pk>/retry/", views.run_retry, name="run-retry"),
]
urlpatterns += [
    path("runs/<int:pk>/reorder/", views.run_reorder, name="run-reorder"),
]
urlpatterns += [
    path("runs/<int:pk>/pause/", views.run_pause, name="run-pause"),
    path("runs/<int:pk>/resume/", views.run_resume, name="run-resume"),
]
urlpatterns += [
    path("runs/<int:pk>/labels/", label_views.run_labels, name="run-labels"),
    path("adapters/<int:pk>/labels/", label_views.adapter_labels, name="adapter-labels"),
    path("runs/compare/", compare.run_compare, name="run-compare"),
    path("runs/compare/metrics.json", compare.compare_metrics, name="run-compare-metrics"),
    path("runs/<int:pk>/metrics.json", compare.run_metrics, name="run-metrics"),
]
