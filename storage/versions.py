"""Version vectors and the deterministic conflict rule for replicated objects and buckets.

Pure module: stdlib only, no I/O.

Vocabulary
----------
* **actor**: the identity that increments a vector entry, ``"<peer_id>.<incarnation>"``. The
  incarnation is created with a new metadata database, so a coordinator that lost its disk and
  restarted under the same peer ID never reuses counters it already handed out (Riak kv679).
* **VersionVector**: immutable mapping actor -> counter (int >= 1). Absent actors count as 0, so
  ``{"a.1": 0}`` and ``{}`` are the same vector (zero entries are dropped on construction; the Go
  original treated them as different, which made ``Equal`` depend on how a vector was built).
* **Version**: what a replica knows about one write of a key: its vector, its last-modified stamp,
  the writing actor, whether it is a tombstone, and an opaque ETag.

The winner rule (``choose_winner``)
-----------------------------------
1. If one vector strictly dominates the other, that version wins (a causally later write, PUT or
   delete, always beats what it has seen; so a delayed older PUT never resurrects a tombstone and a
   newer PUT after a delete wins).
2. Otherwise (concurrent, or equal vectors: normally the same write received twice) the larger
   ``(last_modified_us, writer, deleted, etag)`` wins. The key covers every field but the vector,
   so the pick never depends on argument order.
3. The result carries the **merged** vector of both inputs, so storing it and later comparing it
   with either input gives "this one dominates/equals": the decision is never reopened.

Why the result is the same for every arrival order
--------------------------------------------------
Writers stamp with ``next_timestamp(previous, now) = max(now, previous + 1)`` where ``previous`` is
the stamp of the version they hold for the key, which by the rule above is the largest stamp they
have seen. Hence a write whose vector dominates another's also has a strictly larger stamp, the two
steps above agree, and choosing a winner is "maximum of ``(last_modified_us, writer, deleted,
etag)``" over everything seen while the vector is the join (pointwise maximum) of everything seen.
Maximum and join are commutative, associative and idempotent, so every replica that has received the
same set of versions, in any order and through any forwarding path, holds the same result. (With
stamps that break the rule, e.g. records forged by hand, no order-independent rule can honour both
"dominating wins" and "later stamp wins"; step 1 keeps causality safe pairwise in that case.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

__all__ = [
    "Ordering",
    "VersionVector",
    "EMPTY_VV",
    "Version",
    "choose_winner",
    "prefer",
    "resolve",
    "next_timestamp",
]


class Ordering(Enum):
    """How one vector relates to another (``a.compare(b)`` reads "a is ... b")."""

    EQUAL = "equal"
    BEFORE = "before"  # a < b: b has seen everything a has, and more
    AFTER = "after"  # a > b
    CONCURRENT = "concurrent"  # each has seen something the other has not


def _check_actor(actor: object) -> str:
    if not isinstance(actor, str) or not actor:
        raise ValueError(f"version vector actor must be a non-empty string, got {actor!r}")
    return actor


def _check_counter(actor: str, counter: object, *, allow_zero: bool) -> int:
    # bool is an int subclass; True as a counter is a bug in the caller, not a 1.
    if not isinstance(counter, int) or isinstance(counter, bool):
        raise ValueError(f"version vector counter for {actor!r} must be an int, got {counter!r}")
    if counter < 0 or (counter == 0 and not allow_zero):
        raise ValueError(f"version vector counter for {actor!r} must be positive, got {counter}")
    return counter


class VersionVector(Mapping[str, int]):
    """Immutable, hashable mapping actor -> counter (>= 1); absent actors count as 0.

    Iteration is in sorted actor order, so ``to_dict()`` and ``repr`` are canonical.
    Indexing an absent actor raises ``KeyError`` (Mapping semantics); use ``counter(actor)``
    for the 0-default.
    """

    __slots__ = ("_entries", "_hash")

    _entries: dict[str, int]
    _hash: int | None

    def __init__(self, entries: Mapping[str, int] | Iterable[tuple[str, int]] | None = None) -> None:
        items = entries.items() if isinstance(entries, Mapping) else (entries or ())
        cleaned: dict[str, int] = {}
        for actor, counter in items:
            _check_actor(actor)
            _check_counter(actor, counter, allow_zero=True)
            if counter:
                cleaned[actor] = max(counter, cleaned.get(actor, 0))
        # Sorted once here so iteration, equality of dumps and hashing are canonical.
        object.__setattr__(self, "_entries", dict(sorted(cleaned.items())))
        object.__setattr__(self, "_hash", None)

    @classmethod
    def _trusted(cls, entries: dict[str, int]) -> VersionVector:
        """Build from an already-validated dict of positive counters (internal fast path)."""
        vv = cls.__new__(cls)
        object.__setattr__(vv, "_entries", dict(sorted(entries.items())))
        object.__setattr__(vv, "_hash", None)
        return vv

    # -- Mapping protocol -------------------------------------------------------------------
    def __getitem__(self, actor: str) -> int:
        return self._entries[actor]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __contains__(self, actor: object) -> bool:
        return actor in self._entries

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VersionVector):
            return self._entries == other._entries
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            object.__setattr__(self, "_hash", hash(tuple(self._entries.items())))
        return self._hash  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"VersionVector({self._entries!r})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("VersionVector is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("VersionVector is immutable")

    def __reduce__(self) -> tuple[type[VersionVector], tuple[dict[str, int]]]:
        # Slots plus a blocked __setattr__ defeat the default pickle/copy path.
        return (VersionVector, (dict(self._entries),))

    # -- operations --------------------------------------------------------------------------
    def counter(self, actor: str) -> int:
        """The counter of ``actor`` (0 when absent)."""
        return self._entries.get(actor, 0)

    def increment(self, actor: str) -> VersionVector:
        """A new vector with ``actor``'s counter one higher: strictly after ``self``."""
        _check_actor(actor)
        entries = dict(self._entries)
        entries[actor] = entries.get(actor, 0) + 1
        return VersionVector._trusted(entries)

    def merge(self, other: VersionVector) -> VersionVector:
        """Pointwise maximum: the least vector that descends from both."""
        if not other or self is other:
            return self
        if not self:
            return other
        entries = dict(self._entries)
        for actor, counter in other._entries.items():
            if counter > entries.get(actor, 0):
                entries[actor] = counter
        return VersionVector._trusted(entries)

    def descends(self, other: VersionVector) -> bool:
        """True when ``self`` has seen everything ``other`` has (``self >= other`` pointwise)."""
        mine = self._entries
        return all(mine.get(actor, 0) >= counter for actor, counter in other._entries.items())

    def compare(self, other: VersionVector) -> Ordering:
        """Where ``self`` stands relative to ``other`` (BEFORE means ``self < other``)."""
        self_ge = self.descends(other)
        other_ge = other.descends(self)
        if self_ge and other_ge:
            return Ordering.EQUAL
        if self_ge:
            return Ordering.AFTER
        if other_ge:
            return Ordering.BEFORE
        return Ordering.CONCURRENT

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, int]:
        """``{actor: counter}`` with sorted keys (a fresh dict, safe to mutate)."""
        return dict(self._entries)

    @classmethod
    def from_dict(cls, data: object) -> VersionVector:
        """Parse what ``to_dict`` produced (e.g. after a JSON round trip); strict.

        Raises ValueError unless ``data`` is a dict of non-empty str -> positive int.
        """
        if not isinstance(data, dict):
            raise ValueError(f"version vector must be a JSON object, got {type(data).__name__}")
        entries: dict[str, int] = {}
        for actor, counter in data.items():
            _check_actor(actor)
            entries[actor] = _check_counter(actor, counter, allow_zero=False)
        return cls._trusted(entries)

    def to_json(self) -> str:
        """Compact canonical JSON (sorted keys, no spaces)."""
        return json.dumps(self._entries, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> VersionVector:
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"version vector is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


EMPTY_VV = VersionVector()


@dataclass(frozen=True, slots=True)
class Version:
    """One write of a key (or bucket) as replicas compare it.

    ``writer`` is the actor that made the write; ``etag`` is opaque to this module (used only as the
    final tie-break and by callers to skip identical re-sends).
    """

    vv: VersionVector
    last_modified_us: int
    writer: str
    deleted: bool = False
    etag: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.vv, VersionVector):
            raise TypeError(f"Version.vv must be a VersionVector, got {type(self.vv).__name__}")
        if isinstance(self.last_modified_us, bool) or not isinstance(self.last_modified_us, int):
            raise TypeError("Version.last_modified_us must be an int (microseconds since the epoch)")

    def tiebreak_key(self) -> tuple[int, str, bool, str]:
        """Order used when neither vector dominates: later stamp, then larger writer, etc."""
        return (self.last_modified_us, self.writer, self.deleted, self.etag)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vv": self.vv.to_dict(),
            "last_modified_us": self.last_modified_us,
            "writer": self.writer,
            "deleted": self.deleted,
            "etag": self.etag,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Version:
        """Parse what ``to_dict`` produced; strict (raises ValueError on any malformed field)."""
        try:
            vv, stamp, writer = data["vv"], data["last_modified_us"], data["writer"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"invalid version record: missing {exc}") from exc
        deleted, etag = data.get("deleted", False), data.get("etag", "")
        if isinstance(stamp, bool) or not isinstance(stamp, int):
            raise ValueError(f"invalid version record: last_modified_us {stamp!r}")
        if not isinstance(writer, str) or not isinstance(etag, str) or not isinstance(deleted, bool):
            raise ValueError("invalid version record: writer/etag must be str, deleted a bool")
        return cls(VersionVector.from_dict(vv), stamp, writer, deleted, etag)


def prefer(a: Version, b: Version) -> Version:
    """Which input wins, returned as that very object (``prefer(a, b) is a`` tells the side).

    A strictly dominating vector wins; otherwise the larger ``tiebreak_key`` (``a`` on a full tie,
    where both carry the same data). Callers holding richer records (chunks, headers) use this to
    pick the record, then give it ``a.vv.merge(b.vv)``; ``choose_winner`` does both.
    """
    order = a.vv.compare(b.vv)
    if order is Ordering.AFTER:
        return a
    if order is Ordering.BEFORE:
        return b
    return a if a.tiebreak_key() >= b.tiebreak_key() else b


def choose_winner(a: Version, b: Version) -> Version:
    """The version a replica keeps when it holds ``a`` and receives ``b`` (or vice versa).

    A strictly dominating vector wins; otherwise the larger ``tiebreak_key``. The returned
    version carries ``a.vv.merge(b.vv)``. See the module docstring for why this is the same
    whatever the arrival order.
    """
    winner = prefer(a, b)
    merged = a.vv.merge(b.vv)
    return winner if winner.vv == merged else replace(winner, vv=merged)


def resolve(versions: Iterable[Version]) -> Version:
    """Fold ``choose_winner`` over ``versions`` (at least one). Order does not matter."""
    iterator = iter(versions)
    try:
        result = next(iterator)
    except StopIteration:
        raise ValueError("resolve() needs at least one version") from None
    for version in iterator:
        result = choose_winner(result, version)
    return result


def next_timestamp(previous_us: int | None, now_us: int) -> int:
    """Stamp for a new write of a key: ``max(now, previous + 1)``.

    ``previous_us`` is the stamp of the version this node currently holds for the key (None if
    none). A causally later write therefore never carries an earlier stamp than what it replaces,
    even when this node's clock is behind the writer of the previous version (Garage's rule).
    """
    if previous_us is None:
        return now_us
    return max(now_us, previous_us + 1)
