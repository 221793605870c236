"""Garbage collection between real coordinators: after everything is deleted, disk use returns to
near zero on every coordinator and the tombstones are purged, with nothing run by hand.

The grace periods are shortened in the settings (``storage.gc_grace`` 3 s, ``storage.tombstone_grace``
2 s) and so are the intervals of the beat jobs doing the work (``storage.gc_interval`` 1 s for the
chunk GC, ``sync.interval`` 2 s for the manifest sync that confirms and purges tombstones).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import botocore.exceptions
import pytest

from tests.support import Coordinator, cluster, remove_tree, short_tmp_dir, wait_for

pytestmark = pytest.mark.slow

SETTINGS = {
    "storage": {"chunk_size": "64KiB", "gc_grace": "3s", "tombstone_grace": "2s", "gc_interval": "1s"},
    "sync": {"interval": "2s"},
}
OBJECTS = 24
NEAR_ZERO = 64 * 1024  # bytes of chunk files allowed to remain per coordinator (none expected)


def chunk_bytes(node: Coordinator) -> int:
    root = Path(node.data_dir) / "chunks"
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(root) for n in names if len(n) == 64)


def metadata_rows(node: Coordinator) -> tuple[int, int]:
    """(object rows incl. tombstones, bucket rows incl. tombstones) in the node's metadata."""
    uri = f"file:{Path(node.data_dir) / 'meta' / 'metadata.db'}?mode=ro"
    with sqlite3.connect(uri, uri=True, timeout=30) as conn:
        objects = conn.execute("SELECT COUNT(*) FROM objects").fetchone()[0]
        buckets = conn.execute("SELECT COUNT(*) FROM buckets").fetchone()[0]
    return int(objects), int(buckets)


def present(node: Coordinator, key: str) -> bool:
    try:
        node.s3_client().head_object(Bucket="data", Key=key)
        return True
    except botocore.exceptions.ClientError:
        return False


def test_deleting_everything_returns_disk_use_to_near_zero_and_purges_tombstones() -> None:
    root = short_tmp_dir()
    try:
        with cluster(root, 3, settings=SETTINGS) as nodes:
            a = nodes[0]
            s3 = a.s3_client()
            s3.create_bucket(Bucket="data")
            for i in range(OBJECTS):
                s3.put_object(Bucket="data", Key=f"k/{i}", Body=os.urandom(150_000 + i * 1000))
            wait_for(lambda: all(metadata_rows(n)[0] == OBJECTS for n in nodes), 60, "objects everywhere", 0.5)
            # Every chunk on its factor (2) of holders: about 2x the data spread over three nodes.
            wait_for(lambda: sum(chunk_bytes(n) for n in nodes) >= 2 * sum(150_000 + i * 1000 for i in range(OBJECTS)),
                     60, "chunks replicated", 0.5)
            before = {n.name: chunk_bytes(n) for n in nodes}

            for i in range(OBJECTS):
                s3.delete_object(Bucket="data", Key=f"k/{i}")
            wait_for(lambda: not any(present(n, f"k/{i}") for n in nodes for i in range(OBJECTS)), 60,
                     "the deletes everywhere", 0.5)
            s3.delete_bucket(Bucket="data")

            def collected() -> bool:
                return all(chunk_bytes(n) <= NEAR_ZERO and metadata_rows(n) == (0, 0) for n in nodes)

            try:
                wait_for(collected, 90, "chunks collected and tombstones purged everywhere", interval=1)
            finally:
                after = {n.name: (chunk_bytes(n), metadata_rows(n)) for n in nodes}
                print(f"\ngc: chunk bytes before {before}; after (bytes, (object rows, bucket rows)) {after}")
            # Still a working cluster: a new write goes through and replicates.
            s3.create_bucket(Bucket="again")
            s3.put_object(Bucket="again", Key="k", Body=b"alive")
            def replicated() -> bool:
                try:
                    return nodes[2].s3_client().get_object(Bucket="again", Key="k")["Body"].read() == b"alive"
                except botocore.exceptions.ClientError:
                    return False

            wait_for(replicated, 30, "a new write to replicate after the purge", 0.5)
    finally:
        remove_tree(root)
