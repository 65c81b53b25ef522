"""Hugging Face Hub repository ids: the rule a push's "namespace/name" must follow, checked before any upload."""

from __future__ import annotations

import re

MAX_NAME_LENGTH = 96  # the Hub's limit on each of namespace and name
NAME_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


def repo_id_problem(repo_id: str) -> str | None:
    """Why `repo_id` is not a valid "namespace/name" Hub repository id, or None when it is."""
    parts = repo_id.split("/")
    if len(parts) != 2:
        return 'must be "namespace/name": your user or organisation name, a slash, and the repository name'
    for what, part in zip(("namespace", "name"), parts, strict=True):
        if not part:
            return f"the {what} is empty"
        if len(part) > MAX_NAME_LENGTH:
            return f"the {what} is longer than {MAX_NAME_LENGTH} characters"
        if not NAME_PART.fullmatch(part):
            return (
                f"the {what} {part!r} may hold only letters, digits, '-', '_' and '.', "
                "and must start and end with a letter or digit"
            )
        if "--" in part or ".." in part:
            return f"the {what} {part!r} may not contain '--' or '..'"
    if parts[1].endswith(".git"):
        return "the name may not end with .git"
    return None
