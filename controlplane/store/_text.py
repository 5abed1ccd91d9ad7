"""Text that must fit the schema on every backend.

PostgreSQL refuses NUL characters in text columns and values longer than a varchar column,
where SQLite stores both. Values that come from callers or agents and are only recorded (an
audit target, an agent's error message) are made to fit rather than failing the write;
identifiers a caller chose are validated at the API instead, with a precise error.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"


def fit(text: str, limit: int | None = None) -> str:
    """`text` without NUL characters and, with `limit`, cut to at most `limit` characters
    (ending in "…" when cut)."""
    if "\x00" in text:
        text = text.replace("\x00", _REPLACEMENT)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def has_nul(text: str) -> bool:
    return "\x00" in text
