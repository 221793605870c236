"""The replication ledger: what each peer still has to receive, and which chunk copies peers confirmed.

A separate SQLite file (``data_dir/meta/replication.db``) so the metadata schema stays untouched;
it is shared by every process of one coordinator (WAL, one connection per thread and process).

``pending`` rows: one per (peer, kind, bucket, key) that must still be pushed to ``peer``.
The outbox drain turns the coordinator-wide outbox into these per-peer rows before it enqueues
tasks, so an intent stays durable per peer until that peer confirmed it:

- ``add`` bumps the row's generation; ``needs_task`` is False when a task for the row is queued and
  has not started yet (it will read the current record when it runs: repeated overwrites while
  pending send only the newest version).
- ``claim`` (a task starts) records the generation the task is working for; ``done`` deletes the row
  only if no newer write re-added it meanwhile.
- ``mark_hint`` (the last attempt failed) keeps the row as a *hint*, replayed when the peer is up.

``confirmed`` rows: (chunk hash, peer) pairs a peer confirmed holding durably (it answered "have"
or acknowledged a verified upload). The writer drops its own extra copy of a chunk only when every
placement holder confirmed it (see ``tunnelmesh.replication``).

Stdlib only, like the rest of ``storage/``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from storage.sqlite import SQLiteDatabase

__all__ = ["KIND_OBJECT", "KIND_BUCKET", "STATE_QUEUED", "STATE_HINT", "PendingItem", "ReplicationLedger",
           "ledger_path"]

KIND_OBJECT = "object"
KIND_BUCKET = "bucket"
STATE_QUEUED = "queued"  # a task is (or should be) on the queue for it
STATE_HINT = "hint"  # every attempt failed: replay when the peer is seen up

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS pending (
        peer TEXT NOT NULL,
        kind TEXT NOT NULL,
        bucket TEXT NOT NULL,
        key TEXT NOT NULL,
        gen INTEGER NOT NULL,
        started_gen INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL,
        updated_us INTEGER NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (peer, kind, bucket, key))""",
    "CREATE INDEX IF NOT EXISTS pending_by_state ON pending (state, peer)",
    """CREATE TABLE IF NOT EXISTS confirmed (
        hash TEXT NOT NULL,
        peer TEXT NOT NULL,
        confirmed_us INTEGER NOT NULL,
        PRIMARY KEY (hash, peer))""",
)


def ledger_path(data_dir: Path) -> Path:
    return Path(data_dir) / "meta" / "replication.db"


def _now_us() -> int:
    return int(time.time() * 1_000_000)


@dataclass(frozen=True, slots=True)
class PendingItem:
    peer: str
    kind: str
    bucket: str
    key: str
    gen: int
    state: str
    updated_us: int
    last_error: str = ""


class ReplicationLedger(SQLiteDatabase):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        with self._tx() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    # -- pending work --------------------------------------------------------------------------
    def add(self, items: Iterable[tuple[str, str, str, str]]) -> list[tuple[str, str, str, str]]:
        """Record (peer, kind, bucket, key) intents; returns those that need a new task enqueued.

        An item whose queued task has not started yet needs none (that task reads the current
        record); a started, finished-with-hint or new item does.
        """
        needs_task = []
        now = _now_us()
        with self._tx() as conn:
            for peer, kind, bucket, key in items:
                row = conn.execute("SELECT gen, started_gen, state FROM pending WHERE peer = ? AND kind = ? "
                                   "AND bucket = ? AND key = ?", (peer, kind, bucket, key)).fetchone()
                if row is None:
                    conn.execute("INSERT INTO pending (peer, kind, bucket, key, gen, state, updated_us) "
                                 "VALUES (?, ?, ?, ?, 1, ?, ?)", (peer, kind, bucket, key, STATE_QUEUED, now))
                    needs_task.append((peer, kind, bucket, key))
                    continue
                gen, started_gen, state = row
                conn.execute("UPDATE pending SET gen = ?, state = ?, updated_us = ? WHERE peer = ? AND kind = ? "
                             "AND bucket = ? AND key = ?", (gen + 1, STATE_QUEUED, now, peer, kind, bucket, key))
                if state != STATE_QUEUED or started_gen >= gen:
                    needs_task.append((peer, kind, bucket, key))
        return needs_task

    def claim(self, peer: str, kind: str, bucket: str, key: str) -> int | None:
        """A task starts working on the item: returns the generation it covers (None: nothing pending)."""
        with self._tx() as conn:
            row = conn.execute("SELECT gen FROM pending WHERE peer = ? AND kind = ? AND bucket = ? AND key = ?",
                               (peer, kind, bucket, key)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE pending SET started_gen = ?, state = ? WHERE peer = ? AND kind = ? AND bucket = ? "
                         "AND key = ?", (row[0], STATE_QUEUED, peer, kind, bucket, key))
            return int(row[0])

    def done(self, peer: str, kind: str, bucket: str, key: str, gen: int) -> bool:
        """The peer holds the version current at ``claim``: drop the item unless rewritten since."""
        with self._tx() as conn:
            cur = conn.execute("DELETE FROM pending WHERE peer = ? AND kind = ? AND bucket = ? AND key = ? "
                               "AND gen <= ?", (peer, kind, bucket, key, gen))
            return cur.rowcount > 0

    def mark_hint(self, peer: str, kind: str, bucket: str, key: str, error: str = "") -> None:
        """Every attempt failed: keep the item as a hint for when the peer is back."""
        with self._tx() as conn:
            conn.execute("UPDATE pending SET state = ?, started_gen = gen, updated_us = ?, last_error = ? "
                         "WHERE peer = ? AND kind = ? AND bucket = ? AND key = ?",
                         (STATE_HINT, _now_us(), error[:500], peer, kind, bucket, key))

    def items(self, peer: str | None = None, state: str | None = None,
              updated_before_us: int | None = None) -> list[PendingItem]:
        clauses, params = [], []
        if peer is not None:
            clauses.append("peer = ?")
            params.append(peer)
        if state is not None:
            clauses.append("state = ?")
            params.append(state)
        if updated_before_us is not None:
            clauses.append("updated_us < ?")
            params.append(updated_before_us)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._conn().execute(
            f"SELECT peer, kind, bucket, key, gen, state, updated_us, last_error FROM pending {where} "
            "ORDER BY peer, kind, bucket, key", params)
        return [PendingItem(*row) for row in rows]

    def requeue(self, items: Iterable[PendingItem]) -> None:
        """Hints (or stale items) are being re-enqueued: back to ``queued``, not started."""
        now = _now_us()
        with self._tx() as conn:
            for item in items:
                conn.execute("UPDATE pending SET state = ?, started_gen = 0, updated_us = ? WHERE peer = ? "
                             "AND kind = ? AND bucket = ? AND key = ?",
                             (STATE_QUEUED, now, item.peer, item.kind, item.bucket, item.key))

    def pending_counts(self) -> list[tuple[str, str, int]]:
        """(peer, state, count) of pending items: what monitoring shows."""
        rows = self._conn().execute("SELECT peer, state, COUNT(*) FROM pending GROUP BY peer, state ORDER BY 1, 2")
        return [(peer, state, count) for peer, state, count in rows]

    def peers_with(self, state: str) -> list[str]:
        rows = self._conn().execute("SELECT DISTINCT peer FROM pending WHERE state = ? ORDER BY peer", (state,))
        return [row[0] for row in rows]

    # -- confirmed chunk copies ----------------------------------------------------------------
    def confirm_chunks(self, peer: str, hashes: Iterable[str]) -> None:
        now = _now_us()
        with self._tx() as conn:
            conn.executemany("INSERT OR REPLACE INTO confirmed (hash, peer, confirmed_us) VALUES (?, ?, ?)",
                             [(h, peer, now) for h in hashes])

    def confirmed_peers(self, chunk_hash: str) -> set[str]:
        rows = self._conn().execute("SELECT peer FROM confirmed WHERE hash = ?", (chunk_hash,))
        return {row[0] for row in rows}

    def forget_chunk(self, chunk_hash: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM confirmed WHERE hash = ?", (chunk_hash,))
