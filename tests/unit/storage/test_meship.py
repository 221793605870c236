"""Mesh IP allocation: determinism, the pool, stickiness, and conflict resolution after a partition."""

from __future__ import annotations

import itertools
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.meship import (
    AddressPoolExhausted,
    allocate,
    in_pool,
    pool_size,
    preferred_ip,
    resolve_conflicts,
)

PROPERTY = settings(max_examples=60, deadline=None)

peer_ids = st.text(alphabet="0123456789abcdef", min_size=16, max_size=16)
cidrs = st.sampled_from(["10.42.0.0/16", "10.42.0.0/24", "10.42.0.0/28", "192.168.7.0/29"])
SMALL = "10.42.0.0/29"  # pool: .2 .. .6 (five addresses)


def pid(i: int) -> str:
    return f"{i:016x}"


def ids_with(predicate, count: int) -> list[str]:
    """The first ``count`` peer IDs (in numeric order) satisfying ``predicate``."""
    return list(itertools.islice((pid(i) for i in itertools.count() if predicate(pid(i))), count))


# ---------------------------------------------------------------------------------------------
# The pool and the preferred address
# ---------------------------------------------------------------------------------------------


def test_pool_excludes_network_first_host_and_broadcast() -> None:
    assert pool_size("10.42.0.0/16") == 65533
    assert pool_size(IPv4Network(SMALL)) == 5
    assert pool_size("10.42.0.0/30") == 1
    assert [in_pool(f"10.42.0.{i}", SMALL) for i in range(8)] == [False, False] + [True] * 5 + [False]
    assert not in_pool("10.43.0.2", SMALL)
    assert not in_pool("not an ip", SMALL)


@pytest.mark.parametrize("cidr", ["10.42.0.1/16", "fd00::/64", "10.0.0.0/31", "10.0.0.0/32", "garbage"])
def test_invalid_cidrs_are_refused(cidr: str) -> None:
    with pytest.raises(ValueError):
        preferred_ip(pid(1), cidr)


@PROPERTY
@given(peer_ids, cidrs)
def test_preferred_ip_is_deterministic_and_inside_the_pool(peer_id: str, cidr: str) -> None:
    ip = preferred_ip(peer_id, cidr)
    assert ip == preferred_ip(peer_id, IPv4Network(cidr))
    assert isinstance(ip, IPv4Address)
    assert ip in IPv4Network(cidr) and in_pool(ip, cidr)


def test_preferred_ips_spread_over_the_pool() -> None:
    ips = {preferred_ip(pid(i), "10.42.0.0/16") for i in range(200)}
    assert len(ips) > 190  # a hash, not a counter: few collisions among 200 peers in 65533 slots


# ---------------------------------------------------------------------------------------------
# allocate
# ---------------------------------------------------------------------------------------------


def test_allocate_prefers_the_hash_then_probes_upwards_and_wraps() -> None:
    peer = ids_with(lambda p: preferred_ip(p, SMALL) == IPv4Address("10.42.0.5"), 1)[0]
    assert allocate(peer, SMALL, {}) == IPv4Address("10.42.0.5")
    taken = {IPv4Address("10.42.0.5"): pid(900), IPv4Address("10.42.0.6"): pid(901)}
    assert allocate(peer, SMALL, taken) == IPv4Address("10.42.0.2")  # wrapped around
    # Addresses in the map but outside the pool do not block anything; string keys are accepted.
    assert allocate(peer, SMALL, {"10.42.0.1": pid(902), "10.42.0.5": pid(900)}) == IPv4Address("10.42.0.6")


def test_allocate_is_sticky() -> None:
    peer = pid(7)
    taken = {IPv4Address("10.42.0.3"): peer, IPv4Address("10.42.0.4"): pid(8)}
    assert allocate(peer, SMALL, taken) == IPv4Address("10.42.0.3")
    # An address outside the pool is not kept.
    assert allocate(peer, SMALL, {IPv4Address("10.42.0.7"): peer}) == preferred_ip(peer, SMALL)


def test_allocate_raises_when_the_pool_is_full() -> None:
    taken = {IPv4Address(f"10.42.0.{i}"): pid(100 + i) for i in range(2, 7)}
    with pytest.raises(AddressPoolExhausted):
        allocate(pid(1), SMALL, taken)
    assert allocate(pid(102), SMALL, taken) == IPv4Address("10.42.0.2")  # a holder still gets its own


@PROPERTY
@given(st.lists(peer_ids, unique=True, max_size=13), st.sampled_from(["10.42.0.0/28", "10.42.0.0/24"]))
def test_sequential_allocation_never_duplicates(peers: list[str], cidr: str) -> None:
    taken: dict[IPv4Address, str] = {}
    for peer in peers:
        ip = allocate(peer, cidr, taken)
        assert ip not in taken and in_pool(ip, cidr)
        taken[ip] = peer
        assert allocate(peer, cidr, taken) == ip  # asking again gives the same address


# ---------------------------------------------------------------------------------------------
# resolve_conflicts
# ---------------------------------------------------------------------------------------------


def test_the_peer_whose_preferred_address_it_is_keeps_it() -> None:
    five = IPv4Address("10.42.0.5")
    # ``squatter`` has the lower ID but got .5 only by probing past its own preferred .4.
    squatter = ids_with(lambda p: preferred_ip(p, SMALL) == IPv4Address("10.42.0.4"), 1)[0]
    owner = ids_with(lambda p: preferred_ip(p, SMALL) == five and p > squatter, 1)[0]
    other = pid(10**6)
    result = resolve_conflicts({owner: five, squatter: five, other: IPv4Address("10.42.0.4")}, SMALL)
    assert result[owner] == five and result[other] == IPv4Address("10.42.0.4")
    assert result[squatter] == IPv4Address("10.42.0.6")  # re-probed from .4: .4 and .5 are taken


def test_same_preferred_address_lower_peer_id_keeps_it() -> None:
    low, high = ids_with(lambda p: preferred_ip(p, SMALL) == IPv4Address("10.42.0.3"), 2)
    result = resolve_conflicts({high: "10.42.0.3", low: "10.42.0.3"}, SMALL)
    assert result == {low: IPv4Address("10.42.0.3"), high: IPv4Address("10.42.0.4")}


def test_addresses_outside_the_pool_are_reallocated() -> None:
    peers = [pid(1), pid(2), pid(3)]
    result = resolve_conflicts({peers[0]: "10.42.0.1", peers[1]: "10.43.0.9", peers[2]: "10.42.0.7"}, SMALL)
    assert all(in_pool(ip, SMALL) for ip in result.values())
    assert len(set(result.values())) == 3


def test_conflict_free_input_is_returned_unchanged() -> None:
    assignments = {pid(1): IPv4Address("10.42.0.2"), pid(2): IPv4Address("10.42.0.6")}
    assert resolve_conflicts(assignments, SMALL) == assignments


def test_exhausted_pool_cannot_resolve() -> None:
    assignments = {pid(i): IPv4Address("10.42.0.2") for i in range(6)}
    with pytest.raises(AddressPoolExhausted):
        resolve_conflicts(assignments, SMALL)


def _allocate_all(peers: list[str], cidr: str, taken: dict[IPv4Address, str]) -> dict[IPv4Address, str]:
    taken = dict(taken)
    for peer in peers:
        taken[allocate(peer, cidr, taken)] = peer
    return taken


@st.composite
def partitions(draw):
    """A registry before a partition, then peers registered on each side without seeing the other."""
    cidr = draw(st.sampled_from(["10.42.0.0/28", "10.42.0.0/27", "10.42.0.0/29"]))
    everyone = draw(st.lists(peer_ids, unique=True, min_size=2, max_size=pool_size(cidr)))
    cut1 = draw(st.integers(0, len(everyone)))
    cut2 = draw(st.integers(cut1, len(everyone)))
    return cidr, everyone[:cut1], everyone[cut1:cut2], everyone[cut2:]


@PROPERTY
@given(partitions(), st.randoms(use_true_random=False))
def test_partition_allocations_resolve_deterministically(case, rnd) -> None:
    cidr, before, side_a, side_b = case
    base = _allocate_all(before, cidr, {})
    left = _allocate_all(side_a, cidr, base)
    right = _allocate_all(side_b, cidr, base)
    merged = {peer: ip for ip, peer in itertools.chain(left.items(), right.items())}

    result = resolve_conflicts(merged, cidr)

    assert set(result) == set(merged)
    assert len(set(result.values())) == len(result)  # no duplicates
    assert all(in_pool(ip, cidr) for ip in result.values())
    holders: dict[IPv4Address, list[str]] = {}
    for peer, ip in merged.items():
        holders.setdefault(ip, []).append(peer)
    for ip, peers in holders.items():
        if len(peers) == 1:
            assert result[peers[0]] == ip  # sticky: no conflict, no move
        else:
            assert sum(result[p] == ip for p in peers) == 1  # exactly one of the clashing peers stays
    for peer in before:
        assert result[peer] == merged[peer]  # allocated before the partition: never moved

    # Any input order, any node: the same answer; resolving again changes nothing.
    items = list(merged.items())
    rnd.shuffle(items)
    assert resolve_conflicts(dict(items), cidr) == result
    assert resolve_conflicts({p: str(ip) for p, ip in reversed(items)}, IPv4Network(cidr)) == result
    assert resolve_conflicts(result, cidr) == result


def test_partitions_do_produce_conflicts() -> None:
    # Guard for the property above: in small pools clashes are common, so it exercises re-probing.
    clashes = 0
    for i in range(50):
        left = _allocate_all([pid(1000 + 3 * i)], SMALL, {})
        right = _allocate_all([pid(1001 + 3 * i)], SMALL, {})
        clashes += set(left) == set(right)
    assert clashes > 0
