"""Per-process state of the S3 app: settings, the object store, this node's identity and the
credential lookup SigV4 verification uses.

Everything heavy is created lazily on first use, so a gunicorn master that preloads the app never
opens SQLite connections or files that forked workers would then share.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from tunnelmesh import identity
from tunnelmesh.config import Settings
from web.s3.access import Principal, principal_for
from web.s3.errors import S3Error

if TYPE_CHECKING:
    from storage.metadata import ObjectRecord
    from storage.objects import ObjectStore
    from tunnelmesh.replication import OutboxNudger, ReplicationService


ADMIN_CACHE_SECONDS = 5.0


@functools.lru_cache(maxsize=4096)
def _secret_for(mesh_token: str, peer_id: str) -> str:
    # HKDF per request would be cheap but not free; a peer's secret never changes for a token.
    return identity.s3_credentials(mesh_token, peer_id).secret_key


class S3Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data_dir = Path(settings.coordinator.data_dir)
        self._lock = threading.RLock()  # node_peer_id is read while opening the store
        self._store: ObjectStore | None = None
        self._node_peer_id: str | None = None
        self._mesh_token: str | None = None
        self._admin_cache: dict[str, tuple[bool, float]] = {}
        self._nudger: OutboxNudger | None = None
        self._replication: ReplicationService | None = None

    # -- identity and credentials ---------------------------------------------------------------

    @property
    def node_peer_id(self) -> str:
        if self._node_peer_id is None:
            with self._lock:
                if self._node_peer_id is None:
                    self._node_peer_id = identity.load_or_create_identity(self.data_dir).peer_id
        return self._node_peer_id

    def mesh_token(self) -> str:
        """The mesh token; every request is refused until the node has one (it has not joined yet)."""
        if self._mesh_token is None:
            self._mesh_token = identity.read_token(self.data_dir)
        if self._mesh_token is None:
            raise S3Error("ServiceUnavailable",
                          "This coordinator has no mesh token yet (identity/mesh_token in its data directory), "
                          "so it cannot verify S3 credentials. Bootstrap or join a mesh first.")
        return self._mesh_token

    def lookup_secret(self, access_key: str) -> str | None:
        """The secret of an access key that maps to a peer ID (derived from the mesh token), else None."""
        peer_id = identity.peer_id_from_access_key(access_key)
        if peer_id is None:
            return None
        return _secret_for(self.mesh_token(), peer_id)

    def principal(self, peer_id: str) -> Principal:
        return principal_for(peer_id, node_peer_id=self.node_peer_id,
                             admin_peers=self.settings.coordinator.admin_peers,
                             registered_admin=self._registered_admin(peer_id))

    def _registered_admin(self, peer_id: str) -> bool:
        """Admin per the replicated peer registry: its is_admin flag, or an admin_peers glob over
        its registered name. Cached briefly: a request must not pay a database read each time."""
        now = time.monotonic()
        cached = self._admin_cache.get(peer_id)
        if cached is not None and now - cached[1] < ADMIN_CACHE_SECONDS:
            return cached[0]
        from tunnelmesh import node

        registry = node.shared_registry(self.settings)
        record = registry.get(peer_id)
        admin = record is not None and (
            record.is_admin or node.matches_admin(self.settings.coordinator.admin_peers, peer_id, record.name))
        self._admin_cache[peer_id] = (admin, now)
        return admin

    # -- storage --------------------------------------------------------------------------------

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            with self._lock:
                if self._store is None:
                    self._store = self._open_store()
        return self._store

    def _open_store(self) -> ObjectStore:
        from storage.objects import ObjectStore
        from tunnelmesh.replication import ChunkFetcher

        storage = self.settings.storage
        # Chunks held by other coordinators (placement) are fetched from them (issue 5).
        return ObjectStore(self.data_dir, actor=self.node_peer_id, chunk_size=storage.chunk_size,
                           fsync=storage.fsync, min_free_space=storage.min_free_space,
                           chunk_fetcher=ChunkFetcher(self.settings))

    def nudge_replication(self) -> None:
        """After a committed mutation: ask the worker to drain the outbox (never blocks, never fails)."""
        if self._nudger is None:
            from tunnelmesh.replication import OutboxNudger

            with self._lock:  # request threads and DeleteObjects' quorum threads share one nudger
                if self._nudger is None:
                    self._nudger = OutboxNudger(self.settings)
        self._nudger.nudge()

    def await_write_quorum(self, record: ObjectRecord) -> None:
        """With ``replication.write_quorum`` >= 2, hold the acknowledgement of a committed object write
        until that many coordinators hold it durably; else S3 ServiceUnavailable (503). The write
        stays committed here and is still replicated asynchronously (the client should retry)."""
        if self.settings.replication.write_quorum <= 1:
            return
        from tunnelmesh.replication import QuorumNotReached, ReplicationService

        if self._replication is None:
            with self._lock:
                if self._replication is None:
                    self._replication = ReplicationService(self.settings, store=self.store,
                                                           self_id=self.node_peer_id)
        try:
            self._replication.push_for_quorum(record)
        except QuorumNotReached as exc:
            self.nudge_replication()  # the 503 skips the after-request nudge; the outbox row is there
            raise S3Error("ServiceUnavailable", f"{exc}. The write is kept by this coordinator and "
                          "replicated later; retry the request.") from None

    def await_write_quorums(self, records: Sequence[ObjectRecord]) -> list[S3Error | None]:
        """:meth:`await_write_quorum` for many committed writes (DeleteObjects: up to 1,000 keys),
        ``replication.concurrency`` at a time, so waits on slow or unreachable peers overlap (a
        partition costs one ``peer_timeout``, not one per key); per record, None or its key's error."""
        if self.settings.replication.write_quorum <= 1 or not records:
            return [None] * len(records)

        def wait_for(record: ObjectRecord) -> S3Error | None:
            try:
                self.await_write_quorum(record)
            except S3Error as exc:
                return exc
            return None

        workers = min(len(records), self.settings.replication.concurrency)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="delete-quorum") as pool:
            return list(pool.map(wait_for, records))
