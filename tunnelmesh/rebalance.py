"""Rebalance after membership changes, extra-copy cleanup, and drain on leave (issue 6).

Rebalance (pull-based, per coordinator)
---------------------------------------
Every coordinator holds every object's metadata, so each one can work out on its own which chunks
it must hold under the current placement: the referenced chunks ``h`` (objects and in-progress
uploads) with ``self in place(h, members, replication.factor)``. Those it lacks are fetched from
current holders (``tunnelmesh.replication.ChunkFetcher``: placement holders first, then every other
coordinator; each copy verified by hash), at most ``rebalance.max_bytes_per_cycle`` per cycle (one
Celery task per cycle, so replication tasks interleave), cycle after cycle until nothing is missing.
Only what placement says moves, so the total moved is the ideal (the chunks the new member now
ranks for), plus repairs of chunks that were missing anyway.

A copy a node holds but is not a placement holder of (an *extra copy*) is dropped only after every
placement holder confirmed holding it durably, asked through the sync ``confirm`` operation, which
also returns the holder's membership fingerprint: nothing is dropped unless both sides agree on the
membership (so on who the holders are). Objects stay readable throughout: reads of chunks not held
locally fall back to any holder, and a chunk is never dropped before its new holders have it.

Trigger and debounce
--------------------
``request_rebalance(settings)`` (called by the beat watcher ``check_membership`` when the
membership fingerprint changes, and usable by anyone noticing a change) records the change time in
Redis and schedules one ``tasks.rebalance.start`` after ``rebalance.debounce`` if none is scheduled.
``start`` re-schedules itself while changes keep coming (a quiet window is needed), so several
joins within the window give one rebalance. Each start increments ``tm:rebalance:runs``.

Drain (``tunnelmesh leave``)
----------------------------
``drain(settings, progress_callback)``: the leaving coordinator first pushes its pending
replication, then sends every chunk it holds to the holders placement gives it *without* itself,
checking with each holder first; it reports done only when every such holder confirmed every chunk.
Then the CLI removes it from the membership; the others rebalance (nothing left to fetch).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from storage.chunks import ChunkRef
from storage.gc import extra_copies
from storage.metadata import _CHUNK  # noqa: PLC2701 - the packed chunk-list format
from storage.placement import members_fingerprint, place
from tunnelmesh.config import Settings

log = logging.getLogger("tunnelmesh.rebalance")

PROGRESS_KEY = "tm:rebalance:progress"
REQUESTED_KEY = "tm:rebalance:requested_at"
SCHEDULED_KEY = "tm:rebalance:scheduled"
RUNS_KEY = "tm:rebalance:runs"
MEMBERS_FP_KEY = "tm:rebalance:members_fp"
CYCLE_LOG_KEY = "tm:rebalance:cycles"  # list of JSON cycle reports (newest last, capped)
CONFIRM_BATCH = 5000


# =============================================================================================
# Pure decisions
# =============================================================================================


def referenced_chunk_sizes(meta: Any) -> dict[str, int]:
    """hash -> size of every chunk an object row or an in-progress upload's part references."""
    sizes: dict[str, int] = {}
    with meta.read() as tx:
        for table in ("objects", "parts"):
            for (blob,) in tx.conn.execute(f"SELECT chunks FROM {table}"):
                for digest, size in _CHUNK.iter_unpack(blob):
                    sizes[digest.hex()] = size
    return sizes


def wanted_chunks(referenced: dict[str, int], self_id: str, members: Sequence[str], factor: int) -> dict[str, int]:
    """The referenced chunks ``self_id`` must hold under placement."""
    return {h: size for h, size in referenced.items() if self_id in place(h, members, factor)}


def take_cycle(missing: Sequence[ChunkRef], budget: int) -> list[ChunkRef]:
    """The chunks of one cycle: in order, at most ``budget`` bytes (one oversized chunk alone)."""
    taken: list[ChunkRef] = []
    total = 0
    for ref in missing:
        if total + ref.size > budget:
            if not taken:
                taken.append(ref)
            break
        taken.append(ref)
        total += ref.size
    return taken


@dataclass(slots=True)
class CycleReport:
    moved_chunks: int = 0
    moved_bytes: int = 0
    failed_chunks: int = 0
    remaining_chunks: int = 0
    remaining_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"moved_chunks": self.moved_chunks, "moved_bytes": self.moved_bytes,
                "failed_chunks": self.failed_chunks, "remaining_chunks": self.remaining_chunks,
                "remaining_bytes": self.remaining_bytes}


Confirm = Callable[[str, list[str]], tuple[str, set[str]]]  # (peer, hashes) -> (peer's fingerprint, have)


class Rebalancer:
    """One coordinator's side of a rebalance (transport injected: HTTP in production)."""

    def __init__(self, store: Any, self_id: str, members: Callable[[], list[str]], factor: int,
                 fetch: Callable[[ChunkRef], bytes], confirm: Confirm) -> None:
        self.store = store
        self.self_id = self_id
        self.members = members
        self.factor = factor
        self.fetch = fetch
        self.confirm = confirm

    def missing(self) -> list[ChunkRef]:
        wanted = wanted_chunks(referenced_chunk_sizes(self.store.meta), self.self_id, self.members(), self.factor)
        exists = self.store.chunks.exists
        return [ChunkRef(h, size) for h, size in sorted(wanted.items()) if not exists(h)]

    def cycle(self, budget: int) -> CycleReport:
        """Fetch at most ``budget`` bytes of what this node lacks; report what is left."""
        missing = self.missing()
        report = CycleReport()
        batch = take_cycle(missing, budget)
        for ref in batch:
            try:
                data = self.fetch(ref)
                self.store.chunks.write_verified(data, ref.hash)
            except Exception as exc:  # noqa: BLE001 - an unavailable chunk is retried next cycle
                log.warning("rebalance: chunk %s not fetched: %s", ref.hash, exc)
                report.failed_chunks += 1
                continue
            report.moved_chunks += 1
            report.moved_bytes += ref.size
        left = [ref for ref in missing if not self.store.chunks.exists(ref.hash)]
        report.remaining_chunks = len(left)
        report.remaining_bytes = sum(ref.size for ref in left)
        return report

    def confirmed_by_holders(self, hashes: Iterable[str], holders_of: Callable[[str], list[str]],
                             fingerprint: str | None) -> set[str]:
        """The hashes every holder (``holders_of``) confirmed; with ``fingerprint``, only holders
        that agree on it count."""
        wanted: dict[str, list[str]] = {}
        by_peer: dict[str, list[str]] = {}
        for chunk_hash in hashes:
            holders = [p for p in holders_of(chunk_hash) if p != self.self_id]
            wanted[chunk_hash] = holders
            for peer in holders:
                by_peer.setdefault(peer, []).append(chunk_hash)
        have: dict[str, set[str]] = {}
        for peer, peer_hashes in by_peer.items():
            got: set[str] = set()
            for start in range(0, len(peer_hashes), CONFIRM_BATCH):
                try:
                    peer_fp, confirmed = self.confirm(peer, peer_hashes[start:start + CONFIRM_BATCH])
                except Exception as exc:  # noqa: BLE001 - unreachable holder: drop nothing it holds
                    log.info("rebalance: %s could not confirm chunks: %s", peer, exc)
                    break
                if fingerprint is not None and peer_fp != fingerprint:
                    break
                got |= confirmed
            have[peer] = got
        return {h for h, holders in wanted.items() if holders and all(h in have.get(p, ()) for p in holders)}

    def drop_extra_copies(self) -> tuple[int, int]:
        """Drop local referenced chunks this node is not a holder of, once every holder confirmed
        them (and agrees on the membership). Returns (chunks, bytes) dropped."""
        members = self.members()
        referenced = referenced_chunk_sizes(self.store.meta)
        local = [h for h in referenced if self.store.chunks.exists(h)]
        extras = extra_copies(local, self.self_id, members, self.factor)
        if not extras:
            return 0, 0
        fingerprint = members_fingerprint(members)
        confirmed = self.confirmed_by_holders(extras, lambda h: place(h, members, self.factor), fingerprint)
        dropped = freed = 0
        for chunk_hash in confirmed:
            if self.store.chunks.delete(chunk_hash):
                dropped += 1
                freed += referenced.get(chunk_hash, 0)
        return dropped, freed


# =============================================================================================
# Settings-level wiring (HTTP, Redis)
# =============================================================================================


def open_rebalancer(settings: Settings) -> tuple[Rebalancer, Any]:
    """This coordinator's Rebalancer (HTTP transport) and its replication service."""
    from tunnelmesh import node
    from tunnelmesh.replication import ChunkFetcher, ReplicationService
    from tunnelmesh.sync import HttpLink

    service = ReplicationService(settings)
    fetcher = ChunkFetcher(settings, service)

    def confirm(peer: str, hashes: list[str]) -> tuple[str, set[str]]:
        member = next(m for m in node.coordinator_members(settings) if m.peer_id == peer)
        answer = HttpLink(settings, member, service.client, service).call("confirm", {"hashes": hashes})
        return str(answer.get("fp", "")), set(answer.get("have", []))

    def members() -> list[str]:
        return [m.peer_id for m in node.coordinator_members(settings)]

    rebalancer = Rebalancer(service.store, service.self_id, members, settings.replication.factor,
                            fetcher.fetch, confirm)
    return rebalancer, service


def _redis(settings: Settings) -> Any:
    from tunnelmesh import redis_server

    return redis_server.client(settings, timeout=5.0)


def local_progress(settings: Settings) -> dict[str, Any]:
    """This coordinator's rebalance progress (what ``GET /api/v1/sync/progress`` answers)."""
    try:
        conn = _redis(settings)
        raw = conn.hgetall(PROGRESS_KEY)
        runs = int(conn.get(RUNS_KEY) or 0)
    except Exception as exc:  # noqa: BLE001 - status must answer even with Redis down
        return {"name": settings.name, "state": "unknown", "error": str(exc)}
    progress: dict[str, Any] = {"name": settings.name, "runs": runs, "state": "idle"}
    for key, value in raw.items():
        key = key.decode() if isinstance(key, bytes) else key
        value = value.decode() if isinstance(value, bytes) else value
        progress[key] = int(value) if value.lstrip("-").isdigit() else value
    return progress


def rebalance_progress(settings: Settings) -> dict[str, Any]:
    """Progress of every coordinator (``tunnelmesh status``): name -> {state, moved_bytes,
    remaining_bytes, cycles, runs, ...}; unreachable peers get ``{"state": "unreachable"}``."""
    from tunnelmesh import node
    from tunnelmesh.identity import load_or_create_identity
    from tunnelmesh.peer_client import PeerClient

    identity = load_or_create_identity(settings.data_dir)
    client = PeerClient(settings, identity)
    result: dict[str, Any] = {}
    for member in node.coordinator_members(settings):
        if member.peer_id == identity.peer_id:
            result[member.name] = local_progress(settings)
            continue
        try:
            response = client.request("GET", f"{member.api_url.rstrip('/')}/api/v1/sync/progress", timeout=(3, 5))
            result[member.name] = response.json() if response.status_code == 200 else {
                "state": "unreachable", "error": f"HTTP {response.status_code}"}
        except Exception as exc:  # noqa: BLE001 - one peer down must not break status
            result[member.name] = {"state": "unreachable", "error": str(exc)}
    return result


def record_progress(settings: Settings, **fields: Any) -> None:
    conn = _redis(settings)
    conn.hset(PROGRESS_KEY, mapping={k: str(v) for k, v in fields.items()})


def record_cycle(settings: Settings, cycle: dict[str, Any]) -> None:
    conn = _redis(settings)
    conn.rpush(CYCLE_LOG_KEY, json.dumps(cycle))
    conn.ltrim(CYCLE_LOG_KEY, -1000, -1)


def cycles(settings: Settings) -> list[dict[str, Any]]:
    """The recorded cycle reports (for tests and status): moved bytes per cycle and the budget."""
    return [json.loads(item) for item in _redis(settings).lrange(CYCLE_LOG_KEY, 0, -1)]


def members_changed(settings: Settings) -> bool:
    """True (once) when the membership fingerprint differs from the one last seen (beat watcher)."""
    from tunnelmesh import node

    fingerprint = members_fingerprint(m.peer_id for m in node.coordinator_members(settings))
    conn = _redis(settings)
    previous = conn.getset(MEMBERS_FP_KEY, fingerprint)
    previous = previous.decode() if isinstance(previous, bytes) else previous
    return previous != fingerprint


# =============================================================================================
# Drain
# =============================================================================================


def drain(settings: Settings, progress_callback: Callable[[dict[str, Any]], None] | None = None,
          *, timeout: float = 3600.0) -> dict[str, Any]:
    """Hand every chunk of this coordinator to its holders without it; returns when all confirmed.

    Call before removing this coordinator from the membership (``tunnelmesh leave``).
    ``progress_callback`` receives ``{moved_bytes, remaining_bytes, remaining_chunks}`` after
    each pass. Raises TimeoutError if holders could not confirm everything within ``timeout``.
    """
    from tunnelmesh import node

    rebalancer, service = open_rebalancer(settings)
    self_id = service.self_id
    # 1. Pending replication first: metadata of recent writes must reach everyone.
    service.drain_outbox(lambda peer, kind, bucket, key: service.replicate(peer, kind, bucket, key))
    for item in service.ledger.items():
        try:
            service.replicate(item.peer, item.kind, item.bucket, item.key)
        except Exception as exc:  # noqa: BLE001 - the sync of the others repairs metadata too
            log.warning("drain: replicate %s/%s to %s failed: %s", item.bucket, item.key, item.peer, exc)
    members = {m.peer_id: m for m in node.coordinator_members(settings)}
    remaining_members = [p for p in members if p != self_id]
    factor = settings.replication.factor
    deadline = time.monotonic() + timeout
    moved = 0
    while True:
        referenced = referenced_chunk_sizes(service.store.meta)
        local = [h for h in referenced if service.store.chunks.exists(h)]
        if not remaining_members:
            raise RuntimeError("the last coordinator cannot drain: nobody would hold its data")

        def holders_of(chunk_hash: str) -> list[str]:
            return place(chunk_hash, remaining_members, factor)

        confirmed = rebalancer.confirmed_by_holders(local, holders_of, None)
        pending = [h for h in local if h not in confirmed]
        report = {"moved_bytes": moved, "remaining_chunks": len(pending),
                  "remaining_bytes": sum(referenced[h] for h in pending)}
        if progress_callback is not None:
            progress_callback(report)
        if not pending:
            return {**report, "chunks": len(local)}
        if time.monotonic() > deadline:
            raise TimeoutError(f"drain: {len(pending)} chunk(s) not confirmed by their new holders")
        for chunk_hash in pending:
            for peer in holders_of(chunk_hash):
                try:
                    service._put_chunk(members[peer], ChunkRef(chunk_hash, referenced[chunk_hash]))
                    moved += referenced[chunk_hash]
                except Exception as exc:  # noqa: BLE001 - retried on the next pass
                    log.warning("drain: chunk %s to %s failed: %s", chunk_hash, peer, exc)
        time.sleep(0.2)
