"""``GET /metrics``: Prometheus text exposition of a coordinator's state, on coordinator.listen.

Every value is read when Prometheus scrapes (from SQLite, the chunk store, the replication ledger
and Redis), so the numbers are the same whichever gunicorn worker answers and no multiprocess
registry is needed. Requires the mesh token as a bearer token, like every endpoint but /health
(Prometheus: ``authorization: {credentials: <token>}``). Celery task metrics come from Flower's
own /metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tunnelmesh.config import Settings
from tunnelmesh.identity import load_or_create_identity

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)


class CoordinatorCollector:
    """Collects on demand; each source that fails is skipped (and logged), never the whole scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._handles: dict[str, Any] = {}  # opened on first scrape, kept for the process

    def _handle(self, name: str) -> Any:
        if name not in self._handles:
            if name == "meta":
                from storage.metadata import MetadataStore

                self._handles[name] = MetadataStore(self.settings.data_dir / "meta" / "metadata.db")
            elif name == "chunks":
                from storage.chunks import ChunkStore

                self._handles[name] = ChunkStore(self.settings.data_dir)
            elif name == "ledger":
                from storage.hints import ReplicationLedger, ledger_path

                self._handles[name] = ReplicationLedger(ledger_path(self.settings.data_dir))
        return self._handles[name]

    def collect(self) -> Iterator[Metric]:
        for source in (self._objects, self._chunks, self._replication, self._membership, self._queues,
                       self._rebalance):
            try:
                yield from source()
            except Exception:  # noqa: BLE001 - a scrape must answer even when one source is down
                log.warning("metrics: %s failed", source.__name__, exc_info=True)

    def _objects(self) -> Iterator[Metric]:
        with self._handle("meta").read() as tx:
            rows = tx.conn.execute(
                "SELECT deleted, COUNT(*), COALESCE(SUM(size), 0) FROM objects GROUP BY deleted").fetchall()
            outbox = tx.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            buckets = tx.conn.execute("SELECT COUNT(*) FROM buckets WHERE deleted = 0").fetchone()[0]
        objects = GaugeMetricFamily("tunnelmesh_objects", "Objects in the metadata store", labels=["state"])
        logical = GaugeMetricFamily("tunnelmesh_object_bytes", "Logical bytes of live objects")
        live_bytes = 0
        counts = {"live": 0, "tombstone": 0}
        for deleted, count, size in rows:
            counts["tombstone" if deleted else "live"] += count
            if not deleted:
                live_bytes += size
        for state, count in counts.items():
            objects.add_metric([state], count)
        logical.add_metric([], live_bytes)
        yield objects
        yield logical
        yield GaugeMetricFamily("tunnelmesh_buckets", "Live buckets", value=buckets)
        yield GaugeMetricFamily("tunnelmesh_outbox_entries", "Replication intents not yet drained", value=outbox)

    def _chunks(self) -> Iterator[Metric]:
        chunks = self._handle("chunks")
        usage = chunks.disk_usage()
        yield CounterMetricFamily("tunnelmesh_corrupt_chunks", "Chunks found corrupt on read and quarantined",
                                  value=chunks.corrupt_count())
        yield GaugeMetricFamily("tunnelmesh_disk_free_bytes", "Free bytes on the data directory's disk",
                                value=usage.free)
        yield GaugeMetricFamily("tunnelmesh_disk_total_bytes", "Size of the data directory's disk",
                                value=usage.total)

    def _replication(self) -> Iterator[Metric]:
        rows = self._handle("ledger").pending_counts()
        pending = GaugeMetricFamily("tunnelmesh_replication_pending",
                                    "Objects still to be replicated, per peer and state (queued, hint)",
                                    labels=["peer", "state"])
        for peer, state, count in rows:
            pending.add_metric([peer, state], count)
        yield pending

    def _membership(self) -> Iterator[Metric]:
        from tunnelmesh import node

        registry = node.shared_registry(self.settings)
        view = registry.load_view()
        self_id = load_or_create_identity(self.settings.data_dir).peer_id
        entries = node.coordinator_list(self.settings, registry, self_id, view)
        up = GaugeMetricFamily("tunnelmesh_coordinator_up", "1 if the coordinator is seen healthy",
                               labels=["name", "peer_id"])
        for entry in entries:
            up.add_metric([entry["name"], entry["peer_id"]], 1 if entry.get("healthy") else 0)
        yield up
        yield GaugeMetricFamily("tunnelmesh_membership_version", "Version of the coordinator membership view",
                                value=view.version)
        yield GaugeMetricFamily("tunnelmesh_registered_nodes", "Nodes in the peer registry",
                                value=len(registry.list_peers()))

    def _queues(self) -> Iterator[Metric]:
        from tasks.app import QUEUES
        from tunnelmesh import redis_server

        conn = redis_server.client(self.settings, timeout=2.0)
        lengths = GaugeMetricFamily("tunnelmesh_queue_length", "Celery messages waiting in the local Redis",
                                    labels=["queue"])
        for name in QUEUES:
            lengths.add_metric([name], conn.llen(name))
        yield lengths

    def _rebalance(self) -> Iterator[Metric]:
        from tunnelmesh.rebalance import local_progress

        progress: dict[str, Any] = local_progress(self.settings)
        for field, doc in (("moved_bytes", "Bytes pulled by rebalancing since the last membership change"),
                           ("remaining_bytes", "Bytes this coordinator still has to pull")):
            value = progress.get(field)
            if isinstance(value, int) and value >= 0:
                yield GaugeMetricFamily(f"tunnelmesh_rebalance_{field}", doc, value=value)


@bp.get("/metrics")
def metrics() -> Response:
    from web.coordination import _ctx, require_mesh_token

    require_mesh_token()
    app = current_app
    if "tunnelmesh_metrics" not in app.extensions:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(CoordinatorCollector(_ctx().settings))  # type: ignore[arg-type]
        app.extensions["tunnelmesh_metrics"] = registry
    registry = app.extensions["tunnelmesh_metrics"]
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4; charset=utf-8")
