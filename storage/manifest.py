"""Manifest digests and the reconcile plan for the periodic safety-net sync (issue 6).

Pure module: stdlib only, no I/O. ``tasks/manifest_sync.py`` moves the messages; this module
decides what they contain and what to do with them.

What is compared
----------------
A manifest entry is one object's (or bucket's: ``key == ""``, which no S3 key can be) replicated
state: ``(bucket, key, vv, last_modified_us, deleted, etag, writer)``. Tombstones are entries with
``deleted=True`` and stay in the manifest until tombstone GC purges them (issue 6: once every current
coordinator holds them, plus a grace period). GC should apply that same criterion on every node: an
owner still listing a tombstone that a peer already purged re-sends it (harmless churn until the
owner purges it too).

Cost grows with what differs (four steps)
-----------------------------------------
Objects are split into ``DEFAULT_RANGES`` = 256 ranges by a hash of (bucket, key). Each range has a
digest ``(count, XOR of entry_digest over its entries)``; the *top* digest hashes the 256 range
digests. One sync round between a range owner and a peer:

1. exchange top digests (``top_message``, about 80 bytes, or ``top_for`` the owner's ranges):
   equal means done;
2. otherwise exchange the range tables (``RangeDigests.to_json``, 256 x 20 bytes, about 7 KB) and
   ``diff_ranges``;
3. for each differing range, exchange ``RangeSummary`` (16 bytes per object of the range, about
   9 KB at 100,000 objects) and ``differing_names``;
4. each side sends its full entries for those names only (``select_names``); ``reconcile``.

The owner compares only the ranges it owns (its table entries for other ranges are ignored).

XOR is order-free and its own inverse, so ``DigestTable`` maintains the digests incrementally
(add/remove per write) instead of rescanning; ``build_digests`` is the from-scratch version.

Ownership
---------
Every coordinator holds every object's metadata. Each *range* has one owner among the current
members, ``storage.placement.owner_of_range`` (rendezvous hashing); the owner initiates the
comparison of its ranges with every peer. Nodes first compare ``members_fingerprint``; if they
disagree on membership they skip the round (nothing is deleted when unsure).

The delete-safety rule (why a sync can never delete what it should not)
-----------------------------------------------------------------------
A peer never deletes an object because it is *absent* from the owner's manifest. It deletes its
live copy only when the owner's manifest holds a **tombstone for that key whose vector covers
(descends from) the peer's copy's vector** and wins ``choose_winner`` against it: the owner has seen
exactly that write (or later ones) and then a delete.
Per-key vectors are the only sound "has seen" evidence: a range-wide joined vector was rejected
because counters are per object, so ``{a: 7}`` gathered from other keys says nothing about a
key whose own vector is ``{a: 1}`` (it would falsely cover an in-flight write).

Consequences, each tested:

* a write the owner never received (in flight, or the owner was down/partitioned) is absent from
  its manifest or only concurrent with what it holds: the peer keeps it and pushes it to the owner
  (``send_to_owner``); the owner's own conflict rule then decides;
* an empty or new owner store holds no tombstones, so it cannot delete anything, it only receives;
  a half-started one holds only tombstones it really has, each covering only writes it saw;
* a lost delete message is repaired in the next round: the owner's tombstone dominates the peer's
  stale copy (``delete_on_peer``). If the delete reached neither the owner nor the peer but a third
  node, that node's round with the owner brings the tombstone to the owner first (two rounds);
* the peer executes ``delete_on_peer`` and ``send_to_peer`` through the same apply path as
  replication (``choose_winner`` against its *current* version), so a newer write that arrived after
  the plan was computed still wins.

For the other direction the plan lists what the peer lacks or holds older (``send_to_peer``: the
owner re-replicates it, tombstones included so tombstone GC can complete) and what the peer holds
that the owner lacks or holds older (``send_to_owner``). Concurrent versions go to the owner; they go
to the peer too unless the owner's side is a tombstone (then the owner merges first and the next round
decides, so a deletion always rests on domination).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _esc  # type: ignore[attr-defined]
from typing import Any

from storage.versions import Ordering, Version, VersionVector

__all__ = [
    "DEFAULT_RANGES",
    "ManifestEntry",
    "entry_digest",
    "row_digest",
    "range_of",
    "RangeDigests",
    "DigestTable",
    "build_digests",
    "diff_ranges",
    "group_by_range",
    "name_id",
    "RangeSummary",
    "differing_names",
    "select_names",
    "Plan",
    "reconcile",
]

DEFAULT_RANGES = 256
_DIGEST_BYTES = 16  # 128-bit entry digests: XOR collisions are negligible for honest data
_RANGE_RECORD = struct.Struct(">I16s")  # count, XOR digest
_FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One object's replicated state as the manifest sync sees it."""

    bucket: str
    key: str
    vv: VersionVector
    last_modified_us: int
    deleted: bool = False
    etag: str = ""
    writer: str = ""

    @property
    def name(self) -> tuple[str, str]:
        return (self.bucket, self.key)

    def version(self) -> Version:
        return Version(self.vv, self.last_modified_us, self.writer, self.deleted, self.etag)

    @classmethod
    def from_version(cls, bucket: str, key: str, version: Version) -> ManifestEntry:
        return cls(
            bucket, key, version.vv, version.last_modified_us, version.deleted, version.etag, version.writer
        )

    def to_row(self) -> list[Any]:
        """Compact JSON row: ``[bucket, key, vv, last_modified_us, deleted(0/1), etag, writer]``."""
        return [
            self.bucket,
            self.key,
            self.vv.to_dict(),
            self.last_modified_us,
            int(self.deleted),
            self.etag,
            self.writer,
        ]

    @classmethod
    def from_row(cls, row: object) -> ManifestEntry:
        if not isinstance(row, list) or len(row) != 7:
            raise ValueError(f"manifest row must be a list of 7 fields, got {row!r}")
        bucket, key, vv, stamp, deleted, etag, writer = row
        if not all(isinstance(text, str) for text in (bucket, key, etag, writer)):
            raise ValueError(f"manifest row has a non-string name, etag or writer: {row!r}")
        if isinstance(stamp, bool) or not isinstance(stamp, int) or deleted not in (0, 1):
            raise ValueError(f"manifest row has an invalid stamp or deleted flag: {row!r}")
        return cls(bucket, key, VersionVector.from_dict(vv), stamp, bool(deleted), etag, writer)


# One encoder reused: json.dumps() rebuilds it on every call, a third of the digest cost.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def _canonical(entry: ManifestEntry) -> bytes:
    # JSON with ASCII escapes is unambiguous for any strings and identical on every Python version
    # (unlike repr, whose escaping follows the Unicode database).
    return _COMPACT_JSON.encode(entry.to_row()).encode()


def entry_digest(entry: ManifestEntry) -> bytes:
    """16-byte digest of every field of ``entry`` (any difference changes it)."""
    return hashlib.blake2b(_canonical(entry), digest_size=_DIGEST_BYTES).digest()


def row_digest(bucket: str, key: str, vv_json: str, stamp: int, deleted: int, etag: str, writer: str) -> bytes:
    """:func:`entry_digest` of an entry given as stored fields (``vv_json`` is
    ``VersionVector.to_json()``: compact, sorted, ASCII-escaped), without building a
    VersionVector: the metadata store keeps its range digests up to date with it on every write."""
    text = f"[{_esc(bucket)},{_esc(key)},{vv_json},{stamp},{deleted},{_esc(etag)},{_esc(writer)}]"
    return hashlib.blake2b(text.encode(), digest_size=_DIGEST_BYTES).digest()


def range_of(bucket: str, key: str, ranges: int = DEFAULT_RANGES) -> int:
    """The range (0 <= r < ranges) of an object: a hash of its name, so stable across nodes."""
    if ranges < 1:
        raise ValueError(f"ranges must be >= 1, got {ranges}")
    # Bucket names cannot contain NUL, so bucket + NUL + key is unambiguous.
    name = bucket.encode("utf-8", "surrogatepass") + b"\0" + key.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "big") % ranges


@dataclass(frozen=True, slots=True)
class RangeDigests:
    """Per-range ``(count, XOR of entry digests)`` and a top digest over them."""

    counts: tuple[int, ...]
    hashes: tuple[int, ...]  # 128-bit XOR accumulators
    top: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.hashes) or not self.counts:
            raise ValueError("RangeDigests needs one count and one hash per range")
        object.__setattr__(self, "top", hashlib.blake2b(self._packed(), digest_size=16).hexdigest())

    @property
    def ranges(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        return sum(self.counts)

    def _packed(self) -> bytes:
        header = struct.pack(">I", self.ranges)
        return header + b"".join(
            _RANGE_RECORD.pack(count, digest.to_bytes(_DIGEST_BYTES, "big"))
            for count, digest in zip(self.counts, self.hashes, strict=True)
        )

    def top_for(self, indexes: Iterable[int]) -> str:
        """A digest over some ranges only (e.g. those an owner owns), for step 1 of its round."""
        hasher = hashlib.blake2b(digest_size=16)
        for index in sorted(set(indexes)):
            digest = self.hashes[index].to_bytes(_DIGEST_BYTES, "big")
            hasher.update(struct.pack(">I", index) + _RANGE_RECORD.pack(self.counts[index], digest))
        return hasher.hexdigest()

    def top_message(self) -> dict[str, Any]:
        """Step 1 of a round: what is sent before anything else."""
        return {"v": _FORMAT_VERSION, "ranges": self.ranges, "count": self.total, "top": self.top}

    def to_json(self) -> str:
        """Step 2: the full range table, compact (base64 of 20-byte records)."""
        table = base64.b64encode(self._packed()[4:]).decode()
        return json.dumps(
            {"v": _FORMAT_VERSION, "ranges": self.ranges, "top": self.top, "table": table},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> RangeDigests:
        try:
            data = json.loads(text)
            ranges = int(data["ranges"])
            raw = base64.b64decode(data["table"], validate=True)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"invalid range digests: {exc}") from exc
        if data.get("v") != _FORMAT_VERSION or ranges < 1 or len(raw) != ranges * _RANGE_RECORD.size:
            raise ValueError("invalid range digests: wrong version or table size")
        counts: list[int] = []
        hashes: list[int] = []
        for count, digest in _RANGE_RECORD.iter_unpack(raw):
            counts.append(count)
            hashes.append(int.from_bytes(digest, "big"))
        digests = cls(tuple(counts), tuple(hashes))
        if data.get("top") != digests.top:
            raise ValueError("invalid range digests: top digest does not match the table")
        return digests


class DigestTable:
    """Mutable, incrementally maintained range digests (XOR: add and remove are the same op).

    Replace an object's entry with ``remove(old)`` then ``add(new)``. Not thread-safe: the owner
    of the table serialises updates (e.g. under the metadata write transaction).
    """

    def __init__(self, ranges: int = DEFAULT_RANGES) -> None:
        if ranges < 1:
            raise ValueError(f"ranges must be >= 1, got {ranges}")
        self.ranges = ranges
        self._counts = [0] * ranges
        self._hashes = [0] * ranges

    def add(self, entry: ManifestEntry) -> int:
        """Account for ``entry``; returns its range."""
        index = range_of(entry.bucket, entry.key, self.ranges)
        self._counts[index] += 1
        self._hashes[index] ^= int.from_bytes(entry_digest(entry), "big")
        return index

    def remove(self, entry: ManifestEntry) -> int:
        """Undo ``add(entry)`` (the exact same entry must have been added)."""
        index = range_of(entry.bucket, entry.key, self.ranges)
        if self._counts[index] == 0:
            raise ValueError(f"remove from an empty range {index}")
        self._counts[index] -= 1
        self._hashes[index] ^= int.from_bytes(entry_digest(entry), "big")
        return index

    def snapshot(self) -> RangeDigests:
        return RangeDigests(tuple(self._counts), tuple(self._hashes))


def build_digests(entries: Iterable[ManifestEntry], ranges: int = DEFAULT_RANGES) -> RangeDigests:
    """Range digests of a whole manifest. Each (bucket, key) may appear at most once."""
    table = DigestTable(ranges)
    seen: set[tuple[str, str]] = set()
    for entry in entries:
        # A duplicate would cancel itself out of the XOR and hide a difference.
        if entry.name in seen:
            raise ValueError(f"duplicate manifest entry for {entry.name!r}")
        seen.add(entry.name)
        table.add(entry)
    return table.snapshot()


def diff_ranges(mine: RangeDigests, theirs: RangeDigests) -> list[int]:
    """Indexes of the ranges whose digests differ (empty when the top digests match)."""
    if mine.ranges != theirs.ranges:
        raise ValueError(f"range counts differ: {mine.ranges} != {theirs.ranges}")
    if mine.top == theirs.top:
        return []
    return [
        index
        for index in range(mine.ranges)
        if mine.counts[index] != theirs.counts[index] or mine.hashes[index] != theirs.hashes[index]
    ]


def group_by_range(
    entries: Iterable[ManifestEntry], wanted: Iterable[int] | None = None, ranges: int = DEFAULT_RANGES
) -> dict[int, list[ManifestEntry]]:
    """Entries grouped by range, optionally only for the ``wanted`` ranges (step 3 of a round)."""
    wanted_set = None if wanted is None else set(wanted)
    grouped: dict[int, list[ManifestEntry]] = {}
    for entry in entries:
        index = range_of(entry.bucket, entry.key, ranges)
        if wanted_set is None or index in wanted_set:
            grouped.setdefault(index, []).append(entry)
    return grouped


def name_id(bucket: str, key: str) -> int:
    """64-bit identifier of an object name, used in range summaries instead of the name itself."""
    name = bucket.encode("utf-8", "surrogatepass") + b"\0" + key.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(name, digest_size=8, person=b"tm-name").digest(), "big")


_SUMMARY_RECORD = struct.Struct(">QQ")  # name id, first 8 bytes of the entry digest


@dataclass(frozen=True, slots=True)
class RangeSummary:
    """Step 3 of a round for one differing range: ``name id -> entry digest`` (16 bytes/entry).

    Only the names whose summaries differ are then exchanged as full entries, so one lost delete in
    a range of ~400 objects costs about 9 KB instead of the whole range's entries. Two names of one
    node sharing an id (2**-64 per pair) have their digests XORed; a mismatch then selects both.
    """

    digests: Mapping[int, int]

    @classmethod
    def of(cls, entries: Iterable[ManifestEntry]) -> RangeSummary:
        digests: dict[int, int] = {}
        for entry in entries:
            ident = name_id(entry.bucket, entry.key)
            digests[ident] = digests.get(ident, 0) ^ int.from_bytes(entry_digest(entry)[:8], "big")
        return cls(digests)

    def to_json(self) -> str:
        packed = b"".join(_SUMMARY_RECORD.pack(ident, self.digests[ident]) for ident in sorted(self.digests))
        return json.dumps(
            {"v": _FORMAT_VERSION, "ids": base64.b64encode(packed).decode()}, separators=(",", ":")
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> RangeSummary:
        try:
            data = json.loads(text)
            raw = base64.b64decode(data["ids"], validate=True)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"invalid range summary: {exc}") from exc
        if data.get("v") != _FORMAT_VERSION or len(raw) % _SUMMARY_RECORD.size:
            raise ValueError("invalid range summary: wrong version or size")
        return cls(dict(_SUMMARY_RECORD.iter_unpack(raw)))


def differing_names(mine: RangeSummary, theirs: RangeSummary) -> set[int]:
    """Name ids present on one side only or with different digests."""
    return {
        ident
        for ident in mine.digests.keys() | theirs.digests.keys()
        if mine.digests.get(ident) != theirs.digests.get(ident)
    }


def select_names(entries: Iterable[ManifestEntry], ids: set[int]) -> list[ManifestEntry]:
    """The entries whose ``name_id`` is in ``ids`` (what each side sends before ``reconcile``)."""
    return [entry for entry in entries if name_id(entry.bucket, entry.key) in ids]


def _rows(entries: Sequence[ManifestEntry]) -> list[list[Any]]:
    return [entry.to_row() for entry in entries]


@dataclass(frozen=True, slots=True)
class Plan:
    """What one owner/peer comparison asks for (see the module docstring for the rules).

    * ``delete_on_peer``: the owner's tombstones that dominate the peer's live copy; the peer applies
      them (through ``choose_winner``), which deletes the stale copy; always covering (``descends``).
    * ``send_to_peer``: the owner's entries the peer lacks, holds in an older version, or holds in a
      concurrent version (live owner side only); the owner re-replicates them (metadata + chunks).
    * ``send_to_owner``: the peer's entries the owner lacks, holds older, or holds concurrently.
    """

    delete_on_peer: tuple[ManifestEntry, ...] = ()
    send_to_peer: tuple[ManifestEntry, ...] = ()
    send_to_owner: tuple[ManifestEntry, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.delete_on_peer or self.send_to_peer or self.send_to_owner)

    def summary(self) -> dict[str, int]:
        return {
            "delete_on_peer": len(self.delete_on_peer),
            "send_to_peer": len(self.send_to_peer),
            "send_to_owner": len(self.send_to_owner),
        }

    def to_json(self) -> str:
        return json.dumps(
            {
                "delete_on_peer": _rows(self.delete_on_peer),
                "send_to_peer": _rows(self.send_to_peer),
                "send_to_owner": _rows(self.send_to_owner),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"plan is not valid JSON: {exc}") from exc
        if not isinstance(data, Mapping):
            raise ValueError("plan must be a JSON object")

        def parse(name: str) -> tuple[ManifestEntry, ...]:
            rows = data.get(name, [])
            if not isinstance(rows, list):
                raise ValueError(f"plan field {name} must be a list")
            return tuple(ManifestEntry.from_row(row) for row in rows)

        return cls(parse("delete_on_peer"), parse("send_to_peer"), parse("send_to_owner"))


def _index(entries: Iterable[ManifestEntry], side: str) -> dict[tuple[str, str], ManifestEntry]:
    indexed: dict[tuple[str, str], ManifestEntry] = {}
    for entry in entries:
        if entry.name in indexed:
            raise ValueError(f"duplicate {side} manifest entry for {entry.name!r}")
        indexed[entry.name] = entry
    return indexed


def reconcile(owner_entries: Iterable[ManifestEntry], peer_entries: Iterable[ManifestEntry]) -> Plan:
    """Compare the owner's and a peer's entries for the same range(s) and say what must move.

    Never lists a deletion without an owner tombstone for that very key whose vector covers the
    peer's copy; an object absent
    from the owner's entries is only ever sent *to* the owner.
    """
    owner = _index(owner_entries, "owner")
    peer = _index(peer_entries, "peer")
    delete_on_peer: list[ManifestEntry] = []
    send_to_peer: list[ManifestEntry] = []
    send_to_owner: list[ManifestEntry] = []

    for name in sorted(owner.keys() | peer.keys()):
        mine = owner.get(name)
        theirs = peer.get(name)
        if mine is None:
            assert theirs is not None
            send_to_owner.append(theirs)  # the owner never saw it: never a reason to delete
            continue
        if theirs is None:
            send_to_peer.append(mine)  # tombstones too, so GC can see every node holds them
            continue
        order = mine.vv.compare(theirs.vv)
        if order is Ordering.EQUAL:
            if mine == theirs:
                continue
            # One vector, two different records should not happen (one vector = one write); settle
            # it towards the deterministic winner like replication would.
            owner_wins = mine.version().tiebreak_key() > theirs.version().tiebreak_key()
            order = Ordering.AFTER if owner_wins else Ordering.BEFORE
        if order is Ordering.AFTER:
            if mine.deleted and not theirs.deleted:
                delete_on_peer.append(mine)  # a lost delete: the owner saw this copy, then deleted it
            else:
                send_to_peer.append(mine)
        elif order is Ordering.BEFORE:
            send_to_owner.append(theirs)
        else:  # concurrent: the owner merges; the peer gets a live owner side right away
            send_to_owner.append(theirs)
            if not mine.deleted:
                send_to_peer.append(mine)

    return Plan(tuple(delete_on_peer), tuple(send_to_peer), tuple(send_to_owner))
