"""Helpers shared by the storage tests."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from storage.metadata import ObjectRecord
from storage.objects import ObjectStore

CHUNK = 64 * 1024  # the smallest chunk size the config schema allows


def put(store: ObjectStore, key: str, data: bytes, bucket: str = "b", **kwargs: Any) -> ObjectRecord:
    """put_object with a BytesIO body and, unless given, the exact content length."""
    kwargs.setdefault("content_length", len(data))
    return store.put_object(bucket, key, io.BytesIO(data), **kwargs)


def get(store: ObjectStore, key: str, bucket: str = "b", start: int = 0, end: int | None = None) -> bytes:
    return b"".join(store.read_object(store.head_object(bucket, key), start, end))


def files_under(root: Path) -> set[str]:
    """Every file below ``root``, as paths relative to it."""
    return {os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names}


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-per-chunk bytes (distinct chunks, so no accidental dedup)."""
    block = bytes((i * 7 + seed) % 251 for i in range(251))
    data = (block * (size // 251 + 1))[:size]
    # Stamp every 4 KiB with its offset so chunks of one object differ from each other.
    out = bytearray(data)
    for off in range(0, size, 4096):
        stamp = f"{seed}:{off}".encode()
        out[off:off + len(stamp)] = stamp[: max(0, min(len(stamp), size - off))]
    return bytes(out)
