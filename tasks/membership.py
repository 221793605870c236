"""``tasks.membership.heartbeat_round``: one heartbeat / anti-entropy round with every other
coordinator (logic in :mod:`tunnelmesh.cluster`).

Scheduled by beat every ``coordinator.heartbeat_interval`` (``expires`` drops a run that waited
longer than one interval: the next one supersedes it), and sent on demand by the coordination API
after a membership change. Idempotent: a round only merges views and registries and records
heartbeat times, so a redelivery or an extra run is harmless; rounds never overlap (a Redis lock).
"""

from __future__ import annotations

from typing import Any

from tasks.app import app, get_settings
from tunnelmesh import cluster


@app.task(name=cluster.ROUND_TASK, ignore_result=True)
def heartbeat_round() -> dict[str, Any]:
    return cluster.heartbeat_round_once(get_settings())
