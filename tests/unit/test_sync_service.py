"""The manifest-sync service on real stores in temp dirs, linked in process (tunnelmesh/sync.py).

Each Go failure mode of the reference (§3.9/§3.10/§7) has its own test here; the same scenarios
run between real coordinators in tests/integration/test_manifest_sync.py.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.errors import NoSuchKey
from storage.manifest import build_digests, entry_digest, row_digest
from storage.metadata import ObjectRecord
from storage.objects import ObjectStore
from storage.placement import owner_of_object
from tunnelmesh.sync import LocalLink, LocalManifest, SyncService, row_entry

CHUNK = 64 * 1024
IDS = ["a" * 16, "b" * 16, "c" * 16]


class Node:
    def __init__(self, root: Path, peer_id: str, members: list[str], grace: float = 3600.0) -> None:
        self.peer_id = peer_id
        self.members = members
        self.store = ObjectStore(root / peer_id, peer_id, chunk_size=CHUNK, fsync=False)
        self.sync = SyncService(self.store, peer_id, lambda: list(self.members), tombstone_grace=grace, factor=2)

    def links(self, nodes: list[Node]) -> list[LocalLink]:
        return [LocalLink(self.sync, other.sync) for other in nodes if other is not self and other.peer_id in self.members]

    def live(self, key: str, bucket: str = "b") -> bool:
        try:
            self.store.head_object(bucket, key)
            return True
        except NoSuchKey:
            return False


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[Node]]:
    made = [Node(tmp_path, peer, IDS) for peer in IDS]
    yield made
    for node in made:
        node.store.close()


def replicate(src: Node, dst: Node, key: str, bucket: str = "b") -> None:
    LocalLink(src.sync, dst.sync).push("object" if key else "bucket", bucket, key)


def put(node: Node, key: str, data: bytes = b"x" * 100, bucket: str = "b") -> ObjectRecord:
    return node.store.put_object(bucket, key, io.BytesIO(data), content_length=len(data))


def everyone_has_bucket(nodes: list[Node], bucket: str = "b") -> None:
    nodes[0].store.create_bucket(bucket, "owner")
    for other in nodes[1:]:
        replicate(nodes[0], other, "", bucket)


def sync_all(nodes: list[Node]) -> list[dict]:
    return [node.sync.run(node.links(nodes)) for node in nodes]


def test_stored_row_digests_equal_the_manifest_digest(nodes: list[Node]) -> None:
    a = nodes[0]
    everyone_has_bucket(nodes)
    put(a, "plain")
    put(a, "ünïcödé/\"quoted\"\\slash")
    a.store.delete_object("b", "plain")
    manifest = LocalManifest.load(a.store.meta)
    entries = manifest.entries(range(manifest.ranges))
    assert len(entries) == 3  # two objects and the bucket
    assert manifest.digests == build_digests(entries)
    assert [e.key for e in manifest.tombstones(range(manifest.ranges))] == ["plain"]
    with a.store.meta.read() as tx:
        for _, row in tx.manifest_rows(range(manifest.ranges)):
            assert row_digest(*row) == entry_digest(row_entry(row))


def test_lost_delete_is_repaired_in_one_round(nodes: list[Node]) -> None:
    a, b, c = nodes
    everyone_has_bucket(nodes)
    put(a, "doomed")
    replicate(a, b, "doomed")
    replicate(a, c, "doomed")
    a.store.delete_object("b", "doomed")
    replicate(a, b, "doomed")  # the delete reaches B; the message to C is lost
    assert c.live("doomed")
    sync_all(nodes)
    assert not a.live("doomed") and not b.live("doomed") and not c.live("doomed")


def test_write_the_owner_never_saw_survives_and_reaches_the_owner(nodes: list[Node]) -> None:
    everyone_has_bucket(nodes)
    # A key owned by A, written on C and not replicated yet (in flight while A builds its manifest).
    key = next(f"k{i}" for i in range(1000) if owner_of_object("b", f"k{i}", IDS) == IDS[0])
    a, b, c = nodes
    put(c, key)
    report = a.sync.run(a.links(nodes))  # A is the owner: its manifest lacks the key
    assert c.live(key)
    assert a.live(key), report  # pulled by the owner (send_to_owner)
    sync_all(nodes)
    assert all(node.live(key) for node in nodes)


def test_concurrent_rewrite_is_not_deleted_by_an_older_tombstone(nodes: list[Node]) -> None:
    a, b, c = nodes
    everyone_has_bucket(nodes)
    put(a, "k")
    replicate(a, c, "k")
    a.store.delete_object("b", "k")
    put(c, "k", b"new data written on C")  # C never saw the delete: concurrent, later stamp
    sync_all(nodes)
    sync_all(nodes)
    winners = {node.store.meta.get_object("b", "k").version() for node in nodes}
    assert len(winners) == 1  # converged on one version, the same everywhere
    assert all(node.live("k") for node in nodes)


def test_empty_store_deletes_nothing_elsewhere_and_catches_up(nodes: list[Node], tmp_path: Path) -> None:
    """Go bug: an empty manifest at start-up purged everything on the peers."""
    a, b, c = nodes
    everyone_has_bucket(nodes)
    for i in range(50):
        put(a, f"k{i}")
        replicate(a, b, f"k{i}")
        replicate(a, c, f"k{i}")
    c.store.close()
    fresh = Node(tmp_path / "wiped", c.peer_id, IDS)  # C restarted with an empty data directory
    nodes[2] = fresh
    assert not fresh.sync.caught_up()
    report = fresh.sync.run(fresh.links(nodes))
    assert report["caught_up"]
    assert {r["mode"] for r in report["rounds"]} == {"catch-up", "owner"}
    for node in (a, b):
        assert all(node.live(f"k{i}") for i in range(50))
        assert sum(r["deleted_on_peer"] for r in report["rounds"]) == 0
    assert all(fresh.live(f"k{i}") for i in range(50))
    sync_all(nodes)
    assert all(node.live(f"k{i}") for node in nodes for i in range(50))
    fresh.store.close()


def test_node_that_cannot_reach_anyone_never_acts_as_owner(nodes: list[Node]) -> None:
    a, _, _ = nodes

    class DeadLink(LocalLink):
        def call(self, op: str, body: dict) -> dict:
            from tunnelmesh.sync import SyncError

            raise SyncError("unreachable")

        def push(self, kind: str, bucket: str, key: str) -> None:  # pragma: no cover - must not happen
            raise AssertionError("a node that did not catch up pushed something")

    report = a.sync.run([DeadLink(a.sync, other.sync) for other in nodes[1:]])
    assert report["caught_up"] is False
    assert all(r["mode"] == "catch-up" for r in report["rounds"])
    assert not a.sync.caught_up()


def test_bucket_another_node_created_is_not_purged(nodes: list[Node]) -> None:
    """Go bug: a manifest purged buckets (and their objects) owned by another node."""
    a, b, c = nodes
    b.store.create_bucket("only-on-b", "owner")
    put(b, "obj", bucket="only-on-b")
    sync_all(nodes)
    assert b.store.get_bucket("only-on-b") and b.live("obj", "only-on-b")
    assert a.live("obj", "only-on-b") and c.live("obj", "only-on-b")


def test_no_ping_pong_after_repair(nodes: list[Node]) -> None:
    """Go bug: ping-pong re-sends; once converged, a run sends nothing in either direction."""
    a, b, c = nodes
    everyone_has_bucket(nodes)
    for i in range(20):
        put(nodes[i % 3], f"k{i}")
    sync_all(nodes)
    sync_all(nodes)
    for report in sync_all(nodes):
        for r in report["rounds"]:
            assert r["outcome"] == "equal", r
            assert r["sent_to_peer"] == r["pulled"] == 0


def test_membership_disagreement_skips_the_round(nodes: list[Node]) -> None:
    a, b, c = nodes
    everyone_has_bucket(nodes)
    put(a, "k")
    b.members = IDS[:2]  # B has not heard of C yet
    report = a.sync.run([LocalLink(a.sync, b.sync)])
    assert report["rounds"][-1]["outcome"] == "skipped"


def test_cost_grows_with_what_differs(nodes: list[Node]) -> None:
    a, b, _ = nodes
    for node in (a, b):
        node.members = IDS[:2]
    a.store.create_bucket("b", "o")
    replicate(a, b, "", "b")
    template = put(a, "key/00000", b"")
    records = [dataclasses.replace(template, key=f"key/{i:05d}") for i in range(2000)]
    for node in (a, b):  # one transaction each: 2000 commits would cost seconds of fsync
        with node.store.meta.write() as tx:
            for record in records:
                tx.put_object(record)
    for node in (a, b):
        node.sync.run(node.links([a, b]))
    equal = a.sync.compare(LocalLink(a.sync, b.sync), mode="owner")
    assert equal.outcome == "equal"
    assert equal.bytes_sent + equal.bytes_received < 400
    b.store.delete_object("b", "key/00007")
    differing = a.sync.compare(LocalLink(a.sync, b.sync), mode="owner")
    differing_b = b.sync.compare(LocalLink(b.sync, a.sync), mode="owner")
    one_diff = [r for r in (differing, differing_b) if r.names_differing]
    assert len(one_diff) == 1 and one_diff[0].names_differing == 1
    assert one_diff[0].bytes_sent + one_diff[0].bytes_received < 16_000
    assert not a.live("key/00007")


def test_tombstones_purged_only_after_every_member_has_them_and_the_grace(tmp_path: Path) -> None:
    nodes = [Node(tmp_path, peer, IDS, grace=0.0) for peer in IDS]
    a, b, c = nodes
    everyone_has_bucket(nodes)
    put(a, "gone")
    for other in (b, c):
        replicate(a, other, "gone")
    a.store.delete_object("b", "gone")
    replicate(a, b, "gone")
    # C unreachable for everyone: nobody may purge (C does not hold the tombstone).
    for node in (a, b):
        node.sync.run([LocalLink(node.sync, o.sync) for o in (a, b) if o is not node])
    assert a.store.meta.get_object("b", "gone") is not None
    # C back: the first run brings it the tombstone, the next ones see it everywhere and purge it.
    for _ in range(3):
        sync_all(nodes)
    assert all(node.store.meta.get_object("b", "gone") is None for node in nodes)
    for node in nodes:
        node.store.close()


def test_tombstones_kept_during_the_grace(nodes: list[Node]) -> None:
    a, b, c = nodes
    everyone_has_bucket(nodes)
    put(a, "gone")
    a.store.delete_object("b", "gone")
    for _ in range(3):
        sync_all(nodes)
    assert all(node.store.meta.get_object("b", "gone").deleted for node in nodes)
