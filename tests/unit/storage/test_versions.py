"""Version vector laws and the conflict rule (storage/versions.py)."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.versions import (
    Ordering,
    Version,
    VersionVector,
    choose_winner,
    next_timestamp,
    prefer,
    resolve,
)

# A small actor alphabet so that generated vectors overlap often; "a.2" is peer a after a
# disk loss (new incarnation).
ACTORS = ["a.1", "b.1", "c.1", "a.2"]
actors = st.sampled_from(ACTORS)
vectors = st.dictionaries(actors, st.integers(min_value=0, max_value=3)).map(VersionVector)
versions = st.builds(
    Version,
    vv=vectors,
    last_modified_us=st.integers(min_value=0, max_value=5),
    writer=actors,
    deleted=st.booleans(),
    etag=st.sampled_from(["", "e1", "e2"]),
)

FAST = settings(max_examples=150, deadline=None)
SLOW = settings(max_examples=60, deadline=None)


# -- VersionVector: construction, serialisation -------------------------------------------------


def test_zero_entries_are_dropped_and_equal_vectors_hash_alike() -> None:
    vv = VersionVector({"a.1": 0, "b.1": 2})
    assert vv == VersionVector({"b.1": 2})
    assert hash(vv) == hash(VersionVector([("b.1", 2)]))
    assert len(vv) == 1 and bool(vv) and not VersionVector()
    assert vv.counter("a.1") == 0 and vv["b.1"] == 2
    assert "a.1" not in vv
    assert repr(vv) == "VersionVector({'b.1': 2})"


def test_vector_is_immutable_and_copyable() -> None:
    vv = VersionVector({"a.1": 1})
    with pytest.raises(AttributeError):
        vv._entries = {}  # type: ignore[misc]
    with pytest.raises(AttributeError):
        vv.anything = 1  # type: ignore[attr-defined]
    assert pickle.loads(pickle.dumps(vv)) == vv
    assert copy.deepcopy(vv) == vv
    exported = vv.to_dict()
    exported["a.1"] = 99
    assert vv["a.1"] == 1


@given(vectors)
@FAST
def test_dict_and_json_round_trip(vv: VersionVector) -> None:
    assert VersionVector.from_dict(vv.to_dict()) == vv
    assert VersionVector.from_dict(json.loads(json.dumps(vv.to_dict()))) == vv
    assert VersionVector.from_json(vv.to_json()) == vv
    assert " " not in vv.to_json()


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        [["a.1", 1]],
        "a.1",
        {"a.1": 0},
        {"a.1": -1},
        {"a.1": 1.0},
        {"a.1": "1"},
        {"a.1": True},
        {"": 1},
        {1: 1},
        {"a.1": None},
    ],
)
def test_from_dict_rejects_invalid_input(bad: object) -> None:
    with pytest.raises(ValueError):
        VersionVector.from_dict(bad)


def test_from_json_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        VersionVector.from_json("{not json")
    with pytest.raises(ValueError):
        VersionVector({"a.1": -1})


# -- VersionVector: partial-order and lattice laws ----------------------------------------------


@given(vectors)
@FAST
def test_reflexive(a: VersionVector) -> None:
    assert a.compare(a) is Ordering.EQUAL
    assert a.descends(a)


@given(vectors, vectors)
@FAST
def test_antisymmetric_and_compare_consistent_with_descends(a: VersionVector, b: VersionVector) -> None:
    if a.descends(b) and b.descends(a):
        assert a == b
    expected = {
        (True, True): Ordering.EQUAL,
        (True, False): Ordering.AFTER,
        (False, True): Ordering.BEFORE,
        (False, False): Ordering.CONCURRENT,
    }[(a.descends(b), b.descends(a))]
    assert a.compare(b) is expected
    mirror = {
        Ordering.EQUAL: Ordering.EQUAL,
        Ordering.AFTER: Ordering.BEFORE,
        Ordering.BEFORE: Ordering.AFTER,
        Ordering.CONCURRENT: Ordering.CONCURRENT,
    }
    assert b.compare(a) is mirror[a.compare(b)]
    assert (a.compare(b) is Ordering.EQUAL) == (a == b)


@given(vectors, vectors, vectors)
@FAST
def test_transitive(c: VersionVector, x: VersionVector, y: VersionVector) -> None:
    # Build a >= b >= c so the premise always holds, plus check on the raw triple.
    b = c.merge(x)
    a = b.merge(y)
    assert a.descends(b) and b.descends(c) and a.descends(c)
    if x.descends(y) and y.descends(c):
        assert x.descends(c)


@given(vectors, vectors, vectors)
@FAST
def test_merge_is_a_least_upper_bound(a: VersionVector, b: VersionVector, c: VersionVector) -> None:
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a
    m = a.merge(b)
    assert m.descends(a) and m.descends(b)
    if c.descends(a) and c.descends(b):
        assert c.descends(m)


@given(vectors, actors)
@FAST
def test_increment_is_strictly_after(a: VersionVector, actor: str) -> None:
    bumped = a.increment(actor)
    assert bumped.compare(a) is Ordering.AFTER
    assert a.compare(bumped) is Ordering.BEFORE
    assert bumped.counter(actor) == a.counter(actor) + 1


# -- choose_winner on arbitrary pairs -----------------------------------------------------------


@given(versions, versions)
@FAST
def test_choose_winner_is_commutative_and_merges(a: Version, b: Version) -> None:
    assert choose_winner(a, b) == choose_winner(b, a)
    w = choose_winner(a, b)
    assert w.vv == a.vv.merge(b.vv)
    side = prefer(a, b)
    assert side is a or side is b
    assert (side.last_modified_us, side.writer, side.deleted, side.etag) == (
        w.last_modified_us,
        w.writer,
        w.deleted,
        w.etag,
    )
    # The stored result settles the question: re-applying either input changes nothing.
    assert choose_winner(w, a) == w and choose_winner(w, b) == w


@given(versions, vectors, actors, versions)
@FAST
def test_dominating_write_always_wins(base: Version, seen: VersionVector, actor: str, shape: Version) -> None:
    # `later` has seen `base` (and maybe more) and then written: its vector dominates,
    # whatever its stamp, writer, tombstone flag or etag.
    later = Version(
        base.vv.merge(seen).increment(actor),
        shape.last_modified_us,
        shape.writer,
        shape.deleted,
        shape.etag,
    )
    for result in (choose_winner(base, later), choose_winner(later, base)):
        assert (result.last_modified_us, result.writer, result.deleted, result.etag) == (
            later.last_modified_us,
            later.writer,
            later.deleted,
            later.etag,
        )
        assert result.vv == later.vv


@given(versions, actors, st.integers(min_value=0, max_value=5))
@FAST
def test_tombstone_is_never_resurrected_by_the_put_it_deleted(put: Version, actor: str, stamp: int) -> None:
    put = Version(put.vv, put.last_modified_us, put.writer, deleted=False, etag=put.etag)
    # The delete saw the PUT; its stamp may even be earlier (a clock behind).
    tombstone = Version(put.vv.increment(actor), stamp, actor, deleted=True)
    stored = choose_winner(tombstone, put)
    assert stored.deleted
    # A delayed re-delivery of the PUT, any number of times, in any order.
    assert choose_winner(put, stored).deleted and choose_winner(stored, put).deleted


@given(versions, actors)
@FAST
def test_newer_put_after_delete_wins(tombstone: Version, actor: str) -> None:
    tombstone = Version(tombstone.vv, tombstone.last_modified_us, tombstone.writer, deleted=True)
    put = Version(
        tombstone.vv.increment(actor),
        next_timestamp(tombstone.last_modified_us, 0),
        actor,
        etag="new",
    )
    for stored in (choose_winner(tombstone, put), choose_winner(put, tombstone)):
        assert not stored.deleted and stored.etag == "new"


def test_concurrent_writes_later_stamp_then_larger_writer() -> None:
    a = Version(VersionVector({"a.1": 1}), 200, "a.1", etag="A")
    b = Version(VersionVector({"b.1": 1}), 100, "b.1", etag="B")
    assert choose_winner(a, b).etag == "A"
    same_stamp = Version(VersionVector({"b.1": 1}), 200, "b.1", etag="B")
    assert choose_winner(a, same_stamp).etag == "B"  # "b.1" > "a.1"
    assert choose_winner(a, b).vv == VersionVector({"a.1": 1, "b.1": 1})


def test_full_tie_prefers_the_tombstone_then_larger_etag() -> None:
    vv = VersionVector({"a.1": 1})
    put = Version(vv, 5, "a.1", deleted=False, etag="x")
    tomb = Version(vv, 5, "a.1", deleted=True, etag="")
    assert choose_winner(put, tomb).deleted and choose_winner(tomb, put).deleted
    assert choose_winner(Version(vv, 5, "a.1", etag="a"), Version(vv, 5, "a.1", etag="b")).etag == "b"


def test_resolve_needs_input() -> None:
    with pytest.raises(ValueError):
        resolve([])


def test_next_timestamp() -> None:
    assert next_timestamp(None, 1000) == 1000
    assert next_timestamp(500, 1000) == 1000
    assert next_timestamp(1000, 1000) == 1001
    assert next_timestamp(5000, 1000) == 5001  # our clock is behind the previous writer's


def test_version_round_trip_and_validation() -> None:
    v = Version(VersionVector({"a.1": 3}), 42, "a.1", deleted=True, etag="abc")
    assert Version.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    with pytest.raises(ValueError):
        Version.from_dict({"vv": {"a.1": 0}, "last_modified_us": 1, "writer": "a.1"})
    with pytest.raises(ValueError):
        Version.from_dict({"vv": {}})
    with pytest.raises(ValueError):
        Version.from_dict({"vv": {}, "last_modified_us": 1.5, "writer": "a.1"})
    with pytest.raises(ValueError):
        Version.from_dict({"vv": {}, "last_modified_us": 1, "writer": "a.1", "deleted": "yes"})
    with pytest.raises(TypeError):
        Version({"a.1": 1}, 1, "a.1")  # type: ignore[arg-type]


# -- histories produced by the protocol: order independence ------------------------------------

NODES = ["a.1", "b.1", "c.1"]


@st.composite
def protocol_histories(draw: st.DrawFn) -> list[Version]:
    """Versions of one key produced by nodes that follow the protocol.

    Each node holds its current version (``None`` at first). A write increments the node's actor in
    the held vector and stamps with ``next_timestamp`` against a wildly skewed clock; a sync sends
    the sender's stored version (winner + merged vector) to another node, which applies
    ``choose_winner``. Every written and every forwarded version goes into the pool.
    """
    held: dict[str, Version | None] = dict.fromkeys(NODES)
    pool: list[Version] = []
    for _ in range(draw(st.integers(min_value=1, max_value=14))):
        node = draw(st.sampled_from(NODES))
        if draw(st.booleans()) or not pool:
            current = held[node]
            clock = draw(st.integers(min_value=0, max_value=40))
            version = Version(
                (current.vv if current else VersionVector()).increment(node),
                next_timestamp(current.last_modified_us if current else None, clock),
                node,
                deleted=draw(st.booleans()),
                etag=f"{node}:{len(pool)}",
            )
            held[node] = version
            pool.append(version)
        else:
            source = draw(st.sampled_from(NODES))
            sent = held[source] if held[source] is not None else draw(st.sampled_from(pool))
            current = held[node]
            held[node] = sent if current is None else choose_winner(current, sent)
            pool.append(sent)
    return pool


@given(protocol_histories(), st.data())
@SLOW
def test_any_arrival_order_gives_the_same_winner_and_vector(pool: list[Version], data: st.DataObject) -> None:
    expected = resolve(pool)
    for _ in range(3):
        order = data.draw(st.permutations(pool))
        assert resolve(order) == expected
    # Tree-shaped merges (replicas forwarding partial results to each other) agree too.
    split = data.draw(st.integers(min_value=0, max_value=len(pool)))
    left, right = pool[:split], pool[split:]
    if left and right:
        assert choose_winner(resolve(right), resolve(left)) == expected
    # And the result is simply "largest stamp key, joined vector".
    assert expected.tiebreak_key() == max(v.tiebreak_key() for v in pool)
    assert expected.vv == functools.reduce(VersionVector.merge, (v.vv for v in pool))


@given(protocol_histories(), st.data())
@SLOW
def test_replicas_converge_whatever_they_receive_first(pool: list[Version], data: st.DataObject) -> None:
    finals = []
    for _ in NODES:
        order = data.draw(st.permutations(pool))
        finals.append(resolve(order))
    assert all(final == finals[0] for final in finals)


def test_partition_scenario_converges_without_resurrection() -> None:
    """A and B partitioned: both overwrite k, A deletes it afterwards, B writes once more."""
    base = Version(VersionVector({"a.1": 1}), 1_000, "a.1", etag="v0")
    a_put = Version(base.vv.increment("a.1"), next_timestamp(base.last_modified_us, 2_000), "a.1", etag="a")
    a_del = Version(
        a_put.vv.increment("a.1"), next_timestamp(a_put.last_modified_us, 2_500), "a.1", deleted=True
    )
    b_put = Version(base.vv.increment("b.1"), next_timestamp(base.last_modified_us, 2_200), "b.1", etag="b")
    # After healing, every arrival order agrees, and the delete (latest stamp, concurrent with b) wins.
    pool = [base, a_put, a_del, b_put]
    results = {resolve(order) for order in _all_orders(pool)}
    assert len(results) == 1
    (healed,) = results
    assert healed.deleted and healed.vv == VersionVector({"a.1": 3, "b.1": 1})
    # The stale a_put is re-delivered late: the object stays deleted.
    assert choose_winner(healed, a_put).deleted
    # A PUT made after seeing the healed state wins everywhere.
    recreated = Version(
        healed.vv.increment("b.1"), next_timestamp(healed.last_modified_us, 10), "b.1", etag="new"
    )
    assert choose_winner(healed, recreated).etag == "new"


def _all_orders(items: list[Version]) -> list[list[Version]]:
    return [list(p) for p in itertools.permutations(items)]
