"""``tasks.gc.run``: garbage collection of one coordinator (logic in storage/gc.py and
tunnelmesh/rebalance.py), by beat every ``storage.gc_interval``.

Removes chunks referenced by nothing once older than ``storage.gc_grace``, and extra copies (chunks
this node is not a placement holder of) once every holder confirmed them. Tombstones are purged by
the manifest sync (only the range owner knows that every member holds them).
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.app import app, get_settings
from tunnelmesh.config import Settings

log = logging.getLogger("tunnelmesh.gc")


def run_gc_once(settings: Settings) -> dict[str, Any]:
    from storage.gc import collect_unreferenced_chunks
    from tunnelmesh.rebalance import open_rebalancer

    rebalancer, service = open_rebalancer(settings)
    store = service.store
    chunks = collect_unreferenced_chunks(store.meta, store.chunks, settings.storage.gc_grace)
    dropped, freed = rebalancer.drop_extra_copies()
    report = {**chunks.to_dict(), "extra_dropped": dropped, "extra_dropped_bytes": freed}
    log.info("gc: %s", report)
    return report


@app.task(name="tasks.gc.run", acks_late=True, ignore_result=False)
def run() -> dict[str, Any]:
    return run_gc_once(get_settings())
