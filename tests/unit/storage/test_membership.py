"""Coordinator membership: merge laws, transitive discovery, removal/re-join, versions, health."""

from __future__ import annotations

import base64
import copy
import hashlib
import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.membership import (
    ACTIVE,
    REMOVED,
    UNSTAMPED,
    HealthTracker,
    Member,
    MembershipView,
    Stamp,
    coordinator_list,
    coordinator_mesh_ips,
    is_newer,
    peer_id_for_public_key,
)

PROPERTY = settings(max_examples=60, deadline=None)


def make_key(seed: str) -> str:
    """A deterministic 32-byte 'public key' (any 32 bytes will do: only its hash is used)."""
    return base64.b64encode(hashlib.sha256(seed.encode()).digest()).decode()


def make_member(seed: str, *, variant: int = 0) -> Member:
    key = make_key(seed)
    return Member(
        peer_id=peer_id_for_public_key(key),
        name=f"coord-{seed}",
        public_key=key,
        api_url=f"https://{seed}.example:{8443 + variant}",
        s3_url=f"https://{seed}.example:9000",
        mesh_ip=f"10.42.{variant}.{10 + int(seed[1:])}",
    )


SEEDS = [f"n{i}" for i in range(5)]
MEMBERS = [make_member(s) for s in SEEDS]
IDS = [m.peer_id for m in MEMBERS]


def ids_sorted(view: MembershipView) -> list[str]:
    return [m.peer_id for m in view.active_members()]


# ---------------------------------------------------------------------------------------------
# Random views: arbitrary writes with arbitrary stamps (including two writes with one stamp,
# which next_stamp never produces) so the merge laws are checked on the hardest inputs.
# ---------------------------------------------------------------------------------------------

write_ops = st.lists(
    st.tuples(
        st.booleans(),  # True: add_or_update, False: remove
        st.integers(0, len(MEMBERS) - 1),  # which member
        st.integers(1, 6),  # stamp counter
        st.integers(0, 2),  # origin
        st.integers(0, 2),  # field variant
    ),
    max_size=8,
)


def build(ops: list[tuple[bool, int, int, int, int]]) -> MembershipView:
    view = MembershipView()
    for add, index, counter, origin, variant in ops:
        stamp = Stamp(counter, IDS[origin])
        if add:
            view = view.add_or_update(make_member(SEEDS[index], variant=variant), stamp)
        else:
            view = view.remove(IDS[index], stamp)
    return view


views = write_ops.map(build)


@PROPERTY
@given(views, views)
def test_merge_is_commutative(a: MembershipView, b: MembershipView) -> None:
    ab, ba = a.merge(b), b.merge(a)
    assert ab == ba
    assert (ab.version, ab.digest()) == (ba.version, ba.digest())


@PROPERTY
@given(views, views, views)
def test_merge_is_associative(a: MembershipView, b: MembershipView, c: MembershipView) -> None:
    assert a.merge(b).merge(c) == a.merge(b.merge(c))


@PROPERTY
@given(views, views)
def test_merge_is_idempotent(a: MembershipView, b: MembershipView) -> None:
    assert a.merge(a) == a
    ab = a.merge(b)
    assert ab.merge(a) == ab
    assert ab.merge(b) == ab


@PROPERTY
@given(views, views)
def test_version_never_decreases_under_merge(a: MembershipView, b: MembershipView) -> None:
    ab = a.merge(b)
    assert ab.version >= max(a.version, b.version)
    # Strict growth on every change holds for honestly stamped writes: see the replica test below
    # (these random views also contain two different writes with one stamp).


@PROPERTY
@given(views)
def test_dict_round_trip_keeps_content_version_and_digest(view: MembershipView) -> None:
    wire = json.loads(json.dumps(view.to_dict()))
    back = MembershipView.from_dict(wire)
    assert back == view
    assert (back.version, back.digest()) == (view.version, view.digest())


# ---------------------------------------------------------------------------------------------
# Honest replicas: writes stamped with next_stamp, random gossip. Every change of a replica's view
# raises its version strictly, and after a full exchange all replicas hold one view.
# ---------------------------------------------------------------------------------------------

replica_actions = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 2), st.integers(0, 4), st.booleans(), st.integers(0, 2)),
        st.tuples(st.just("gossip"), st.integers(0, 2), st.integers(0, 2)),
    ),
    max_size=25,
)


@PROPERTY
@given(replica_actions)
def test_replicas_converge_and_versions_rise_with_every_change(actions: list[tuple]) -> None:
    replicas = [MembershipView() for _ in range(3)]
    seen_lists: list[MembershipView] = []
    for action in actions:
        if action[0] == "write":
            _, r, index, add, variant = action
            before = replicas[r]
            stamp = before.next_stamp(IDS[r])
            after = (
                before.add_or_update(make_member(SEEDS[index], variant=variant), stamp)
                if add
                else before.remove(IDS[index], stamp)
            )
        else:
            _, src, r = action
            before = replicas[r]
            after = before.merge(replicas[src])
        assert after.version >= before.version
        if after != before:
            assert after.version > before.version
        replicas[r] = after
        seen_lists.append(after)
    for _ in range(2):  # full anti-entropy round: everyone pulls from everyone
        for r, src in itertools.product(range(3), range(3)):
            replicas[r] = replicas[r].merge(replicas[src])
    final = replicas[0]
    assert all(r == final and r.digest() == final.digest() for r in replicas)
    # A peer that keeps "the newer list" by (version, digest) ends on the converged one.
    tags = [(v.version, v.digest()) for v in seen_lists] + [(final.version, final.digest())]
    assert max(tags) == (final.version, final.digest())
    assert all(not is_newer(t, (final.version, final.digest())) for t in tags)


# ---------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------


def join(registrar: MembershipView, registrar_id: str, newcomer: Member) -> MembershipView:
    return registrar.add_or_update(newcomer, registrar.next_stamp(registrar_id))


def test_discovery_is_transitive_whatever_the_merge_order() -> None:
    a, b, c, d = MEMBERS[:4]
    # A bootstraps; B and C each register with A and take A's view from the response.
    view_a = join(MembershipView(), a.peer_id, a)
    view_a = join(view_a, a.peer_id, b)
    view_b = MembershipView().merge(view_a)
    view_a = join(view_a, a.peer_id, c)
    view_c = MembershipView().merge(view_a)
    assert c.peer_id not in ids_sorted(view_b)  # B has not heard of C yet

    results = set()
    for order in itertools.permutations([("b", "a"), ("c", "a"), ("a", "b"), ("b", "c"), ("c", "b")]):
        views = {"a": view_a, "b": view_b, "c": view_c}
        for dst, src in order:
            views[dst] = views[dst].merge(views[src])
        for dst, src in order:  # a second round closes any order
            views[dst] = views[dst].merge(views[src])
        assert views["a"] == views["b"] == views["c"]
        results.add((views["a"].version, views["a"].digest()))
        assert ids_sorted(views["b"]) == sorted([a.peer_id, b.peer_id, c.peer_id])
    assert len(results) == 1  # same version and digest whatever the order

    # A fourth coordinator joins C; gossip C -> B -> A brings it everywhere.
    view_c = join(view_c.merge(view_a), c.peer_id, d)
    view_b = view_b.merge(view_c)
    view_a = view_a.merge(view_b)
    view_c = view_c.merge(view_a)
    assert view_a == view_b == view_c
    assert ids_sorted(view_a) == sorted(m.peer_id for m in (a, b, c, d))
    assert view_a.version > results.pop()[0]


def test_removal_beats_the_join_it_has_seen_and_a_later_rejoin_beats_the_removal() -> None:
    a, x = MEMBERS[0], MEMBERS[1]
    view = join(join(MembershipView(), a.peer_id, a), a.peer_id, x)
    removed = view.remove(x.peer_id, view.next_stamp(a.peer_id))
    assert x.peer_id not in ids_sorted(removed)
    assert removed.get(x.peer_id).state == REMOVED
    assert removed.get(x.peer_id).name == x.name  # the tombstone keeps the last known record
    assert removed.version > view.version
    assert view.merge(removed) == removed.merge(view) == removed  # the old join cannot undo it

    rejoined = removed.add_or_update(x, removed.next_stamp(a.peer_id))
    assert rejoined.is_active(x.peer_id)
    assert rejoined.merge(removed) == rejoined
    # A stale re-join (stamped before the removal) loses.
    stale = removed.add_or_update(x, Stamp(removed.get(x.peer_id).stamp.counter - 1, a.peer_id))
    assert not stale.is_active(x.peer_id)


def test_removal_versus_concurrent_update_larger_stamp_wins_on_every_node() -> None:
    a, b, x = MEMBERS[0], MEMBERS[1], MEMBERS[2]
    lo, hi = sorted([a.peer_id, b.peer_id])
    base = join(join(join(MembershipView(), lo, a), lo, b), lo, x)
    moved = make_member(SEEDS[2], variant=1)
    # Same counter on both sides of a partition: the origin decides, identically everywhere.
    removal = base.remove(x.peer_id, base.next_stamp(lo))
    update = base.add_or_update(moved, base.next_stamp(hi))
    merged = removal.merge(update)
    assert merged == update.merge(removal)
    assert merged.get(x.peer_id) == update.get(x.peer_id)  # hi > lo: the update wins
    # The admin re-issues the removal after seeing the update: now it wins everywhere.
    again = merged.remove(x.peer_id, merged.next_stamp(lo))
    assert not again.merge(update).merge(removal).is_active(x.peer_id)

    # With a higher counter the removal wins over the concurrent update.
    removal_later = base.remove(x.peer_id, Stamp(base.clock + 2, lo))
    assert not removal_later.merge(update).is_active(x.peer_id)
    assert not update.merge(removal_later).is_active(x.peer_id)


def test_merge_of_same_counter_concurrent_writes_outranks_both_lists() -> None:
    # Two coordinators at the same clock update one member concurrently: the stamps share a counter.
    # A peer holding either list must see the merged list as newer, or it would keep a stale one.
    a, b, x = MEMBERS[0], MEMBERS[1], MEMBERS[2]
    base = join(MembershipView(), a.peer_id, x)
    left = base.add_or_update(make_member(SEEDS[2], variant=1), base.next_stamp(a.peer_id))
    right = base.add_or_update(make_member(SEEDS[2], variant=2), base.next_stamp(b.peer_id))
    assert left.clock == right.clock
    merged = left.merge(right)
    for side in (left, right):
        assert merged.version > side.version
        assert is_newer((merged.version, merged.digest()), (side.version, side.digest()))
        assert not is_newer((side.version, side.digest()), (merged.version, merged.digest()))


def test_remove_of_an_unknown_member_is_a_tombstone_that_beats_an_older_join() -> None:
    a, x = MEMBERS[0], MEMBERS[1]
    tomb = MembershipView().remove(x.peer_id, Stamp(5, a.peer_id))
    assert tomb.get(x.peer_id).state == REMOVED and tomb.active_members() == []
    old_join = MembershipView().add_or_update(x, Stamp(3, a.peer_id))
    assert not old_join.merge(tomb).is_active(x.peer_id)


def test_active_members_sorted_and_next_stamp_exceeds_clock() -> None:
    view = MembershipView()
    for m in reversed(MEMBERS):
        view = view.add_or_update(m, view.next_stamp(IDS[0]))
    assert ids_sorted(view) == sorted(IDS)
    assert view.clock == len(MEMBERS)
    assert view.next_stamp(IDS[1]) == Stamp(len(MEMBERS) + 1, IDS[1])
    assert [m.peer_id for m in view.all_members()] == sorted(IDS)


def test_writes_need_real_stamps_and_active_members() -> None:
    view = MembershipView()
    with pytest.raises(ValueError, match="real stamp"):
        view.add_or_update(MEMBERS[0], UNSTAMPED)
    with pytest.raises(ValueError, match="active member"):
        view.add_or_update(Member(IDS[0], "", "", "", "", "", REMOVED), Stamp(1, IDS[0]))
    with pytest.raises(ValueError):
        Stamp(1, "not-a-peer-id")
    with pytest.raises(ValueError):
        Stamp(-1, "")


def test_same_content_same_digest_different_content_different_digest() -> None:
    one = join(MembershipView(), IDS[0], MEMBERS[0])
    two = join(MembershipView(), IDS[0], MEMBERS[0])
    assert one == two and one.digest() == two.digest() and hash(one) == hash(two)
    other = join(MembershipView(), IDS[0], make_member(SEEDS[0], variant=1))
    assert other.digest() != one.digest()


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def test_peer_id_rule_matches_node_identity() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from tunnelmesh.identity import NodeIdentity, peer_id_from_public_key

    node = NodeIdentity(Ed25519PrivateKey.generate())
    assert peer_id_for_public_key(node.public_key_b64) == peer_id_from_public_key(node.public_key_bytes)
    assert peer_id_for_public_key(node.public_key_b64) == node.peer_id


@pytest.mark.parametrize(
    "change, message",
    [
        ({"peer_id": "ABCDEF0123456789"}, "peer_id"),
        ({"public_key": make_key("someone-else")}, "does not belong"),
        ({"public_key": "%%%"}, "base64"),
        ({"public_key": base64.b64encode(b"short").decode()}, "32-byte"),
        ({"name": ""}, "lacks name"),
        ({"name": "bad\nname"}, "printable"),
        ({"api_url": "ftp://x"}, "api_url"),
        ({"mesh_ip": "10.42.0.300"}, "mesh_ip"),
        ({"mesh_ip": "::1"}, "mesh_ip"),
        ({"state": "gone"}, "state"),
        ({"name": 5}, "name must be a string"),
    ],
)
def test_member_rejects_invalid_fields(change: dict, message: str) -> None:
    fields = dict(
        peer_id=IDS[0],
        name="c",
        public_key=MEMBERS[0].public_key,
        api_url="https://c.example:8443",
        s3_url="",
        mesh_ip="10.42.0.9",
    )
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        Member(**fields)


def _sample_dict() -> dict:
    view = join(join(MembershipView(), IDS[0], MEMBERS[0]), IDS[0], MEMBERS[1])
    return view.remove(IDS[1], view.next_stamp(IDS[0])).to_dict()


def _set(path: tuple, value: object):
    def mutate(d: dict) -> dict:
        target = d
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
        return d

    return mutate


def _delete(path: tuple):
    def mutate(d: dict) -> dict:
        target = d
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]
        return d

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: [d], "must be an object"),
        (lambda d: None, "must be an object"),
        (_set(("format",), 2), "format"),
        (_set(("extra",), 1), "unknown keys"),
        (_set(("members",), {}), "must be a list"),
        (_set(("members", 0), "x"), r"members\[0\]: member must be an object"),
        (_delete(("members", 0, "name")), r"members\[0\]: member lacks \['name'\]"),
        (_set(("members", 0, "colour"), "red"), "unknown keys"),
        (_set(("members", 0, "peer_id"), "zz"), "peer_id"),
        (_set(("members", 0, "state"), "zombie"), "state"),
        (_set(("members", 0, "mesh_ip"), "10.42.0.01"), "mesh_ip"),
        (_set(("members", 0, "stamp"), [1, "x"]), "stamp must be an object"),
        (_set(("members", 0, "stamp", "counter"), "1"), "counter"),
        (_set(("members", 0, "stamp", "counter"), True), "counter"),
        (_set(("members", 0, "stamp", "counter"), 0), "counter"),
        (_set(("members", 0, "stamp", "origin"), "nobody"), "origin"),
        (_set(("members", 0, "seen"), {}), "seen"),
        (_set(("members", 0, "seen"), []), "seen"),
        (_set(("members", 0, "seen", "0000000000000000"), -1), "seen entry"),
        (_set(("members", 0, "seen", "ffffffffffffffff"), 99), "does not match the stamp"),
        (lambda d: d["members"].append(copy.deepcopy(d["members"][0])) or d, "duplicate peer_id"),
        (_set(("version",), 10**6), "version"),
        (_set(("version",), "3"), "version"),
        (_set(("digest",), "0" * 64), "digest"),
    ],
)
def test_from_dict_rejects_malformed_input(mutate, message: str) -> None:
    data = mutate(_sample_dict())
    with pytest.raises(ValueError, match=message):
        MembershipView.from_dict(data)


def test_from_dict_accepts_a_dict_without_version_and_digest() -> None:
    data = _sample_dict()
    expected = MembershipView.from_dict(data)
    del data["version"], data["digest"]
    assert MembershipView.from_dict(data) == expected


# ---------------------------------------------------------------------------------------------
# Health and the list peers receive
# ---------------------------------------------------------------------------------------------

INTERVAL, MISSES = 10.0, 3


def test_health_down_after_missed_heartbeats_and_up_again() -> None:
    health = HealthTracker()
    peer = IDS[1]
    assert not health.is_up(peer, 0.0, INTERVAL, MISSES)  # never heard from
    health.heartbeat(peer, 100.0)
    assert health.is_up(peer, 100.0 + INTERVAL * MISSES, INTERVAL, MISSES)
    assert not health.is_up(peer, 100.0 + INTERVAL * MISSES + 0.001, INTERVAL, MISSES)
    health.heartbeat(peer, 150.0)
    assert health.is_up(peer, 150.0, INTERVAL, MISSES)
    health.heartbeat(peer, 120.0)  # a late, out-of-order heartbeat does not move it back
    assert health.last_seen(peer) == 150.0
    assert health.status(150.0, INTERVAL, MISSES, [peer, IDS[2]]) == {peer: True, IDS[2]: False}
    health.forget(peer)
    assert health.snapshot() == {}
    with pytest.raises(ValueError):
        health.is_up(peer, 0.0, 0.0, MISSES)
    with pytest.raises(ValueError):
        health.is_up(peer, 0.0, INTERVAL, 0)


def test_down_coordinator_stays_listed_until_removed() -> None:
    a, b, c = MEMBERS[:3]
    view = MembershipView()
    for m in (a, b, c):
        view = join(view, a.peer_id, m)
    health = HealthTracker({b.peer_id: 0.0, c.peer_id: 0.0})
    health.heartbeat(c.peer_id, 100.0)
    listing = coordinator_list(view, health, 100.0, INTERVAL, MISSES, self_peer_id=a.peer_id)
    assert [item["peer_id"] for item in listing] == sorted([a.peer_id, b.peer_id, c.peer_id])
    healthy = {item["peer_id"]: item["healthy"] for item in listing}
    assert healthy == {a.peer_id: True, b.peer_id: False, c.peer_id: True}
    assert set(listing[0]) == {"name", "peer_id", "mesh_ip", "api_url", "s3_url", "healthy"}
    assert view.is_active(b.peer_id)  # down is not removed

    health.heartbeat(b.peer_id, 101.0)
    assert all(
        i["healthy"] for i in coordinator_list(view, health, 101.0, INTERVAL, MISSES, self_peer_id=a.peer_id)
    )
    view = view.remove(b.peer_id, view.next_stamp(a.peer_id))
    listing = coordinator_list(view, health, 101.0, INTERVAL, MISSES, self_peer_id=a.peer_id)
    assert b.peer_id not in [i["peer_id"] for i in listing]
    assert coordinator_mesh_ips(view) == [i["mesh_ip"] for i in listing]


def test_member_defaults() -> None:
    m = MEMBERS[0]
    assert m.state == ACTIVE and m.stamp == UNSTAMPED
