"""Coordinator membership: a replicated, mergeable view of who the coordinators are, plus local health.

Pure module: stdlib only, no I/O, no clocks (callers pass ``now``). The HTTP endpoints and the Celery
heartbeat/gossip tasks are thin adapters around what is here.

Why a mergeable view
--------------------
The Go original learns about coordinators only from its own registrations, so when B and C both join
A, B never hears of C. Here every coordinator holds a ``MembershipView`` and views are exchanged and
*merged* (anti-entropy): ``merge`` is commutative, associative and idempotent, so however, in
whatever order and however often views travel, every coordinator that has (transitively) received
the same writes holds the identical view, with the same ``version`` and ``digest``. B and C each
merge A's view and thereby learn of each other.

Identity
--------
One identity space: the peer ID (16 lowercase hex, the first 8 bytes of SHA-256 over the raw ed25519
public key, as ``tunnelmesh.identity.peer_id_from_public_key``). A member's ``public_key`` must hash
to its ``peer_id``, so a view can never bind an ID to somebody else's key. Placement, replication
pools and the list sent to peers all use peer IDs.

Writes and stamps (the merge rule)
----------------------------------
Each member entry is a last-writer-wins register ordered by a Lamport ``Stamp(counter, origin)``
(``origin`` = peer ID of the coordinator that made the write; compared as the pair). Writers get a
stamp from ``view.next_stamp(own_peer_id)`` = (largest counter in the view + 1, own ID): a write made
after seeing another write therefore always has the larger stamp.

* ``add_or_update(member, stamp)`` writes an "active" record (join, re-registration, new URL).
* ``remove(peer_id, stamp)`` writes a "removed" tombstone (keeping the last known fields). A removal
  beats the join it has seen; a re-join stamped after the removal beats the removal.
* Concurrent writes (neither saw the other) to the same member: the larger stamp wins on every node
  (counter, then origin ID). If a concurrent update beat an admin's removal, the removal is simply
  issued again: it is then stamped after the update and wins.
* A write whose stamp is lower than what the view holds loses, exactly as it would in ``merge``.
* Tombstones are never purged: there are few coordinators, and dropping one would let a node that
  was offline resurrect the removed member.

Version: "which list is newer"
------------------------------
Besides the winning record, each entry keeps ``seen``: for every coordinator that wrote this member,
the highest counter of its writes that has reached this view (merged by pointwise maximum; the
winning stamp is always the largest ``(counter, origin)`` in it). ``version`` is the sum of all
``seen`` counters of all members. Hence:

* the same content gives the same version on every node (it is computed from the content only);
* merging never lowers it, and any merge that changes the view raises it strictly (a changed entry
  always has a larger ``seen`` somewhere);
* two views with the same version are equal or concurrent; concurrent views are superseded by their
  merge, whose version is strictly larger than both.

So a node or mesh peer keeps the list with the larger ``(version, digest)`` pair (``is_newer``): it
always ends on the converged list, whatever order the lists arrive in. (The only way to get two
different writes with one stamp is a coordinator reusing its peer ID after losing its view; the
digest still orders those deterministically.)

``digest()`` is SHA-256 over the canonical JSON of the content: anti-entropy compares digests first
and ships ``to_dict()`` only when they differ.

Health is local, not replicated
-------------------------------
Whether a coordinator answers is an observation each node makes for itself, so it is kept out of the
merged view (a replicated "down" flag would flap and never converge). ``HealthTracker`` records
heartbeat times; a member silent for more than ``interval * misses`` seconds is *down* but stays a
member, with its share of replication waiting for it, until an admin removes it.

Public API
----------
``Stamp(counter, origin)``, ``UNSTAMPED``, ``Member(...)``, ``MembershipView`` (``next_stamp``,
``add_or_update``, ``remove``, ``merge``, ``get``, ``is_active``, ``active_members``,
``all_members``, ``clock``, ``version``, ``digest``, ``to_dict``, ``from_dict``), ``is_newer``,
``HealthTracker`` (``heartbeat``, ``last_seen``, ``is_up``, ``status``, ``forget``, ``snapshot``),
``coordinator_list``, ``coordinator_mesh_ips``; helpers ``is_peer_id``, ``peer_id_for_public_key``;
constants ``ACTIVE``, ``REMOVED``, ``VIEW_FORMAT``. Views travel (HTTP, Redis, Celery arguments) as
``to_dict()`` JSON, never pickled.

Typical use by the web layer::

    view = MembershipView.from_dict(stored)                   # or MembershipView() on bootstrap
    view = view.add_or_update(member, view.next_stamp(self_id))   # a coordinator registered
    view = view.merge(MembershipView.from_dict(remote_json))     # gossip from another coordinator
    health.heartbeat(remote_id, time.monotonic())
    body = {"membership_version": view.version, "membership_digest": view.digest(),
            "coordinators": coordinator_list(view, health, time.monotonic(), interval, misses,
                                             self_peer_id=self_id)}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

ACTIVE = "active"
REMOVED = "removed"
MEMBER_STATES = (ACTIVE, REMOVED)

VIEW_FORMAT = 1  # bump when the to_dict() layout changes
_PEER_ID_RE = re.compile(r"[0-9a-f]{16}")
_MAX_NAME = 255
_MAX_URL = 2048
_MEMBER_KEYS = frozenset(
    {"peer_id", "name", "public_key", "api_url", "s3_url", "mesh_ip", "state", "stamp", "seen"}
)
_VIEW_KEYS = frozenset({"format", "members", "version", "digest"})


def is_peer_id(value: object) -> bool:
    """True for a well-formed peer ID: exactly 16 lowercase hex characters."""
    return isinstance(value, str) and _PEER_ID_RE.fullmatch(value) is not None


def peer_id_for_public_key(public_key_b64: str) -> str:
    """The peer ID of a base64 raw ed25519 public key (same rule as ``tunnelmesh.identity``).

    Raises ``ValueError`` when the key is not base64 of exactly 32 bytes.
    """
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"public_key is not valid base64: {exc}") from None
    if len(raw) != 32:
        raise ValueError(f"public_key must be a 32-byte ed25519 key, got {len(raw)} bytes")
    return hashlib.sha256(raw).hexdigest()[:16]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Stamp and Member
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Stamp:
    """Lamport stamp of one membership write: ordered by ``counter``, then ``origin``.

    ``counter >= 1`` and ``origin`` a peer ID for real writes; ``UNSTAMPED`` (0, "") marks a
    ``Member`` built by a caller before the view stamps it.
    """

    counter: int
    origin: str

    def __post_init__(self) -> None:
        if not _is_int(self.counter) or self.counter < 0:
            raise ValueError(f"stamp counter must be an integer >= 0, got {self.counter!r}")
        if self.counter == 0:
            if self.origin != "":
                raise ValueError("the zero stamp has no origin")
        elif not is_peer_id(self.origin):
            raise ValueError(f"stamp origin must be a peer ID (16 lowercase hex), got {self.origin!r}")


UNSTAMPED = Stamp(0, "")


@dataclass(frozen=True)
class Member:
    """One coordinator as the cluster knows it.

    Active members need every field but ``s3_url`` (empty when S3 is disabled); tombstones
    (``state == "removed"``) may have empty fields when the removal arrived for an unknown ID.
    Non-empty fields are always validated: ``public_key`` must hash to ``peer_id``, ``mesh_ip`` is a
    canonical IPv4 address, URLs are http(s). Invalid values raise ``ValueError``.
    """

    peer_id: str
    name: str
    public_key: str
    api_url: str
    s3_url: str
    mesh_ip: str
    state: str = ACTIVE
    stamp: Stamp = UNSTAMPED

    def __post_init__(self) -> None:
        if not is_peer_id(self.peer_id):
            raise ValueError(f"peer_id must be 16 lowercase hex characters, got {self.peer_id!r}")
        for field in ("name", "public_key", "api_url", "s3_url", "mesh_ip"):
            if not isinstance(getattr(self, field), str):
                raise ValueError(f"{field} must be a string, got {type(getattr(self, field)).__name__}")
        if self.state not in MEMBER_STATES:
            raise ValueError(f"state must be one of {MEMBER_STATES}, got {self.state!r}")
        if not isinstance(self.stamp, Stamp):
            raise ValueError(f"stamp must be a Stamp, got {type(self.stamp).__name__}")
        if self.state == ACTIVE:
            missing = [f for f in ("name", "public_key", "api_url", "mesh_ip") if not getattr(self, f)]
            if missing:
                raise ValueError(f"active member {self.peer_id} lacks {', '.join(missing)}")
        if len(self.name) > _MAX_NAME or any(not ch.isprintable() for ch in self.name):
            raise ValueError(f"name must be at most {_MAX_NAME} printable characters")
        if self.public_key and peer_id_for_public_key(self.public_key) != self.peer_id:
            raise ValueError(f"public_key does not belong to peer_id {self.peer_id}")
        for field in ("api_url", "s3_url"):
            url = getattr(self, field)
            if url and (len(url) > _MAX_URL or not url.startswith(("http://", "https://"))):
                raise ValueError(f"{field} must be an http:// or https:// URL, got {url[:80]!r}")
        if self.mesh_ip:
            try:
                canonical = str(ipaddress.IPv4Address(self.mesh_ip))
            except ValueError:
                raise ValueError(f"mesh_ip must be an IPv4 address, got {self.mesh_ip!r}") from None
            # Digests compare text, so only one spelling of an address is allowed.
            if canonical != self.mesh_ip:
                raise ValueError(f"mesh_ip must be written canonically ({canonical}), got {self.mesh_ip!r}")

    def _content_key(self) -> tuple[int | str, ...]:
        """Everything but the stamp; a tombstone sorts above an active record with the same stamp."""
        return (
            int(self.state == REMOVED),
            self.name,
            self.public_key,
            self.api_url,
            self.s3_url,
            self.mesh_ip,
        )


# ---------------------------------------------------------------------------------------------
# The view
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """The winning record of one member plus ``seen`` (origin -> highest counter), sorted by origin."""

    member: Member
    seen: tuple[tuple[str, int], ...]

    def rank(self) -> tuple[Stamp, tuple[int | str, ...]]:
        # Stamp decides; the content only breaks the tie of two different writes with one stamp
        # (never produced by next_stamp), so that merge stays a deterministic maximum.
        return self.member.stamp, self.member._content_key()

    def merged(self, other: _Entry) -> _Entry:
        if self == other:
            return self
        winner = self.member if self.rank() >= other.rank() else other.member
        seen = dict(self.seen)
        for origin, counter in other.seen:
            seen[origin] = max(counter, seen.get(origin, 0))
        merged = _Entry(winner, tuple(sorted(seen.items())))
        return self if merged == self else merged

    def to_dict(self) -> dict[str, Any]:
        m = self.member
        return {
            "peer_id": m.peer_id,
            "name": m.name,
            "public_key": m.public_key,
            "api_url": m.api_url,
            "s3_url": m.s3_url,
            "mesh_ip": m.mesh_ip,
            "state": m.state,
            "stamp": {"counter": m.stamp.counter, "origin": m.stamp.origin},
            "seen": dict(self.seen),
        }


class MembershipView:
    """Immutable set of coordinator records; every change returns a new view. See the module doc."""

    __slots__ = ("_entries", "_version", "_digest", "_clock")

    def __init__(self) -> None:
        self._set_entries({})

    def _set_entries(self, entries: dict[str, _Entry]) -> None:
        self._entries: Mapping[str, _Entry] = MappingProxyType(entries)
        self._version = sum(c for e in entries.values() for _, c in e.seen)
        self._clock = max((e.member.stamp.counter for e in entries.values()), default=0)
        self._digest: str | None = None

    @classmethod
    def _of(cls, entries: dict[str, _Entry]) -> MembershipView:
        view = cls.__new__(cls)
        view._set_entries(entries)
        return view

    def _with_entry(self, entry: _Entry) -> MembershipView:
        pid = entry.member.peer_id
        current = self._entries.get(pid)
        new = entry if current is None else current.merged(entry)
        if new is current:  # merged() returns the same object when nothing changed
            return self
        entries = dict(self._entries)
        entries[pid] = new
        return MembershipView._of(entries)

    # -- writing ------------------------------------------------------------------------------

    @property
    def clock(self) -> int:
        """The largest stamp counter in the view (the Lamport clock of whoever holds it)."""
        return self._clock

    def next_stamp(self, origin: str) -> Stamp:
        """The stamp for a new write by coordinator ``origin``: larger than everything in the view."""
        return Stamp(self._clock + 1, origin)

    def add_or_update(self, member: Member, stamp: Stamp) -> MembershipView:
        """Record ``member`` as active with ``stamp`` (join, re-join or changed fields).

        The member's own ``state``/``stamp`` fields are replaced. A stamp lower than the member's
        current one loses (the view keeps the newer record), as in ``merge``.
        """
        if member.state != ACTIVE:
            raise ValueError("add_or_update takes an active member; use remove() for removals")
        return self._write(replace(member, stamp=stamp), stamp)

    def remove(self, peer_id: str, stamp: Stamp) -> MembershipView:
        """Record a tombstone for ``peer_id`` with ``stamp`` (it need not be known yet)."""
        current = self.get(peer_id)
        if current is None:
            tombstone = Member(peer_id, "", "", "", "", "", REMOVED, stamp)
        else:
            tombstone = replace(current, state=REMOVED, stamp=stamp)
        return self._write(tombstone, stamp)

    def _write(self, member: Member, stamp: Stamp) -> MembershipView:
        if not isinstance(stamp, Stamp) or stamp.counter < 1:
            raise ValueError("a write needs a real stamp (use view.next_stamp(origin))")
        return self._with_entry(_Entry(member, ((stamp.origin, stamp.counter),)))

    def merge(self, other: MembershipView) -> MembershipView:
        """The join of both views: per member, the larger-stamped record and the union of ``seen``."""
        if other is self or not other._entries:
            return self
        if not self._entries:
            return other
        entries = dict(self._entries)
        changed = False
        for pid, theirs in other._entries.items():
            mine = entries.get(pid)
            new = theirs if mine is None else mine.merged(theirs)
            if new is not mine:
                entries[pid] = new
                changed = True
        return MembershipView._of(entries) if changed else self

    # -- reading ------------------------------------------------------------------------------

    def get(self, peer_id: str) -> Member | None:
        """The record of ``peer_id`` (active or tombstone), or None if the view never heard of it."""
        entry = self._entries.get(peer_id)
        return entry.member if entry else None

    def is_active(self, peer_id: str) -> bool:
        member = self.get(peer_id)
        return member is not None and member.state == ACTIVE

    def active_members(self) -> list[Member]:
        """Active members sorted by peer ID: the replication pool, identical on every node."""
        return [e.member for _, e in sorted(self._entries.items()) if e.member.state == ACTIVE]

    def all_members(self) -> list[Member]:
        """Every record including tombstones, sorted by peer ID."""
        return [e.member for _, e in sorted(self._entries.items())]

    @property
    def version(self) -> int:
        """Sum of all ``seen`` counters: same content, same version; grows with every change."""
        return self._version

    def digest(self) -> str:
        """SHA-256 hex of the canonical JSON of the content (equal views, equal digests)."""
        if self._digest is None:
            canonical = json.dumps(
                self._members_dicts(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
            )
            self._digest = hashlib.sha256(canonical.encode()).hexdigest()
        return self._digest

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MembershipView):
            return NotImplemented
        return self._entries == other._entries

    def __hash__(self) -> int:
        return hash(self.digest())

    def __repr__(self) -> str:
        active = len(self.active_members())
        return (
            f"MembershipView(version={self.version}, active={active}, "
            f"removed={len(self._entries) - active}, digest={self.digest()[:12]})"
        )

    # -- serialisation ------------------------------------------------------------------------

    def _members_dicts(self) -> list[dict[str, Any]]:
        return [e.to_dict() for _, e in sorted(self._entries.items())]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form: ``{"format", "version", "digest", "members": [...]}``."""
        return {
            "format": VIEW_FORMAT,
            "version": self.version,
            "digest": self.digest(),
            "members": self._members_dicts(),
        }

    @classmethod
    def from_dict(cls, data: object) -> MembershipView:
        """Parse and validate ``to_dict()`` output (e.g. from another coordinator).

        Raises ``ValueError`` naming the offending field for anything malformed: wrong types,
        unknown or missing keys, invalid members, a ``seen`` map that does not match the stamp,
        duplicate peer IDs, or ``version``/``digest`` (optional) that do not match the content.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"membership view must be an object, got {type(data).__name__}")
        unknown = set(data) - _VIEW_KEYS
        if unknown:
            raise ValueError(f"membership view has unknown keys: {sorted(map(str, unknown))}")
        if data.get("format") != VIEW_FORMAT:
            raise ValueError(f"membership view format must be {VIEW_FORMAT}, got {data.get('format')!r}")
        members = data.get("members")
        if not isinstance(members, list):
            raise ValueError("membership view 'members' must be a list")
        entries: dict[str, _Entry] = {}
        for index, raw in enumerate(members):
            try:
                entry = _entry_from_dict(raw)
            except ValueError as exc:
                raise ValueError(f"members[{index}]: {exc}") from None
            if entry.member.peer_id in entries:
                raise ValueError(f"members[{index}]: duplicate peer_id {entry.member.peer_id}")
            entries[entry.member.peer_id] = entry
        view = cls._of(entries)
        if "version" in data and (not _is_int(data["version"]) or data["version"] != view.version):
            raise ValueError(
                f"membership version {data['version']!r} does not match the content (computed {view.version})"
            )
        if "digest" in data and data["digest"] != view.digest():
            raise ValueError("membership digest does not match the content")
        return view


def _entry_from_dict(raw: object) -> _Entry:
    if not isinstance(raw, Mapping):
        raise ValueError(f"member must be an object, got {type(raw).__name__}")
    missing = _MEMBER_KEYS - set(raw)
    if missing:
        raise ValueError(f"member lacks {sorted(missing)}")
    unknown = set(raw) - _MEMBER_KEYS
    if unknown:
        raise ValueError(f"member has unknown keys {sorted(map(str, unknown))}")
    stamp_raw = raw["stamp"]
    if not isinstance(stamp_raw, Mapping) or set(stamp_raw) != {"counter", "origin"}:
        raise ValueError("stamp must be an object with exactly 'counter' and 'origin'")
    if not _is_int(stamp_raw["counter"]) or stamp_raw["counter"] < 1:
        raise ValueError(f"stamp counter must be an integer >= 1, got {stamp_raw['counter']!r}")
    try:
        stamp = Stamp(stamp_raw["counter"], stamp_raw["origin"])
    except ValueError as exc:
        raise ValueError(f"stamp: {exc}") from None
    seen_raw = raw["seen"]
    if not isinstance(seen_raw, Mapping) or not seen_raw:
        raise ValueError("seen must be a non-empty object of origin -> counter")
    for origin, counter in seen_raw.items():
        if not is_peer_id(origin) or not _is_int(counter) or counter < 1:
            raise ValueError(f"seen entry {origin!r}: {counter!r} is not peer ID -> integer >= 1")
    # The winning stamp is by construction the largest (counter, origin) ever seen for the member.
    largest = max((c, o) for o, c in seen_raw.items())
    if largest != (stamp.counter, stamp.origin):
        raise ValueError(
            f"seen does not match the stamp (largest seen write is {largest}, "
            f"stamp is {(stamp.counter, stamp.origin)})"
        )
    member = Member(
        raw["peer_id"],
        raw["name"],
        raw["public_key"],
        raw["api_url"],
        raw["s3_url"],
        raw["mesh_ip"],
        raw["state"],
        stamp,
    )
    return _Entry(member, tuple(sorted(seen_raw.items())))


def is_newer(candidate: tuple[int, str], current: tuple[int, str]) -> bool:
    """True when a list tagged ``(version, digest)`` should replace the one held.

    Larger version wins; equal versions (only possible for equal or concurrent views) are ordered by
    digest so every receiver picks the same one. The converged view out-ranks every view it merged.
    """
    return tuple(candidate) > tuple(current)


# ---------------------------------------------------------------------------------------------
# Local health
# ---------------------------------------------------------------------------------------------


class HealthTracker:
    """Heartbeat times of other coordinators, as observed by this node (never replicated).

    Times are whatever monotonic clock the caller uses (``time.monotonic()`` in one process;
    wall-clock seconds if the map is shared between processes through Redis via ``snapshot``).
    A peer never heard from is down. Thread-safe.
    """

    def __init__(self, last_seen: Mapping[str, float] | None = None) -> None:
        self._lock = threading.Lock()
        self._last_seen: dict[str, float] = dict(last_seen or {})

    def heartbeat(self, peer_id: str, now: float) -> None:
        """Record a heartbeat; an out-of-order older time never moves the record back."""
        with self._lock:
            previous = self._last_seen.get(peer_id)
            if previous is None or now > previous:
                self._last_seen[peer_id] = now

    def last_seen(self, peer_id: str) -> float | None:
        return self._last_seen.get(peer_id)

    def is_up(self, peer_id: str, now: float, interval: float, misses: int) -> bool:
        """Up until more than ``misses`` heartbeat intervals have passed since the last heartbeat."""
        _check_timing(interval, misses)
        last = self._last_seen.get(peer_id)
        return last is not None and now - last <= interval * misses

    def status(
        self, now: float, interval: float, misses: int, peer_ids: Iterable[str] | None = None
    ) -> dict[str, bool]:
        """peer_id -> up, for ``peer_ids`` (default: everyone ever heard from), sorted by peer ID."""
        ids = sorted(self._last_seen if peer_ids is None else set(peer_ids))
        return {pid: self.is_up(pid, now, interval, misses) for pid in ids}

    def forget(self, peer_id: str) -> None:
        """Drop a peer's record (after its removal from the view)."""
        with self._lock:
            self._last_seen.pop(peer_id, None)

    def snapshot(self) -> dict[str, float]:
        """A copy of peer_id -> last heartbeat time (to persist or share)."""
        with self._lock:
            return dict(self._last_seen)


def _check_timing(interval: float, misses: int) -> None:
    if not interval > 0:
        raise ValueError(f"heartbeat interval must be > 0, got {interval!r}")
    if not _is_int(misses) or misses < 1:
        raise ValueError(f"heartbeat misses must be an integer >= 1, got {misses!r}")


# ---------------------------------------------------------------------------------------------
# What mesh peers receive
# ---------------------------------------------------------------------------------------------


def coordinator_list(
    view: MembershipView,
    health: HealthTracker,
    now: float,
    interval: float,
    misses: int,
    *,
    self_peer_id: str | None = None,
) -> list[dict[str, Any]]:
    """The coordinator list for ``RegisterResponse`` and broadcasts, sorted by peer ID.

    Each item: ``name, peer_id, mesh_ip, api_url, s3_url, healthy``. Only active members appear;
    a down member is listed with ``healthy: False`` (it is not removed). ``self_peer_id`` (the
    coordinator answering) is always healthy. Send ``view.version``/``view.digest()`` with it so
    receivers can apply ``is_newer``.
    """
    _check_timing(interval, misses)
    return [
        {
            "name": m.name,
            "peer_id": m.peer_id,
            "mesh_ip": m.mesh_ip,
            "api_url": m.api_url,
            "s3_url": m.s3_url,
            "healthy": m.peer_id == self_peer_id or health.is_up(m.peer_id, now, interval, misses),
        }
        for m in view.active_members()
    ]


def coordinator_mesh_ips(view: MembershipView) -> list[str]:
    """``coord_mesh_ips``: the active members' mesh IPs, in the order of ``coordinator_list``."""
    return [m.mesh_ip for m in view.active_members()]
