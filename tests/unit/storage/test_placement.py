"""Rendezvous placement (storage/placement.py): acceptance figures of issue 5 and properties.

Run with ``pytest -s`` to see the computed figures.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.manifest import range_of
from storage.placement import (
    PlacementChange,
    holds,
    members_fingerprint,
    owner_of_object,
    owner_of_range,
    place,
    placement_changes,
    rank,
    score,
)

CHUNK_SIZE = 4 * 1024 * 1024
OBJECTS = 10_000
MAX_MEMBERS = 8  # 2..7 coordinators, plus one more for the join from 7
BALANCE_TOLERANCE = 0.10
MOVE_TOLERANCE = 1.2


def _peer_ids(rng: random.Random, count: int) -> list[str]:
    return [f"{rng.getrandbits(64):016x}" for _ in range(count)]


def _chunk_hashes(rng: random.Random, objects: int) -> list[list[str]]:
    """Random content hashes for ``objects`` objects of log-uniform size (1 B .. 256 MiB)."""
    result = []
    for _ in range(objects):
        size = int(math.exp(rng.uniform(0, math.log(256 * 1024 * 1024))))
        chunks = max(1, math.ceil(size / CHUNK_SIZE))
        result.append([f"{rng.getrandbits(256):064x}" for _ in range(chunks)])
    return result


class RankTable:
    """Every chunk's ranking of all candidate members, computed once with ``placement.score``.

    Rendezvous rankings have a useful property: the ranking over a subset of members is the full
    ranking with the others filtered out. So the holders for any membership are a short filter of
    a precomputed list, which keeps the figures below fast; ``check_against_place`` proves the
    shortcut equals ``place``.
    """

    def __init__(self, chunks: Sequence[str], members: Sequence[str]) -> None:
        self.chunks = list(chunks)
        self.rankings = []
        for chunk in self.chunks:
            scores = {member: score(member, chunk) for member in members}
            self.rankings.append(sorted(members, key=lambda member: (-scores[member], member)))
        self._cache: dict[tuple[frozenset[str], int], list[list[str]]] = {}

    def all_holders(self, members: Sequence[str], factor: int) -> list[list[str]]:
        wanted = frozenset(members)
        cache_key = (wanted, factor)
        if cache_key not in self._cache:
            self._cache[cache_key] = [
                [member for member in ranking if member in wanted][:factor] for ranking in self.rankings
            ]
        return self._cache[cache_key]

    def check_against_place(self, members: Sequence[str], factor: int, sample: int = 300) -> None:
        holders = self.all_holders(members, factor)
        for index in range(0, len(self.chunks), max(1, len(self.chunks) // sample)):
            assert holders[index] == place(self.chunks[index], members, factor)


@pytest.fixture(scope="module")
def world() -> tuple[list[str], list[list[str]], RankTable]:
    rng = random.Random(20240501)
    peers = _peer_ids(rng, MAX_MEMBERS)
    objects = _chunk_hashes(rng, OBJECTS)
    flat = [chunk for chunks in objects for chunk in chunks]
    return peers, objects, RankTable(flat, peers)


def _configs() -> list[tuple[int, int]]:
    return [(n, factor) for n in range(2, 8) for factor in (2, 3) if factor <= n]


def test_share_of_chunk_replicas_is_within_10_percent_of_the_mean(world) -> None:
    peers, objects, table = world
    print(f"\nplacement balance: {OBJECTS} objects, {len(table.chunks)} chunks (sizes 1 B..256 MiB)")
    for n, factor in _configs():
        members = peers[:n]
        table.check_against_place(members, factor)
        counts = Counter(member for holders in table.all_holders(members, factor) for member in holders)
        mean = len(table.chunks) * factor / n
        worst = max(abs(counts[member] - mean) / mean for member in members)
        print(
            f"  N={n} factor={factor}: replicas per coordinator min={min(counts.values())} "
            f"max={max(counts.values())} mean={mean:.0f} worst deviation={worst:.2%}"
        )
        assert worst <= BALANCE_TOLERANCE


def _moved(before: list[list[str]], after: list[list[str]]) -> int:
    """Chunk replicas that must be transferred: holders present after but not before."""
    return sum(len(set(new) - set(old)) for old, new in zip(before, after, strict=True))


def test_join_moves_about_the_ideal_fraction(world) -> None:
    peers, _objects, table = world
    print("\nplacement movement on join (moved replicas / total, ideal 1/(N+1)):")
    for n in range(1, MAX_MEMBERS):
        for factor in (2, 3):
            before = table.all_holders(peers[:n], factor)
            after = table.all_holders(peers[: n + 1], factor)
            total = sum(len(holders) for holders in after)
            moved_fraction = _moved(before, after) / total
            ideal = 1 / (n + 1)
            ratio = moved_fraction / ideal
            print(
                f"  {n}->{n + 1} factor={factor}: moved {moved_fraction:.2%} "
                f"ideal {ideal:.2%} ratio {ratio:.3f}"
            )
            if factor <= n + 1:
                assert ratio <= MOVE_TOLERANCE
            # Only the newcomer ever gains a chunk on a join.
            newcomer = peers[n]
            assert all(set(new) - set(old) <= {newcomer} for old, new in zip(before, after, strict=True))


def test_leave_moves_only_the_leavers_share(world) -> None:
    peers, _objects, table = world
    print("\nplacement movement on leave (moved replicas / leaver's replicas):")
    for n in range(3, MAX_MEMBERS + 1):
        for factor in (2, 3):
            if factor > n - 1:
                continue
            members = peers[:n]
            leaver = members[n // 2]
            remaining = [member for member in members if member != leaver]
            before = table.all_holders(members, factor)
            after = table.all_holders(remaining, factor)
            share = sum(holders.count(leaver) for holders in before)
            ratio = _moved(before, after) / share
            print(f"  {n}->{n - 1} factor={factor}: leaver held {share} replicas, ratio {ratio:.3f}")
            assert ratio <= MOVE_TOLERANCE


def test_placement_changes_agrees_with_the_figures(world) -> None:
    peers, _objects, table = world
    chunks = table.chunks[:2000]
    changes = placement_changes(chunks, peers[:3], peers[:4], 2)
    assert all(isinstance(change, PlacementChange) for change in changes)
    assert all(change.gained == (peers[3],) and len(change.lost) == 1 for change in changes)
    # Roughly 2/4 of chunks get the newcomer among their two holders.
    assert 0.4 < len(changes) / len(chunks) < 0.6
    assert placement_changes(chunks, peers[:3], list(reversed(peers[:3])), 2) == []


def test_one_large_object_spreads_over_every_coordinator(world) -> None:
    peers, objects, _table = world
    rng = random.Random(7)
    large = [f"{rng.getrandbits(256):064x}" for _ in range(200)]
    print("\nplacement of one 200-chunk object (primaries per coordinator):")
    for n in range(2, 8):
        members = peers[:n]
        primaries = Counter(place(chunk, members, 2)[0] for chunk in large)
        replicas = Counter(member for chunk in large for member in place(chunk, members, 2))
        print(f"  N={n}: {sorted(primaries.values())}")
        assert set(primaries) == set(members)
        assert set(replicas) == set(members)
        assert max(primaries.values()) <= 2 * 200 / n


def test_small_objects_do_not_pile_on_one_coordinator(world) -> None:
    """The seed's `chunk_index mod N` put every single-chunk object on coordinator 0."""
    peers, objects, _table = world
    single = [chunks[0] for chunks in objects if len(chunks) == 1][:3000]
    primaries = Counter(place(chunk, peers[:4], 2)[0] for chunk in single)
    assert max(primaries.values()) < 1.15 * len(single) / 4


# -- properties --------------------------------------------------------------------------------

peer_ids = st.text(alphabet="0123456789abcdef", min_size=16, max_size=16)
member_lists = st.lists(peer_ids, min_size=1, max_size=9, unique=True)
chunk_hashes = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
PROPS = settings(max_examples=100, deadline=None)


@given(chunk_hashes, member_lists, st.integers(min_value=1, max_value=5), st.randoms(use_true_random=False))
@PROPS
def test_deterministic_and_independent_of_member_order(chunk, members, factor, rnd) -> None:
    shuffled = list(members)
    rnd.shuffle(shuffled)
    result = place(chunk, members, factor)
    assert result == place(chunk, shuffled, factor) == place(chunk, members + members[:2], factor)
    assert len(result) == min(factor, len(members)) == len(set(result))
    assert set(result) <= set(members)
    assert result == rank(chunk, members)[:factor]
    assert all(holds(member, chunk, members, factor) == (member in result) for member in members)


@given(chunk_hashes, member_lists, peer_ids, st.integers(min_value=1, max_value=4))
@PROPS
def test_join_only_inserts_the_newcomer(chunk, members, newcomer, factor) -> None:
    if newcomer in members:
        return
    before = place(chunk, members, factor)
    after = place(chunk, [*members, newcomer], factor)
    # The old holders keep their relative order; at most the newcomer enters and one falls out.
    assert [member for member in after if member != newcomer] == before[: len(after) - (newcomer in after)]


@given(chunk_hashes, member_lists, st.integers(min_value=1, max_value=4))
@PROPS
def test_a_larger_factor_extends_the_same_ranking(chunk, members, factor) -> None:
    assert place(chunk, members, factor + 1)[:factor] == place(chunk, members, factor)


def test_edge_cases() -> None:
    assert place("0" * 64, [], 2) == []
    with pytest.raises(ValueError):
        place("0" * 64, ["a" * 16], 0)
    with pytest.raises(ValueError):
        place("0" * 64, [""], 1)
    with pytest.raises(ValueError):
        owner_of_range(0, [])


def test_object_ownership_is_by_range(world) -> None:
    peers, _objects, _table = world
    members = peers[:3]
    owners = Counter(owner_of_range(index, members) for index in range(256))
    print(f"\nmanifest range owners for 3 coordinators: {sorted(owners.values())}")
    assert set(owners) == set(members)
    assert owner_of_object("b", "k", members) == owner_of_range(range_of("b", "k"), members)
    assert owner_of_object("b", "k", list(reversed(members))) == owner_of_object("b", "k", members)
    assert members_fingerprint(members) == members_fingerprint(reversed(members))
    assert members_fingerprint(members) != members_fingerprint(peers[:4])
