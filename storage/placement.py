"""Chunk placement over the coordinators: rendezvous (highest-random-weight) hashing.

Pure module: stdlib only, no I/O.

The rule
--------
For a chunk with content hash ``h`` and the current set of coordinator peer IDs ``members``, every
member gets a score ``score(member, h)`` (the first 8 bytes of ``blake2b(member + NUL + h)`` read as
an unsigned integer; ties, which are 2**-64 unlikely, go to the smaller peer ID). The members
sorted by descending score are the chunk's *ranking*; ``place(h, members, factor)`` returns the
first ``min(factor, len(members))`` of it: the first is the chunk's primary owner, the next are its
replicas. Every node computes the same answer for the same member *set*: order and duplicates in
``members`` do not matter.

Why not the seed's ``chunk_index mod num_coordinators``
-------------------------------------------------------
The seed's intent is kept: each chunk has a deterministic primary owner and ``factor - 1``
replicas on the "next" coordinators of its ring. Taken literally the formula has two flaws:

* chunk 0 of *every* object (so every small, single-chunk object) lands on coordinator 0, which
  ends up with most of the data;
* changing N reassigns ``index mod N`` for almost every chunk, so one join re-homes 75-89 % of the
  primaries (3->4 .. 8->9) instead of the ideal 1/(N+1).

Rendezvous hashing keeps the intent (deterministic primary, replicas next in a per-chunk ring) and
fixes both: a chunk's ranking depends on its hash, so small objects spread evenly and the chunks of
one large object spread over all coordinators; and a member's score does not depend on the other
members, so a join moves only the replicas the newcomer now ranks for (1/(N+1) of them in
expectation) and a leave moves only the leaver's replicas. No partition table, no coordination.

Placement is keyed on the chunk's *content* hash rather than (object, index): the chunk store is
content-addressed, so a chunk shared by several objects has one placement, and a receiver can check
that it should hold a chunk from the hash alone.

Objects (metadata) are not placed: every coordinator holds every object's metadata. For the manifest
sync, each object *range* (``storage.manifest.range_of``) has exactly one owner among the members,
``owner_of_range``; see ``owner_of_object``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from storage.manifest import DEFAULT_RANGES, range_of

__all__ = [
    "score",
    "rank",
    "place",
    "holds",
    "PlacementChange",
    "placement_changes",
    "owner_of_range",
    "owner_of_object",
    "members_fingerprint",
]


@lru_cache(maxsize=4096)
def _member_hasher(member: str) -> hashlib.blake2b:
    # The member's prefix is absorbed once; each score copies this state (cheaper than rehashing).
    if not isinstance(member, str) or not member:
        raise ValueError(f"member must be a non-empty peer ID string, got {member!r}")
    hasher = hashlib.blake2b(digest_size=8)
    hasher.update(member.encode() + b"\0")
    return hasher


def score(member: str, item: str) -> int:
    """The rendezvous weight of ``member`` for ``item`` (a chunk hash or a namespaced name)."""
    hasher = _member_hasher(member).copy()
    hasher.update(item.encode())
    return int.from_bytes(hasher.digest(), "big")


def _unique(members: Iterable[str]) -> list[str]:
    # Sorting first makes the result independent of the caller's order before any scoring.
    return sorted(set(members))


def rank(item: str, members: Iterable[str]) -> list[str]:
    """All distinct members, best first, for ``item``: the per-item ring of the module docstring."""
    unique = _unique(members)
    # Descending score; the peer ID as the secondary key makes even a full collision deterministic.
    return sorted(unique, key=lambda member: (-score(member, item), member))


def place(chunk_hash: str, members: Sequence[str], factor: int) -> list[str]:
    """The coordinators that hold ``chunk_hash``: primary first, then replicas.

    ``factor`` is capped at the number of distinct members; an empty membership gives ``[]``.
    """
    if factor < 1:
        raise ValueError(f"replication factor must be >= 1, got {factor}")
    return rank(chunk_hash, members)[:factor]


def holds(member: str, chunk_hash: str, members: Sequence[str], factor: int) -> bool:
    """Whether ``member`` is one of the ``factor`` holders of ``chunk_hash``."""
    return member in place(chunk_hash, members, factor)


@dataclass(frozen=True, slots=True)
class PlacementChange:
    """How the holders of one chunk change between two memberships."""

    chunk_hash: str
    old: tuple[str, ...]
    new: tuple[str, ...]

    @property
    def gained(self) -> tuple[str, ...]:
        """Members that must fetch the chunk (in the new ranking's order)."""
        return tuple(member for member in self.new if member not in self.old)

    @property
    def lost(self) -> tuple[str, ...]:
        """Members that may drop the chunk, but only once every gainer confirmed it durably."""
        return tuple(member for member in self.old if member not in self.new)


def placement_changes(
    chunk_hashes: Iterable[str],
    old_members: Sequence[str],
    new_members: Sequence[str],
    factor: int,
) -> list[PlacementChange]:
    """For each chunk whose holder *set* differs between the memberships, who gains and who loses.

    Chunks whose holders only changed order (e.g. a new primary among the same holders) need no
    transfer and are left out. The total transfer of a rebalance is
    ``sum(len(change.gained) for change in changes)`` chunk replicas.
    """
    if factor < 1:
        raise ValueError(f"replication factor must be >= 1, got {factor}")
    old_unique = _unique(old_members)
    new_unique = _unique(new_members)
    changes: list[PlacementChange] = []
    for chunk_hash in chunk_hashes:
        old = tuple(place(chunk_hash, old_unique, factor))
        new = tuple(place(chunk_hash, new_unique, factor))
        if set(old) != set(new):
            changes.append(PlacementChange(chunk_hash, old, new))
    return changes


def owner_of_range(range_index: int, members: Sequence[str]) -> str:
    """The single member whose manifest is authoritative for object range ``range_index``.

    Rendezvous hashing again (namespaced ``"range/<i>"``, which no 64-hex chunk hash can equal), so a
    membership change re-homes only the ranges the changed member wins or held.
    """
    ranking = rank(f"range/{range_index}", members)
    if not ranking:
        raise ValueError("owner_of_range needs at least one member")
    return ranking[0]


def owner_of_object(bucket: str, key: str, members: Sequence[str], ranges: int = DEFAULT_RANGES) -> str:
    """The owner of an object's manifest entry: the owner of its range.

    "Locally owned" for the manifest sync (issue 6) means ``owner_of_object(b, k, members) == me``.
    Ownership is by range rather than by object so that an owner's manifest covers whole ranges and a
    range digest means the same thing on every node. Every node holds every object's metadata, so
    ownership decides only who *initiates* a comparison for a range (no ping-pong); the safety of
    deletions does not depend on it (see ``storage.manifest``).
    """
    return owner_of_range(range_of(bucket, key, ranges), members)


def members_fingerprint(members: Iterable[str]) -> str:
    """A short digest of a member *set*; two nodes exchange it to check they agree on ownership."""
    joined = "\n".join(_unique(members)).encode()
    return hashlib.blake2b(joined, digest_size=8).hexdigest()
