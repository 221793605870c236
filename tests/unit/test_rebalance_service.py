"""Rebalance decisions and the Rebalancer on real stores linked in process (tunnelmesh/rebalance.py)."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.chunks import ChunkRef
from storage.objects import ObjectStore
from storage.placement import members_fingerprint, place
from tunnelmesh.rebalance import Rebalancer, drain_pass, format_progress, referenced_chunk_sizes, take_cycle

CHUNK = 64 * 1024
IDS = ["a" * 16, "b" * 16, "c" * 16]


def test_take_cycle_respects_the_budget() -> None:
    refs = [ChunkRef(f"{i:064x}", 40) for i in range(10)]
    assert sum(r.size for r in take_cycle(refs, 100)) == 80
    assert take_cycle([ChunkRef("f" * 64, 500)], 100) == [ChunkRef("f" * 64, 500)]  # never stuck
    assert take_cycle([], 100) == []


class Cluster:
    def __init__(self, root: Path) -> None:
        self.members = IDS[:2]
        self.stores = {p: ObjectStore(root / p, p, chunk_size=CHUNK, fsync=False) for p in IDS}
        self.views = {p: self.members for p in IDS}
        self.fetched: list[tuple[str, int]] = []

    def rebalancer(self, peer: str) -> Rebalancer:
        def fetch(ref: ChunkRef) -> bytes:
            for other, store in self.stores.items():
                if other != peer and store.chunks.exists(ref.hash):
                    self.fetched.append((peer, ref.size))
                    return store.chunks.read(ref.hash)
            raise LookupError(ref.hash)

        def confirm(other: str, hashes: list[str]) -> tuple[str, set[str]]:
            store = self.stores[other]
            return members_fingerprint(self.views[other]), {h for h in hashes if store.chunks.exists(h)}

        return Rebalancer(self.stores[peer], peer, lambda: list(self.views[peer]), 2, fetch, confirm)

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


@pytest.fixture
def two_nodes_with_data(tmp_path: Path) -> Iterator[Cluster]:
    """A and B hold 40 objects (metadata everywhere, chunks on their holders); C is empty."""
    cluster = Cluster(tmp_path)
    rng = random.Random(7)
    a = cluster.stores[IDS[0]]
    for store in cluster.stores.values():
        store.create_bucket("b", "o")
    for i in range(40):
        data = rng.randbytes(rng.randrange(1, 4 * CHUNK))
        record = a.put_object("b", f"k{i}", io.BytesIO(data), content_length=len(data))
        for peer in IDS[1:]:
            cluster.stores[peer].apply_remote_object(record)
        for ref in record.chunks:
            cluster.stores[IDS[1]].chunks.write(a.chunks.read(ref.hash))
    yield cluster
    cluster.close()


def holders_hold_everything(cluster: Cluster, members: list[str]) -> bool:
    sizes = referenced_chunk_sizes(cluster.stores[IDS[0]].meta)
    return all(cluster.stores[p].chunks.exists(h) for h in sizes for p in place(h, members, 2))


def test_join_moves_only_the_ideal_within_the_budget_then_drops_confirmed_extras(two_nodes_with_data: Cluster) -> None:
    cluster = two_nodes_with_data
    new_members = IDS
    for peer in IDS:
        cluster.views[peer] = new_members
    sizes = referenced_chunk_sizes(cluster.stores[IDS[0]].meta)
    ideal = sum(size for h, size in sizes.items() if IDS[2] in place(h, new_members, 2))
    budget = 3 * CHUNK
    c = cluster.rebalancer(IDS[2])
    # A and B first try to drop (the Go bug): C holds nothing yet, so nothing may go.
    for peer in IDS[:2]:
        assert cluster.rebalancer(peer).drop_extra_copies() == (0, 0)
    cycles = []
    while True:
        report = c.cycle(budget)
        cycles.append(report)
        assert report.moved_bytes <= budget or report.moved_chunks == 1
        if not report.remaining_chunks:
            break
    moved = sum(r.moved_bytes for r in cycles)
    assert moved == ideal and len(cycles) > 1
    for peer in IDS[:2]:
        cluster.rebalancer(peer).drop_extra_copies()
    assert holders_hold_everything(cluster, new_members)
    for h in sizes:  # exactly the factor, on the right nodes
        assert {p for p in IDS if cluster.stores[p].chunks.exists(h)} == set(place(h, new_members, 2))
    for i in range(40):  # every object still complete somewhere
        record = cluster.stores[IDS[0]].head_object("b", f"k{i}")
        assert all(any(cluster.stores[p].chunks.exists(r.hash) for p in IDS) for r in record.chunks)


def test_no_drop_when_holders_disagree_on_membership(two_nodes_with_data: Cluster) -> None:
    cluster = two_nodes_with_data
    cluster.views[IDS[0]] = IDS
    cluster.views[IDS[2]] = IDS
    c = cluster.rebalancer(IDS[2])
    while c.cycle(10**9).remaining_chunks:
        pass
    # B has not seen C join yet: A must not drop copies on the strength of C's confirmation alone.
    assert cluster.rebalancer(IDS[0]).drop_extra_copies() == (0, 0)


def test_drain_sends_only_what_the_remaining_holders_lack(tmp_path: Path) -> None:
    """C leaves a three-node cluster: each holder is asked first, so no chunk is sent twice and the
    bytes moved are exactly the (chunk, holder) pairs that lacked it."""
    cluster = Cluster(tmp_path)
    for peer in IDS:
        cluster.views[peer] = IDS
    rng = random.Random(11)
    a, c = cluster.stores[IDS[0]], cluster.stores[IDS[2]]
    for store in cluster.stores.values():
        store.create_bucket("b", "o")
    for i in range(30):
        data = rng.randbytes(rng.randrange(1, 4 * CHUNK))
        record = a.put_object("b", f"k{i}", io.BytesIO(data), content_length=len(data))
        for peer in IDS[1:]:
            cluster.stores[peer].apply_remote_object(record)
        for ref in record.chunks:  # every chunk on exactly its holders among the three
            chunk = a.chunks.read(ref.hash)
            for peer in IDS:
                if peer in place(ref.hash, IDS, 2):
                    cluster.stores[peer].chunks.write(chunk)
                else:
                    cluster.stores[peer].chunks.delete(ref.hash)
    remaining = IDS[:2]
    sizes = referenced_chunk_sizes(c.meta)
    expected = sum(size for h, size in sizes.items() if c.chunks.exists(h)
                   for p in remaining if not cluster.stores[p].chunks.exists(h))
    assert expected > 0
    sent: list[tuple[str, str]] = []

    def send(peer: str, ref: ChunkRef) -> None:
        sent.append((peer, ref.hash))
        cluster.stores[peer].chunks.write_verified(c.chunks.read(ref.hash), ref.hash)

    drainer = cluster.rebalancer(IDS[2])
    first = drain_pass(drainer, remaining, send)
    assert first.sent_bytes == expected and first.already_held > 0 and first.failed == 0
    assert len(sent) == len(set(sent))  # nothing sent twice
    second = drain_pass(drainer, remaining, send)
    assert second.pending_chunks == 0 and second.sent_chunks == 0  # all confirmed, nothing re-sent
    for h in sizes:  # the full factor on the remaining nodes
        assert all(cluster.stores[p].chunks.exists(h) for p in place(h, remaining, 2))
    cluster.close()


def test_drain_with_an_unreachable_holder_keeps_the_chunk_pending(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    for peer in IDS:
        cluster.views[peer] = IDS
    c = cluster.stores[IDS[2]]
    c.create_bucket("b", "o")
    c.put_object("b", "k", io.BytesIO(b"z" * 1000), content_length=1000)

    def send(peer: str, ref: ChunkRef) -> None:
        raise ConnectionError("down")

    result = drain_pass(cluster.rebalancer(IDS[2]), IDS[:2], send)
    assert result.pending_chunks == 1 and result.failed == 2 and result.sent_bytes == 0
    with pytest.raises(RuntimeError):
        drain_pass(cluster.rebalancer(IDS[2]), [], send)
    cluster.close()


def test_format_progress_shows_bytes_and_a_bar_per_coordinator() -> None:
    progress = {
        "coordinator-a": {"state": "done", "moved_bytes": 0, "remaining_bytes": 0},
        "coordinator-c": {"state": "running", "moved_bytes": 30_000_000, "remaining_bytes": 10_000_000},
        "coordinator-b": {"state": "unreachable", "error": "connection refused"},
        "coordinator-d": {"state": "running", "moved_bytes": 0, "remaining_bytes": -1},
    }
    text = format_progress(progress, 80)
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["coordinator-a", "coordinator-b", "coordinator-c",
                                                        "coordinator-d"]
    assert all(len(line) <= 80 for line in lines)
    c_line = lines[2]
    assert "75%" in c_line and "30.0 MB" in c_line and "10.0 MB" in c_line
    bar = c_line[c_line.index("[") + 1:c_line.index("]")]
    assert set(bar) == {"#", "-"} and abs(bar.count("#") / len(bar) - 0.75) < 0.05
    assert "100%" in lines[0] and "connection refused" in lines[1]
    assert "[" not in lines[3] and "?" in lines[3]  # remaining not computed yet: no bar
    assert lines[-1] == "total: moved 30.0 MB, remaining 10.0 MB"
    assert len(format_progress(progress, 120).splitlines()[2]) > len(c_line)  # the bar uses the width
    assert format_progress({}, 80) == "no coordinators"
