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

Metadata catch-up first
-----------------------
A run starts with a manifest-sync run in catch-up mode, metadata only (``catch_up_metadata``): every
node pulls, over every range, the records a peer holds that it lacks or holds older, and the range
owners push theirs. A write whose replication fanned out before the writer knew the new member (so
never reached it) is therefore known everywhere before anyone works out what it must hold; no
manual sync is needed after a join. Chunks are not moved by that run: the budgeted cycles move them.
If a peer's membership view still differs (its rounds are skipped), the start waits and tries again.

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
asking each holder first which of them it already has and sending only the ones it lacks (so
bytes moved are not overcounted); it reports done only when every such holder confirmed every chunk.
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

    def ask_holders(self, hashes: Iterable[str], holders_of: Callable[[str], list[str]],
                    fingerprint: str | None) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
        """Ask every holder (``holders_of``, self excluded) which of its chunks it holds durably.

        Returns ``(holders per hash, confirmed hashes per holder)``; a holder that cannot be
        reached, or (with ``fingerprint``) disagrees on the membership, confirms nothing.
        """
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
                    got = set()
                    break
                if fingerprint is not None and peer_fp != fingerprint:
                    got = set()
                    break
                got |= confirmed
            have[peer] = got
        return wanted, have

    def confirmed_by_holders(self, hashes: Iterable[str], holders_of: Callable[[str], list[str]],
                             fingerprint: str | None) -> set[str]:
        """The hashes every holder (``holders_of``) confirmed; with ``fingerprint``, only holders
        that agree on it count."""
        wanted, have = self.ask_holders(hashes, holders_of, fingerprint)
        return {h for h, holders in wanted.items() if holders and all(h in have.get(p, ()) for p in holders)}

    def drop_extra_copies(self) -> tuple[int, int]:
        """Drop local referenced chunks this node is not a holder of, once every holder confirmed
        them (and agrees on the membership). Returns (chunks, bytes) dropped."""
        dropped, freed, _ = self.drop_extra_copies_report()
        return dropped, freed

    def drop_extra_copies_report(self) -> tuple[int, int, int]:
        """``drop_extra_copies``, plus the number of extra copies kept (not confirmed yet)."""
        members = self.members()
        referenced = referenced_chunk_sizes(self.store.meta)
        local = [h for h in referenced if self.store.chunks.exists(h)]
        extras = extra_copies(local, self.self_id, members, self.factor)
        if not extras:
            return 0, 0, 0
        fingerprint = members_fingerprint(members)
        confirmed = self.confirmed_by_holders(extras, lambda h: place(h, members, self.factor), fingerprint)
        dropped = freed = 0
        for chunk_hash in confirmed:
            if self.store.chunks.delete(chunk_hash):
                dropped += 1
                freed += referenced.get(chunk_hash, 0)
        return dropped, freed, len(extras) - len(confirmed)


SendChunk = Callable[[str, ChunkRef], None]  # (peer, chunk) -> upload it, verified on arrival


@dataclass(slots=True)
class DrainPass:
    """One pass of a drain: what the holders already had, what was sent, what is still pending."""
    chunks: int = 0
    already_held: int = 0  # (chunk, holder) pairs the holder confirmed without an upload
    sent_chunks: int = 0
    sent_bytes: int = 0
    failed: int = 0
    pending_chunks: int = 0
    pending_bytes: int = 0


def drain_pass(rebalancer: Rebalancer, remaining_members: Sequence[str], send: SendChunk) -> DrainPass:
    """Give every referenced chunk this node holds to its holders among ``remaining_members``.

    Each holder is asked first which of its chunks it has (``Rebalancer.confirm``); only the
    (chunk, holder) pairs it lacks are uploaded, so bytes are counted once per real transfer. A
    chunk is *pending* until every holder confirmed it (the pass after an upload re-asks).
    """
    if not remaining_members:
        raise RuntimeError("the last coordinator cannot drain: nobody would hold its data")
    store = rebalancer.store
    referenced = referenced_chunk_sizes(store.meta)
    local = [h for h in sorted(referenced) if store.chunks.exists(h)]

    def holders_of(chunk_hash: str) -> list[str]:
        return place(chunk_hash, remaining_members, rebalancer.factor)

    wanted, have = rebalancer.ask_holders(local, holders_of, None)
    result = DrainPass(chunks=len(local))
    for chunk_hash, holders in wanted.items():
        lacking = [p for p in holders if chunk_hash not in have.get(p, ())]
        result.already_held += len(holders) - len(lacking)
        if not lacking:
            continue
        result.pending_chunks += 1
        result.pending_bytes += referenced[chunk_hash]
        for peer in lacking:
            try:
                send(peer, ChunkRef(chunk_hash, referenced[chunk_hash]))
            except Exception as exc:  # noqa: BLE001 - retried on the next pass
                log.warning("drain: chunk %s to %s failed: %s", chunk_hash, peer, exc)
                result.failed += 1
                continue
            result.sent_chunks += 1
            result.sent_bytes += referenced[chunk_hash]
    return result


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


def catch_up_metadata(settings: Settings, *, lock_timeout: float | None = None) -> dict[str, Any]:
    """The metadata catch-up a rebalance starts with (module docstring): one manifest-sync run in
    catch-up mode, records only. Adds ``membership_agreed``: False when a peer's view still differs
    (its rounds were skipped), so the caller should try again shortly."""
    from tunnelmesh.sync import run_sync_once

    if lock_timeout is None:  # wait for a running beat sync, well within the task's time limit
        lock_timeout = min(120.0, settings.worker.task_time_limit / 4)
    report = run_sync_once(settings, lock_timeout=lock_timeout, catch_up=True, metadata_only=True)
    rounds = report.get("rounds", [])
    report["membership_agreed"] = "skipped" not in report and not any(r["outcome"] == "skipped" for r in rounds)
    return report


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
    ``progress_callback`` receives ``{moved_bytes, moved_chunks, remaining_bytes, remaining_chunks,
    passes, chunks}`` after each pass (remaining: not yet confirmed by every new holder). Raises TimeoutError if holders could not confirm everything within ``timeout``.
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
    deadline = time.monotonic() + timeout
    moved = moved_chunks = passes = 0

    def send(peer: str, ref: ChunkRef) -> None:
        service._put_chunk(members[peer], ref)

    while True:
        result = drain_pass(rebalancer, remaining_members, send)
        passes += 1
        moved += result.sent_bytes
        moved_chunks += result.sent_chunks
        # Uploads of this pass are confirmed by the next one's question; what was already held
        # needs nothing more. Done when a pass found nothing to send.
        done = result.pending_chunks == 0
        report = {"moved_bytes": moved, "moved_chunks": moved_chunks, "remaining_chunks": result.pending_chunks,
                  "remaining_bytes": result.pending_bytes, "passes": passes, "chunks": result.chunks}
        if progress_callback is not None:
            progress_callback(report)
        if done:
            return report
        if time.monotonic() > deadline:
            raise TimeoutError(f"drain: {result.pending_chunks} chunk(s) not confirmed by their new holders")
        if result.failed:
            time.sleep(0.2)


# =============================================================================================
# Progress display (``tunnelmesh status`` and its watch mode)
# =============================================================================================


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"  # pragma: no cover - unreachable


def _progress_bar(fraction: float, width: int) -> str:
    width = max(1, width)
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def format_progress(progress: dict[str, Any], width: int) -> str:
    """Render ``rebalance_progress`` output: one line per coordinator with its state, bytes moved
    and remaining, and a text progress bar, fitted to ``width`` columns (the CLI's watch mode
    redraws it every second). A remaining count of -1 (not computed yet) or a coordinator that
    could not be asked shows no bar; a finished one shows a full bar.
    """
    width = max(40, width)
    names = sorted(progress)
    if not names:
        return "no coordinators"
    name_width = min(max(len(n) for n in names), 24)
    lines = []
    total_moved = total_remaining = 0
    for name in names:
        info = progress[name] if isinstance(progress[name], dict) else {}
        state = str(info.get("state", "unknown"))
        moved = int(info.get("moved_bytes", 0) or 0)
        remaining = int(info.get("remaining_bytes", -1) if info.get("remaining_bytes") is not None else -1)
        head = f"{name[:name_width]:<{name_width}}  {state:<11}"
        if state in ("unreachable", "unknown"):
            detail = str(info.get("error", ""))
            lines.append(f"{head}  {detail}"[:width])
            continue
        total_moved += moved
        numbers = f"moved {_human_bytes(moved):>9}  remaining " + (
            f"{_human_bytes(max(remaining, 0)):>9}" if remaining >= 0 else f"{'?':>9}")
        total_remaining += max(remaining, 0)
        if state == "done" or remaining == 0:
            fraction: float | None = 1.0
        elif remaining > 0:
            fraction = moved / (moved + remaining)
        else:
            fraction = None
        bar_width = width - len(head) - len(numbers) - 11
        if fraction is None or bar_width < 5:
            lines.append(f"{head}  {numbers}"[:width])
        else:
            lines.append(f"{head}  {_progress_bar(fraction, bar_width)} {fraction * 100:3.0f}%  {numbers}"[:width])
    lines.append(f"total: moved {_human_bytes(total_moved)}, remaining {_human_bytes(total_remaining)}"[:width])
    return "\n".join(lines)
