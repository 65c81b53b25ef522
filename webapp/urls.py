from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

handler500 = "webapp.errors.server_error"

urlpatterns = [
    path("", include("webapp.dashboard.urls")),
    path("", include("webapp.training.urls")),
    path("", include("webapp.catalog.urls")),
    path("", include("webapp.fleet.urls")),
    path("", include("webapp.playground.urls")),
    path("", include("webapp.sweeps.urls")),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("webapp.api.urls")),
    path("account/api-keys/", include("webapp.api.keys_views")),
    path("v1/", include("webapp.api.openai.urls")),  # the OpenAI-compatible subset
]
