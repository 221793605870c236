"""enable_wal: a new database switches to WAL even while another connection briefly holds a lock."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from storage.sqlite import enable_wal


def test_switch_waits_for_a_reader_of_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN")
    holder.execute("SELECT * FROM t").fetchall()  # a shared lock in rollback-journal mode
    threading.Timer(0.3, lambda: holder.execute("COMMIT")).start()
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    enable_wal(conn, timeout=10)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_gives_up_after_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "held.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN")
    holder.execute("SELECT * FROM t").fetchall()
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        enable_wal(conn, timeout=0.2)
    holder.execute("COMMIT")
