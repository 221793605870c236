"""Mesh IP allocation: deterministic, sticky per node, and conflict-free after a partition heals.

Pure module: stdlib only, no I/O. The registry (who holds which IP) lives elsewhere; the functions
here take it as a mapping and return decisions.

The pool
--------
Inside the mesh CIDR (default ``10.42.0.0/16``) the usable addresses are all host addresses except
the network address, the broadcast address and the first host (``.1`` of the network, kept free for
a gateway or future use). The pool is offsets ``2 .. size-2`` of the network; a /30 is the smallest
CIDR with a pool (one address).

The rules
---------
1. **Preferred address**: ``preferred_ip(peer_id, cidr)`` = pool[SHA-256(peer_id) mod pool size].
   It depends on the peer ID and the CIDR only, so every coordinator computes the same one. (The Go
   original hashed the *name*, which a rename changes.)
2. **Allocation**: ``allocate(peer_id, cidr, taken)`` returns the address the peer already holds in
   ``taken`` (stickiness: re-registration and failover keep the IP), otherwise the first free
   address probing linearly from the preferred one and wrapping around the pool. Every coordinator
   that sees the same ``taken`` gives the same answer.
3. **Conflicts after a partition**: two coordinators that allocated without seeing each other may
   give one address to two peers. ``resolve_conflicts(assignments, cidr)``, run on the merged
   registry, decides deterministically:

   * each peer whose address is unique and inside the pool keeps it (stickiness);
   * of the peers sharing an address, the one whose *preferred* address it is keeps it (it is the
     address any coordinator would give it from scratch); if that is several or none, the lowest
     peer ID keeps it;
   * every other peer (the losers, and peers holding an address outside the pool, e.g. after a
     CIDR change) is re-allocated with rule 2, in ascending peer-ID order, against everything kept.

   The result depends only on the content of ``assignments`` (never on its iteration order), so all
   coordinators reach the same answer; it has no duplicates, and a conflict-free input comes back
   unchanged (the function is idempotent, safe to run after every registry merge).

Public API
----------
``pool_size(cidr)``, ``in_pool(ip, cidr)``, ``preferred_ip(peer_id, cidr)``,
``allocate(peer_id, cidr, taken)``, ``resolve_conflicts(assignments, cidr)``,
``AddressPoolExhausted``. ``cidr`` is a string like ``"10.42.0.0/16"`` or an ``IPv4Network``;
addresses may be given as ``IPv4Address`` or strings and are returned as ``IPv4Address``.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network

_FIRST_OFFSET = 2  # skip the network address (offset 0) and the reserved first host (offset 1)
_HASH_DOMAIN = b"tunnelmesh/mesh-ip/v1\0"  # keeps this hash independent of other uses of the peer ID


class AddressPoolExhausted(Exception):
    """Every address of the mesh CIDR's pool is taken."""


@lru_cache(maxsize=32)
def _network(cidr: str | IPv4Network) -> IPv4Network:
    if isinstance(cidr, IPv4Network):
        network = cidr
    else:
        try:
            network = ipaddress.ip_network(cidr, strict=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"mesh CIDR {cidr!r} is not a network address with a prefix: {exc}") from None
        if not isinstance(network, IPv4Network):
            raise ValueError(f"mesh CIDR must be IPv4, got {cidr!r}")
    if network.prefixlen > 30:
        raise ValueError(f"mesh CIDR {network} is too small: a /30 or larger is needed")
    return network


def pool_size(cidr: str | IPv4Network) -> int:
    """Number of allocatable addresses in ``cidr`` (65533 for a /16)."""
    return _network(cidr).num_addresses - _FIRST_OFFSET - 1  # minus broadcast


def _offset(ip: IPv4Address | str, network: IPv4Network) -> int | None:
    """Pool index of ``ip`` (0 = first allocatable address), or None if it is not allocatable."""
    try:
        address = ipaddress.IPv4Address(ip)
    except ValueError:
        return None
    offset = int(address) - int(network.network_address) - _FIRST_OFFSET
    return offset if 0 <= offset < network.num_addresses - _FIRST_OFFSET - 1 else None


def _address(offset: int, network: IPv4Network) -> IPv4Address:
    return IPv4Address(int(network.network_address) + _FIRST_OFFSET + offset)


def in_pool(ip: IPv4Address | str, cidr: str | IPv4Network) -> bool:
    """True if ``ip`` is an allocatable address of ``cidr`` (not network, broadcast or first host)."""
    return _offset(ip, _network(cidr)) is not None


def _preferred_offset(peer_id: str, size: int) -> int:
    digest = hashlib.sha256(_HASH_DOMAIN + peer_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % size


def preferred_ip(peer_id: str, cidr: str | IPv4Network) -> IPv4Address:
    """The address ``peer_id`` gets when it is free: a hash of the peer ID mapped into the pool."""
    network = _network(cidr)
    return _address(_preferred_offset(peer_id, pool_size(network)), network)


def _probe(peer_id: str, network: IPv4Network, taken_offsets: set[int]) -> int:
    """First free pool index, probing linearly from the peer's preferred one and wrapping around."""
    size = pool_size(network)
    start = _preferred_offset(peer_id, size)
    for step in range(size):
        candidate = (start + step) % size
        if candidate not in taken_offsets:
            return candidate
    raise AddressPoolExhausted(f"no free mesh IP left in {network} ({size} addresses)")


def _offsets(ips: Iterable[IPv4Address | str], network: IPv4Network) -> set[int]:
    return {o for o in (_offset(ip, network) for ip in ips) if o is not None}


def allocate(
    peer_id: str, cidr: str | IPv4Network, taken: Mapping[IPv4Address, str] | Mapping[str, str]
) -> IPv4Address:
    """The mesh IP for ``peer_id`` given the registry ``taken`` (address -> holder's peer ID).

    Sticky: an address already held by ``peer_id`` is returned (the lowest, should it hold
    several). Otherwise the first free address from ``preferred_ip`` on. Raises
    ``AddressPoolExhausted`` when the pool is full.
    """
    network = _network(cidr)
    own = sorted(_offsets((ip for ip, holder in taken.items() if holder == peer_id), network))
    if own:
        return _address(own[0], network)
    return _address(_probe(peer_id, network, _offsets(taken, network)), network)


def resolve_conflicts(
    assignments: Mapping[str, IPv4Address] | Mapping[str, str], cidr: str | IPv4Network
) -> dict[str, IPv4Address]:
    """Make ``assignments`` (peer ID -> address) duplicate-free, deterministically (see module doc).

    Returns a new mapping with every peer of the input, sorted by peer ID. Raises
    ``AddressPoolExhausted`` if the pool cannot hold all peers.
    """
    network = _network(cidr)
    holders: dict[int, list[str]] = {}
    displaced: list[str] = []
    for peer_id, ip in assignments.items():
        offset = _offset(ip, network)
        if offset is None:
            displaced.append(peer_id)
        else:
            holders.setdefault(offset, []).append(peer_id)

    size = pool_size(network)
    kept: dict[str, int] = {}
    for offset, peers in holders.items():
        # The peer this address is "naturally" for keeps it; then the lowest peer ID.
        keeper = min(peers, key=lambda p: (_preferred_offset(p, size) != offset, p))
        kept[keeper] = offset
        displaced.extend(p for p in peers if p != keeper)

    taken = set(kept.values())
    for peer_id in sorted(displaced):  # a fixed order, so every node re-probes identically
        offset = _probe(peer_id, network, taken)
        taken.add(offset)
        kept[peer_id] = offset
    return {peer_id: _address(kept[peer_id], network) for peer_id in sorted(kept)}
