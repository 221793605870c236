"""A coordinator drains and leaves a three-coordinator cluster (``tunnelmesh.rebalance.drain``).

The drain runs in the test process against the leaving coordinator's own config (what
``tunnelmesh leave`` calls), then the coordinator asks the others to remove it from the membership
and is stopped. Shown: every chunk then has its full replication factor on the two remaining
coordinators, the drain sent only what they lacked (bytes counted once), and a reader thread
reading every object through the remaining coordinators never failed, before, during or after.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from storage.metadata import MetadataStore
from storage.placement import place
from tests.support import Coordinator, cluster, remove_tree, short_tmp_dir, wait_for
from tunnelmesh import rebalance
from tunnelmesh.cluster import broadcast_removal
from tunnelmesh.identity import load_or_create_identity

pytestmark = pytest.mark.slow

SETTINGS = {
    "storage": {"chunk_size": "64KiB", "gc_interval": "1h"},
    "sync": {"interval": "1h"},
    "rebalance": {"debounce": "1s", "check_interval": "0.5s"},
}
OBJECTS = 24


def chunk_files(node: Coordinator) -> dict[str, int]:
    root = Path(node.data_dir) / "chunks"
    return {n: os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(root) for n in names if len(n) == 64}


def referenced(node: Coordinator) -> set[str]:
    return set(rebalance.referenced_chunk_sizes(MetadataStore(Path(node.data_dir) / "meta" / "metadata.db")))


def test_drain_then_leave_keeps_the_factor_and_everything_readable() -> None:
    root = short_tmp_dir()
    try:
        with cluster(root, 3, settings=SETTINGS) as nodes:
            a, b, c = nodes
            members = [n.peer_id for n in nodes]
            s3 = a.s3_client()
            s3.create_bucket(Bucket="data")
            payloads = {f"obj/{i}": os.urandom(200_000 + i * 3000) for i in range(OBJECTS)}
            for key, body in payloads.items():
                s3.put_object(Bucket="data", Key=key, Body=body)

            def placed(holders: list[str], exact: bool) -> bool:
                files = {n.peer_id: chunk_files(n) for n in nodes}
                refs = referenced(a)
                if len(refs) < OBJECTS * 3:
                    return False
                return all((({p for p in files if h in files[p]} == set(place(h, holders, 2))) if exact
                            else all(h in files[p] for p in place(h, holders, 2))) for h in refs)

            wait_for(lambda: placed(members, exact=True), 60, "every chunk on exactly its holders", 0.5)
            # A start waits (up to 10 x 2 s) while a peer's membership view still differs: on a loaded
            # 2-core machine the last one may finish well after the chunks are in place.
            states: dict[str, object] = {}

            def rebalances_done() -> bool:
                states.update({n.name: rebalance.local_progress(n.settings()).get("state") for n in nodes})
                return all(state == "done" for state in states.values())

            try:
                wait_for(rebalances_done, 60, "the start-up rebalances to finish", 0.2)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; states: {states}") from None

            failures: list[str] = []
            reads = [0]
            stop = threading.Event()

            def reader() -> None:
                clients = [a.s3_client(), b.s3_client()]
                while not stop.is_set():
                    for key, body in payloads.items():
                        client = clients[reads[0] % 2]
                        try:
                            if client.get_object(Bucket="data", Key=key)["Body"].read() != body:
                                failures.append(f"{key}: wrong bytes")
                        except Exception as exc:  # noqa: BLE001 - every failure is a test failure
                            failures.append(f"{key}: {exc}")
                        reads[0] += 1

            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
            remaining = [a.peer_id, b.peer_id]
            files = {n.peer_id: chunk_files(n) for n in nodes}
            # The ideal: each (chunk held by C, remaining holder lacking it) pair, sent once.
            ideal = sum(size for h, size in files[c.peer_id].items()
                        for p in place(h, remaining, 2) if h not in files[p])
            progress: list[dict[str, Any]] = []
            try:
                report = rebalance.drain(c.settings(), progress.append, timeout=120)
                accepted = broadcast_removal(c.settings(), load_or_create_identity(c.data_dir), c.peer_id)
                assert sorted(accepted) == ["coordinator-a", "coordinator-b"], accepted
                c.stop()
                wait_for(lambda: placed(remaining, exact=False), 10, "the full factor on A and B")
                reads_after_stop = reads[0]
                wait_for(lambda: reads[0] >= reads_after_stop + 2 * OBJECTS, 60, "reads after C stopped")
            finally:
                stop.set()
                thread.join(60)
            print(f"\ndrain: moved {report['moved_bytes']} bytes ({report['moved_chunks']} chunk uploads) in "
                  f"{report['passes']} pass(es); ideal {ideal}; {reads[0]} reads, {len(failures)} failed")
            assert not failures, failures[:5]
            assert report["moved_bytes"] == ideal > 0
            assert report["remaining_chunks"] == 0 and progress[-1]["remaining_chunks"] == 0
            assert progress[0]["remaining_bytes"] > 0
            for key, body in payloads.items():
                assert b.s3_client().get_object(Bucket="data", Key=key)["Body"].read() == body
    finally:
        remove_tree(root)
