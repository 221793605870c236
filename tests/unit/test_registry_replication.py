"""Peer registry replication: merging records from other coordinators converges, resolves name and
mesh IP clashes deterministically, and keeps local observations local."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from storage.registry import PeerRecord, PeerRegistry

CIDR = "10.9.0.0/28"  # tiny pool: clashes are likely


def exchange(x: PeerRegistry, y: PeerRegistry) -> None:
    """What a heartbeat round does on a digest mismatch: push x's records, merge y's answer."""
    x_records = x.list_peers()
    y.merge_records(x_records, mesh_cidr=CIDR)
    x.merge_records(y.list_peers(), mesh_cidr=CIDR)


def test_partitioned_registrations_converge_without_duplicates(tmp_path: Path) -> None:
    a, b = PeerRegistry(tmp_path / "a.db"), PeerRegistry(tmp_path / "b.db")
    # During a partition both accept a "laptop" (different keys) and hand out addresses independently.
    a.register(peer_id="1" * 16, name="laptop", public_key="k1", mesh_cidr=CIDR, now_us=100)
    b.register(peer_id="2" * 16, name="laptop", public_key="k2", mesh_cidr=CIDR, now_us=200)
    for i in range(3):
        a.register(peer_id=f"a{i:015x}", name=f"a{i}", public_key="k", mesh_cidr=CIDR)
        b.register(peer_id=f"b{i:015x}", name=f"b{i}", public_key="k", mesh_cidr=CIDR)
    exchange(a, b)
    exchange(b, a)
    assert a.digest() == b.digest()
    records = a.list_peers()
    assert len({r.mesh_ip for r in records}) == len(records) == 8
    assert len({r.name for r in records}) == 8
    assert a.get("1" * 16).name == "laptop" and a.get("2" * 16).name == "laptop-2"  # first registered keeps it


def test_a_newer_registration_wins_and_last_seen_stays_local(tmp_path: Path) -> None:
    a, b = PeerRegistry(tmp_path / "a.db"), PeerRegistry(tmp_path / "b.db")
    old = a.register(peer_id="1" * 16, name="p", public_key="k", addresses=["x"], mesh_cidr=CIDR, now_us=100)
    b.merge_records([old], mesh_cidr=CIDR)
    b.touch("1" * 16, now_us=999)
    newer = a.register(peer_id="1" * 16, name="p", public_key="k", addresses=["y"], mesh_cidr=CIDR, now_us=200)
    assert b.merge_records([newer], mesh_cidr=CIDR)
    assert b.get("1" * 16).addresses == ("y",) and b.get("1" * 16).last_seen_us == 999
    assert not b.merge_records([old], mesh_cidr=CIDR)  # an older record changes nothing
    assert a.digest() == b.digest()


def test_records_travel_as_dicts(tmp_path: Path) -> None:
    a = PeerRegistry(tmp_path / "a.db")
    record = a.register(peer_id="1" * 16, name="p", public_key="k", mesh_cidr=CIDR, is_coordinator=True)
    again = PeerRecord.from_dict(record.replicated())
    assert again.replicated() == record.replicated()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 5), st.sampled_from(["n", "m", "o"])),
                min_size=1, max_size=10))
def test_merge_order_does_not_matter(tmp_path_factory: object, writes: list[tuple[str, int, str]]) -> None:
    base = tmp_path_factory.mktemp("r")  # type: ignore[attr-defined]
    a, b, c = (PeerRegistry(base / f"{n}.db") for n in "abc")
    for t, (where, peer, name) in enumerate(writes):
        target = a if where == "a" else b
        target.register(peer_id=f"{peer:016x}", name=name, public_key="k", mesh_cidr=CIDR, now_us=1000 + t)
    exchange(a, b)
    c.merge_records(b.list_peers(), mesh_cidr=CIDR)
    c.merge_records(a.list_peers(), mesh_cidr=CIDR)
    exchange(c, a)
    exchange(a, b)
    assert a.digest() == b.digest() == c.digest()
    records = a.list_peers()
    assert len({r.mesh_ip for r in records}) == len(records)
    assert len({r.name for r in records}) == len(records)
