"""Garbage collection decisions and operations (storage/gc.py)."""

from __future__ import annotations

import io
import os
import random
import time
from pathlib import Path

from storage.gc import (
    TombstoneLedger,
    chunks_to_collect,
    collect_unreferenced_chunks,
    extra_copies,
    purge_tombstones,
    remove_idle_chunk,
    tombstones_due,
)
from storage.manifest import ManifestEntry
from storage.objects import ObjectStore
from storage.placement import place
from storage.versions import VersionVector

CHUNK = 64 * 1024


def make_store(tmp_path: Path) -> ObjectStore:
    store = ObjectStore(tmp_path / "d", "a" * 16, chunk_size=CHUNK, fsync=False, min_part_size=CHUNK)
    store.create_bucket("b", "o")
    return store


def age(store: ObjectStore, chunk_hash: str, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(store.chunks.path(chunk_hash), (past, past))


def test_pure_decision_keeps_referenced_and_young() -> None:
    stored = [("r", 0.0), ("old", 0.0), ("young", 95.0)]
    assert chunks_to_collect(stored, {"r"}, now=100.0, grace=10.0) == ["old"]


def test_unreferenced_chunks_removed_only_after_the_grace(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    kept = store.put_object("b", "kept", io.BytesIO(b"k" * 100), content_length=100)
    gone = store.put_object("b", "gone", io.BytesIO(b"g" * 100), content_length=100)
    store.delete_object("b", "gone")
    orphan = store.chunks.write(b"arrived before its metadata")
    report = collect_unreferenced_chunks(store.meta, store.chunks, grace=3600)
    assert report.removed == 0 and report.young == 2  # inside the grace: nothing goes
    for ref in (*kept.chunks, *gone.chunks, orphan):
        age(store, ref.hash, 7200)
    report = collect_unreferenced_chunks(store.meta, store.chunks, grace=3600)
    assert report.removed == 2
    assert store.chunks.exists(kept.chunks[0].hash)
    assert not store.chunks.exists(gone.chunks[0].hash) and not store.chunks.exists(orphan.hash)


def test_upload_in_progress_keeps_its_parts(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    upload = store.create_multipart("b", "mp", "o")
    part = store.upload_part(upload.upload_id, 1, io.BytesIO(b"p" * 1000), 1000)
    age(store, part.chunks[0].hash, 7200)
    collect_unreferenced_chunks(store.meta, store.chunks, grace=60)
    assert store.chunks.exists(part.chunks[0].hash)


def test_a_chunk_reused_during_collection_survives(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    ref = store.chunks.write(b"shared bytes")
    age(store, ref.hash, 7200)
    cutoff = time.time() - 3600
    store.chunks.write(b"shared bytes")  # a writer's dedup hit refreshes the mtime
    assert remove_idle_chunk(store.chunks, ref.hash, cutoff) == 0
    assert store.chunks.exists(ref.hash)


def test_everything_deleted_leaves_no_chunks(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    rng = random.Random(1)
    for i in range(20):
        data = rng.randbytes(rng.randrange(0, 3 * CHUNK))
        store.put_object("b", f"k{i}", io.BytesIO(data), content_length=len(data))
        store.delete_object("b", f"k{i}")
    collect_unreferenced_chunks(store.meta, store.chunks, grace=0, now=time.time() + 1)
    assert list(store.chunks.iter_hashes()) == []


def test_extra_copies_are_the_chunks_placement_gives_to_others() -> None:
    members = ["a" * 16, "b" * 16, "c" * 16]
    hashes = [f"{i:064x}" for i in range(200)]
    extras = extra_copies(hashes, members[0], members, 2)
    assert extras and all(members[0] not in place(h, members, 2) for h in extras)
    assert extra_copies(hashes, members[0], members[:1], 2) == []


def entry(key: str, vv: dict[str, int], deleted: bool = True) -> ManifestEntry:
    return ManifestEntry("b", key, VersionVector(vv), 1, deleted, "", "a")


def test_tombstone_grace_counts_from_confirmation(tmp_path: Path) -> None:
    ledger = TombstoneLedger(tmp_path / "t.db")
    tomb = entry("k", {"a": 2})
    ledger.confirm([tomb], now_us=1_000)
    assert tombstones_due([tomb], ledger.since(), now_us=1_500, grace_us=1_000) == []
    assert tombstones_due([tomb], ledger.since(), now_us=2_000, grace_us=1_000) == [tomb]
    newer = entry("k", {"a": 3})
    ledger.confirm([newer], now_us=5_000)  # a different version restarts the grace
    assert tombstones_due([newer], ledger.since(), now_us=5_500, grace_us=1_000) == []


def test_purge_only_the_exact_tombstone(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.put_object("b", "k", io.BytesIO(b"x"), content_length=1)
    store.delete_object("b", "k")
    row = store.meta.get_object("b", "k")
    stale = ManifestEntry("b", "k", VersionVector({"zz": 1}), 0, True, "", "")
    assert purge_tombstones(store.meta, [stale]) == []
    exact = ManifestEntry.from_version("b", "k", row.version())
    assert purge_tombstones(store.meta, [exact]) == [exact]
    assert store.meta.get_object("b", "k") is None
