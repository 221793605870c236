"""Background hashing (storage/hashing.py) and the read-ahead / overlapped-MD5 paths that use it."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from storage.errors import CorruptChunk
from storage.hashing import BackgroundHash
from storage.objects import ObjectStore
from web.s3.body import new_checksum  # the x-amz-checksum-* objects the S3 layer feeds it

BIG = 512 * 1024  # above BACKGROUND_MIN_SIZE: these updates run in the pool


def test_background_hash_keeps_order_across_sizes() -> None:
    pieces = [os.urandom(n) for n in (BIG, 10, BIG + 1, 0, 3000, BIG, 7)]
    expected_md5, expected_crc = hashlib.md5(), new_checksum("crc32")
    md5, crc = BackgroundHash(hashlib.md5()), BackgroundHash(new_checksum("crc32"))
    for piece in pieces:
        expected_md5.update(piece)
        expected_crc.update(piece)
        md5.update(piece)
        crc.update(piece)
    assert md5.hexdigest() == expected_md5.hexdigest()
    assert md5.digest() == expected_md5.digest()
    assert crc.digest() == expected_crc.digest()


def test_background_hash_copies_a_mutable_buffer() -> None:
    buffer = bytearray(os.urandom(BIG))
    original = bytes(buffer)
    digest = BackgroundHash(hashlib.sha256())
    digest.update(buffer)
    buffer[:] = b"\0" * len(buffer)  # the caller reuses its buffer at once
    assert digest.hexdigest() == hashlib.sha256(original).hexdigest()


def test_background_hash_reports_a_failed_update() -> None:
    class Broken:
        def update(self, data: bytes) -> None:
            raise ValueError("boom")

        def digest(self) -> bytes:
            return b""

    digest = BackgroundHash(Broken())
    digest.update(b"x" * BIG)
    with pytest.raises(ValueError):
        digest.digest()


@pytest.fixture
def big_store(tmp_path: Path):
    s = ObjectStore(tmp_path / "data", "n", chunk_size=BIG, fsync=False)
    s.create_bucket("b", "o")
    yield s
    s.close()


@pytest.mark.parametrize("size", [BIG - 1, BIG, 3 * BIG + 5, 4 * BIG])
def test_large_put_etag_and_read_back(big_store: ObjectStore, size: int) -> None:
    data = os.urandom(size)
    record = big_store.put_object("b", "k", io.BytesIO(data), content_length=size)
    assert record.etag == hashlib.md5(data).hexdigest()
    assert b"".join(big_store.read_object(record)) == data
    assert b"".join(big_store.read_object(record, 5, size - 3)) == data[5:size - 3]


def test_read_ahead_still_detects_a_corrupt_later_chunk(big_store: ObjectStore) -> None:
    data = os.urandom(4 * BIG)
    record = big_store.put_object("b", "k", io.BytesIO(data), content_length=len(data))
    path = big_store.chunks.path(record.chunks[2].hash)
    raw = bytearray(path.read_bytes())
    raw[12345] ^= 0x01
    path.write_bytes(bytes(raw))
    pieces = big_store.read_object(record)
    assert next(pieces) == data[:BIG]
    assert next(pieces) == data[BIG:2 * BIG]
    with pytest.raises(CorruptChunk):
        next(pieces)
    assert big_store.chunks.corrupt_count() == 1


def test_read_ahead_stopped_early(big_store: ObjectStore) -> None:
    data = os.urandom(4 * BIG)
    record = big_store.put_object("b", "k", io.BytesIO(data), content_length=len(data))
    pieces = big_store.read_object(record)
    assert next(pieces) == data[:BIG]
    pieces.close()  # the client went away: the read-ahead is dropped, nothing is left running
    assert b"".join(big_store.read_object(record)) == data
