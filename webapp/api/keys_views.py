"""The API keys page: a user makes keys (the secret shown once), sees them and revokes them."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import path
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.views.decorators.debug import sensitive_variables
from django.views.decorators.http import require_POST

from webapp.api.models import SCOPES, ApiKey

SCOPE_HELP = {
    "read": "read: list and fetch everything the team can see",
    "write": "write: also create, cancel, retry and delete (implies read)",
    "admin": "admin: also the staff endpoints, e.g. workers (implies write)",
}


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="What the key is for, e.g. “laptop CLI” or “CI”.")
    scopes = forms.MultipleChoiceField(widget=forms.CheckboxSelectMultiple, initial=["read"],
                                       help_text="What the key may do.")
    expires = forms.DateField(required=False, label="Expires after",
                              widget=forms.DateInput(attrs={"type": "date"}),
                              help_text="Optional: the last day (UTC) the key works. Empty: until revoked.")

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        offered = [s for s in SCOPES if s != "admin" or user.is_staff]  # admin scope: staff only
        self.fields["scopes"].choices = [(s, SCOPE_HELP[s]) for s in offered]

    def clean_expires(self) -> Any:
        day = self.cleaned_data["expires"]
        if day is not None and day < timezone.now().date():
            raise forms.ValidationError(f"{day.isoformat()} is in the past: choose today or a later day")
        return day

    def expires_at(self) -> datetime | None:
        day = self.cleaned_data["expires"]
        return None if day is None else datetime.combine(day + timedelta(days=1), time.min, tzinfo=UTC)


def _page(request: HttpRequest, form: ApiKeyForm, status: int = 200, **extra: Any) -> HttpResponse:
    keys = ApiKey.objects.filter(user=request.user).order_by("-id")
    context = {"form": form, "keys": keys, "now": timezone.now(), **extra}
    return render(request, "api/keys.html", context, status=status)


@login_required
@sensitive_variables("raw")
def api_keys(request: HttpRequest) -> HttpResponse:
    """GET lists the keys; POST makes one and shows its secret on this response only (never cached)."""
    if request.method != "POST":
        return _page(request, ApiKeyForm(user=request.user))
    form = ApiKeyForm(request.POST, user=request.user)
    if not form.is_valid():
        return _page(request, form, status=400)
    key, raw = ApiKey.issue(request.user, form.cleaned_data["name"], form.cleaned_data["scopes"], form.expires_at())
    example = f'curl -H "Authorization: Bearer {raw}" {request.build_absolute_uri("/api/v1/runs/")}'
    response = _page(request, ApiKeyForm(user=request.user), created=key, secret=raw, example=example)
    add_never_cache_headers(response)
    return response


@login_required
@require_POST
def api_key_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    key = get_object_or_404(ApiKey, pk=pk, user=request.user)  # another user's key: 404, as if it did not exist
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
        messages.success(request, f"API key {key.name} ({key.prefix}…) revoked: it is refused from now on.")
    return redirect("api-keys")


urlpatterns = [
    path("", api_keys, name="api-keys"),
    path("<int:pk>/revoke/", api_key_revoke, name="api-key-revoke"),
]
