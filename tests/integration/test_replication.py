"""Replication between real coordinators (issue 5): three coordinators on loopback, each with its
own Redis, gunicorns, Celery worker and beat; 64 KiB chunks, factor 2, short retry delays.

One cluster for the whole module (start-up dominates the cost); tests run in file order and each
leaves the cluster running with every member up.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from storage.metadata import MetadataStore
from storage.placement import place
from tests.support import Coordinator, cluster, remove_tree, short_tmp_dir, wait_converged, wait_for

CHUNK = 64 * 1024
SETTINGS = {
    "storage": {"chunk_size": "64KiB"},
    "replication": {"factor": 2, "max_attempts": 3, "retry_backoff": "0.5s", "retry_backoff_max": "4s",
                    "peer_timeout": "3s", "drain_interval": "1s", "hint_interval": "1s"},
    "worker": {"concurrency": 2},
}

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def nodes() -> Iterator[list[Coordinator]]:
    root = short_tmp_dir("tmr-")
    try:
        with cluster(root, 3, settings=SETTINGS) as coordinators:
            wait_converged(coordinators)
            yield coordinators
    finally:
        remove_tree(root)


def client(writer: Coordinator, endpoint: Coordinator) -> Any:
    """boto3 with ``writer``'s credentials against ``endpoint``'s S3 API (one mesh: same token)."""
    return writer.s3_client(endpoint)


def read(s3: Any, bucket: str, key: str) -> bytes | None:
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception:  # noqa: BLE001 - not replicated yet
        return None


def keys(s3: Any, bucket: str) -> list[str] | None:
    try:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]
    except Exception:  # noqa: BLE001
        return None


def chunk_path(c: Coordinator, chunk_hash: str) -> Path:
    return c.data_dir / "chunks" / chunk_hash[:2] / chunk_hash


def object_chunks(c: Coordinator, bucket: str, key: str) -> list[str]:
    meta = MetadataStore(c.data_dir / "meta" / "metadata.db")
    try:
        record = meta.get_object(bucket, key)
        return [ref.hash for ref in record.chunks] if record else []
    finally:
        meta.close()


def ensure_bucket(a: Coordinator, bucket: str) -> Any:
    s3 = client(a, a)
    s3.create_bucket(Bucket=bucket)
    return s3


def test_write_through_a_read_anywhere_and_each_chunk_on_factor_holders(nodes: list[Coordinator]) -> None:
    a, b, c = nodes
    s3a = ensure_bucket(a, "data")
    objects = {"empty": b"", "one-byte": b"x", "one-chunk": os.urandom(CHUNK),
               "many-chunks": os.urandom(7 * CHUNK + 123)}
    for key, body in objects.items():
        s3a.put_object(Bucket="data", Key=key, Body=body)
    # Multipart: two parts (S3's 5 MiB minimum for all but the last).
    part1, part2 = os.urandom(5 * 1024 * 1024), os.urandom(1000)
    upload = s3a.create_multipart_upload(Bucket="data", Key="multipart")["UploadId"]
    etags = [s3a.upload_part(Bucket="data", Key="multipart", UploadId=upload, PartNumber=n, Body=body)["ETag"]
             for n, body in ((1, part1), (2, part2))]
    s3a.complete_multipart_upload(Bucket="data", Key="multipart", UploadId=upload, MultipartUpload={
        "Parts": [{"PartNumber": n, "ETag": e} for n, e in zip((1, 2), etags, strict=True)]})
    objects["multipart"] = part1 + part2

    started = time.monotonic()
    for node in (b, c):
        s3 = client(a, node)
        for key, body in objects.items():
            got = wait_for(lambda s3=s3, key=key, body=body: read(s3, "data", key) == body, 60,
                           f"{key} readable through {node.name}")
            assert got
    print(f"\nall objects readable on B and C {time.monotonic() - started:.2f}s after the last ack")
    listings = [keys(client(a, node), "data") for node in nodes]
    assert listings[0] == sorted(objects) and listings[1] == listings[0] and listings[2] == listings[0]

    members = sorted(n.peer_id for n in nodes)
    hashes = {h for key in objects for h in object_chunks(a, "data", key)}
    assert len(hashes) > 80

    def on_factor_holders() -> bool:
        return all({n.peer_id for n in nodes if chunk_path(n, h).exists()} == set(place(h, members, 2))
                   for h in hashes)

    wait_for(on_factor_holders, 60, "every chunk on exactly its 2 placement holders", 0.5)


def test_b_down_during_writes_then_catches_up(nodes: list[Coordinator]) -> None:
    a, b, c = nodes
    s3a = ensure_bucket(a, "outage")
    b.kill()
    written = {}
    for i in range(20):
        body = os.urandom(1000 + i * 5000)
        s3a.put_object(Bucket="outage", Key=f"k{i:02d}", Body=body)  # keeps succeeding with B down
        written[f"k{i:02d}"] = body
    s3c = client(a, c)
    wait_for(lambda: all(read(s3c, "outage", k) == v for k, v in written.items()), 60, "C to have every write")
    time.sleep(3)  # long enough for B's pushes to run out of attempts (hints)
    b.start(join=a, token=a.printed_join_command()[1])
    restarted = time.monotonic()
    s3b = client(a, b)
    wait_for(lambda: all(read(s3b, "outage", k) == v for k, v in written.items()), 90, "B to catch up")
    print(f"\nB caught up {time.monotonic() - restarted:.2f}s after it was ready again")


def test_a_sigkilled_right_after_acks_loses_nothing(nodes: list[Coordinator]) -> None:
    a, b, c = nodes
    s3a = ensure_bucket(a, "crash")
    time.sleep(1.5)  # the bucket itself is replicated by now
    written = {}
    for i in range(15):
        body = os.urandom(200 + i * 9000)
        s3a.put_object(Bucket="crash", Key=f"k{i:02d}", Body=body)
        written[f"k{i:02d}"] = body
    a.kill()  # SIGKILL the whole stack right after the last acknowledgement
    a.start(join=b, token=b.token)
    for node in (b, c):
        s3 = client(a, node)
        wait_for(lambda s3=s3: all(read(s3, "crash", k) == v for k, v in written.items()), 90,
                 f"every acknowledged write on {node.name}")


def _web_processes(c: Coordinator) -> list[psutil.Process]:
    root = psutil.Process(c.pids()["web"])
    return [root, *root.children(recursive=True)]


def test_failing_peer_gets_growing_retries_then_a_hint_that_replays(nodes: list[Coordinator]) -> None:
    a, b, c = nodes
    s3a = ensure_bucket(a, "retry")
    time.sleep(1.5)
    frozen = _web_processes(b)
    for proc in frozen:  # B's coordination API stops answering: every push to B times out
        proc.send_signal(signal.SIGSTOP)
    key = f"retry-{os.urandom(4).hex()}"
    body = os.urandom(3 * CHUNK)
    try:
        s3a.put_object(Bucket="retry", Key=key, Body=body)
        pattern = re.compile(rf"replicate object retry/{key} to {b.peer_id}: attempt (\d) of 3 failed .*"
                             r"retrying in ([\d.]+)s")
        wait_for(lambda: f"object retry/{key} to {b.peer_id} failed after 3 attempt(s); kept as a hint"
                 in a.output(), 60, "the hint after the last attempt", 0.3)
        attempts = [(int(m.group(1)), float(m.group(2))) for m in pattern.finditer(a.output())]
        assert [n for n, _ in attempts] == [1, 2]
        assert 0.25 <= attempts[0][1] <= attempts[1][1] <= 1.0  # 0.5 s doubling, jitter in [50 %, 100 %]
        assert read(client(a, c), "retry", key) == body  # the other peer was not held up
    finally:
        for proc in frozen:
            proc.send_signal(signal.SIGCONT)
    s3b = client(a, b)
    wait_for(lambda: read(s3b, "retry", key) == body, 60, "the hint to replay once B answers again")
    digest = hashlib.sha256(body).hexdigest()
    assert digest  # bytes identical (compared above)


def test_corrupt_replica_on_a_holder_is_repaired_when_read_from_elsewhere(nodes: list[Coordinator]) -> None:
    """A holder whose copy is corrupt quarantines it, fetches a good copy from the other holder,
    stores it again and serves it: the reader gets the right bytes and the replica is repaired."""
    a = nodes[0]
    by_id = {c.peer_id: c for c in nodes}
    s3 = ensure_bucket(a, "repair")
    body = os.urandom(40 * CHUNK)
    s3.put_object(Bucket="repair", Key="obj", Body=body)
    ids = sorted(by_id)
    # A chunk whose primary holder (asked first by the third coordinator) is not the writer, and
    # whose reader is not the writer either: the writer keeps its own copy of a chunk it does not
    # hold until replication confirms, and would serve that copy without asking the holder.
    for chunk_hash in object_chunks(a, "repair", "obj"):
        first, second = place(chunk_hash, ids, 2)
        reader = next(c for c in nodes if c.peer_id not in (first, second))
        if first != a.peer_id and second == a.peer_id:
            break
    else:
        pytest.fail("no chunk of 40 has the writer as its second holder")
    holder = by_id[first]
    path = chunk_path(holder, chunk_hash)
    wait_for(lambda: path.exists() and read(client(a, reader), "repair", "obj") == body, 60,
             "the object readable through the third coordinator", 0.3)
    assert not chunk_path(reader, chunk_hash).exists()  # the reader has to ask a holder
    good = path.read_bytes()
    path.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])

    assert read(client(a, reader), "repair", "obj") == body
    try:
        wait_for(lambda: path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == chunk_hash, 30,
                 "the holder's replica to be repaired", 0.3)
    except AssertionError as exc:
        repair_lines = [line for line in holder.output().splitlines() if chunk_hash in line]
        raise AssertionError(f"{exc}; the holder's log about the chunk: {repair_lines[-10:]}") from None
    assert (holder.data_dir / "quarantine").exists()
