"""``tasks.health.ping``: proves that this coordinator's worker consumes tasks from its Redis.

The task records its marker in the coordinator's own Redis (hash ``tunnelmesh:health:pings``,
field = marker), so a test or an operator can enqueue a ping and then look for the marker, which
only a worker connected to that Redis can have written.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from tasks.app import app, get_settings
from tunnelmesh import redis_server

PINGS_KEY = "tunnelmesh:health:pings"


@app.task(name="tasks.health.ping", ignore_result=False)
def ping(marker: str) -> dict[str, Any]:
    """Record ``marker`` (idempotent: a redelivery writes the same field again)."""
    record = {"marker": marker, "worker_pid": os.getpid(), "host": socket.gethostname(), "at": time.time()}
    conn = redis_server.client(get_settings())
    try:
        conn.hset(PINGS_KEY, marker, json.dumps(record))
    finally:
        conn.close()
    return record


def read_ping(conn: Any, marker: str) -> dict[str, Any] | None:
    """The record a ping with ``marker`` left in Redis (``conn``: a redis-py client), or None."""
    raw = conn.hget(PINGS_KEY, marker)
    return json.loads(raw) if raw else None
