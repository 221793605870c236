"""``tasks.manifest_sync.run``: the safety-net manifest sync (logic in tunnelmesh/sync.py).

Run by beat every ``sync.interval`` (with ``expires``, so runs that backed up are dropped rather than
piling up) on the ``manifest`` queue. ``run_sync_once`` holds a Redis lock, so two runs never
overlap (a second one returns ``{"skipped": ...}``). Idempotent: a round only converges states.
"""

from __future__ import annotations

from typing import Any

from tasks.app import app, get_settings
from tunnelmesh.sync import run_sync_once


@app.task(name="tasks.manifest_sync.run", acks_late=True, ignore_result=False)
def run() -> dict[str, Any]:
    return run_sync_once(get_settings())
