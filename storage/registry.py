"""The peer registry of one coordinator: nodes that registered, their keys, names and mesh IPs.

SQLite in WAL mode at ``data_dir/meta/registry.db`` (a file of its own, apart from the object
metadata), shared by the coordination API's gunicorn workers and the supervisor. Stdlib only.

Rules applied by :meth:`PeerRegistry.register` (one ``BEGIN IMMEDIATE`` transaction, so concurrent
registrations never hand out one name or address twice):

- The peer ID is given by the caller (derived from the public key); re-registration with the same
  key keeps the peer ID and the mesh IP (sticky), and updates name, addresses and URLs.
- Reserved names are refused (:class:`ReservedName`); a name held by a different peer is renamed
  ``name-2``, ``name-3``, ... (the first free one).
- The mesh IP comes from :func:`storage.meship.allocate`: a deterministic address derived from the
  peer ID, probing linearly past taken ones.
- ``is_admin`` is sticky: once granted (by ``admin_peers`` at registration) it stays.

Replication between coordinators (issue 4): every record carries ``updated_us``, the time of its
last registration (its stamp). :meth:`PeerRegistry.merge_records` merges records learned from another
coordinator: per peer the record with the larger ``(updated_us, content)`` wins, then name clashes
(first registered keeps the name, the others become ``name-2`` ...) and mesh IP clashes
(:func:`storage.meship.resolve_conflicts`) are resolved deterministically, re-stamping the records
it changed so the resolution wins everywhere. ``last_seen_us`` is a local observation, never
replicated. :meth:`PeerRegistry.digest` lets two coordinators compare registries cheaply.

The same database keeps this coordinator's copy of the coordinator membership view
(:class:`storage.membership.MembershipView`, state key ``membership_view``, read-modify-written in
one transaction by :meth:`PeerRegistry.update_view`) and the local heartbeat times of the other
coordinators (table ``heartbeats``, wall-clock seconds, shared by all processes of the node).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from storage import meship
from storage.membership import MembershipView
from storage.sqlite import SQLiteDatabase

RESERVED_NAMES = frozenset(
    {
        "admin",
        "administrator",
        "super",
        "supervisor",
        "peers",
        "api",
        "prometheus",
        "grafana",
        "health",
        "assets",
        "static",
        "coordinator",
        "tunnelmesh",
    }
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS peers (
    peer_id        TEXT PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    public_key     TEXT NOT NULL,
    addresses      TEXT NOT NULL,          -- JSON list of strings
    is_coordinator INTEGER NOT NULL,
    is_admin       INTEGER NOT NULL,
    mesh_ip        TEXT NOT NULL UNIQUE,
    api_url        TEXT NOT NULL DEFAULT '',
    s3_url         TEXT NOT NULL DEFAULT '',
    version        TEXT NOT NULL DEFAULT '',
    registered_us  INTEGER NOT NULL,
    last_seen_us   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS heartbeats (
    peer_id TEXT PRIMARY KEY,
    at      REAL NOT NULL                  -- wall-clock seconds of the last heartbeat heard
);
"""
VIEW_KEY = "membership_view"
# Fields that replicate (and enter the digest); last_seen_us is local.
_REPLICATED = ("peer_id", "name", "public_key", "mesh_ip", "addresses", "is_coordinator", "is_admin",
               "api_url", "s3_url", "version", "registered_us", "updated_us")


class ReservedName(ValueError):
    """The requested node name is reserved."""


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class PeerRecord:
    peer_id: str
    name: str
    public_key: str
    mesh_ip: str
    addresses: tuple[str, ...] = ()
    is_coordinator: bool = False
    is_admin: bool = False
    api_url: str = ""
    s3_url: str = ""
    version: str = ""
    registered_us: int = field(default_factory=_now_us)
    last_seen_us: int = field(default_factory=_now_us)
    updated_us: int = field(default_factory=_now_us)  # stamp of the last registration (merge order)

    def replicated(self) -> dict[str, object]:
        """The fields other coordinators get (everything but the local ``last_seen_us``)."""
        d = self.to_dict()
        return {k: d[k] for k in _REPLICATED}

    def rank(self) -> tuple[int, str]:
        """Merge order: later registration wins; the content breaks ties deterministically."""
        return self.updated_us, json.dumps(self.replicated(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: object) -> PeerRecord:
        """A record received from another coordinator; ``ValueError`` when malformed."""
        if not isinstance(data, dict):
            raise ValueError("a peer record must be an object")
        try:
            addresses = data.get("addresses", [])
            if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
                raise ValueError("addresses must be a list of strings")
            texts = {k: data[k] for k in ("peer_id", "name", "public_key", "mesh_ip")}
            texts.update({k: data.get(k, "") for k in ("api_url", "s3_url", "version")})
            if not all(isinstance(v, str) and len(v) <= 2048 for v in texts.values()):
                raise ValueError("peer_id, name, public_key, mesh_ip, api_url, s3_url, version must be strings")
            ints = {k: data[k] for k in ("registered_us", "updated_us")}
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()):
                raise ValueError("registered_us and updated_us must be integers")
            flags = {k: data.get(k, False) for k in ("is_coordinator", "is_admin")}
            if not all(isinstance(v, bool) for v in flags.values()):
                raise ValueError("is_coordinator and is_admin must be booleans")
        except KeyError as exc:
            raise ValueError(f"a peer record lacks {exc.args[0]}") from None
        return cls(addresses=tuple(addresses), last_seen_us=0, **texts, **ints, **flags)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        return {
            "peer_id": self.peer_id,
            "name": self.name,
            "public_key": self.public_key,
            "mesh_ip": self.mesh_ip,
            "addresses": list(self.addresses),
            "is_coordinator": self.is_coordinator,
            "is_admin": self.is_admin,
            "api_url": self.api_url,
            "s3_url": self.s3_url,
            "version": self.version,
            "registered_us": self.registered_us,
            "last_seen_us": self.last_seen_us,
            "updated_us": self.updated_us,
        }


def _row_to_record(row: sqlite3.Row) -> PeerRecord:
    return PeerRecord(
        peer_id=row["peer_id"],
        name=row["name"],
        public_key=row["public_key"],
        mesh_ip=row["mesh_ip"],
        addresses=tuple(json.loads(row["addresses"])),
        is_coordinator=bool(row["is_coordinator"]),
        is_admin=bool(row["is_admin"]),
        api_url=row["api_url"],
        s3_url=row["s3_url"],
        version=row["version"],
        registered_us=row["registered_us"],
        last_seen_us=row["last_seen_us"],
        updated_us=row["updated_us"],
    )


class PeerRegistry(SQLiteDatabase):
    """Thread- and process-safe access to ``registry.db`` (one connection per thread)."""

    row_factory = True

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        conn = self._conn()
        conn.executescript(_SCHEMA)
        columns = {r["name"] for r in conn.execute("PRAGMA table_info(peers)")}
        if "updated_us" not in columns:  # registry.db written before issue 4
            try:
                conn.execute("ALTER TABLE peers ADD COLUMN updated_us INTEGER NOT NULL DEFAULT 0")
            except sqlite3.OperationalError:  # another process migrated it first
                pass

    # -- reads ------------------------------------------------------------------------------

    def get(self, peer_id: str) -> PeerRecord | None:
        row = self._conn().execute("SELECT * FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
        return _row_to_record(row) if row else None

    def by_name(self, name: str) -> PeerRecord | None:
        row = self._conn().execute("SELECT * FROM peers WHERE name = ?", (name,)).fetchone()
        return _row_to_record(row) if row else None

    def list_peers(self, *, coordinators_only: bool = False) -> list[PeerRecord]:
        sql = "SELECT * FROM peers"
        if coordinators_only:
            sql += " WHERE is_coordinator = 1"
        return [_row_to_record(r) for r in self._conn().execute(sql + " ORDER BY name")]

    # -- writes -----------------------------------------------------------------------------

    def register(
        self,
        *,
        peer_id: str,
        name: str,
        public_key: str,
        addresses: Iterable[str] = (),
        is_coordinator: bool = False,
        version: str = "",
        api_url: str = "",
        s3_url: str = "",
        mesh_cidr: str,
        is_admin: Callable[[str, str], bool] = lambda _id, _name: False,
        now_us: int | None = None,
    ) -> PeerRecord:
        """Insert or refresh a node; returns its record (final name, mesh IP, admin flag)."""
        if name.lower() in RESERVED_NAMES:
            raise ReservedName(f"the name {name!r} is reserved")
        now = _now_us() if now_us is None else now_us
        with self._tx() as conn:
            existing = conn.execute("SELECT * FROM peers WHERE peer_id = ?", (peer_id,)).fetchone()
            final_name = self._free_name(conn, name, peer_id)
            if existing is not None:
                mesh_ip = existing["mesh_ip"]
                registered = existing["registered_us"]
                admin = bool(existing["is_admin"]) or is_admin(peer_id, final_name)
            else:
                taken = {
                    r["mesh_ip"]: r["peer_id"] for r in conn.execute("SELECT mesh_ip, peer_id FROM peers")
                }
                mesh_ip = str(meship.allocate(peer_id, mesh_cidr, taken))
                registered = now
                admin = is_admin(peer_id, final_name)
            record = PeerRecord(
                peer_id=peer_id,
                name=final_name,
                public_key=public_key,
                mesh_ip=mesh_ip,
                addresses=tuple(addresses),
                is_coordinator=is_coordinator,
                is_admin=admin,
                api_url=api_url,
                s3_url=s3_url,
                version=version,
                registered_us=registered,
                last_seen_us=now,
                updated_us=max(now, existing["updated_us"] + 1) if existing is not None else now,
            )
            self._write(conn, record)
        return record

    @staticmethod
    def _free_name(conn: sqlite3.Connection, name: str, peer_id: str) -> str:
        candidate, n = name, 1
        while True:
            row = conn.execute("SELECT peer_id FROM peers WHERE name = ?", (candidate,)).fetchone()
            if row is None or row["peer_id"] == peer_id:
                return candidate
            n += 1
            candidate = f"{name}-{n}"

    @staticmethod
    def _write(conn: sqlite3.Connection, record: PeerRecord) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO peers (peer_id, name, public_key, addresses, is_coordinator, is_admin,"
            " mesh_ip, api_url, s3_url, version, registered_us, last_seen_us, updated_us)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.peer_id,
                record.name,
                record.public_key,
                json.dumps(list(record.addresses)),
                int(record.is_coordinator),
                int(record.is_admin),
                record.mesh_ip,
                record.api_url,
                record.s3_url,
                record.version,
                record.registered_us,
                record.last_seen_us,
                record.updated_us,
            ),
        )

    def upsert(self, record: PeerRecord) -> None:
        """Store a record learned from another coordinator as is.

        Rows of other peers holding the same name or mesh IP are dropped first: the other
        coordinator's view of those wins here (issue 4 replaces this with a proper merge).
        """
        with self._tx() as conn:
            conn.execute(
                "DELETE FROM peers WHERE peer_id != ? AND (name = ? OR mesh_ip = ?)",
                (record.peer_id, record.name, record.mesh_ip),
            )
            self._write(conn, record)

    def touch(self, peer_id: str, now_us: int | None = None) -> None:
        """Record that ``peer_id`` was heard from now."""
        self._conn().execute(
            "UPDATE peers SET last_seen_us = ? WHERE peer_id = ?",
            (_now_us() if now_us is None else now_us, peer_id),
        )

    # -- small key/value state (e.g. which coordinator this node joined through) -----------

    def get_state(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def set_state(self, key: str, value: str) -> None:
        self._conn().execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

    # -- replication between coordinators (issue 4) -----------------------------------------

    def digest(self) -> str:
        """SHA-256 over the replicated fields of every record: equal registries, equal digests."""
        records = sorted((r.replicated() for r in self.list_peers()), key=lambda d: str(d["peer_id"]))
        return hashlib.sha256(json.dumps(records, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def merge_records(self, incoming: Iterable[PeerRecord], *, mesh_cidr: str, now_us: int | None = None) -> bool:
        """Merge records from another coordinator; True when the local registry changed.

        Per peer the larger ``rank()`` wins (the local ``last_seen_us`` is kept). Then, on the
        merged set, clashes are resolved deterministically (so every coordinator with the same
        records ends the same): of several peers with one name, the first registered (then lowest
        peer ID) keeps it and the others get ``name-2`` ...; mesh IPs go through
        :func:`meship.resolve_conflicts`. A record changed by that resolution is re-stamped, so the
        resolution beats the clashing original wherever it travels.
        """
        now = _now_us() if now_us is None else now_us
        with self._tx() as conn:
            local = {r["peer_id"]: _row_to_record(r) for r in conn.execute("SELECT * FROM peers")}
            merged = dict(local)
            for record in incoming:
                current = merged.get(record.peer_id)
                if current is None or record.rank() > current.rank():
                    seen = current.last_seen_us if current is not None else 0
                    merged[record.peer_id] = replace(record, last_seen_us=seen)
            merged = _resolve_clashes(merged, mesh_cidr, now)
            changed = merged != local
            if changed:
                # Rewritten as a whole: the UNIQUE name/IP constraints hold only for the final set.
                conn.execute("DELETE FROM peers")
                for record in merged.values():
                    self._write(conn, record)
        return changed

    # -- coordinator membership view and heartbeats -------------------------------------------

    def load_view(self) -> MembershipView:
        raw = self.get_state(VIEW_KEY)
        return MembershipView.from_dict(json.loads(raw)) if raw else MembershipView()

    def update_view(self, change: Callable[[MembershipView], MembershipView]) -> tuple[MembershipView, bool]:
        """Apply ``change`` to the stored view atomically; returns (new view, whether it changed)."""
        with self._tx() as conn:
            row = conn.execute("SELECT value FROM state WHERE key = ?", (VIEW_KEY,)).fetchone()
            current = MembershipView.from_dict(json.loads(row["value"])) if row else MembershipView()
            new = change(current)
            changed = new != current
            if changed:
                conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                             (VIEW_KEY, json.dumps(new.to_dict(), separators=(",", ":"))))
        return new, changed

    def merge_view(self, other: MembershipView) -> tuple[MembershipView, bool]:
        return self.update_view(lambda view: view.merge(other))

    def record_heartbeat(self, peer_id: str, at: float) -> None:
        """``peer_id`` was heard from at wall-clock ``at`` (never moves back)."""
        self._conn().execute(
            "INSERT INTO heartbeats (peer_id, at) VALUES (?, ?)"
            " ON CONFLICT(peer_id) DO UPDATE SET at = max(at, excluded.at)", (peer_id, at))

    def heartbeats(self) -> dict[str, float]:
        return {r["peer_id"]: r["at"] for r in self._conn().execute("SELECT peer_id, at FROM heartbeats")}


def _resolve_clashes(records: dict[str, PeerRecord], mesh_cidr: str, now_us: int) -> dict[str, PeerRecord]:
    result = dict(records)
    stamp = max([now_us, *(r.updated_us + 1 for r in records.values())])

    by_name: dict[str, list[PeerRecord]] = {}
    for record in result.values():
        by_name.setdefault(record.name, []).append(record)
    taken = set(by_name)
    for name, holders in sorted(by_name.items()):
        if len(holders) < 2:
            continue
        holders.sort(key=lambda r: (r.registered_us, r.peer_id))
        for loser in holders[1:]:
            n = 2
            while f"{name}-{n}" in taken:
                n += 1
            taken.add(f"{name}-{n}")
            result[loser.peer_id] = replace(loser, name=f"{name}-{n}", updated_us=stamp)

    try:
        resolved = meship.resolve_conflicts({pid: r.mesh_ip for pid, r in result.items()}, mesh_cidr)
    except ValueError:  # a record with an unparsable address: leave addresses alone
        return result
    for pid, ip in resolved.items():
        if str(ip) != result[pid].mesh_ip:
            result[pid] = replace(result[pid], mesh_ip=str(ip), updated_us=stamp)
    return result


def registry_path(data_dir: Path) -> Path:
    return Path(data_dir) / "meta" / "registry.db"
