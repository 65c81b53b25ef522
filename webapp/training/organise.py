"""Tags and notes on runs and adapters: what a tag may be, setting them, and the lists' filter and search.

A tag is a short lowercase word (`baseline`, `lr-sweep`, `ticket:42`); a run or an adapter carries up to
MAX_TAGS of them and one free-text note. Both the pages and the API change them through `set_labels`, which
checks everything first and writes nothing on a refusal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from django.db import transaction
from django.db.models import Q, QuerySet

from webapp.training.models import Tag

MAX_TAGS, MAX_TAG_LENGTH, MAX_NOTE_LENGTH = 20, 50, 5000
TAG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._:/-]*$")
TAG_RULE = "lowercase letters, digits and . _ : / - (starting with a letter or digit)"


class LabelError(ValueError):
    """Refused tags or note: {field: [message, ...]}."""

    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__("; ".join(f"{k}: {' '.join(v)}" for k, v in errors.items()))
        self.errors = errors


def split_tags(text: str) -> list[str]:
    """Tags typed in one box, separated by commas or spaces."""
    return [t for t in re.split(r"[,\s]+", text or "") if t]


def clean_tags(tags: Iterable[Any]) -> list[str]:
    """The tags, lowercased and deduplicated in order; LabelError naming each bad one."""
    cleaned: list[str] = []
    problems: list[str] = []
    for raw in tags:
        tag = str(raw).strip().lower()
        if len(tag) > MAX_TAG_LENGTH:
            problems.append(f"{tag[:MAX_TAG_LENGTH]}… is longer than {MAX_TAG_LENGTH} characters")
        elif not TAG_PATTERN.match(tag):
            problems.append(f"{tag!r} is not a tag: use {TAG_RULE}")
        elif tag not in cleaned:
            cleaned.append(tag)
    if len(cleaned) > MAX_TAGS:
        problems.append(f"at most {MAX_TAGS} tags ({len(cleaned)} given)")
    if problems:
        raise LabelError({"tags": problems})
    return cleaned


def clean_note(note: Any) -> str:
    text = str(note if note is not None else "").replace("\r\n", "\n").strip()
    if len(text) > MAX_NOTE_LENGTH:
        raise LabelError({"note": [f"at most {MAX_NOTE_LENGTH} characters ({len(text)} given)"]})
    return text


def set_labels(obj: Any, tags: Iterable[Any] | None = None, note: Any | None = None) -> None:
    """Replace a run's or an adapter's tags and/or note (None leaves that one as it is); all checked before any
    write, so a refusal changes nothing."""
    errors: dict[str, list[str]] = {}
    cleaned_tags: list[str] | None = None
    cleaned_note: str | None = None
    if tags is not None:
        try:
            cleaned_tags = clean_tags(tags)
        except LabelError as exc:
            errors.update(exc.errors)
    if note is not None:
        try:
            cleaned_note = clean_note(note)
        except LabelError as exc:
            errors.update(exc.errors)
    if errors:
        raise LabelError(errors)
    with transaction.atomic():
        if cleaned_tags is not None:
            known = {t.name: t for t in Tag.objects.filter(name__in=cleaned_tags)}
            missing = [Tag(name=name) for name in cleaned_tags if name not in known]
            Tag.objects.bulk_create(missing, ignore_conflicts=True)  # a tag created meanwhile by someone else
            obj.tags.set(Tag.objects.filter(name__in=cleaned_tags))
        if cleaned_note is not None:
            type(obj).objects.filter(pk=obj.pk).update(note=cleaned_note)
            obj.note = cleaned_note


def filter_labels(queryset: QuerySet[Any], tags: Iterable[str] = (), q: str = "") -> QuerySet[Any]:
    """Rows carrying every one of `tags`, and matching the free text `q` in their name, note or a tag.

    Each condition is a subquery on the through table (`row_id IN (rows with tag X)`), not a join: no duplicate
    rows to take away with DISTINCT, and the list keeps its own ordering and pagination."""
    field = queryset.model.tags.field
    through = field.remote_field.through
    row = f"{field.m2m_field_name()}_id"
    for tag in tags:
        name = str(tag).strip().lower()
        if name:
            queryset = queryset.filter(pk__in=through.objects.filter(tag__name=name).values(row))
    text = (q or "").strip()
    if text:
        tagged = through.objects.filter(tag__name__icontains=text).values(row)
        queryset = queryset.filter(Q(name__icontains=text) | Q(note__icontains=text) | Q(pk__in=tagged))
    return queryset


def tags_in_use(limit: int = 100) -> list[str]:
    return list(Tag.objects.order_by("name").values_list("name", flat=True)[:limit])
