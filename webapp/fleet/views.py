"""Staff pages for the worker fleet."""

from __future__ import annotations

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from webapp.fleet.models import Worker


@staff_member_required
def workers(request: HttpRequest) -> HttpResponse:
    return render(request, "fleet/workers.html", {"workers": Worker.objects.order_by("name")})
