"""A spec dataclass's fields as input fields: each field of a flat spec (`workers/contract/spec.py`) becomes a Django
form field for the pages or a DRF serializer field for the API, with its help text and, where the spec names
them, its choices. The spec stays the one declaration of a setting; both front ends read it here.

Outside the app layers: it knows specs, Django forms and DRF, and no app.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from django import forms
from rest_framework import serializers

INT32 = 2**31 - 1  # the API's integers fit a database integer column


class NameListField(forms.CharField):
    """A list of names typed as 'q_proj, v_proj' (commas or lines between them)."""

    def prepare_value(self, value: Any) -> Any:
        return ", ".join(value) if isinstance(value, list) else value

    def to_python(self, value: Any) -> list[str]:  # type: ignore[override]
        return [part.strip() for part in str(value or "").replace("\n", ",").split(",") if part.strip()]


class JSONObjectField(forms.JSONField):
    """A JSON object typed in a text area (a grader definition); empty is {}."""

    widget = forms.Textarea(attrs={"rows": 6, "spellcheck": "false", "class": "code"})

    def to_python(self, value: Any) -> Any:
        value = super().to_python(value)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise forms.ValidationError("Enter a JSON object ({...}).", code="invalid")
        return value


def kind(f: dataclasses.Field[Any], choices: Mapping[str, Sequence[str]]) -> str:
    """What input a spec field takes: choice, bool, int, float, a list of names, a JSON object or free text."""
    if f.name in choices:
        return "choice"
    for name, types in (("bool", ("bool", bool)), ("int", ("int", int)), ("float", ("float", float)),
                        ("list", ("list[str]", list)), ("json", ("dict[str, Any]", dict))):
        if f.type in types:
            return name
    return "str"


def label(f: dataclasses.Field[Any]) -> str:
    return f.name.replace("_", " ").capitalize()


def help_text(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("help", ""))


def default(f: dataclasses.Field[Any]) -> Any:
    """The field's default value (a list or an object is made by its factory)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def form_field(f: dataclasses.Field[Any], initial: Any, choices: Mapping[str, Sequence[str]]) -> forms.Field:
    """The page's field for spec field `f`, starting at `initial`."""
    common: dict[str, Any] = {"initial": initial, "help_text": help_text(f), "label": label(f)}
    match kind(f, choices):
        case "choice":
            return forms.ChoiceField(choices=[(c, c) for c in choices[f.name]], **common)
        case "bool":
            return forms.BooleanField(required=False, **common)
        case "int":
            return forms.IntegerField(**common)
        case "float":
            return forms.FloatField(**common)
        case "list":
            return NameListField(required=False, **common)
        case "json":
            return JSONObjectField(required=False, **common)
    return forms.CharField(required=False, **common)


def serializer_field(f: dataclasses.Field[Any], choices: Mapping[str, Sequence[str]], note: str = "") -> serializers.Field:
    """The API's field for spec field `f`, optional (the caller fills what is left out); `note` ends its help."""
    text = f"{help_text(f)} {note}".strip()
    match kind(f, choices):
        case "choice":
            return serializers.ChoiceField(choices=list(choices[f.name]), required=False, help_text=text)
        case "bool":
            return serializers.BooleanField(required=False, help_text=text)
        case "int":
            return serializers.IntegerField(required=False, min_value=-INT32, max_value=INT32, help_text=text)
        case "float":
            return serializers.FloatField(required=False, help_text=text)
        case "list":
            return serializers.ListField(child=serializers.CharField(), required=False, help_text=text)
        case "json":
            return serializers.DictField(required=False, help_text=text)
    return serializers.CharField(required=False, allow_blank=True, help_text=text)
