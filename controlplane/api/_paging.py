"""Page tokens for List methods: opaque to clients, the last key of the previous page."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class PageError(ValueError):
    """A page_size or page_token the caller must fix; the message names the field."""


def page_size(requested: int) -> int:
    if requested < 0:
        raise PageError(f"page_size: must not be negative, got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(last_key: str) -> str:
    return base64.urlsafe_b64encode(f"k1:{last_key}".encode()).decode()


def decode_token(token: str) -> str:
    """The key after which the page starts; '' for the first page."""
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise PageError("page_token: not a token this server issued") from None
    if not raw.startswith("k1:"):
        raise PageError("page_token: not a token this server issued")
    return raw[3:]


def paginate(
    items: Sequence[T], key: Callable[[T], str], requested_size: int, token: str
) -> tuple[list[T], str]:
    """One page of `items` (sorted by `key`) and the token of the next page ('' at the end)."""
    size = page_size(requested_size)
    after = decode_token(token)
    remaining = [item for item in items if key(item) > after]
    page = list(remaining[:size])
    return page, encode_token(key(page[-1])) if len(remaining) > size else ""
