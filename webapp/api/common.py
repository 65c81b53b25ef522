"""Pieces shared by the run, adapter, job and worker endpoints: id lookups, error mapping, references."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from django.db.models import Model, QuerySet
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request

from webapp.api import access

MAX_ID = 2**63 - 1
ID = re.compile(r"[0-9]{1,19}")
NON_FIELD = "non_field_errors"


def parse_id(raw: Any) -> int | None:
    text = str(raw)
    return int(text) if ID.fullmatch(text) and 0 < int(text) <= MAX_ID else None


def get_visible(request: Request, queryset: QuerySet[Any], pk: Any, noun: str) -> Any:
    """The row with this id that the caller may see, or a 404 problem naming what was looked for."""
    number = parse_id(pk)
    row = access.visible(request.user, queryset).filter(pk=number).first() if number is not None else None
    if row is None:
        raise NotFound(f"no {noun} with id {str(pk)[:40]}")
    return row


class VisibleObjectMixin:
    """get_object() through access.visible, with a 404 problem for an unknown or malformed id."""

    noun = "object"

    def get_object(self) -> Any:
        view: Any = self
        return get_visible(view.request, view.get_queryset(), view.kwargs[view.lookup_url_kwarg or view.lookup_field],
                           self.noun)


class Ref(serializers.PrimaryKeyRelatedField):
    """A reference by id to a row the caller may see; a malformed or unknown id is a field error."""

    default_error_messages = {
        "does_not_exist": "no {noun} with id {pk_value}",
        "incorrect_type": "must be an id (a whole number), got {data_type}",
    }

    def __init__(self, noun: str, **kwargs: Any) -> None:
        self.noun = noun
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, bool) or not isinstance(data, int | str):
            self.fail("incorrect_type", data_type=type(data).__name__)
        number = parse_id(data)
        row = None
        if number is not None:
            row = access.visible(self.context["request"].user, self.get_queryset()).filter(pk=number).first()
        if row is None:
            self.fail("does_not_exist", noun=self.noun, pk_value=str(data)[:40])
        return row

    def to_representation(self, value: Any) -> Any:
        return value.pk if isinstance(value, Model) else value


@extend_schema_field({"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "minLength": 1}],
                      "description": "An id, or a name (a string of digits that names one object and is another's "
                                     "id is refused as ambiguous: send the id as a number)."})
class NamedRef(Ref):
    """A reference to a catalog row (base model, dataset, LoRA config: their names are unique) by id or by name,
    the way the CLI's run specs and the pages name them. A number is an id; a string is a name, or an id when it
    is all digits (what Ref accepts); a string that is both is refused rather than guessed."""

    default_error_messages = {
        "does_not_exist": "no {noun} {what}: GET /api/v1/{path}/ (tunedeck {command} list) lists their names and ids",
        "ambiguous": "{value!r} is both the name of {noun} {named} and the id of {noun} {numbered} ({numbered_name}): "
                     "send the id as a number, {named} or {numbered}",
        "incorrect_type": "must be an id (a whole number) or a name, got {data_type}",
    }

    def __init__(self, noun: str, path: str, command: str | None = None, **kwargs: Any) -> None:
        self.path, self.command = path, command or path  # the API's list, and the CLI group that lists it
        super().__init__(noun, **kwargs)

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, bool) or not isinstance(data, int | str) or data == "":
            self.fail("incorrect_type", data_type=type(data).__name__ if data != "" else "an empty string")
        rows = access.visible(self.context["request"].user, self.get_queryset())
        number = parse_id(data)
        numbered = rows.filter(pk=number).first() if number is not None else None
        named = rows.filter(name=data).first() if isinstance(data, str) and "\x00" not in data else None
        if named is not None and numbered is not None and named != numbered:
            self.fail("ambiguous", value=data, noun=self.noun, named=named.pk, numbered=numbered.pk,
                      numbered_name=numbered.name)
        row = named or numbered
        if row is None:
            what = f"with id {data}" if isinstance(data, int) else f"named {str(data)[:200]!r}"
            self.fail("does_not_exist", noun=self.noun, what=what, path=self.path, command=self.command)
        return row


def raise_field_errors(errors: dict[str, Any], rename: Callable[[str], str] = str) -> None:
    """Raise a 400 problem from {field: message or [messages]} (Django form errors, JobError), renaming fields."""
    out: dict[str, list[str]] = {}
    for name, messages in errors.items():
        key = NON_FIELD if name in ("__all__", None) else rename(name)
        items = messages if isinstance(messages, list | tuple) else [messages]
        out.setdefault(key, []).extend(str(m) for m in items)
    raise ValidationError(out)


def form_errors(form: Any) -> dict[str, list[str]]:
    return {name: [str(m) for m in messages] for name, messages in form.errors.items()}


def int_param(request: Request, name: str) -> int | None:
    """An optional id-valued query parameter; a malformed one is a 400 naming it."""
    raw = request.query_params.get(name, "")
    if raw == "":
        return None
    number = parse_id(raw)
    if number is None:
        raise ValidationError({name: [f"must be an id (a whole number); got {raw[:40]!r}"]})
    return number


def owner_param(request: Request, queryset: QuerySet[Any], field: str = "owner") -> QuerySet[Any]:
    """?owner=<username> or ?owner=me."""
    from django.contrib.auth import get_user_model

    raw = request.query_params.get("owner", "")
    if raw == "":
        return queryset
    if raw == "me":
        return queryset.filter(**{field: request.user})
    user = get_user_model().objects.filter(username=raw).first() if "\x00" not in raw else None
    if user is None:
        raise ValidationError({"owner": [f"no user named {raw[:150]!r} (use a username or 'me')"]})
    return queryset.filter(**{field: user})


def choice_param(request: Request, name: str, choices: list[str] | tuple[str, ...]) -> str | None:
    raw = request.query_params.get(name, "")
    if raw == "":
        return None
    if raw not in choices:
        raise ValidationError({name: [f"must be one of {', '.join(choices)}; got {raw[:40]!r}"]})
    return raw


def cancel_refused(request: Any, job: Any) -> Any:
    """Cancel a run or an adapter job for the API: 403 unless the caller may change it; the 409 problem when it
    has already finished, else None."""
    from webapp.api.problems import problem
    from webapp.jobs import ledger

    access.check_can_change(request.user, job.owner_id, job.NOUN)
    if not ledger.request_cancel(job):
        return problem(409, f"the {job.NOUN} has already finished: it is {job.state}", instance=request.path)
    return None


def retry_refused(request: Any, job: Any) -> Any:
    """Queue a failed or cancelled run or adapter job again for the API: 403 unless the caller may change it; the
    409 problem when it is in another state, else None."""
    from webapp.api.problems import problem
    from webapp.jobs import ledger

    access.check_can_change(request.user, job.owner_id, job.NOUN)
    if not ledger.retry(job, request.user):
        return problem(409, f"only a failed or cancelled {job.NOUN} can be retried; this one is {job.state}",
                       instance=request.path)
    return None

