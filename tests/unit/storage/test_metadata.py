"""MetadataStore: SQLite settings, schema, incarnation, connections per thread and process, records."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from storage.chunks import ChunkRef
from storage.errors import StorageError
from storage.metadata import (
    SCHEMA_VERSION,
    BucketRecord,
    MetadataStore,
    ObjectRecord,
    decode_chunks,
    encode_chunks,
)
from storage.versions import VersionVector


@pytest.fixture
def meta(tmp_path: Path) -> MetadataStore:
    return MetadataStore(tmp_path / "meta" / "metadata.db")


def record(key: str = "k", **changes: object) -> ObjectRecord:
    fields: dict[str, object] = dict(
        bucket="b", key=key, size=3, etag="abc", last_modified_us=5, content_type="text/plain",
        headers={"Cache-Control": "no-cache"}, user_meta={"colour": "blau"},
        chunks=(ChunkRef("a" * 64, 3),), vv=VersionVector({"n.1": 1}), writer="n.1")
    fields.update(changes)
    return ObjectRecord(**fields)  # type: ignore[arg-type]


def test_sqlite_settings(meta: MetadataStore) -> None:
    with meta.read() as tx:
        assert tx.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert tx.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert tx.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
        assert tx.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_incarnation_is_random_per_database_and_stable_per_file(tmp_path: Path) -> None:
    a = MetadataStore(tmp_path / "a.db")
    b = MetadataStore(tmp_path / "b.db")
    assert len(a.incarnation) == 16 and a.incarnation != b.incarnation
    assert MetadataStore(tmp_path / "a.db").incarnation == a.incarnation


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    MetadataStore(path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StorageError, match="newer"):
        MetadataStore(path)


def test_write_rolls_back_on_error_and_commits_otherwise(meta: MetadataStore) -> None:
    with pytest.raises(RuntimeError), meta.write() as tx:
        tx.put_object(record())
        tx.append_outbox("put", "b", "k")
        raise RuntimeError("boom")
    assert meta.get_object("b", "k") is None
    assert meta.outbox_after() == []
    with meta.write() as tx:
        tx.put_object(record())
        tx.append_outbox("put", "b", "k")
    assert meta.get_object("b", "k") == record()
    [entry] = meta.outbox_after()
    assert (entry.kind, entry.bucket, entry.key) == ("put", "b", "k")


def test_read_transactions_cannot_write_and_writes_nest(meta: MetadataStore) -> None:
    with meta.read() as tx, pytest.raises(RuntimeError):
        tx.put_object(record())
    with meta.read(), pytest.raises(RuntimeError), meta.write():
        pass
    with meta.write() as outer:
        with meta.write() as inner:
            assert inner is outer
            inner.put_object(record())
        with meta.read() as reader:
            assert reader.get_object("b", "k") is not None
    assert meta.get_object("b", "k") is not None


def test_records_round_trip(meta: MetadataStore) -> None:
    tombstone = record("gone", size=0, etag="", chunks=(), deleted=True, headers={}, user_meta={})
    multipart = record("mp", etag="ff-2", parts=(5, 3), size=8,
                       chunks=(ChunkRef("b" * 64, 5), ChunkRef("c" * 64, 3)))
    unicode_meta = record("ü/ключ", user_meta={"note": "größe ☃"})
    with meta.write() as tx:
        for r in (record(), tombstone, multipart, unicode_meta):
            tx.put_object(r)
    for r in (record(), tombstone, multipart, unicode_meta):
        assert meta.get_object("b", r.key) == r
        assert ObjectRecord.from_dict(r.to_dict()) == r
    bucket = BucketRecord("b", "o", 1, VersionVector({"n.1": 2}), True, 7, "n.1")
    with meta.write() as tx:
        tx.put_bucket(bucket)
    assert meta.get_bucket("b") == bucket
    assert BucketRecord.from_dict(bucket.to_dict()) == bucket


def test_chunk_list_encoding() -> None:
    refs = tuple(ChunkRef(f"{i:064x}", i * 1000) for i in range(100))
    blob = encode_chunks(refs)
    assert len(blob) == 40 * 100
    assert decode_chunks(blob) == refs
    assert decode_chunks(b"") == ()


def test_one_connection_per_thread(meta: MetadataStore) -> None:
    seen: dict[str, int] = {}

    def grab(name: str) -> None:
        with meta.read() as tx:
            seen[name] = id(tx.conn)

    threads = [threading.Thread(target=grab, args=(f"t{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    grab("main")
    first = seen["main"]
    grab("main")
    assert seen["main"] == first
    assert len(set(seen.values())) == 4


def test_forked_child_opens_its_own_connection(meta: MetadataStore) -> None:
    with meta.write() as tx:
        tx.put_object(record("parent"))
    pid = os.fork()
    if pid == 0:  # child: must not use the parent's connection
        code = 1
        try:
            with meta.write() as tx:
                tx.put_object(record("child"))
            code = 0 if meta.get_object("b", "parent") is not None else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert meta.get_object("b", "child") is not None
    with meta.write() as tx:  # the parent's connection still works
        tx.put_object(record("after"))


def test_outbox_consumption(meta: MetadataStore) -> None:
    with meta.write() as tx:
        for i in range(5):
            tx.append_outbox("put", "b", f"k{i}")
    entries = meta.outbox_after()
    assert [e.key for e in entries] == [f"k{i}" for i in range(5)]
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    assert meta.outbox_after(entries[2].seq) == entries[3:]
    assert meta.outbox_remove(e.seq for e in entries[:3]) == 3
    assert meta.outbox_after() == entries[3:]


def test_referenced_chunk_hashes_and_iteration(meta: MetadataStore) -> None:
    with meta.write() as tx:
        tx.put_object(record("a", chunks=(ChunkRef("1" * 64, 1),)))
        tx.put_object(record("z", chunks=(ChunkRef("2" * 64, 1),), deleted=True))
    assert meta.referenced_chunk_hashes() == {"1" * 64, "2" * 64}
    with meta.read() as tx:
        assert [r.key for r in tx.iter_objects("b")] == ["a", "z"]
        assert [r.key for r in tx.iter_objects(include_deleted=False)] == ["a"]
    with meta.write() as tx:
        tx.purge_object("b", "z")
    assert meta.get_object("b", "z") is None
