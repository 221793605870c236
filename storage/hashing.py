"""Incremental hashes fed in the background, so independent digests of one stream overlap.

A large PUT computes several digests of the same bytes: the MD5 (the ETag), the SHA-256 the
client claimed in ``x-amz-content-sha256``, an ``x-amz-checksum-*`` (CRC32, ...) and, per chunk,
the SHA-256 that names it. Each one is serial, but they are independent of each other, and
hashlib, zlib and crc32c release the GIL on large buffers: computed one after another in the
request thread they use one core; fed to a :class:`BackgroundHash` each runs in its own thread,
on whatever core is free, while the request thread reads the next piece.

Order is kept by having at most one update of a given hash in flight: ``update`` waits for the
previous one before submitting the next. Pieces below ``min_size`` are hashed in the calling
thread (a thread hop costs more than hashing a few KiB), so small objects never touch the pool.
The pieces must not be modified until hashed (``bytes`` are immutable; a mutable buffer is
copied). ``digest`` / ``hexdigest`` wait for everything submitted.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["BackgroundHash", "BACKGROUND_MIN_SIZE", "hash_pool"]

# Pieces at least this large are hashed in the background.
BACKGROUND_MIN_SIZE = 256 * 1024

_pool: tuple[ThreadPoolExecutor, int] | None = None
_pool_lock = threading.Lock()


def hash_pool() -> ThreadPoolExecutor:
    """The process's pool for background hashing (recreated after a fork: threads do not survive it).

    Its jobs only hash (they never wait for anything), so sharing one pool cannot deadlock; with
    more concurrent streams than threads, updates simply queue.
    """
    global _pool
    pid = os.getpid()
    with _pool_lock:
        if _pool is None or _pool[1] != pid:
            _pool = (ThreadPoolExecutor(max_workers=8, thread_name_prefix="hasher"), pid)
        return _pool[0]


class BackgroundHash:
    """A hash-like object (``update``/``digest``) whose large updates run in a worker thread."""

    def __init__(self, inner: Any, min_size: int = BACKGROUND_MIN_SIZE) -> None:
        self.inner = inner
        self.min_size = min_size
        self._job: Future[None] | None = None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self.wait()
        if len(data) < self.min_size:
            self.inner.update(data)
            return
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller may reuse its buffer once this returns
        self._job = hash_pool().submit(self.inner.update, data)

    def wait(self) -> None:
        """Wait for the update in flight, if any (its exception, if it failed, is raised here)."""
        job, self._job = self._job, None
        if job is not None:
            job.result()

    def digest(self) -> bytes:
        self.wait()
        return self.inner.digest()

    def hexdigest(self) -> str:
        self.wait()
        return self.inner.hexdigest()
