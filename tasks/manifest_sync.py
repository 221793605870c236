"""``tasks.manifest_sync.run``: the safety-net manifest sync (logic in tunnelmesh/sync.py).

Run by beat every ``sync.interval`` (with ``expires``, so runs that backed up are dropped rather than
piling up) on the ``manifest`` queue. ``run_sync_once`` holds a Redis lock, so two runs never
overlap (a second one returns ``{"skipped": ...}``). Idempotent: a round only converges states.

``tasks.manifest_sync.catch_up`` runs once when the worker starts: a metadata-only pull from the
other coordinators, so a coordinator that just joined (or was down) serves the existing buckets
and objects within seconds instead of after the first rebalance or the 5-minute sync.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from tasks.app import app, get_settings
from tunnelmesh.sync import run_sync_once

log = logging.getLogger(__name__)
CATCH_UP_DELAY = 2.0  # seconds after the worker is ready: let heartbeats confirm the membership


@app.task(name="tasks.manifest_sync.run", acks_late=True, ignore_result=False)
def run() -> dict[str, Any]:
    return run_sync_once(get_settings())


@app.task(name="tasks.manifest_sync.catch_up", acks_late=True, ignore_result=False)
def catch_up() -> dict[str, Any]:
    return run_sync_once(get_settings(), lock_timeout=30.0, catch_up=True, metadata_only=True)


@signals.worker_ready.connect(weak=False)
def _catch_up_on_worker_start(**_: Any) -> None:
    if getattr(app, "tunnelmesh_settings", None) is None:
        return
    try:
        catch_up.apply_async(countdown=CATCH_UP_DELAY, retry=False)
    except Exception:  # noqa: BLE001 - the periodic sync and the rebalance catch up anyway
        log.warning("could not queue the start-up metadata catch-up", exc_info=True)
