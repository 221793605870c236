"""Garbage collection: unreferenced chunks, extra chunk copies, and tombstones (issue 6).

Stdlib only (no Flask/Celery, no network): the pure decisions, plus the operations on one data
directory. Who asks other coordinators what lives in ``tunnelmesh.sync`` / ``tunnelmesh.rebalance``.

Unreferenced chunks
-------------------
A chunk is *referenced* while an object row (the current version of a key; tombstones have no
chunks) or a part of an in-progress multipart upload names it
(``MetadataStore.referenced_chunk_hashes``); this store keeps no older versions, so "no kept
version" needs nothing more. An unreferenced chunk is removed only once its file's mtime is older
than ``storage.gc_grace``. Every chunk write refreshes the mtime, including a write of a chunk that
already exists (dedup hit), so:

* a PUT in progress (chunks written, metadata not committed yet) is safe for the grace period;
* a chunk that arrived by replication before its object record survives until the record comes
  (within the grace), then it is referenced;
* the race "GC decided the chunk is idle, a writer re-uses it, GC deletes it" is closed by moving the
  file aside first (atomic rename), then re-checking its mtime: a writer that refreshed it just
  before the move gets it back; a writer coming after the move finds no file and writes a new one.

Extra copies
------------
A referenced chunk held by a node that is not one of its placement holders (``storage.placement``)
is an *extra copy* (the writer's copy before cleanup, or a copy whose holder changed with the
membership). ``extra_copies`` lists them; they are dropped only after every placement holder
confirmed holding the chunk durably (the caller asks them; see ``tunnelmesh.rebalance``).

Tombstones
----------
A tombstone (object or bucket) must outlive every copy of what it deleted, so it is kept until every
*current* coordinator holds it, and then for ``storage.tombstone_grace`` more. The range owner of a
tombstone records when it first saw every member hold that exact version (``TombstoneLedger``);
once the grace has passed it purges its own row and asks every peer to purge theirs.
``purge_tombstones`` removes a row only if it is still exactly that tombstone (a newer write or a
different tombstone in between keeps it), and a bucket tombstone only when no object row (live or
tombstone) of that bucket is left.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

from storage.chunks import ChunkStore
from storage.manifest import ManifestEntry
from storage.metadata import MetadataStore
from storage.placement import place
from storage.sqlite import SQLiteDatabase

__all__ = [
    "ChunkGcReport",
    "chunks_to_collect",
    "collect_unreferenced_chunks",
    "remove_idle_chunk",
    "extra_copies",
    "TombstoneLedger",
    "tombstone_ledger_path",
    "tombstones_due",
    "purge_tombstones",
    "local_entry",
]


# =============================================================================================
# Unreferenced chunks
# =============================================================================================


@dataclass(slots=True)
class ChunkGcReport:
    scanned: int = 0
    unreferenced: int = 0
    young: int = 0  # unreferenced but inside the grace period: kept
    removed: int = 0
    removed_bytes: int = 0
    removed_hashes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, int]:
        return {"scanned": self.scanned, "unreferenced": self.unreferenced, "young": self.young,
                "removed": self.removed, "removed_bytes": self.removed_bytes}


def chunks_to_collect(stored: Iterable[tuple[str, float]], referenced: AbstractSet[str], now: float,
                      grace: float) -> list[str]:
    """Pure decision: the stored ``(hash, mtime)`` that nothing references and are older than ``grace``."""
    cutoff = now - grace
    return [chunk_hash for chunk_hash, mtime in stored if chunk_hash not in referenced and mtime <= cutoff]


def remove_idle_chunk(chunks: ChunkStore, chunk_hash: str, cutoff: float) -> int:
    """Remove the chunk if its mtime is still <= ``cutoff``; returns the bytes freed (0 if kept).

    The file is renamed aside first, then re-checked (module docstring: the dedup race).
    """
    path = chunks.path(chunk_hash)
    trash = chunks.tmp_dir / f"gc.{chunk_hash}.{os.getpid()}.{time.monotonic_ns()}"
    try:
        if os.stat(path).st_mtime > cutoff:
            return 0
        os.rename(path, trash)
    except FileNotFoundError:
        return 0
    stat = os.stat(trash)
    if stat.st_mtime > cutoff:
        # Refreshed by a writer between our check and the move: put it back (unless the writer,
        # finding no file, already wrote a new copy: then ours is a duplicate).
        try:
            os.link(trash, path)
        except FileExistsError:
            pass
        os.unlink(trash)
        return 0
    os.unlink(trash)
    return stat.st_size


def collect_unreferenced_chunks(meta: MetadataStore, chunks: ChunkStore, grace: float,
                                now: float | None = None) -> ChunkGcReport:
    """Remove every chunk that nothing references and that is older than ``grace`` seconds."""
    now = time.time() if now is None else now
    cutoff = now - grace
    report = ChunkGcReport()
    # Candidates first, references second: a chunk written and referenced between the two steps
    # has a fresh mtime and is not a candidate; one referenced before is in the reference set.
    candidates: list[tuple[str, float]] = []
    for chunk_hash in chunks.iter_hashes():
        report.scanned += 1
        try:
            candidates.append((chunk_hash, os.stat(chunks.path(chunk_hash)).st_mtime))
        except FileNotFoundError:
            continue
    referenced = meta.referenced_chunk_hashes()
    unreferenced = [(h, m) for h, m in candidates if h not in referenced]
    report.unreferenced = len(unreferenced)
    for chunk_hash in chunks_to_collect(unreferenced, referenced, now, grace):
        freed = remove_idle_chunk(chunks, chunk_hash, cutoff)
        if freed or not chunks.exists(chunk_hash):
            report.removed += 1
            report.removed_bytes += freed
            report.removed_hashes.append(chunk_hash)
    report.young = report.unreferenced - report.removed
    return report


# =============================================================================================
# Extra copies
# =============================================================================================


def extra_copies(local_referenced: Iterable[str], self_id: str, members: Sequence[str], factor: int) -> list[str]:
    """Pure: the locally held, referenced chunks whose placement holders do not include ``self_id``.

    With no other member (a cluster of one) nothing is extra.
    """
    if len(set(members) - {self_id}) == 0:
        return []
    return [h for h in local_referenced if self_id not in place(h, members, factor)]


# =============================================================================================
# Tombstones
# =============================================================================================


def tombstone_ledger_path(data_dir: Path) -> Path:
    return Path(data_dir) / "meta" / "tombstones.db"


def local_entry(bucket: str, key: str, vv_json: str, stamp: int, deleted: bool, etag: str,
                writer: str) -> ManifestEntry:
    from storage.versions import VersionVector

    return ManifestEntry(bucket, key, VersionVector.from_json(vv_json), stamp, deleted, etag, writer)


class TombstoneLedger(SQLiteDatabase):
    """When each tombstone version was first seen held by every current coordinator.

    A separate SQLite file (``data_dir/meta/tombstones.db``): losing it only restarts the grace.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        with self._tx() as conn:
            conn.execute("""CREATE TABLE IF NOT EXISTS confirmed (
                bucket TEXT NOT NULL, key TEXT NOT NULL, vv TEXT NOT NULL, since_us INTEGER NOT NULL,
                PRIMARY KEY (bucket, key))""")

    def confirm(self, entries: Iterable[ManifestEntry], now_us: int) -> None:
        """Every member holds these tombstones: start their grace unless already started for that
        exact version (a different version restarts it)."""
        rows = [(e.bucket, e.key, e.vv.to_json(), now_us) for e in entries if e.deleted]
        if not rows:
            return
        with self._tx() as conn:
            conn.executemany(
                "INSERT INTO confirmed (bucket, key, vv, since_us) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (bucket, key) DO UPDATE SET vv = excluded.vv, since_us = excluded.since_us "
                "WHERE confirmed.vv != excluded.vv", rows)

    def since(self) -> dict[tuple[str, str], tuple[str, int]]:
        """``(bucket, key) -> (vv json, confirmed since)``."""
        rows = self._conn().execute("SELECT bucket, key, vv, since_us FROM confirmed")
        return {(b, k): (vv, since) for b, k, vv, since in rows}

    def forget(self, names: Iterable[tuple[str, str]]) -> None:
        with self._tx() as conn:
            conn.executemany("DELETE FROM confirmed WHERE bucket = ? AND key = ?", list(names))


def tombstones_due(tombstones: Iterable[ManifestEntry], confirmed: Mapping[tuple[str, str], tuple[str, int]],
                   now_us: int, grace_us: int) -> list[ManifestEntry]:
    """Pure: the tombstones every member has held (this exact version) for at least ``grace_us``."""
    due = []
    for entry in tombstones:
        if not entry.deleted:
            continue
        seen = confirmed.get(entry.name)
        if seen is not None and seen[0] == entry.vv.to_json() and now_us - seen[1] >= grace_us:
            due.append(entry)
    return due


def purge_tombstones(meta: MetadataStore, entries: Iterable[ManifestEntry]) -> list[ManifestEntry]:
    """Remove the rows that are still exactly these tombstones; returns those purged.

    Objects first, so a bucket whose last object tombstones go in the same call can go too.
    """
    ordered = sorted(entries, key=lambda e: e.key == "")
    purged = []
    with meta.write() as tx:
        for entry in ordered:
            if not entry.deleted:
                continue
            if entry.key == "":
                bucket = tx.get_bucket(entry.bucket)
                if bucket is None or not bucket.deleted or bucket.vv != entry.vv:
                    continue
                if tx.conn.execute("SELECT 1 FROM objects WHERE bucket = ? LIMIT 1", (entry.bucket,)).fetchone():
                    continue
                tx.purge_bucket(entry.bucket)
            else:
                record = tx.get_object(entry.bucket, entry.key)
                if record is None or not record.deleted or record.vv != entry.vv:
                    continue
                tx.purge_object(entry.bucket, entry.key)
            purged.append(entry)
    return purged
