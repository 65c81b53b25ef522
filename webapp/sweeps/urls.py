from django.urls import path

from webapp.sweeps import views

urlpatterns = [
    path("sweeps/", views.sweeps_list, name="sweeps"),
    path("sweeps/new/", views.sweep_new, name="sweep-new"),
    path("sweeps/<int:pk>/", views.sweep_detail, name="sweep-detail"),
    path("sweeps/<int:pk>/stop/", views.sweep_stop, name="sweep-stop"),
]
