"""A new API key for a user name and password: how `tunedeck login` starts without a browser, like
`gh auth login`.

Guessing is held back twice: the API's request rates, and failed attempts counted per user name and per address
(TUNEDECK_LOGIN_FAILURE_RATE; past it every attempt is refused for a while, the right password included). A
refusal says nothing about whether the user exists; only the right password learns that an account is
inactive. The password is never logged, and never shown in an error report.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.contrib.auth import authenticate, get_user_model
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.decorators import method_decorator
from django.views.decorators.debug import sensitive_post_parameters, sensitive_variables
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.parsers import JSONParser
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from webapp.api.models import SCOPES, ApiKey, refused_scopes
from webapp.api.problems import problem
from webapp.api.throttling import AnonRate, FailureRate, LoginFailuresByAddress, LoginFailuresByName, UserRate

log = logging.getLogger(__name__)
REFUSED = "wrong user name or password"  # the same words whether or not the user exists


class LoginSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)
    password = serializers.CharField(max_length=4096, trim_whitespace=False, write_only=True,
                                     style={"input_type": "password"})
    name = serializers.CharField(max_length=100, required=False, default="cli",
                                 help_text="The key's name on the API keys page, e.g. \"cli on laptop\".")
    scopes = serializers.ListField(child=serializers.ChoiceField(choices=SCOPES), required=False,
                                   default=["read", "write"], min_length=1,
                                   help_text="Default read and write; admin for staff only.")
    expires_days = serializers.IntegerField(min_value=1, max_value=3650, required=False, allow_null=True,
                                            default=None, help_text="Default: until revoked.")


class NewKeySerializer(serializers.Serializer):
    key = serializers.CharField(help_text="The secret, shown this once: only its hash is kept.")
    prefix = serializers.CharField()
    name = serializers.CharField()
    scopes = serializers.ListField(child=serializers.CharField())
    expires_at = serializers.DateTimeField(allow_null=True)
    username = serializers.CharField()


def _inactive_with_this_password(username: str, password: str) -> bool:
    """authenticate() refuses an inactive user as it refuses a wrong password; the right password may learn why.

    Every refusal hashes the password once here, after authenticate()'s one hash: an inactive account takes
    no longer to refuse than an unknown user or a wrong password (Django's own trick for an unknown user)."""
    model = get_user_model()
    user = model._default_manager.filter(**{model.USERNAME_FIELD: username}, is_active=False).first()
    if user is None:
        model().set_password(password)
        return False
    return user.check_password(password)


def _address(request: Request) -> str:
    return str(LoginFailuresByAddress().get_ident(request))  # the address the failures are counted under


@method_decorator(sensitive_post_parameters("password"), name="dispatch")
class Login(APIView):
    """Exchange a user name and password for a new API key (scopes read and write unless asked otherwise)."""

    authentication_classes: list[Any] = []  # the credentials are the body: a stale key in the header is no matter
    permission_classes = [AllowAny]
    throttle_classes = [UserRate, AnonRate, LoginFailuresByAddress, LoginFailuresByName]
    parser_classes = [JSONParser]

    @extend_schema(request=LoginSerializer, auth=[], responses={
        201: NewKeySerializer, 400: OpenApiResponse(description="A field is missing or malformed."),
        401: OpenApiResponse(description="Wrong user name or password (the same answer for both)."),
        403: OpenApiResponse(description="The account is inactive, or the scopes are beyond the user's."),
        429: OpenApiResponse(description="Too many failed attempts for this user name or from this address.")})
    @sensitive_variables("password", "raw", "payload", "data", "body")  # payload, data: the password; body: the key
    def post(self, request: Request) -> Response:
        payload = LoginSerializer(data=request.data)
        payload.is_valid(raise_exception=True)
        data = payload.validated_data
        username, password = data["username"], data["password"]
        user = authenticate(request, username=username, password=password)
        if user is None:
            if _inactive_with_this_password(username, password):
                return problem(403, f"the account {username} is inactive: an admin can activate it",
                               instance=request.path)
            self._count_failure(request)
            log.warning("password login refused for the user name %r from %s", username, _address(request))
            return problem(401, REFUSED, instance=request.path)
        refused = refused_scopes(user, data["scopes"])
        if refused:
            return problem(403, refused, instance=request.path)
        days = data["expires_days"]
        expires_at = timezone.now() + timedelta(days=days) if days else None
        key, raw = ApiKey.issue(user, data["name"], data["scopes"], expires_at)
        log.info("API key %s (%s…) made for %s by a password login", key.name, key.prefix, user.get_username())
        body = {"key": raw, "prefix": key.prefix, "name": key.name, "scopes": key.scopes,
                "expires_at": key.expires_at, "username": user.get_username()}
        response = Response(NewKeySerializer(body).data, status=201)
        add_never_cache_headers(response)
        return response

    def _count_failure(self, request: Request) -> None:
        for throttle in self.get_throttles():
            if isinstance(throttle, FailureRate):
                throttle.failed(request, self)
