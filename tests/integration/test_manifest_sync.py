"""The manifest sync between real coordinators (three on loopback, one cluster for the module).

Sync runs are triggered with ``run_sync_once(settings)`` from the test process, which is what
``tunnelmesh sync --once`` does (beat's own interval is set to an hour so it never interferes).
The lost-delete fault: C is stopped, the delete's replication to C fails (``max_attempts: 1``) and
becomes a hint, the test deletes that hint from A's ledger, then C is restarted: nothing but the
sync can bring the delete to C.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.hints import ReplicationLedger, ledger_path
from tests.support import cluster, remove_tree, short_tmp_dir, wait_for
from tunnelmesh.sync import run_sync_once

SETTINGS = {
    "storage": {"chunk_size": "64KiB", "gc_interval": "1h"},
    "sync": {"interval": "1h"},
    "replication": {"max_attempts": 1, "retry_backoff": "0.2s", "peer_timeout": "5s"},
}


@pytest.fixture(scope="module")
def nodes() -> Iterator[list]:
    root = short_tmp_dir()
    try:
        with cluster(root, 3, settings=SETTINGS) as coordinators:
            a = coordinators[0]
            s3 = a.s3_client()
            s3.create_bucket(Bucket="data")
            yield coordinators
    finally:
        remove_tree(root)


def exists(coordinator, key: str, bucket: str = "data") -> bool:
    import botocore.exceptions

    try:
        coordinator.s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except botocore.exceptions.ClientError:
        return False


def sync_everyone(nodes: list) -> list[dict]:
    return [run_sync_once(node.settings(), lock_timeout=30) for node in nodes if node.running()]


def wait_replicated(nodes: list, key: str, present: bool = True, timeout: float = 30) -> None:
    wait_for(lambda: all(exists(n, key) == present for n in nodes), timeout, f"{key} replicated")


def test_lost_delete_is_repaired_after_one_sync_round(nodes: list) -> None:
    a, b, c = nodes
    a.s3_client().put_object(Bucket="data", Key="doomed", Body=b"x" * 200_000)
    a.s3_client().put_object(Bucket="data", Key="kept", Body=b"y" * 1000)
    wait_replicated(nodes, "doomed")
    wait_replicated(nodes, "kept")
    c.stop()
    a.s3_client().delete_object(Bucket="data", Key="doomed")
    wait_for(lambda: not exists(b, "doomed"), 30, "the delete to reach B")
    ledger = ReplicationLedger(ledger_path(a.data_dir))
    wait_for(lambda: ledger.items(peer=c.peer_id), 30, "the failed delivery to C to become a hint")
    for item in ledger.items(peer=c.peer_id):  # the fault: the delete message to C is lost for good
        ledger.done(item.peer, item.kind, item.bucket, item.key, 2**62)
    c.restart()
    # C's worker runs a catch-up sync round as it starts, which may already repair the lost delete;
    # otherwise the next round does. Either way one sync round removes the stale copy.
    stale_before = exists(c, "doomed")
    reports = sync_everyone(nodes)
    assert not exists(c, "doomed")
    assert exists(a, "kept") and exists(b, "kept") and exists(c, "kept")
    if stale_before:
        # Repaired by this round, or by C's start-up catch-up that finished right after the check
        # above (its summary is in C's log).
        now = sum(r["deleted_on_peer"] + r["pulled"] for rep in reports for r in rep["rounds"])
        at_start = sum(summary["deleted_on_peers"] + summary["pulled"] for summary in
                       map(json.loads, re.findall(r"manifest sync: (\{.*\})", c.output(since_start=True))))
        assert now + at_start >= 1, (reports, c.output(since_start=True)[-3000:])


def test_write_during_manifest_build_survives_and_no_ping_pong(nodes: list) -> None:
    a, b, c = nodes
    # Written on B right before A's run: whether or not A's manifest includes it, nothing deletes it.
    b.s3_client().put_object(Bucket="data", Key="fresh", Body=b"f" * 70_000)
    sync_everyone(nodes)
    wait_replicated(nodes, "fresh")
    sync_everyone(nodes)
    for report in sync_everyone(nodes):
        for r in report["rounds"]:
            assert r["outcome"] == "equal", r  # converged: nothing re-sent in either direction
            assert r["bytes_sent"] + r["bytes_received"] < 2000


def test_restart_with_empty_data_directory_deletes_nothing(nodes: list) -> None:
    a, b, c = nodes
    s3 = a.s3_client()
    for i in range(10):
        s3.put_object(Bucket="data", Key=f"many/{i}", Body=bytes([i]) * 100_000)
    for i in range(10):
        wait_replicated(nodes, f"many/{i}")
    c.stop()
    meta = Path(c.data_dir) / "meta"
    for path in meta.iterdir():  # the object store, ledgers and sync state; keep identity and registry
        if not path.name.startswith("registry"):
            path.unlink()
    shutil.rmtree(Path(c.data_dir) / "chunks")
    c.restart()
    reports = sync_everyone([c, a, b])
    assert reports[0]["caught_up"]
    for node in (a, b, c):
        assert all(exists(node, f"many/{i}") for i in range(10)), node.name
    assert exists(a, "kept") and exists(c, "kept")
    assert c.s3_client().get_object(Bucket="data", Key="many/3")["Body"].read() == bytes([3]) * 100_000
