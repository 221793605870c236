"""SQLite plumbing shared by the small databases of a data directory (peer registry, replication
ledger, tombstone bookkeeping): one connection per thread and per process, WAL, full fsync, and
explicit ``BEGIN IMMEDIATE`` transactions that report a full disk as :class:`InsufficientStorage`.

(The metadata database, storage/metadata.py, has richer transactions of its own but uses the same
connection settings and disk-full test.)
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.errors import InsufficientStorage

BUSY_TIMEOUT_S = 30.0


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.Error) and (
        getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc))


def enable_wal(conn: sqlite3.Connection, timeout: float = BUSY_TIMEOUT_S) -> None:
    """Put the database in WAL mode (persistent in the file; a no-op once it is).

    Switching a new database to WAL needs an exclusive lock, and SQLite may answer "database is
    locked" at once instead of calling the busy handler while another process opens the same new
    file (the processes of a coordinator starting on an empty data directory do): retry until
    ``timeout``.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def connect(path: Path, *, rows: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, synchronous=FULL."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    if rows:
        conn.row_factory = sqlite3.Row
    enable_wal(conn)
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    return conn


class SQLiteDatabase:
    """Base of a small database file: ``_conn()`` and ``_tx()`` for subclasses."""

    #: Return rows as :class:`sqlite3.Row` (access by column name).
    row_factory: bool = False

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn
        # Never reuse a connection inherited through fork: SQLite forbids it.
        conn = connect(self.path, rows=self.row_factory)
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction, committed on normal exit, rolled back on error."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            # A failed COMMIT (disk full) has already rolled back: a second ROLLBACK would raise
            # and hide the real error.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if is_disk_full(exc):
                raise InsufficientStorage(f"{self.path.name}: {exc}") from exc
            raise

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None
