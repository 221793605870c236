"""Object, bucket and multipart metadata in SQLite (``data_dir/meta/metadata.db``).

One database per coordinator, shared by every process and thread of it:

* WAL mode with ``synchronous=FULL``: a committed transaction is on disk (one WAL fsync) before
  ``COMMIT`` returns, and readers never block the writer or each other.
* One connection per thread (``threading.local``) and per process: a connection inherited
  through ``fork`` is never used (nor closed) by the child, as SQLite requires.
* Writes run in ``BEGIN IMMEDIATE`` transactions, so a read-check-write sequence (previous
  version vector, If-None-Match, bucket emptiness) is atomic across processes; ``busy_timeout``
  (30 s) queues concurrent writers instead of failing them.

Keys are stored by value as TEXT with BINARY collation, which orders them by their UTF-8 bytes
(the order S3 lists in). A deleted object stays as a row with ``deleted = 1`` (a tombstone with
its version vector), and so does a deleted bucket, so replication can carry deletes and a later
write continues the vector instead of restarting it.

Every mutation appends a row to ``outbox`` in the same transaction: a durable record of what must
be replicated, consumed later by the replication workers (at-least-once; they read the current
state of the key, so duplicates and coalescing are harmless).

The manifest sync's range digests (``storage.manifest``: per range, the count of rows and the XOR
of their ``row_digest``) are kept in ``range_digests``, updated in the same transaction as every
object or bucket row (``sync_range`` on each row is its ``range_of``), so a sync round between
identical stores reads 256 small rows instead of hashing the whole store.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sqlite3
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.chunks import ChunkRef
from storage.errors import InsufficientStorage, StorageError
from storage.manifest import DEFAULT_RANGES, range_of, row_digest
from storage.sqlite import enable_wal
from storage.versions import Version, VersionVector

__all__ = [
    "BucketRecord",
    "MetadataStore",
    "ObjectRecord",
    "OutboxEntry",
    "PartRecord",
    "Tx",
    "UploadRecord",
    "SCHEMA_VERSION",
]

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 30_000
_RANGE_DIGEST_BYTES = 16  # storage.manifest's row digests are 128 bits

# Outbox kinds (replication intents).
OUTBOX_PUT = "put"  # an object version was written (PUT, copy, multipart completion)
OUTBOX_DELETE = "delete"  # an object tombstone was written
OUTBOX_CREATE_BUCKET = "create_bucket"
OUTBOX_DELETE_BUCKET = "delete_bucket"

_SCHEMA_V1 = [
    """CREATE TABLE node_info (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
    """CREATE TABLE buckets (
        name TEXT PRIMARY KEY COLLATE BINARY,
        owner TEXT NOT NULL,
        created_us INTEGER NOT NULL,
        modified_us INTEGER NOT NULL,
        vv TEXT NOT NULL,
        writer TEXT NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0)""",
    # A rowid table (not WITHOUT ROWID): chunk lists of large objects make rows too big for a
    # clustered key index.
    """CREATE TABLE objects (
        id INTEGER PRIMARY KEY,
        bucket TEXT NOT NULL COLLATE BINARY,
        key TEXT NOT NULL COLLATE BINARY,
        size INTEGER NOT NULL,
        etag TEXT NOT NULL,
        last_modified_us INTEGER NOT NULL,
        content_type TEXT NOT NULL,
        headers TEXT NOT NULL,
        user_meta TEXT NOT NULL,
        chunks BLOB NOT NULL,
        vv TEXT NOT NULL,
        writer TEXT NOT NULL,
        deleted INTEGER NOT NULL,
        parts TEXT,
        UNIQUE (bucket, key))""",
    # Listings scan only live rows: tombstones never cost a listing anything.
    "CREATE INDEX objects_live ON objects (bucket, key) WHERE deleted = 0",
    """CREATE TABLE uploads (
        upload_id TEXT PRIMARY KEY,
        bucket TEXT NOT NULL COLLATE BINARY,
        key TEXT NOT NULL COLLATE BINARY,
        owner TEXT NOT NULL,
        initiated_us INTEGER NOT NULL,
        content_type TEXT NOT NULL,
        headers TEXT NOT NULL,
        user_meta TEXT NOT NULL)""",
    "CREATE INDEX uploads_by_key ON uploads (bucket, key, upload_id)",
    """CREATE TABLE parts (
        upload_id TEXT NOT NULL,
        part_number INTEGER NOT NULL,
        size INTEGER NOT NULL,
        etag TEXT NOT NULL,
        last_modified_us INTEGER NOT NULL,
        chunks BLOB NOT NULL,
        PRIMARY KEY (upload_id, part_number))""",
    """CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        bucket TEXT NOT NULL,
        key TEXT NOT NULL,
        created_us INTEGER NOT NULL)""",
]

# Version 2: the manifest sync's range digests, kept up to date by every row write.
_SCHEMA_V2 = [
    "ALTER TABLE objects ADD COLUMN sync_range INTEGER NOT NULL DEFAULT -1",
    "ALTER TABLE buckets ADD COLUMN sync_range INTEGER NOT NULL DEFAULT -1",
    "CREATE INDEX objects_by_range ON objects (sync_range)",
    # Tombstones are few and read by every sync round (to confirm them), so they get their own index.
    "CREATE INDEX objects_dead_by_range ON objects (sync_range) WHERE deleted = 1",
    """CREATE TABLE range_digests (
        range INTEGER PRIMARY KEY,
        count INTEGER NOT NULL,
        digest BLOB NOT NULL)""",
]


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BucketRecord:
    """A bucket or its tombstone. ``modified_us``/``writer`` stamp the latest create or delete,
    for conflict resolution between coordinators (additions to the contract's fields)."""

    name: str
    owner: str
    created_us: int
    vv: VersionVector
    deleted: bool = False
    modified_us: int = 0
    writer: str = ""

    def version(self) -> Version:
        return Version(self.vv, self.modified_us, self.writer, self.deleted)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "owner": self.owner,
            "created_us": self.created_us,
            "vv": self.vv.to_dict(),
            "deleted": self.deleted,
            "modified_us": self.modified_us,
            "writer": self.writer,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BucketRecord:
        return cls(
            name=str(data["name"]),
            owner=str(data["owner"]),
            created_us=int(data["created_us"]),
            vv=VersionVector.from_dict(data["vv"]),
            deleted=bool(data["deleted"]),
            modified_us=int(data.get("modified_us", 0)),
            writer=str(data.get("writer", "")),
        )


@dataclass(frozen=True, slots=True)
class ObjectRecord:
    """One version of an object (or its tombstone, ``deleted=True``). ``etag`` is unquoted."""

    bucket: str
    key: str
    size: int
    etag: str
    last_modified_us: int
    content_type: str
    headers: dict[str, str]
    user_meta: dict[str, str]
    chunks: tuple[ChunkRef, ...]
    vv: VersionVector
    writer: str
    deleted: bool = False
    parts: tuple[int, ...] | None = None  # sizes of the multipart parts, None for a single PUT

    def version(self) -> Version:
        return Version(self.vv, self.last_modified_us, self.writer, self.deleted, self.etag)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for replication and manifests)."""
        return {
            "bucket": self.bucket,
            "key": self.key,
            "size": self.size,
            "etag": self.etag,
            "last_modified_us": self.last_modified_us,
            "content_type": self.content_type,
            "headers": dict(self.headers),
            "user_meta": dict(self.user_meta),
            "chunks": [[c.hash, c.size] for c in self.chunks],
            "vv": self.vv.to_dict(),
            "writer": self.writer,
            "deleted": self.deleted,
            "parts": list(self.parts) if self.parts is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ObjectRecord:
        parts = data.get("parts")
        return cls(
            bucket=str(data["bucket"]),
            key=str(data["key"]),
            size=int(data["size"]),
            etag=str(data["etag"]),
            last_modified_us=int(data["last_modified_us"]),
            content_type=str(data["content_type"]),
            headers={str(k): str(v) for k, v in data.get("headers", {}).items()},
            user_meta={str(k): str(v) for k, v in data.get("user_meta", {}).items()},
            chunks=tuple(ChunkRef(str(h), int(s)) for h, s in data.get("chunks", [])),
            vv=VersionVector.from_dict(data["vv"]),
            writer=str(data["writer"]),
            deleted=bool(data.get("deleted", False)),
            parts=tuple(int(p) for p in parts) if parts is not None else None,
        )


@dataclass(frozen=True, slots=True)
class UploadRecord:
    upload_id: str
    bucket: str
    key: str
    owner: str
    initiated_us: int
    content_type: str
    headers: dict[str, str]
    user_meta: dict[str, str]


@dataclass(frozen=True, slots=True)
class PartRecord:
    upload_id: str
    part_number: int
    size: int
    etag: str  # unquoted MD5 hex of the part
    last_modified_us: int
    chunks: tuple[ChunkRef, ...]


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    seq: int
    kind: str
    bucket: str
    key: str
    created_us: int


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------

_CHUNK = struct.Struct(">32sQ")  # binary SHA-256 + size: 40 bytes per chunk


def encode_chunks(chunks: Iterable[ChunkRef]) -> bytes:
    return b"".join(_CHUNK.pack(bytes.fromhex(c.hash), c.size) for c in chunks)


def decode_chunks(blob: bytes) -> tuple[ChunkRef, ...]:
    return tuple(ChunkRef(digest.hex(), size) for digest, size in _CHUNK.iter_unpack(blob))


def _dump(mapping: dict[str, str]) -> str:
    return json.dumps(mapping, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def now_us() -> int:
    """Wall-clock microseconds (through ``time.time`` so tests can move the clock)."""
    return int(time.time() * 1_000_000)


_OBJECT_COLUMNS = (
    "bucket, key, size, etag, last_modified_us, content_type, headers, user_meta, "
    "chunks, vv, writer, deleted, parts"
)
_BUCKET_COLUMNS = "name, owner, created_us, vv, deleted, modified_us, writer"
_UPLOAD_COLUMNS = "upload_id, bucket, key, owner, initiated_us, content_type, headers, user_meta"
_PART_COLUMNS = "upload_id, part_number, size, etag, last_modified_us, chunks"
ROW_KEY = 1  # index of the key in an object row (see scan_live_objects)

# A manifest row: bucket, key ("" for a bucket), vv json, stamp, deleted, etag ("" for a bucket),
# writer; the fields of ``storage.manifest.ManifestEntry`` as stored.
ManifestRow = tuple[str, str, str, int, int, str, str]
_OBJECT_MANIFEST_COLUMNS = "bucket, key, vv, last_modified_us, deleted, etag, writer"
_BUCKET_MANIFEST_COLUMNS = "name, '', vv, modified_us, deleted, '', writer"


def object_from_row(row: tuple[Any, ...]) -> ObjectRecord:
    parts = row[12]
    return ObjectRecord(
        bucket=row[0],
        key=row[1],
        size=row[2],
        etag=row[3],
        last_modified_us=row[4],
        content_type=row[5],
        headers=json.loads(row[6]),
        user_meta=json.loads(row[7]),
        chunks=decode_chunks(row[8]),
        vv=VersionVector.from_json(row[9]),
        writer=row[10],
        deleted=bool(row[11]),
        parts=tuple(json.loads(parts)) if parts is not None else None,
    )


def _bucket_from_row(row: tuple[Any, ...]) -> BucketRecord:
    return BucketRecord(
        name=row[0],
        owner=row[1],
        created_us=row[2],
        vv=VersionVector.from_json(row[3]),
        deleted=bool(row[4]),
        modified_us=row[5],
        writer=row[6],
    )


def _upload_from_row(row: tuple[Any, ...]) -> UploadRecord:
    return UploadRecord(
        upload_id=row[0],
        bucket=row[1],
        key=row[2],
        owner=row[3],
        initiated_us=row[4],
        content_type=row[5],
        headers=json.loads(row[6]),
        user_meta=json.loads(row[7]),
    )


def _part_from_row(row: tuple[Any, ...]) -> PartRecord:
    return PartRecord(
        upload_id=row[0],
        part_number=row[1],
        size=row[2],
        etag=row[3],
        last_modified_us=row[4],
        chunks=decode_chunks(row[5]),
    )


# ---------------------------------------------------------------------------------------------
# Transactions
# ---------------------------------------------------------------------------------------------


class Tx:
    """Queries and updates inside one transaction (obtained from ``MetadataStore.read/write``).

    Getters return tombstones too (``deleted=True``); callers decide what "absent" means.
    """

    def __init__(self, conn: sqlite3.Connection, writable: bool) -> None:
        self.conn = conn
        self.writable = writable

    def _write(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        if not self.writable:
            raise RuntimeError("a read transaction cannot modify the metadata")
        return self.conn.execute(sql, params)

    # -- buckets -----------------------------------------------------------------------------
    def get_bucket(self, name: str) -> BucketRecord | None:
        row = self.conn.execute(f"SELECT {_BUCKET_COLUMNS} FROM buckets WHERE name = ?", (name,)).fetchone()
        return _bucket_from_row(row) if row else None

    def put_bucket(self, record: BucketRecord) -> None:
        old = self._bucket_digest(record.name)
        vv = record.vv.to_json()
        sync_range = range_of(record.name, "")
        self._write(
            f"INSERT INTO buckets ({_BUCKET_COLUMNS}, sync_range) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, created_us = excluded.created_us, "
            "vv = excluded.vv, deleted = excluded.deleted, modified_us = excluded.modified_us, "
            "writer = excluded.writer, sync_range = excluded.sync_range",
            (
                record.name,
                record.owner,
                record.created_us,
                vv,
                int(record.deleted),
                record.modified_us,
                record.writer,
                sync_range,
            ),
        )
        new = row_digest(record.name, "", vv, record.modified_us, int(record.deleted), "", record.writer)
        self._shift_range(sync_range, old, new)

    def list_buckets(self, include_deleted: bool = False) -> list[BucketRecord]:
        where = "" if include_deleted else "WHERE deleted = 0"
        rows = self.conn.execute(f"SELECT {_BUCKET_COLUMNS} FROM buckets {where} ORDER BY name")
        return [_bucket_from_row(row) for row in rows]

    def purge_bucket(self, name: str) -> None:
        """Remove a bucket row for good (tombstone garbage collection)."""
        old = self._bucket_digest(name)
        if old is not None:
            self._write("DELETE FROM buckets WHERE name = ?", (name,))
            self._shift_range(range_of(name, ""), old, None)

    def bucket_has_live_objects(self, name: str) -> bool:
        row = self.conn.execute("SELECT 1 FROM objects WHERE bucket = ? AND deleted = 0 LIMIT 1", (name,))
        return row.fetchone() is not None

    # -- objects -----------------------------------------------------------------------------
    def get_object(self, bucket: str, key: str) -> ObjectRecord | None:
        row = self.conn.execute(
            f"SELECT {_OBJECT_COLUMNS} FROM objects WHERE bucket = ? AND key = ?", (bucket, key)
        ).fetchone()
        return object_from_row(row) if row else None

    def put_object(self, record: ObjectRecord) -> None:
        """Insert or replace the row of ``(record.bucket, record.key)``."""
        old = self._object_digest(record.bucket, record.key)
        vv = record.vv.to_json()
        sync_range = range_of(record.bucket, record.key)
        self._write(
            f"INSERT INTO objects ({_OBJECT_COLUMNS}, sync_range) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (bucket, key) DO UPDATE SET size = excluded.size, etag = excluded.etag, "
            "last_modified_us = excluded.last_modified_us, content_type = excluded.content_type, "
            "headers = excluded.headers, user_meta = excluded.user_meta, chunks = excluded.chunks, "
            "vv = excluded.vv, writer = excluded.writer, deleted = excluded.deleted, parts = excluded.parts, "
            "sync_range = excluded.sync_range",
            (
                record.bucket,
                record.key,
                record.size,
                record.etag,
                record.last_modified_us,
                record.content_type,
                _dump(record.headers),
                _dump(record.user_meta),
                encode_chunks(record.chunks),
                vv,
                record.writer,
                int(record.deleted),
                json.dumps(list(record.parts)) if record.parts is not None else None,
                sync_range,
            ),
        )
        new = row_digest(record.bucket, record.key, vv, record.last_modified_us, int(record.deleted),
                         record.etag, record.writer)
        self._shift_range(sync_range, old, new)

    def purge_object(self, bucket: str, key: str) -> None:
        """Remove an object row for good (tombstone garbage collection)."""
        old = self._object_digest(bucket, key)
        if old is not None:
            self._write("DELETE FROM objects WHERE bucket = ? AND key = ?", (bucket, key))
            self._shift_range(range_of(bucket, key), old, None)

    # -- the manifest sync's view ------------------------------------------------------------
    def _bucket_digest(self, name: str) -> bytes | None:
        row = self.conn.execute(
            f"SELECT {_BUCKET_MANIFEST_COLUMNS} FROM buckets WHERE name = ?", (name,)).fetchone()
        return row_digest(*row) if row else None

    def _object_digest(self, bucket: str, key: str) -> bytes | None:
        row = self.conn.execute(
            f"SELECT {_OBJECT_MANIFEST_COLUMNS} FROM objects WHERE bucket = ? AND key = ?", (bucket, key)).fetchone()
        return row_digest(*row) if row else None

    def _shift_range(self, sync_range: int, removed: bytes | None, added: bytes | None) -> None:
        """Take one row's old digest out of its range's digest and put its new one in."""
        if removed == added:
            return  # the same row again (an idempotent re-apply)
        row = self.conn.execute("SELECT count, digest FROM range_digests WHERE range = ?", (sync_range,)).fetchone()
        count, digest = (row[0], int.from_bytes(row[1], "big")) if row else (0, 0)
        for change, sign in ((removed, -1), (added, 1)):
            if change is not None:
                count += sign
                digest ^= int.from_bytes(change, "big")
        self._write("INSERT OR REPLACE INTO range_digests (range, count, digest) VALUES (?, ?, ?)",
                    (sync_range, count, digest.to_bytes(_RANGE_DIGEST_BYTES, "big")))

    def range_digests(self) -> tuple[list[int], list[int]]:
        """Per range (``storage.manifest.DEFAULT_RANGES`` of them): row count, XOR of row digests."""
        counts, hashes = [0] * DEFAULT_RANGES, [0] * DEFAULT_RANGES
        for index, count, digest in self.conn.execute("SELECT range, count, digest FROM range_digests"):
            counts[index], hashes[index] = count, int.from_bytes(digest, "big")
        return counts, hashes

    def manifest_rows(self, ranges: Iterable[int], *, deleted_only: bool = False) -> list[tuple[int, ManifestRow]]:
        """``(range, row)`` of every object and bucket row in ``ranges`` (tombstones only if asked)."""
        wanted = sorted(set(ranges))
        found: list[tuple[int, ManifestRow]] = []
        dead = " AND deleted = 1" if deleted_only else ""
        for start in range(0, len(wanted), 500):
            batch = wanted[start : start + 500]
            marks = ",".join("?" * len(batch))
            for table, columns in (("objects", _OBJECT_MANIFEST_COLUMNS), ("buckets", _BUCKET_MANIFEST_COLUMNS)):
                rows = self.conn.execute(
                    f"SELECT sync_range, {columns} FROM {table} WHERE sync_range IN ({marks}){dead}", batch)
                found += [(row[0], row[1:]) for row in rows]
        return found

    def scan_live_objects(
        self, bucket: str, lower: str, lower_inclusive: bool, upper: str | None, limit: int
    ) -> Iterator[tuple[Any, ...]]:
        """Raw rows of live objects with ``lower <(=) key < upper`` in key order, fetched lazily.

        Rows are decoded with ``object_from_row`` only when used (a listing skips many).
        """
        op = ">=" if lower_inclusive else ">"
        sql = f"SELECT {_OBJECT_COLUMNS} FROM objects WHERE bucket = ? AND deleted = 0 AND key {op} ?"
        params: tuple[Any, ...] = (bucket, lower)
        if upper is not None:
            sql += " AND key < ?"
            params += (upper,)
        return iter(self.conn.execute(sql + " ORDER BY key LIMIT ?", params + (limit,)))

    def iter_objects(self, bucket: str | None = None, include_deleted: bool = True) -> Iterator[ObjectRecord]:
        """Every object row (tombstones included by default), by bucket then key."""
        clauses, params = [], []
        if bucket is not None:
            clauses.append("bucket = ?")
            params.append(bucket)
        if not include_deleted:
            clauses.append("deleted = 0")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        for row in self.conn.execute(
            f"SELECT {_OBJECT_COLUMNS} FROM objects {where} ORDER BY bucket, key", params
        ):
            yield object_from_row(row)

    # -- multipart ---------------------------------------------------------------------------
    def get_upload(self, upload_id: str) -> UploadRecord | None:
        row = self.conn.execute(
            f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE upload_id = ?", (upload_id,)
        ).fetchone()
        return _upload_from_row(row) if row else None

    def put_upload(self, record: UploadRecord) -> None:
        self._write(
            f"INSERT INTO uploads ({_UPLOAD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.upload_id,
                record.bucket,
                record.key,
                record.owner,
                record.initiated_us,
                record.content_type,
                _dump(record.headers),
                _dump(record.user_meta),
            ),
        )

    def delete_upload(self, upload_id: str) -> bool:
        """Remove an upload and its parts; False if there was none."""
        self._write("DELETE FROM parts WHERE upload_id = ?", (upload_id,))
        return self._write("DELETE FROM uploads WHERE upload_id = ?", (upload_id,)).rowcount > 0

    def delete_uploads_of_bucket(self, bucket: str) -> None:
        self._write(
            "DELETE FROM parts WHERE upload_id IN (SELECT upload_id FROM uploads WHERE bucket = ?)", (bucket,)
        )
        self._write("DELETE FROM uploads WHERE bucket = ?", (bucket,))

    def put_part(self, record: PartRecord) -> None:
        """Insert or replace a part (re-uploading a part number replaces it)."""
        self._write(
            f"INSERT OR REPLACE INTO parts ({_PART_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (
                record.upload_id,
                record.part_number,
                record.size,
                record.etag,
                record.last_modified_us,
                encode_chunks(record.chunks),
            ),
        )

    def get_parts(self, upload_id: str, after: int = 0, limit: int | None = None) -> list[PartRecord]:
        """Parts with ``part_number > after`` in ascending order."""
        sql = (
            f"SELECT {_PART_COLUMNS} FROM parts WHERE upload_id = ? AND part_number > ? ORDER BY part_number"
        )
        params: tuple[Any, ...] = (upload_id, after)
        if limit is not None:
            sql += " LIMIT ?"
            params += (limit,)
        return [_part_from_row(row) for row in self.conn.execute(sql, params)]

    def list_uploads(
        self, bucket: str, prefix: str, key_marker: str, upload_id_marker: str, limit: int
    ) -> list[UploadRecord]:
        """Uploads of ``bucket`` after the markers, ordered by key then upload ID (= initiation)."""
        if key_marker and upload_id_marker:
            after = "(key > ? OR (key = ? AND upload_id > ?))"
            params: tuple[Any, ...] = (key_marker, key_marker, upload_id_marker)
        else:
            after, params = "key > ?", (key_marker,)
        sql = (
            f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE bucket = ? AND {after} "
            "AND substr(key, 1, ?) = ? ORDER BY key, upload_id LIMIT ?"
        )
        rows = self.conn.execute(sql, (bucket, *params, len(prefix), prefix, limit))
        return [_upload_from_row(row) for row in rows]

    # -- outbox ------------------------------------------------------------------------------
    def append_outbox(self, kind: str, bucket: str, key: str = "") -> None:
        self._write(
            "INSERT INTO outbox (kind, bucket, key, created_us) VALUES (?, ?, ?, ?)",
            (kind, bucket, key, now_us()),
        )

    # -- garbage collection helpers ----------------------------------------------------------
    def referenced_chunk_hashes(self) -> set[str]:
        """Every chunk hash referenced by an object row or an in-progress upload's part."""
        hashes: set[str] = set()
        for table in ("objects", "parts"):
            for (blob,) in self.conn.execute(f"SELECT chunks FROM {table}"):
                hashes.update(digest.hex() for digest, _ in _CHUNK.iter_unpack(blob))
        return hashes


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


def _fill_range_digests(conn: sqlite3.Connection) -> None:
    """Compute ``sync_range`` of every row and the range digests from scratch (schema upgrade)."""
    counts, hashes = [0] * DEFAULT_RANGES, [0] * DEFAULT_RANGES
    for table, columns, names in (("objects", _OBJECT_MANIFEST_COLUMNS, "bucket = ? AND key = ?"),
                                  ("buckets", _BUCKET_MANIFEST_COLUMNS, "name = ?")):
        updates = []
        for row in conn.execute(f"SELECT {columns} FROM {table}").fetchall():
            index = range_of(row[0], row[1])
            counts[index] += 1
            hashes[index] ^= int.from_bytes(row_digest(*row), "big")
            updates.append((index, *(row[:2] if table == "objects" else row[:1])))
        conn.executemany(f"UPDATE {table} SET sync_range = ? WHERE {names}", updates)
    conn.execute("DELETE FROM range_digests")
    conn.executemany("INSERT INTO range_digests (range, count, digest) VALUES (?, ?, ?)",
                     [(index, counts[index], hashes[index].to_bytes(_RANGE_DIGEST_BYTES, "big"))
                      for index in range(DEFAULT_RANGES) if counts[index]])


def _is_disk_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)


class MetadataStore:
    """The metadata database of one data directory (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # Writers queue on a thread lock, then on an flock shared by every process of the data
        # directory, before BEGIN IMMEDIATE: SQLite's own busy handler polls with growing sleeps,
        # which turned contention into p99 latencies of tens of milliseconds.
        self._write_lock = threading.Lock()
        self._lock_path = self.path.with_name(self.path.name + ".writelock")
        self._lock_fd: int | None = None
        self._lock_pid = 0
        # Connections a forked child inherited: kept referenced so they are never closed (closing
        # them could disturb the parent's locks), never used.
        self._inherited: list[sqlite3.Connection] = []
        self._migrate()
        with self.read() as tx:
            row = tx.conn.execute("SELECT value FROM node_info WHERE name = 'incarnation'").fetchone()
        self.incarnation: str = row[0]

    # -- connections -------------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        pid = os.getpid()
        if conn is not None and local.pid == pid:
            return conn
        if conn is not None:
            self._inherited.append(conn)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous = FULL")
        local.conn, local.pid, local.tx = conn, pid, None
        return conn

    def close(self) -> None:
        """Close this thread's connection (others close when their thread's local is collected)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    def _migrate(self) -> None:
        conn = self._connection()
        # Persistent per database file; switching needs no transaction in progress.
        enable_wal(conn, BUSY_TIMEOUT_MS / 1000)
        with self.write() as tx:
            version = tx.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.path} has schema version {version}; this software knows up to "
                    f"{SCHEMA_VERSION} (was it written by a newer version?)"
                )
            if version == 0:
                for statement in _SCHEMA_V1:
                    tx.conn.execute(statement)
                # New database, new incarnation: a node whose disk was wiped never reuses the
                # version-vector counters it handed out before.
                tx.conn.execute(
                    "INSERT INTO node_info (name, value) VALUES ('incarnation', ?)", (secrets.token_hex(8),)
                )
                tx.conn.execute(
                    "INSERT INTO node_info (name, value) VALUES ('created_us', ?)", (str(now_us()),)
                )
            if version < 2:
                for statement in _SCHEMA_V2:
                    tx.conn.execute(statement)
                _fill_range_digests(tx.conn)
            # Later schema versions: "if version < 3: ..." steps go here, in order.
            if version < SCHEMA_VERSION:
                tx.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- transactions ------------------------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[Tx]:
        """A ``BEGIN IMMEDIATE`` transaction: committed on normal exit, rolled back on error.

        Nested inside another ``write`` of the same thread, joins it.
        """
        conn = self._connection()
        current: Tx | None = self._local.tx
        if current is not None:
            if not current.writable:
                raise RuntimeError("cannot start a write transaction inside a read transaction")
            yield current
            return
        tx = Tx(conn, writable=True)
        with self._writer_turn():
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if _is_disk_full(exc):
                    raise InsufficientStorage(f"metadata database: {exc}") from exc
                raise
            self._local.tx = tx
            try:
                yield tx
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and _is_disk_full(exc):
                    raise InsufficientStorage(f"metadata database: {exc}") from exc
                raise
            finally:
                self._local.tx = None

    @contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """Exclusive right to write, across the threads and processes of this data directory."""
        with self._write_lock:
            pid = os.getpid()
            if self._lock_fd is None or self._lock_pid != pid:
                # A forked child must not share the parent's open file description (flock is per
                # description), so it opens its own.
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                self._lock_pid = pid
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read transaction: one consistent snapshot for several queries (joins an open one)."""
        conn = self._connection()
        current: Tx | None = self._local.tx
        if current is not None:
            yield current
            return
        tx = Tx(conn, writable=False)
        conn.execute("BEGIN")
        self._local.tx = tx
        try:
            yield tx
        finally:
            self._local.tx = None
            if conn.in_transaction:
                conn.execute("COMMIT")

    # -- shortcuts ---------------------------------------------------------------------------
    def get_object(self, bucket: str, key: str) -> ObjectRecord | None:
        """The row of a key, tombstone included (None if the key was never written)."""
        with self.read() as tx:
            return tx.get_object(bucket, key)

    def get_bucket(self, name: str) -> BucketRecord | None:
        with self.read() as tx:
            return tx.get_bucket(name)

    def referenced_chunk_hashes(self) -> set[str]:
        with self.read() as tx:
            return tx.referenced_chunk_hashes()

    # -- outbox ------------------------------------------------------------------------------
    def outbox_after(self, seq: int = 0, limit: int = 1000) -> list[OutboxEntry]:
        """Replication intents with a sequence number above ``seq``, oldest first."""
        with self.read() as tx:
            rows = tx.conn.execute(
                "SELECT seq, kind, bucket, key, created_us FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            )
            return [OutboxEntry(*row) for row in rows]

    def outbox_remove(self, seqs: Iterable[int]) -> int:
        """Drop consumed intents; returns how many were removed."""
        seqs = list(seqs)
        removed = 0
        with self.write() as tx:
            for start in range(0, len(seqs), 500):
                batch = seqs[start : start + 500]
                marks = ",".join("?" * len(batch))
                removed += tx.conn.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", batch).rowcount
        return removed
