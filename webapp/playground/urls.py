from django.urls import path

from webapp.playground import alias_views, chat_views, views

urlpatterns = [
    path("chat/", chat_views.chat_list, name="chats"),
    path("chat/<int:pk>/", chat_views.chat_detail, name="chat-detail"),
    path("chat/<int:pk>/state.json", chat_views.chat_state, name="chat-state"),
    path("chat/<int:pk>/send/", chat_views.chat_send, name="chat-send"),
    path("chat/<int:pk>/stop/", chat_views.chat_stop, name="chat-stop"),
    path("chat/<int:pk>/close/", chat_views.chat_close, name="chat-close"),
    path("chat/<int:pk>/settings/", chat_views.chat_settings, name="chat-settings"),
    path("chat/<int:pk>/thumb/", chat_views.chat_thumb, name="chat-thumb"),
    path("chat/<int:pk>/save/", chat_views.chat_save, name="chat-save"),
    path("chat/<int:pk>/stream/", chat_views.chat_stream, name="chat-stream"),
    path("runs/<int:pk>/delete/", views.run_delete, name="run-delete"),
    path("adapters/<int:pk>/", views.adapter_detail, name="adapter-detail"),
    path("adapters/<int:pk>/download.zip", views.adapter_zip, name="adapter-zip"),
    path("adapters/<int:pk>/merge/", views.adapter_merge, name="adapter-merge"),
    path("adapters/<int:pk>/export/", views.adapter_export, name="adapter-export"),
    path("adapters/<int:pk>/push/", views.adapter_push, name="adapter-push"),
    path("adapters/combine/", views.combine_new, name="combine-new"),
    path("merged/", views.merged_models, name="merged-models"),
    path("merged/<int:pk>/download.zip", views.merged_zip, name="merged-zip"),
    path("merged/<int:pk>/files/<path:name>", views.merged_file, name="merged-file"),
    path("compare/", views.comparisons, name="comparisons"),
    path("compare/new/", views.compare_new, name="compare-new"),
    path("compare/<int:pk>/", views.comparison_detail, name="comparison-detail"),
    path("compare/<int:pk>/vote/", views.comparison_vote, name="comparison-vote"),
    path("compare/<int:pk>/thumbs/", views.comparison_thumb, name="comparison-thumb"),
    path("compare/<int:pk>/to-dataset/", views.comparison_to_dataset, name="comparison-to-dataset"),
    path("datasets/<int:pk>/file", views.dataset_file, name="dataset-file"),
    path("evaluations/new/", views.evaluate_new, name="evaluate-new"),
    path("jobs/", views.jobs, name="jobs"),
    path("jobs/<int:pk>/", views.job_detail, name="job-detail"),
    path("jobs/<int:pk>/status/", views.job_status, name="job-status"),
    path("jobs/<int:pk>/stream/", views.job_stream, name="job-stream"),
    path("jobs/<int:pk>/cancel/", views.job_cancel, name="job-cancel"),
    path("jobs/<int:pk>/retry/", views.job_retry, name="job-retry"),
    path("jobs/<int:pk>/reorder/", views.job_reorder, name="job-reorder"),
]
urlpatterns += [
    path("adapters/<int:pk>/alias/", alias_views.adapter_alias, name="adapter-alias"),
]
