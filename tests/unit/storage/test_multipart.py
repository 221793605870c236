"""Multipart uploads: parts stream to chunks, completion copies no data, every S3 error case."""

from __future__ import annotations

import hashlib
import io

import pytest

from storage.errors import (
    BadDigest,
    EntityTooSmall,
    IncompleteBody,
    InvalidArgument,
    InvalidPart,
    InvalidPartOrder,
    NoSuchBucket,
    NoSuchUpload,
)
from storage.metadata import PartRecord
from storage.objects import ObjectMeta, ObjectStore
from storage.versions import VersionVector
from tests.unit.storage.util import CHUNK, get, pattern, put

PART = 2 * CHUNK  # the fixture's minimum part size


def upload(store: ObjectStore, upload_id: str, number: int, data: bytes) -> PartRecord:
    return store.upload_part(upload_id, number, io.BytesIO(data), len(data))


def multipart_etag(parts: list[bytes]) -> str:
    digests = b"".join(hashlib.md5(p).digest() for p in parts)
    return f"{hashlib.md5(digests).hexdigest()}-{len(parts)}"


def test_happy_path(store: ObjectStore) -> None:
    meta = ObjectMeta("video/mp4", {"Content-Disposition": "inline"}, {"origin": "test"})
    up = store.create_multipart("b", "movie", "owner", meta)
    assert store.get_upload(up.upload_id) == up
    bodies = [pattern(PART + 10, seed=1), pattern(PART, seed=2), pattern(1000, seed=3)]
    parts = [upload(store, up.upload_id, n, body) for n, body in enumerate(bodies, start=1)]
    assert [p.etag for p in parts] == [hashlib.md5(b).hexdigest() for b in bodies]
    chunk_files = set(store.chunks.iter_hashes())
    record = store.complete_multipart(up.upload_id, [(p.part_number, f'"{p.etag}"') for p in parts])
    assert set(store.chunks.iter_hashes()) == chunk_files  # completing copied no data
    whole = b"".join(bodies)
    assert record.size == len(whole) and record.parts == tuple(len(b) for b in bodies)
    assert record.etag == multipart_etag(bodies)
    assert record.chunks == tuple(ref for p in parts for ref in p.chunks)
    assert (record.content_type, record.headers, record.user_meta) == (meta.content_type, meta.headers,
                                                                       meta.user_meta)
    assert record.vv == VersionVector({store.actor: 1})
    assert get(store, "movie") == whole
    # Ranges across part boundaries (parts end in short chunks).
    for start, end in [(PART, PART + 20), (PART + 5, 2 * PART + 15), (0, len(whole)), (len(whole) - 1, len(whole))]:
        assert b"".join(store.read_object(record, start, end)) == whole[start:end]
    with pytest.raises(NoSuchUpload):
        store.get_upload(up.upload_id)
    assert [e.kind for e in store.meta.outbox_after()][-1] == "put"


def test_completion_overwrites_with_an_incremented_vector(store: ObjectStore) -> None:
    first = put(store, "k", b"single")
    up = store.create_multipart("b", "k", "owner")
    part = upload(store, up.upload_id, 1, b"tiny last part")
    record = store.complete_multipart(up.upload_id, [(1, part.etag)])
    assert record.vv == first.vv.increment(store.actor)
    assert record.last_modified_us > first.last_modified_us
    assert get(store, "k") == b"tiny last part"


def test_reuploading_a_part_replaces_it(store: ObjectStore) -> None:
    up = store.create_multipart("b", "k", "owner")
    upload(store, up.upload_id, 1, b"first try")
    second = upload(store, up.upload_id, 1, b"second try")
    [listed] = store.list_parts(up.upload_id).parts
    assert listed == second
    with pytest.raises(InvalidPart):  # the replaced part's ETag is no longer valid
        store.complete_multipart(up.upload_id, [(1, hashlib.md5(b"first try").hexdigest())])
    store.complete_multipart(up.upload_id, [(1, second.etag.upper())])  # ETags compare case-insensitively
    assert get(store, "k") == b"second try"


def test_only_the_listed_parts_are_used(store: ObjectStore) -> None:
    up = store.create_multipart("b", "k", "owner")
    bodies = {n: pattern(PART, seed=n) for n in (1, 2, 3, 7)}
    etags = {n: upload(store, up.upload_id, n, body).etag for n, body in bodies.items()}
    record = store.complete_multipart(up.upload_id, [(2, etags[2]), (7, etags[7])])
    assert get(store, "k") == bodies[2] + bodies[7]
    assert record.parts == (PART, PART)


def test_errors(store: ObjectStore) -> None:
    up = store.create_multipart("b", "k", "owner")
    small = upload(store, up.upload_id, 1, b"x" * (PART - 1))
    big = upload(store, up.upload_id, 2, pattern(PART, seed=5))
    last = upload(store, up.upload_id, 3, b"end")
    with pytest.raises(InvalidPartOrder):
        store.complete_multipart(up.upload_id, [(2, big.etag), (1, small.etag)])
    with pytest.raises(InvalidPartOrder):
        store.complete_multipart(up.upload_id, [(2, big.etag), (2, big.etag)])
    with pytest.raises(InvalidPart):
        store.complete_multipart(up.upload_id, [(2, big.etag), (4, last.etag)])
    with pytest.raises(InvalidPart):
        store.complete_multipart(up.upload_id, [(2, last.etag)])
    with pytest.raises(InvalidPart):
        store.complete_multipart(up.upload_id, [])
    with pytest.raises(EntityTooSmall):
        store.complete_multipart(up.upload_id, [(1, small.etag), (2, big.etag)])
    # A small *last* part is fine, and a failed completion changed nothing.
    assert len(store.list_parts(up.upload_id).parts) == 3
    record = store.complete_multipart(up.upload_id, [(2, big.etag), (3, last.etag)])
    assert record.size == PART + 3
    with pytest.raises(NoSuchUpload):
        store.complete_multipart(up.upload_id, [(2, big.etag), (3, last.etag)])
    with pytest.raises(NoSuchUpload):
        upload(store, up.upload_id, 1, b"late")
    with pytest.raises(NoSuchUpload):
        store.abort_multipart(up.upload_id)
    with pytest.raises(NoSuchUpload):
        store.list_parts("no-such-upload")


def test_part_arguments_and_bodies(store: ObjectStore) -> None:
    up = store.create_multipart("b", "k", "owner")
    for number in (0, 10_001, -1):
        with pytest.raises(InvalidArgument):
            upload(store, up.upload_id, number, b"x")
    with pytest.raises(IncompleteBody):
        store.upload_part(up.upload_id, 1, io.BytesIO(b"abc"), 10)
    with pytest.raises(BadDigest):
        store.upload_part(up.upload_id, 1, io.BytesIO(b"abc"), 3, content_md5=hashlib.md5(b"abd").digest())
    part = store.upload_part(up.upload_id, 1, io.BytesIO(b"abc"), 3, content_md5=hashlib.md5(b"abc").digest())
    assert [p.part_number for p in store.list_parts(up.upload_id).parts] == [1]
    assert part.size == 3
    with pytest.raises(NoSuchBucket):
        store.create_multipart("nope", "k", "owner")


def test_upload_part_copy(store: ObjectStore) -> None:
    source_data = pattern(3 * CHUNK + 500, seed=6)
    source = put(store, "src", source_data)
    up = store.create_multipart("b", "dst", "owner")
    p1 = store.upload_part_copy(up.upload_id, 1, source, 100, 100 + PART)  # unaligned: re-chunked
    p2 = store.upload_part_copy(up.upload_id, 2, source)  # the whole object
    assert p1.size == PART and p1.etag == hashlib.md5(source_data[100:100 + PART]).hexdigest()
    assert all(c.size <= CHUNK for c in p1.chunks)
    record = store.complete_multipart(up.upload_id, [(1, p1.etag), (2, p2.etag)])
    assert get(store, "dst") == source_data[100:100 + PART] + source_data
    assert record.etag == multipart_etag([source_data[100:100 + PART], source_data])


def test_abort_and_listings(store: ObjectStore) -> None:
    ids = {}
    for key in ["b/2", "a", "b/1", "a"]:
        ids.setdefault(key, []).append(store.create_multipart("b", key, "owner").upload_id)
    page = store.list_uploads("b")
    assert [(u.key, u.upload_id) for u in page.uploads] == [
        ("a", ids["a"][0]), ("a", ids["a"][1]), ("b/1", ids["b/1"][0]), ("b/2", ids["b/2"][0])]
    assert not page.is_truncated
    first = store.list_uploads("b", max_uploads=1)
    assert first.is_truncated and (first.next_key_marker, first.next_upload_id_marker) == ("a", ids["a"][0])
    rest = store.list_uploads("b", key_marker=first.next_key_marker, upload_id_marker=first.next_upload_id_marker)
    assert [u.upload_id for u in rest.uploads] == [ids["a"][1], ids["b/1"][0], ids["b/2"][0]]
    assert [u.key for u in store.list_uploads("b", key_marker="a").uploads] == ["b/1", "b/2"]
    assert [u.key for u in store.list_uploads("b", prefix="b/").uploads] == ["b/1", "b/2"]
    store.abort_multipart(ids["a"][0])
    assert [u.upload_id for u in store.list_uploads("b", prefix="a").uploads] == [ids["a"][1]]
    with pytest.raises(NoSuchUpload):
        store.get_upload(ids["a"][0])
    with pytest.raises(NoSuchBucket):
        store.list_uploads("nope")


def test_list_parts_pagination(store: ObjectStore) -> None:
    up = store.create_multipart("b", "k", "owner")
    for n in (1, 2, 5, 9):
        upload(store, up.upload_id, n, bytes([n]))
    page = store.list_parts(up.upload_id, max_parts=2)
    assert [p.part_number for p in page.parts] == [1, 2] and page.is_truncated and page.next_marker == 2
    page = store.list_parts(up.upload_id, marker=page.next_marker, max_parts=2)
    assert [p.part_number for p in page.parts] == [5, 9] and not page.is_truncated
    assert page.upload.key == "k"
    assert store.list_parts(up.upload_id, marker=9).parts == []
