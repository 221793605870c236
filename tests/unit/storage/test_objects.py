"""ObjectStore: objects, buckets, versions, tombstones, keys, failures mid-stream, concurrency."""

from __future__ import annotations

import errno
import hashlib
import io
import multiprocessing
import os
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from storage.chunks import ChunkRef
from storage.errors import (
    BadDigest,
    BucketAlreadyExists,
    BucketAlreadyOwnedByYou,
    BucketNotEmpty,
    ChunkMissing,
    CorruptChunk,
    IncompleteBody,
    InsufficientStorage,
    InvalidArgument,
    InvalidObjectKey,
    NoSuchBucket,
    NoSuchKey,
    NoSuchUpload,
    PreconditionFailed,
)
from storage.objects import ObjectMeta, ObjectStore
from storage.versions import VersionVector
from tests.unit.storage.util import CHUNK, files_under, get, pattern, put


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class ExactReader:
    """A body that fails the test if more than ``limit`` bytes are requested in total."""

    def __init__(self, data: bytes, limit: int) -> None:
        self.stream = io.BytesIO(data)
        self.limit = limit
        self.requested = 0

    def read(self, n: int) -> bytes:
        self.requested += n
        assert self.requested <= self.limit, "read past Content-Length"
        return self.stream.read(n)


class TrickleReader:
    """Returns at most ``step`` bytes per read, like a socket."""

    def __init__(self, data: bytes, step: int) -> None:
        self.stream = io.BytesIO(data)
        self.step = step

    def read(self, n: int) -> bytes:
        return self.stream.read(min(n, self.step))


class FailingReader:
    """Yields ``good`` bytes, then raises (a client disconnect, a bad aws-chunked signature)."""

    def __init__(self, good: bytes) -> None:
        self.stream = io.BytesIO(good)

    def read(self, n: int) -> bytes:
        data = self.stream.read(n)
        if not data:
            raise ConnectionResetError("client went away")
        return data


# -- put / get -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17])
def test_put_get_sizes(store: ObjectStore, size: int) -> None:
    data = pattern(size, seed=size)
    rec = put(store, "obj", data)
    assert rec.size == size
    assert rec.etag == md5(data)
    assert len(rec.chunks) == -(-size // CHUNK)
    assert all(c.size == CHUNK for c in rec.chunks[:-1])
    assert get(store, "obj") == data
    assert store.head_object("b", "obj") == rec


def test_unknown_length_and_short_reads(store: ObjectStore) -> None:
    data = pattern(2 * CHUNK + 5000, seed=1)
    rec = store.put_object("b", "k", TrickleReader(data, 7000), content_length=None)
    assert rec.size == len(data) and rec.etag == md5(data)
    assert [c.size for c in rec.chunks] == [CHUNK, CHUNK, 5000]
    rec2 = store.put_object("b", "k2", TrickleReader(data, 7000), content_length=len(data))
    assert rec2.chunks == rec.chunks  # the same chunks whatever the read sizes


def test_ranges_at_chunk_boundaries(store: ObjectStore) -> None:
    data = pattern(4 * CHUNK + 100, seed=2)
    rec = put(store, "r", data)
    edges = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 4 * CHUNK, len(data) - 1, len(data)]
    for start in edges:
        for end in edges:
            if start <= end:
                assert b"".join(store.read_object(rec, start, end)) == data[start:end], (start, end)
    assert b"".join(store.read_object(rec, 10)) == data[10:]
    assert b"".join(store.read_object(rec, 0, len(data) + 999)) == data  # end is clamped
    # Chunks wholly outside the range are not even read.
    pieces = list(store.read_object(rec, CHUNK, 2 * CHUNK))
    assert pieces == [data[CHUNK:2 * CHUNK]]
    with pytest.raises(InvalidArgument):
        store.read_object(rec, 5, 4)
    with pytest.raises(InvalidArgument):
        store.read_object(rec, -1)


def test_content_md5(store: ObjectStore) -> None:
    data = b"payload"
    good = hashlib.md5(data).digest()
    assert put(store, "k", data, content_md5=good).etag == good.hex()
    with pytest.raises(BadDigest):
        put(store, "k", b"other payload", content_md5=good)
    assert get(store, "k") == data  # the previous version is untouched
    with pytest.raises(BadDigest):
        put(store, "new", b"x", content_md5=good)
    with pytest.raises(NoSuchKey):
        store.head_object("b", "new")
    with pytest.raises(InvalidArgument):
        put(store, "k", data, content_md5=b"short")


def test_incomplete_body_commits_nothing(store: ObjectStore) -> None:
    put(store, "k", b"old")
    outbox = len(store.meta.outbox_after())
    with pytest.raises(IncompleteBody) as info:
        store.put_object("b", "k", io.BytesIO(b"x" * 1000), content_length=5000)
    assert (info.value.expected, info.value.received) == (5000, 1000)
    assert get(store, "k") == b"old"
    assert len(store.meta.outbox_after()) == outbox


def test_bytes_beyond_content_length_are_not_read(store: ObjectStore) -> None:
    data = pattern(CHUNK + 10, seed=3)
    body = ExactReader(data + b"TRAILING GARBAGE", len(data))
    rec = store.put_object("b", "k", body, content_length=len(data))
    assert rec.size == len(data) and get(store, "k") == data


def test_body_read_raising_mid_stream_leaves_the_old_object(store: ObjectStore) -> None:
    old = pattern(2 * CHUNK, seed=4)
    before = put(store, "k", old)
    with pytest.raises(ConnectionResetError):
        store.put_object("b", "k", FailingReader(pattern(3 * CHUNK, seed=5)), content_length=None)
    with pytest.raises(ConnectionResetError):
        store.put_object("b", "fresh", FailingReader(b"abc"), content_length=10)
    assert store.head_object("b", "k") == before
    assert get(store, "k") == old
    with pytest.raises(NoSuchKey):
        store.head_object("b", "fresh")
    assert [o.key for o in store.list_objects("b").objects] == ["k"]


def test_disk_full_mid_stream_leaves_nothing_visible(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    put(store, "k", b"old")
    real_write = os.write
    calls = {"n": 0}

    def write(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(InsufficientStorage):
        put(store, "k", pattern(5 * CHUNK, seed=6))
    monkeypatch.undo()
    assert get(store, "k") == b"old"
    assert list(os.scandir(store.chunks.tmp_dir)) == []


def test_min_free_space_refuses_writes(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = ObjectStore(data_dir, "n", chunk_size=CHUNK, min_free_space=10**6)
    s.create_bucket("b", "o")
    monkeypatch.setattr(s.chunks, "free_bytes", lambda: 10**6 + 100)
    with pytest.raises(InsufficientStorage):
        put(s, "k", b"y" * 1000)
    with pytest.raises(NoSuchKey):
        s.head_object("b", "k")
    s.close()


def test_metadata_is_kept_and_returned(store: ObjectStore) -> None:
    meta = ObjectMeta("text/plain; charset=utf-8",
                      {"Content-Disposition": "attachment", "Cache-Control": "max-age=60",
                       "x-amz-checksum-crc32": "AAAAAA=="},
                      {"colour": "grün", "n": "1"})
    rec = put(store, "k", b"text", meta=meta)
    head = store.head_object("b", "k")
    assert head == rec
    assert (head.content_type, head.headers, head.user_meta) == (meta.content_type, meta.headers, meta.user_meta)
    assert put(store, "plain", b"x").content_type == "application/octet-stream"


# -- versions, tombstones, stamps ---------------------------------------------------------------

def test_overwrite_and_delete_increment_the_vector(store: ObjectStore) -> None:
    me = store.actor
    assert me.startswith("peer0.") and me.endswith(store.meta.incarnation)
    r1 = put(store, "k", b"one")
    r2 = put(store, "k", b"two")
    assert r1.vv == VersionVector({me: 1}) and r2.vv == VersionVector({me: 2})
    assert r2.writer == me and r2.last_modified_us > r1.last_modified_us
    assert store.delete_object("b", "k") is True
    tomb = store.meta.get_object("b", "k")
    assert tomb is not None and tomb.deleted and tomb.vv == VersionVector({me: 3}) and tomb.chunks == ()
    assert store.delete_object("b", "k") is False  # idempotent: no new version
    assert store.meta.get_object("b", "k") == tomb
    with pytest.raises(NoSuchKey):
        store.head_object("b", "k")
    assert store.list_objects("b").objects == []
    r4 = put(store, "k", b"four")  # continues from the tombstone's vector
    assert r4.vv == VersionVector({me: 4}) and r4.last_modified_us > tomb.last_modified_us
    kinds = [(e.kind, e.key) for e in store.meta.outbox_after()]
    assert kinds == [("create_bucket", ""), ("put", "k"), ("put", "k"), ("delete", "k"), ("put", "k")]


def test_deleting_an_absent_key_writes_a_tombstone(store: ObjectStore) -> None:
    assert store.delete_object("b", "never") is False
    tomb = store.meta.get_object("b", "never")
    assert tomb is not None and tomb.deleted and tomb.vv == VersionVector({store.actor: 1})


def test_last_modified_never_goes_backwards(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    r1 = put(store, "k", b"1")
    monkeypatch.setattr(time, "time", lambda: r1.last_modified_us / 1e6 - 3600)  # clock jumps back 1 h
    r2 = put(store, "k", b"2")
    store.delete_object("b", "k")
    tomb = store.meta.get_object("b", "k")
    r3 = put(store, "k", b"3")
    assert r1.last_modified_us < r2.last_modified_us < tomb.last_modified_us < r3.last_modified_us  # type: ignore[union-attr]
    assert r3.last_modified_us - r1.last_modified_us == 3
    other = put(store, "other", b"x")  # a new key simply takes the (early) clock
    assert other.last_modified_us < r1.last_modified_us


def test_if_none_match_any(store: ObjectStore) -> None:
    put(store, "k", b"first", if_none_match_any=True)
    with pytest.raises(PreconditionFailed):
        put(store, "k", b"second", if_none_match_any=True)
    assert get(store, "k") == b"first"
    store.delete_object("b", "k")
    put(store, "k", b"third", if_none_match_any=True)  # a tombstone counts as absent
    assert get(store, "k") == b"third"


def test_if_none_match_is_checked_at_commit(store: ObjectStore) -> None:
    """A racing writer that commits while the body streams makes the conditional PUT fail."""

    class RacingReader:
        def __init__(self) -> None:
            self.raced = False
            self.stream = io.BytesIO(b"mine")

        def read(self, n: int) -> bytes:
            if not self.raced:
                self.raced = True
                put(store, "k", b"theirs")
            return self.stream.read(n)

    with pytest.raises(PreconditionFailed):
        store.put_object("b", "k", RacingReader(), content_length=4, if_none_match_any=True)
    assert get(store, "k") == b"theirs"


def test_if_match(store: ObjectStore) -> None:
    with pytest.raises(NoSuchKey):
        put(store, "k", b"first", if_match=frozenset({"*"}))  # nothing to match: S3 answers 404
    first = put(store, "k", b"first")
    with pytest.raises(PreconditionFailed):
        put(store, "k", b"second", if_match=frozenset({"0" * 32}))
    assert get(store, "k") == b"first"
    second = put(store, "k", b"second", if_match=frozenset({"0" * 32, first.etag}))
    put(store, "k", b"third", if_match=frozenset({"*"}))
    assert get(store, "k") == b"third" and second.etag != first.etag
    store.delete_object("b", "k")
    with pytest.raises(NoSuchKey):
        put(store, "k", b"fourth", if_match=frozenset({"*"}))  # a tombstone counts as absent


def test_if_match_is_checked_at_commit(store: ObjectStore) -> None:
    """A writer that commits while the body streams changes the ETag: the If-Match PUT fails."""
    first = put(store, "k", b"first")

    class RacingReader:
        def __init__(self) -> None:
            self.raced = False
            self.stream = io.BytesIO(b"mine")

        def read(self, n: int) -> bytes:
            if not self.raced:
                self.raced = True
                put(store, "k", b"theirs")
            return self.stream.read(n)

    with pytest.raises(PreconditionFailed):
        store.put_object("b", "k", RacingReader(), content_length=4, if_match=frozenset({first.etag}))
    assert get(store, "k") == b"theirs"


# -- copy ---------------------------------------------------------------------------------------

def test_copy_reuses_chunks(store: ObjectStore) -> None:
    store.create_bucket("dst", "owner")
    data = pattern(3 * CHUNK + 1, seed=7)
    src = put(store, "src", data, meta=ObjectMeta("image/png", {"Cache-Control": "no-store"}, {"a": "1"}))
    chunk_files = set(store.chunks.iter_hashes())
    copy = store.copy_object("b", "src", "dst", "copy")
    assert set(store.chunks.iter_hashes()) == chunk_files  # no data copied
    assert copy.chunks == src.chunks and copy.etag == src.etag and copy.size == src.size
    assert (copy.content_type, copy.headers, copy.user_meta) == (src.content_type, src.headers, src.user_meta)
    assert copy.vv == VersionVector({store.actor: 1})
    assert get(store, "copy", bucket="dst") == data
    replaced = store.copy_object("b", "src", "dst", "copy2", ObjectMeta("text/plain", {}, {"b": "2"}))
    assert (replaced.content_type, replaced.headers, replaced.user_meta) == ("text/plain", {}, {"b": "2"})


def test_copy_onto_itself_changes_metadata(store: ObjectStore) -> None:
    src = put(store, "k", b"data", meta=ObjectMeta("a/b", {}, {"v": "1"}))
    updated = store.copy_object("b", "k", "b", "k", ObjectMeta("c/d", {}, {"v": "2"}))
    assert updated.vv == VersionVector({store.actor: 2}) and updated.last_modified_us > src.last_modified_us
    assert store.head_object("b", "k").user_meta == {"v": "2"}
    assert get(store, "k") == b"data"


def test_copy_errors(store: ObjectStore) -> None:
    with pytest.raises(NoSuchKey):
        store.copy_object("b", "missing", "b", "x")
    put(store, "k", b"1")
    with pytest.raises(NoSuchBucket):
        store.copy_object("b", "k", "nope", "x")
    with pytest.raises(NoSuchBucket):
        store.copy_object("nope", "k", "b", "x")


# -- buckets ------------------------------------------------------------------------------------

def test_buckets(store: ObjectStore) -> None:
    with pytest.raises(BucketAlreadyOwnedByYou):
        store.create_bucket("b", "owner")
    with pytest.raises(BucketAlreadyExists):
        store.create_bucket("b", "someone-else")
    store.create_bucket("a", "x")
    assert [b.name for b in store.list_buckets()] == ["a", "b"]
    assert store.get_bucket("a").owner == "x"
    put(store, "k", b"1")
    with pytest.raises(BucketNotEmpty):
        store.delete_bucket("b")
    store.delete_object("b", "k")
    store.create_multipart("b", "upload", "owner")
    store.delete_bucket("b")  # tombstones and uploads do not count; the upload is aborted
    with pytest.raises(NoSuchBucket):
        store.get_bucket("b")
    with pytest.raises(NoSuchBucket):
        put(store, "k", b"2")
    with pytest.raises(NoSuchBucket):
        store.list_objects("b")
    tomb = store.meta.get_bucket("b")
    assert tomb is not None and tomb.deleted and tomb.vv == VersionVector({store.actor: 2})
    assert [b.name for b in store.list_buckets()] == ["a"]
    again = store.create_bucket("b", "new-owner")
    assert again.vv == VersionVector({store.actor: 3}) and again.owner == "new-owner"
    assert store.list_uploads("b").uploads == []
    with pytest.raises(NoSuchBucket):
        store.delete_bucket("zzz")


def test_missing_bucket(store: ObjectStore) -> None:
    for call in (lambda: put(store, "k", b"1", bucket="nope"), lambda: store.head_object("nope", "k"),
                 lambda: store.delete_object("nope", "k"), lambda: store.get_bucket("nope")):
        with pytest.raises(NoSuchBucket):
            call()


# -- keys ---------------------------------------------------------------------------------------

WEIRD_KEYS = [
    "..", "../../etc/passwd", "a/../../b", "//", "a//b", "/leading", "trailing/", ".", "./x",
    "ctrl\x01\x1f\x7f", "tab\tnew\nline", "üñíçødé/ключ/キー/🔑", "a" * 1024, "é" * 512,
    "%2e%2e/%00", "\\windows\\path", " ", "\ufeffbom",
]


def test_weird_keys_are_stored_by_value_and_never_become_paths(store: ObjectStore, data_dir: Path) -> None:
    before = files_under(data_dir)
    for i, key in enumerate(WEIRD_KEYS):
        put(store, key, f"value {i}".encode())
    for i, key in enumerate(WEIRD_KEYS):
        assert get(store, key) == f"value {i}".encode()
    listed = [o.key for o in store.list_objects("b").objects]
    assert listed == sorted(WEIRD_KEYS, key=lambda k: k.encode("utf-8"))
    # Only chunks (named by their hash) and SQLite's files appear: nothing is named after a key.
    for rel in files_under(data_dir) - before:
        name = os.path.basename(rel)
        assert (rel.startswith("chunks/") and re.fullmatch("[0-9a-f]{64}", name)) or \
            (rel.startswith("meta/") and name.startswith("metadata.db")), rel
    parent = data_dir.parent
    assert {p.name for p in parent.iterdir()} == {"data"}  # nothing escaped the data directory


@pytest.mark.parametrize("key, reason", [
    ("", "empty"), ("a\x00b", "nul"), ("a" * 1025, "too_long"), ("é" * 513, "too_long"),
    ("\udcff", "encoding"),
])
def test_invalid_keys(store: ObjectStore, key: str, reason: str) -> None:
    with pytest.raises(InvalidObjectKey) as info:
        put(store, key, b"1")
    assert info.value.reason == reason
    assert info.value.message
    if reason == "too_long":
        assert info.value.code == "KeyTooLongError"
    with pytest.raises(InvalidObjectKey):
        store.create_multipart("b", key, "o")


# -- chunk fetcher and corruption ---------------------------------------------------------------

def test_missing_chunks_come_from_the_fetcher(data_dir: Path) -> None:
    fetched: list[ChunkRef] = []
    remote: dict[str, bytes] = {}

    def fetch(ref: ChunkRef) -> bytes:
        fetched.append(ref)
        return remote[ref.hash]

    s = ObjectStore(data_dir, "n", chunk_size=CHUNK, chunk_fetcher=fetch)
    s.create_bucket("b", "o")
    data = pattern(2 * CHUNK + 3, seed=8)
    rec = put(s, "k", data)
    for ref in rec.chunks:  # move every chunk "to another coordinator"
        remote[ref.hash] = s.chunks.read(ref.hash)
        s.chunks.delete(ref.hash)
    assert get(s, "k") == data
    assert sorted(r.hash for r in fetched) == sorted(r.hash for r in rec.chunks)  # read-ahead: any order
    remote[rec.chunks[0].hash] = b"tampered"
    with pytest.raises(CorruptChunk):
        get(s, "k")
    del remote[rec.chunks[1].hash]
    with pytest.raises(ChunkMissing):  # a fetcher error becomes ChunkMissing
        b"".join(s.read_object(rec, CHUNK, CHUNK + 1))
    s.close()


def test_remote_chunks_are_fetched_ahead_in_parallel(data_dir: Path) -> None:
    remote: dict[str, bytes] = {}
    running = peak = 0
    lock = threading.Lock()

    def slow_fetch(ref: ChunkRef) -> bytes:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.1)  # a network round trip
        with lock:
            running -= 1
        return remote[ref.hash]

    s = ObjectStore(data_dir, "n", chunk_size=CHUNK, chunk_fetcher=slow_fetch)
    s.create_bucket("b", "o")
    data = pattern(8 * CHUNK, seed=10)
    rec = put(s, "k", data)
    for ref in rec.chunks:
        remote[ref.hash] = s.chunks.read(ref.hash)
        s.chunks.delete(ref.hash)
    started = time.monotonic()
    assert get(s, "k") == data
    elapsed = time.monotonic() - started
    assert peak >= 2, "remote chunks were fetched one at a time"
    assert elapsed < 8 * 0.1 * 0.75, f"no overlap: {elapsed:.2f}s for 8 fetches of 0.1s"
    s.close()


def test_corrupt_local_chunk_is_repaired_from_the_fetcher(data_dir: Path) -> None:
    copies: dict[str, bytes] = {}
    s = ObjectStore(data_dir, "n", chunk_size=CHUNK, chunk_fetcher=lambda ref: copies[ref.hash])
    s.create_bucket("b", "o")
    data = pattern(CHUNK, seed=9)
    rec = put(s, "k", data)
    copies[rec.chunks[0].hash] = data
    path = s.chunks.path(rec.chunks[0].hash)
    path.write_bytes(b"rotten" + data[6:])
    assert get(s, "k") == data
    assert s.chunks.corrupt_count() == 1
    assert s.chunks.read(rec.chunks[0].hash) == data  # repaired locally
    s.close()


def test_corruption_without_fetcher_is_reported_never_returned(store: ObjectStore) -> None:
    data = pattern(2 * CHUNK, seed=10)
    rec = put(store, "k", data)
    path = store.chunks.path(rec.chunks[1].hash)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    pieces = store.read_object(rec)
    assert next(pieces) == data[:CHUNK]  # the good chunk streams
    with pytest.raises(CorruptChunk):
        next(pieces)
    assert store.chunks.corrupt_count() == 1


# -- replication hooks --------------------------------------------------------------------------

def test_apply_remote_object(store: ObjectStore) -> None:
    local = put(store, "k", b"local")
    newer = replace(local, vv=local.vv.increment("other.1"), writer="other.1", etag="e2",
                              last_modified_us=local.last_modified_us + 10)
    assert store.apply_remote_object(newer) is True
    assert store.head_object("b", "k") == newer
    assert store.apply_remote_object(newer) is False  # duplicate delivery changes nothing
    assert store.apply_remote_object(local) is False  # an older version is ignored
    # Concurrent: the later stamp wins and the vectors merge.
    mine = put(store, "k", b"mine")  # vv {me:2, other.1:1}
    theirs = replace(newer, vv=newer.vv.increment("other.1"), etag="e3",
                               last_modified_us=mine.last_modified_us + 5)
    assert store.apply_remote_object(theirs) is True
    kept = store.head_object("b", "k")
    assert kept.etag == "e3" and kept.vv == mine.vv.merge(theirs.vv)
    # A remote tombstone that dominates deletes.
    tomb = replace(kept, vv=kept.vv.increment("other.1"), deleted=True, size=0, chunks=(), etag="")
    assert store.apply_remote_object(tomb) is True
    with pytest.raises(NoSuchKey):
        store.head_object("b", "k")
    assert store.apply_remote_object(kept) is False  # a delayed older PUT never resurrects


def test_apply_remote_bucket(store: ObjectStore) -> None:
    local = store.get_bucket("b")
    tomb = replace(local, vv=local.vv.increment("x.1"), deleted=True, modified_us=local.modified_us + 1)
    assert store.apply_remote_bucket(tomb) is True
    with pytest.raises(NoSuchBucket):
        store.get_bucket("b")
    assert store.apply_remote_bucket(local) is False
    assert store.apply_remote_bucket(replace(local, name="fresh")) is True
    assert store.get_bucket("fresh").owner == local.owner


# -- concurrency --------------------------------------------------------------------------------

def test_concurrent_puts_from_threads_serialise(store: ObjectStore) -> None:
    writers, rounds = 6, 15
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(rounds):
                put(store, "hot", pattern(CHUNK + 50, seed=n * 100 + i))
                put(store, f"own-{n}-{i}", b"x")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    hot = store.head_object("b", "hot")
    assert hot.vv == VersionVector({store.actor: writers * rounds})  # no lost increment
    data = get(store, "hot")
    assert hashlib.md5(data).hexdigest() == hot.etag
    assert data in {pattern(CHUNK + 50, seed=n * 100 + i) for n in range(writers) for i in range(rounds)}
    puts = [e for e in store.meta.outbox_after(limit=10_000) if e.kind == "put"]
    assert len(puts) == 2 * writers * rounds


def _process_writer(data_dir: str, n: int, rounds: int) -> None:
    s = ObjectStore(Path(data_dir), "peer0", chunk_size=CHUNK)
    for i in range(rounds):
        put(s, "hot", f"{n}:{i}".encode() * 100)
    s.close()


def test_concurrent_puts_from_processes_serialise(store: ObjectStore, data_dir: Path) -> None:
    procs, rounds = 3, 10
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_process_writer, args=(str(data_dir), n, rounds)) for n in range(procs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    hot = store.head_object("b", "hot")
    assert hot.vv == VersionVector({store.actor: procs * rounds})
    assert hashlib.md5(get(store, "hot")).hexdigest() == hot.etag
    assert len([e for e in store.meta.outbox_after(limit=1000) if e.key == "hot"]) == procs * rounds


def test_unstorable_names_are_not_found_rather_than_crashing(store: ObjectStore) -> None:
    with pytest.raises(NoSuchBucket):
        store.head_object("\udcff", "k")
    with pytest.raises(InvalidObjectKey):
        store.head_object("b", "\udcff")
    with pytest.raises(NoSuchBucket):
        store.list_objects("\udcff")
    with pytest.raises(NoSuchUpload):
        store.get_upload("\udcff")
    with pytest.raises(NoSuchKey):
        store.head_object("b", "a" * 1024)


class GeneratedBody:
    """A large body produced on the fly (never materialised by the test itself)."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.md5 = hashlib.md5()

    def read(self, n: int) -> bytes:
        data = os.urandom(min(n, self.left))
        self.left -= len(data)
        self.md5.update(data)
        return data


@pytest.mark.parametrize("write_ahead", [0, 1, 2])
def test_streaming_holds_only_a_few_chunks(data_dir: Path, write_ahead: int) -> None:
    import tracemalloc

    s = ObjectStore(data_dir, "n", chunk_size=CHUNK, fsync=False, write_ahead=write_ahead)
    s.create_bucket("b", "o")
    size = 64 * CHUNK
    body = GeneratedBody(size)
    tracemalloc.start()
    try:
        record = s.put_object("b", "big", body, content_length=size)
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        digest = hashlib.md5()
        for piece in s.read_object(record):
            digest.update(piece)
        _, get_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert record.etag == body.md5.hexdigest() == digest.hexdigest()
    assert put_peak < (write_ahead + 4) * CHUNK, put_peak
    assert get_peak < 4 * CHUNK, get_peak
    s.close()
