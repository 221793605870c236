"""ChunkStore: atomic and idempotent writes, verified reads, quarantine, hash validation, disk full."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from storage.chunks import STALE_TMP_SECONDS, ChunkRef, ChunkStore, validate_hash
from storage.errors import ChunkMissing, CorruptChunk, InsufficientStorage


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def chunks(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path / "data")


def test_write_then_read_returns_the_bytes_at_the_content_address(chunks: ChunkStore) -> None:
    ref = chunks.write(b"hello world")
    assert ref == ChunkRef(sha(b"hello world"), 11)
    path = chunks.path(ref.hash)
    assert path == chunks.root / "chunks" / ref.hash[:2] / ref.hash
    assert path.read_bytes() == b"hello world"
    assert chunks.read(ref.hash) == b"hello world"
    assert chunks.exists(ref.hash)
    assert list(os.scandir(chunks.tmp_dir)) == []  # no temporary file left behind


def test_empty_chunk_and_memoryview_input(chunks: ChunkStore) -> None:
    assert chunks.read(chunks.write(b"").hash) == b""
    data = bytearray(b"0123456789")
    ref = chunks.write(memoryview(data)[2:6])
    assert ref == ChunkRef(sha(b"2345"), 4)
    assert chunks.read(ref.hash) == b"2345"


def test_write_is_idempotent_and_does_not_rewrite(chunks: ChunkStore) -> None:
    ref = chunks.write(b"same")
    inode = chunks.path(ref.hash).stat().st_ino
    os.utime(chunks.path(ref.hash), (1, 1))
    assert chunks.write(b"same") == ref
    assert chunks.path(ref.hash).stat().st_ino == inode  # the existing file was kept
    assert chunks.mtime(ref.hash) > 1  # ... and touched, so a GC grace period restarts
    assert list(chunks.iter_hashes()) == [ref.hash]


def test_concurrent_writers_of_the_same_chunk(chunks: ChunkStore) -> None:
    data = os.urandom(200_000)
    results: list[ChunkRef] = []
    threads = [threading.Thread(target=lambda: results.append(chunks.write(data))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert chunks.read(results[0].hash) == data
    assert list(os.scandir(chunks.tmp_dir)) == []


def test_write_verified(chunks: ChunkStore) -> None:
    assert chunks.write_verified(b"abc", sha(b"abc")) == ChunkRef(sha(b"abc"), 3)
    with pytest.raises(CorruptChunk):
        chunks.write_verified(b"abd", sha(b"abc"))
    assert not chunks.exists(sha(b"abd"))


def test_missing_chunk(chunks: ChunkStore) -> None:
    with pytest.raises(ChunkMissing):
        chunks.read(sha(b"never written"))
    with pytest.raises(ChunkMissing):
        chunks.mtime(sha(b"never written"))


def test_flipped_byte_is_detected_quarantined_counted_and_never_returned(chunks: ChunkStore) -> None:
    data = os.urandom(100_000)
    ref = chunks.write(data)
    path = chunks.path(ref.hash)
    raw = bytearray(path.read_bytes())
    raw[54_321] ^= 0x01
    path.write_bytes(bytes(raw))
    assert chunks.corrupt_count() == 0
    with pytest.raises(CorruptChunk) as info:
        chunks.read(ref.hash)
    assert info.value.hash == ref.hash
    assert not path.exists()
    quarantined = [p for p in chunks.quarantine_dir.iterdir() if p.name.startswith(ref.hash)]
    assert len(quarantined) == 1 and quarantined[0].read_bytes() == bytes(raw)
    assert chunks.corrupt_count() == 1
    # Now simply missing; the counter persists across reopening the store.
    with pytest.raises(ChunkMissing):
        chunks.read(ref.hash)
    assert ChunkStore(chunks.root).corrupt_count() == 1
    # A later write repairs it.
    chunks.write(data)
    assert chunks.read(ref.hash) == data


def test_truncated_chunk_is_corrupt(chunks: ChunkStore) -> None:
    ref = chunks.write(b"x" * 1000)
    with open(chunks.path(ref.hash), "r+b") as f:
        f.truncate(10)
    with pytest.raises(CorruptChunk):
        chunks.read(ref.hash)
    assert chunks.corrupt_count() == 1


@pytest.mark.parametrize("bad", [
    "../../etc/passwd",
    "../" * 20 + "etc",
    "/etc/passwd",
    "A" * 64,  # upper case
    "a" * 63,
    "a" * 65,
    "g" * 64,
    "0" * 62 + "/.",
    "0" * 63 + "\n",
    "",
    None,
    b"0" * 64,
])
def test_bad_hashes_are_rejected_before_any_path_is_built(chunks: ChunkStore, bad: object) -> None:
    for call in (chunks.read, chunks.exists, chunks.delete, chunks.mtime, chunks.path):
        with pytest.raises(ValueError):
            call(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        chunks.write_verified(b"data", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        validate_hash(bad)


def test_enospc_raises_insufficient_storage_and_leaves_nothing(chunks: ChunkStore,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd: int, data: bytes) -> int:
        calls["n"] += 1
        if calls["n"] > 1:  # the first part is written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data)[:1000])

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(InsufficientStorage):
        chunks.write(b"z" * 100_000)
    monkeypatch.undo()
    assert not chunks.exists(sha(b"z" * 100_000))
    assert list(os.scandir(chunks.tmp_dir)) == []


def test_min_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = ChunkStore(tmp_path / "data", min_free_space=1_000_000)
    monkeypatch.setattr(chunks, "free_bytes", lambda: 1_050_000)
    assert chunks.write(b"a" * 10_000).size == 10_000
    with pytest.raises(InsufficientStorage, match="min_free_space"):
        chunks.write(b"b" * 60_000)
    assert not chunks.exists(sha(b"b" * 60_000))
    assert list(os.scandir(chunks.tmp_dir)) == []


def test_stale_temporary_files_are_removed_on_open(tmp_path: Path) -> None:
    chunks = ChunkStore(tmp_path / "data")
    stale = chunks.tmp_dir / "stale.partial"
    fresh = chunks.tmp_dir / "fresh.partial"
    stale.write_bytes(b"old")
    fresh.write_bytes(b"in progress elsewhere")
    old = time.time() - STALE_TMP_SECONDS - 5
    os.utime(stale, (old, old))
    ChunkStore(tmp_path / "data")
    assert not stale.exists()
    assert fresh.exists()


def test_inventory_delete_and_disk_usage(chunks: ChunkStore) -> None:
    refs = {chunks.write(bytes([i]) * 10).hash for i in range(20)}
    (chunks.chunks_dir / "00" / "README").write_text("not a chunk")
    assert set(chunks.iter_hashes()) == refs
    victim = sorted(refs)[0]
    assert chunks.delete(victim) is True
    assert chunks.delete(victim) is False
    assert set(chunks.iter_hashes()) == refs - {victim}
    usage = chunks.disk_usage()
    assert usage.total > 0 and 0 <= usage.free <= usage.total


def test_fsync_is_used_when_enabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = ChunkStore(tmp_path / "data", fsync=True)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    chunks.write(b"durable")
    assert len(synced) >= 2  # the file and its directory
    synced.clear()
    nosync = ChunkStore(tmp_path / "other", fsync=False)
    nosync.write(b"fast")
    assert synced == []


@pytest.mark.parametrize("removed", ["its folder", "chunks/"])
def test_a_folder_removed_by_hand_is_recreated_on_write(chunks: ChunkStore, removed: str) -> None:
    import shutil

    data = b"after the folder went away"
    folder = chunks.path(sha(data)).parent
    shutil.rmtree(folder if removed == "its folder" else folder.parent)
    ref = chunks.write(data)
    assert chunks.read(ref.hash) == data
    assert list(os.scandir(chunks.tmp_dir)) == []
