"""Whole numbers read from request text (ids, steps, limits).

ASCII digits only: `str.isdigit()` also accepts "²" or "¹", which `int()` refuses (a 500 where a 400 or a 404 is
due), and a number past a bigint fails in PostgreSQL's query instead of being refused. Every view that reads an id
from a path, a query string or a form field goes through `whole`.
"""

from __future__ import annotations

import re
from typing import Any

MAX_ID = 2**63 - 1  # a bigint: the largest primary key or event id
_DIGITS = re.compile(r"[0-9]{1,19}")


def whole(text: Any, maximum: int = MAX_ID, signed: bool = False) -> int | None:
    """`text` as a whole number within [-maximum, maximum] (or [0, maximum] unless `signed`), else None."""
    raw = str(text if text is not None else "").strip()
    negative = signed and raw.startswith("-")
    digits = raw[1:] if negative else raw
    if not _DIGITS.fullmatch(digits) or int(digits) > maximum:
        return None
    return -int(digits) if negative else int(digits)
