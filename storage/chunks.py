"""Content-addressed chunk store: immutable files named by the SHA-256 of their bytes.

Layout under the data directory (``root``)::

    chunks/ab/<sha256 hex>      one file per chunk, under the first byte of its hash
    tmp/                        in-flight writes (unique names; stale ones removed on open)
    quarantine/                 chunks that failed verification, plus the corrupt counter

A write goes to a unique temporary file, is fsynced, renamed into place and the directory is
fsynced, so a chunk path either does not exist or holds complete, durable bytes. Since the name is
the hash, concurrent writers of the same chunk produce identical files and need no lock (the Go
original's fixed ``.tmp`` name forced a global lock). Every read re-hashes the bytes: a mismatch
moves the file to quarantine, bumps a persistent counter and raises ``CorruptChunk``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from storage.errors import ChunkMissing, CorruptChunk, InsufficientStorage

__all__ = ["ChunkRef", "ChunkStore", "DiskUsage", "validate_hash"]

_HASH = re.compile(r"[0-9a-f]{64}")
# Temporary files younger than this may belong to a write in progress in another process.
STALE_TMP_SECONDS = 60.0
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of an object: its SHA-256 (lowercase hex) and its size in bytes."""

    hash: str
    size: int


class DiskUsage(NamedTuple):
    """Figures of the file system holding the data directory, in bytes."""

    total: int
    used: int
    free: int


def validate_hash(chunk_hash: object) -> str:
    """Return ``chunk_hash`` if it is 64 lowercase hex characters, else raise ValueError.

    Called before any path is built from a hash, so no input can name a file outside chunks/.
    """
    if not isinstance(chunk_hash, str) or not _HASH.fullmatch(chunk_hash):
        raise ValueError(f"not a chunk hash (64 lowercase hex characters): {chunk_hash!r}")
    return chunk_hash


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChunkStore:
    """Chunks of one data directory. Thread- and process-safe without locks (see module doc)."""

    def __init__(self, root: Path, fsync: bool = True, min_free_space: int = 0) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.min_free_space = min_free_space
        self.chunks_dir = self.root / "chunks"
        self.tmp_dir = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self._counter_path = self.quarantine_dir / "corrupt_count"
        for directory in (self.chunks_dir, self.tmp_dir, self.quarantine_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._create_fanout_dirs()
        self._remove_stale_tmp()

    # -- paths -------------------------------------------------------------------------------
    def path(self, chunk_hash: str) -> Path:
        """Where the chunk lives (validated first: a bad hash raises ValueError)."""
        validate_hash(chunk_hash)
        return self.chunks_dir / chunk_hash[:2] / chunk_hash

    def _create_fanout_dirs(self) -> None:
        # The 256 folders are made once, so a chunk write never creates one: a new chunk costs two
        # fsyncs (its file, its folder). A second level (ab/cd/) would make most writes to a young
        # store create a folder and fsync its parent as well: half the small-write rate, measured.
        # One level holds millions of chunks (ext4 indexes directories with a hash tree).
        if (self.chunks_dir / "ff").is_dir():
            return
        for i in range(256):
            (self.chunks_dir / f"{i:02x}").mkdir(exist_ok=True)
        if self.fsync:
            _fsync_dir(self.chunks_dir)
            _fsync_dir(self.root)

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP_SECONDS
        for entry in os.scandir(self.tmp_dir):
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass

    # -- writing -----------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> ChunkRef:
        """Store ``data`` durably and return its reference; a no-op if the chunk exists."""
        return self._store(data, hashlib.sha256(data).hexdigest())

    def write_verified(self, data: bytes | bytearray | memoryview, expected_hash: str) -> ChunkRef:
        """Store ``data`` only if it hashes to ``expected_hash`` (replication receipt)."""
        validate_hash(expected_hash)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_hash:
            raise CorruptChunk(expected_hash, f"received bytes hash to {actual}")
        return self._store(data, actual)

    def _store(self, data: bytes | bytearray | memoryview, chunk_hash: str) -> ChunkRef:
        view = memoryview(data).cast("B")
        ref = ChunkRef(chunk_hash, view.nbytes)
        target = self.path(chunk_hash)
        try:
            # Dedup hit: refresh the mtime so a garbage collector's grace period counts from the
            # latest write that referenced the chunk.
            os.utime(target)
            return ref
        except FileNotFoundError:
            pass
        self._check_free_space(view.nbytes)
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix=chunk_hash[:16] + ".")
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise InsufficientStorage(f"disk full while writing chunk {chunk_hash}") from exc
            raise
        try:
            try:
                written = 0
                while written < view.nbytes:
                    written += os.write(fd, view[written:])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            # Same bytes under the same name: replacing an existing file is harmless.
            created_dir = False
            try:
                os.replace(tmp_name, target)
            except FileNotFoundError:
                # The 256 folders exist from the start, so this is rare: no mkdir per write.
                created_dir = self._recreate_folder(target.parent)
                os.replace(tmp_name, target)
        except OSError as exc:
            _unlink_quietly(tmp_name)
            if exc.errno in _DISK_FULL:
                raise InsufficientStorage(f"disk full while writing chunk {chunk_hash}") from exc
            raise
        except BaseException:
            _unlink_quietly(tmp_name)
            raise
        if self.fsync:
            _fsync_dir(target.parent)
            if created_dir:
                _fsync_dir(target.parent.parent)
        return ref

    def _recreate_folder(self, folder: Path) -> bool:
        """Create a chunk folder removed by hand (``chunks/`` itself too); True if it was missing."""
        if folder.is_dir():
            return False  # the temporary file was the missing piece: the retried rename says so
        created_parent = not self.chunks_dir.is_dir()
        folder.mkdir(parents=True, exist_ok=True)
        if self.fsync and created_parent:
            _fsync_dir(self.root)
        return True

    def free_bytes(self) -> int:
        """Bytes available to this process on the data directory's file system."""
        return shutil.disk_usage(self.root).free

    def _check_free_space(self, incoming: int) -> None:
        if self.min_free_space <= 0:
            return
        free = self.free_bytes()
        if free - incoming < self.min_free_space:
            raise InsufficientStorage(
                f"only {free} bytes free on {self.root}; writing {incoming} more would go under "
                f"storage.min_free_space ({self.min_free_space})"
            )

    # -- reading -----------------------------------------------------------------------------
    def read(self, chunk_hash: str) -> bytes:
        """The chunk's bytes, verified. Corrupt: quarantined + ``CorruptChunk``; absent: ``ChunkMissing``."""
        path = self.path(chunk_hash)
        try:
            with open(path, "rb", buffering=0) as f:
                data = f.readall()
                stat = os.fstat(f.fileno())
        except FileNotFoundError:
            raise ChunkMissing(chunk_hash) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != chunk_hash:
            self._quarantine(chunk_hash, path, stat)
            raise CorruptChunk(chunk_hash, f"stored bytes hash to {actual}; moved to quarantine")
        return data

    def _quarantine(self, chunk_hash: str, path: Path, stat: os.stat_result) -> None:
        try:
            current = os.stat(path)
            # Only move the very file we read: a concurrent repair may already have replaced it.
            if (current.st_ino, current.st_dev) != (stat.st_ino, stat.st_dev):
                return
            os.replace(path, self.quarantine_dir / f"{chunk_hash}.{time.time_ns()}.{os.getpid()}")
        except FileNotFoundError:
            return  # another reader quarantined it and counted it
        self._bump_corrupt_count()

    def _bump_corrupt_count(self) -> None:
        with open(self.quarantine_dir / "corrupt_count.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            count = self.corrupt_count() + 1
            tmp = self.quarantine_dir / f"corrupt_count.{os.getpid()}.tmp"
            tmp.write_text(str(count))
            os.replace(tmp, self._counter_path)

    def corrupt_count(self) -> int:
        """How many corrupt chunks were ever detected in this data directory."""
        try:
            return int(self._counter_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    # -- inventory ---------------------------------------------------------------------------
    def exists(self, chunk_hash: str) -> bool:
        return self.path(chunk_hash).is_file()

    def delete(self, chunk_hash: str) -> bool:
        """Remove the chunk; False if it was not there."""
        try:
            os.unlink(self.path(chunk_hash))
            return True
        except FileNotFoundError:
            return False

    def mtime(self, chunk_hash: str) -> float:
        """Last write (or dedup hit) of the chunk, seconds since the epoch."""
        try:
            return os.stat(self.path(chunk_hash)).st_mtime
        except FileNotFoundError:
            raise ChunkMissing(chunk_hash) from None

    def iter_hashes(self) -> Iterator[str]:
        """Every stored chunk hash (directory order; files with other names are ignored)."""
        for first in sorted(os.scandir(self.chunks_dir), key=lambda e: e.name):
            if not first.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(first.path):
                if _HASH.fullmatch(entry.name):
                    yield entry.name

    def disk_usage(self) -> DiskUsage:
        """Total, used and free bytes of the file system holding the data directory."""
        usage = shutil.disk_usage(self.root)
        return DiskUsage(usage.total, usage.used, usage.free)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
