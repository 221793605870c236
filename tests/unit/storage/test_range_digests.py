"""The metadata store keeps the manifest sync's range digests current on every row write.

Property: after any sequence of object and bucket writes, tombstones, purges and rolled-back
transactions, the stored ``range_digests`` equal the digests computed from scratch over every row
(``storage.manifest.build_digests``), and a schema-1 database is upgraded to the same digests.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.chunks import ChunkRef
from storage.manifest import DEFAULT_RANGES, ManifestEntry, RangeDigests, build_digests, range_of
from storage.metadata import BucketRecord, MetadataStore, ObjectRecord
from storage.versions import VersionVector


def object_record(key: str, counter: int, deleted: bool) -> ObjectRecord:
    return ObjectRecord(bucket="b", key=key, size=0 if deleted else 3, etag="" if deleted else f"e{counter}",
                        last_modified_us=1000 + counter, content_type="text/plain", headers={}, user_meta={},
                        chunks=() if deleted else (ChunkRef("a" * 64, 3),), vv=VersionVector({"n.1": counter}),
                        writer="n.1", deleted=deleted)


def bucket_record(name: str, counter: int, deleted: bool) -> BucketRecord:
    return BucketRecord(name=name, owner="o", created_us=1, modified_us=1000 + counter,
                        vv=VersionVector({"n.1": counter}), writer="n.1", deleted=deleted)


def stored(meta: MetadataStore) -> RangeDigests:
    with meta.read() as tx:
        counts, hashes = tx.range_digests()
    return RangeDigests(tuple(counts), tuple(hashes))


def from_scratch(meta: MetadataStore) -> RangeDigests:
    with meta.read() as tx:
        entries = [ManifestEntry(o.bucket, o.key, o.vv, o.last_modified_us, o.deleted, o.etag, o.writer)
                   for o in tx.iter_objects()]
        entries += [ManifestEntry(b.name, "", b.vv, b.modified_us, b.deleted, "", b.writer)
                    for b in tx.list_buckets(include_deleted=True)]
    return build_digests(entries)


KEYS = st.sampled_from(["a", "b", "c/d", "ünï", "e" * 40])
BUCKETS = st.sampled_from(["b", "photos", "logs"])
OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), KEYS, st.booleans()),
    st.tuples(st.just("purge"), KEYS, st.just(False)),
    st.tuples(st.just("bucket"), BUCKETS, st.booleans()),
    st.tuples(st.just("purge-bucket"), BUCKETS, st.just(False)),
    st.tuples(st.just("rolled-back"), KEYS, st.booleans()),
), max_size=30)


@settings(max_examples=60, deadline=None)
@given(ops=OPS)
def test_stored_digests_equal_the_digests_of_every_row(tmp_path_factory: pytest.TempPathFactory,
                                                        ops: list[tuple[str, str, bool]]) -> None:
    meta = MetadataStore(tmp_path_factory.mktemp("meta") / "metadata.db")
    for counter, (op, name, deleted) in enumerate(ops, start=1):
        if op == "rolled-back":
            with pytest.raises(RuntimeError), meta.write() as tx:
                tx.put_object(object_record(name, counter, deleted))
                raise RuntimeError("aborted")
            continue
        with meta.write() as tx:
            if op == "put":
                tx.put_object(object_record(name, counter, deleted))
            elif op == "purge":
                tx.purge_object("b", name)
            elif op == "bucket":
                tx.put_bucket(bucket_record(name, counter, deleted))
            else:
                tx.purge_bucket(name)
        assert stored(meta) == from_scratch(meta), (op, name)
    meta.close()


def test_the_same_row_written_again_changes_nothing(tmp_path: Path) -> None:
    meta = MetadataStore(tmp_path / "metadata.db")
    with meta.write() as tx:
        tx.put_object(object_record("k", 1, False))
    before = stored(meta)
    with meta.write() as tx:
        tx.put_object(object_record("k", 1, False))
    assert stored(meta) == before == from_scratch(meta)
    assert before.total == 1


def test_rows_and_tombstones_are_read_by_range(tmp_path: Path) -> None:
    meta = MetadataStore(tmp_path / "metadata.db")
    with meta.write() as tx:
        tx.put_bucket(bucket_record("b", 1, False))
        tx.put_object(object_record("live", 2, False))
        tx.put_object(object_record("gone", 3, True))
    with meta.read() as tx:
        everything = tx.manifest_rows(range(DEFAULT_RANGES))
        dead = tx.manifest_rows(range(DEFAULT_RANGES), deleted_only=True)
        only_live = tx.manifest_rows([range_of("b", "live")])
    assert sorted((row[0], row[1]) for _, row in everything) == [("b", ""), ("b", "gone"), ("b", "live")]
    assert all(index == range_of(row[0], row[1]) for index, row in everything)
    assert [(row[1], row[4]) for _, row in dead] == [("gone", 1)]
    assert ("b", "live") in {(row[0], row[1]) for _, row in only_live}


def test_a_schema_1_database_gets_its_range_digests_on_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "metadata.db"
    meta = MetadataStore(path)
    with meta.write() as tx:
        tx.put_bucket(bucket_record("b", 1, False))
        for n in range(50):
            tx.put_object(object_record(f"k{n}", n + 2, n % 7 == 0))
    expected = from_scratch(meta)
    meta.close()
    # Back to schema 1: no sync_range columns, no range_digests table.
    conn = sqlite3.connect(path)
    for statement in ("DROP INDEX objects_by_range", "DROP INDEX objects_dead_by_range", "DROP TABLE range_digests",
                      "ALTER TABLE objects DROP COLUMN sync_range", "ALTER TABLE buckets DROP COLUMN sync_range",
                      "PRAGMA user_version = 1"):
        conn.execute(statement)
    conn.commit()
    conn.close()
    upgraded = MetadataStore(path)
    assert stored(upgraded) == expected and expected.total == 51
    with upgraded.read() as tx:
        assert tx.conn.execute("SELECT COUNT(*) FROM objects WHERE sync_range < 0").fetchone()[0] == 0
        assert len(tx.manifest_rows(range(DEFAULT_RANGES))) == 51
