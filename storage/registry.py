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

Issue 4 replicates this registry between coordinators; :meth:`PeerRegistry.upsert` stores a record
learned from another coordinator as is.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from storage import meship

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
"""


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
    )


class PeerRegistry:
    """Thread- and process-safe access to ``registry.db`` (one connection per thread)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self._conn()
        conn.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below).
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=True)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

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
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
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
            )
            self._write(conn, record)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
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
            " mesh_ip, api_url, s3_url, version, registered_us, last_seen_us)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            ),
        )

    def upsert(self, record: PeerRecord) -> None:
        """Store a record learned from another coordinator as is.

        Rows of other peers holding the same name or mesh IP are dropped first: the other
        coordinator's view of those wins here (issue 4 replaces this with a proper merge).
        """
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "DELETE FROM peers WHERE peer_id != ? AND (name = ? OR mesh_ip = ?)",
                (record.peer_id, record.name, record.mesh_ip),
            )
            self._write(conn, record)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

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


def registry_path(data_dir: Path) -> Path:
    return Path(data_dir) / "meta" / "registry.db"
