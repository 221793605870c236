"""S3 listing over a sorted key range: prefix, delimiter (common prefixes), start_after, max_keys.

The listing is defined as the sorted sequence of *entries*: every live key under ``prefix`` that
has no ``delimiter`` after the prefix, plus every distinct common prefix (the key up to and
including the first delimiter after the prefix). A common prefix sorts at its own string; since
all keys rolled up into it are >= it and < its successor, that order is consistent with the
key order. A page holds the first ``max_keys`` entries greater than ``start_after``, and
``next_marker`` is the last entry of the page, so passing it back as ``start_after`` continues
exactly after it: no entry is skipped or repeated, whatever was written in between.

Cost: one range query per page plus one per common prefix emitted, because after a common
prefix the scan jumps past every key under it (``prefix_successor``) instead of reading them.

Python compares ``str`` by code point, which is the same order as comparing UTF-8 bytes (what
SQLite's BINARY collation does), so the bounds computed here agree with the database's order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["ListPage", "list_page", "prefix_successor"]

T = TypeVar("T")
Row = Any
# scan(lower, lower_inclusive, upper_exclusive_or_None, limit) -> rows in key order
Scan = Callable[[str, bool, "str | None", int], Iterator[Row]]

_MAX_CODE_POINT = 0x10FFFF


@dataclass(frozen=True, slots=True)
class ListPage(Generic[T]):
    objects: list[T]
    common_prefixes: list[str]
    is_truncated: bool
    next_marker: str  # last key or common prefix of this page ("" if the page is empty)


def prefix_successor(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with ``prefix``.

    None when there is no such string (empty prefix, or only U+10FFFF characters).
    """
    chars = list(prefix)
    while chars:
        code = ord(chars[-1])
        if code < _MAX_CODE_POINT:
            code += 1
            if 0xD800 <= code <= 0xDFFF:  # surrogates never occur in valid UTF-8 keys
                code = 0xE000
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()
    return None


def list_page(
    scan: Scan,
    key_of: Callable[[Row], str],
    decode: Callable[[Row], T],
    *,
    prefix: str = "",
    delimiter: str = "",
    start_after: str = "",
    max_keys: int = 1000,
) -> ListPage[T]:
    """One page of a listing (see the module docstring); ``scan`` must return only live keys."""
    if max_keys <= 0:
        return ListPage([], [], False, "")
    upper = prefix_successor(prefix) if prefix else None
    if start_after < prefix:
        lower, inclusive = prefix, True
    else:
        lower, inclusive = start_after, False

    objects: list[T] = []
    prefixes: list[str] = []
    last = ""
    exhausted = False
    while len(objects) + len(prefixes) < max_keys and not exhausted:
        limit = max_keys - len(objects) - len(prefixes)
        fetched = 0
        jumped = False
        for row in scan(lower, inclusive, upper, limit):
            fetched += 1
            key = key_of(row)
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                common = key[: cut + len(delimiter)]
                if common > start_after:  # else the marker lies inside it: emitted on an earlier page
                    prefixes.append(common)
                    last = common
                successor = prefix_successor(common)
                if successor is None:
                    exhausted = True
                else:
                    lower, inclusive = successor, True
                jumped = True
                break
            objects.append(decode(row))
            last = key
            lower, inclusive = key, False
        if not jumped and fetched < limit:
            exhausted = True

    is_truncated = False
    if not exhausted:
        # Any live key past the cursor is a new entry: keys under an emitted common prefix were
        # jumped over, and a key under a prefix the marker lies in would have been skipped above.
        is_truncated = next(scan(lower, inclusive, upper, 1), None) is not None
    return ListPage(objects, prefixes, is_truncated, last)
