"""Replication between coordinators: what to send to whom, pushing to one peer, hints, remote reads.

The flow (issue 5)
------------------
1. A mutation commits locally with an outbox row in the same transaction and is acknowledged.
2. ``drain_outbox`` (a Celery task: nudged by the S3 app after each write, run by beat every
   ``replication.drain_interval`` and on worker start) coalesces the outbox per (bucket, key),
   records one durable *pending* item per (item, peer) in the ledger (``storage.hints``), enqueues
   one task per item and peer, and only then removes the outbox rows. A crash anywhere repeats work,
   never loses it; tasks are convergent ("make the peer hold the current version").
3. ``ReplicationService.replicate`` (one task per object and peer) reads the CURRENT local record,
   asks the peer which of the chunks it should hold (placement) it already has, uploads the missing
   ones (verified by hash on arrival) and then the metadata record (object or tombstone, with its
   version vector, plus its bucket record). The receiver applies it with ``apply_remote_*``
   (dominated versions ignored, concurrent ones resolved deterministically, no outbox row: no echo).
   Metadata goes to every coordinator; chunks only to their placement holders.
4. A peer that cannot be reached raises ``PeerUnavailable``: the task retries with exponential backoff
   and jitter; after the last attempt the pending item stays in the ledger as a *hint*, replayed as
   soon as the peer is seen up (``replay_hints_for``: heartbeat handler, beat check).

Writer cleanup rule
-------------------
The writer stores every chunk of a write locally (the write is acknowledged before any transfer).
A chunk the writer is not a placement holder of is an *extra copy*. After a successful push, the
writer drops an extra copy only when every placement holder has confirmed holding that chunk
durably (answered "have" or acknowledged its verified upload; recorded in the ledger), never before.
Once replication and cleanup have run, each chunk is therefore on exactly ``replication.factor``
coordinators (fewer while the membership is smaller than the factor).

Slow peers and the write quorum
-------------------------------
At most ``per_peer_slots`` pushes to one peer run at once; a push finding its peer's slots busy
raises ``PeerBusy`` and the task defers itself, so a crawling peer never occupies every worker
process. With ``replication.write_quorum`` >= 2 the S3 app calls ``push_for_quorum`` before it
answers (docs/configuration.md, "Write quorum").

Reads of chunks not held locally go through ``ChunkFetcher``: the placement holders (then every
other coordinator), each copy verified by hash; a holder that is down or returns a corrupt copy is
skipped for the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from storage.chunks import ChunkRef, validate_hash
from storage.errors import ChunkMissing, NoSuchBucket
from storage.hints import KIND_BUCKET, KIND_OBJECT, STATE_HINT, STATE_QUEUED, ReplicationLedger, ledger_path
from storage.metadata import (
    OUTBOX_CREATE_BUCKET,
    OUTBOX_DELETE_BUCKET,
    BucketRecord,
    ObjectRecord,
    OutboxEntry,
)
from storage.placement import place
from tunnelmesh.config import Settings

log = logging.getLogger("tunnelmesh.replication")

API_PREFIX = "/api/v1/replication"
MAX_HAVE_QUERY = 10_000  # hashes per "which do you have" request
DRAIN_BATCH = 5000

Item = tuple[str, str, str]  # (kind, bucket, key); key is "" for buckets
Enqueue = Callable[[str, str, str, str], None]  # (peer, kind, bucket, key) -> put a task on the queue


class PeerUnavailable(Exception):
    """The peer could not be reached, timed out or answered 5xx: worth retrying later."""


class PeerRejected(Exception):
    """The peer refused the request (4xx): retrying the same request would not help."""


class PeerBusy(Exception):
    """Every push slot of this peer is taken (it is slow): run the task again a little later
    instead of holding a worker process that pushes to the other peers."""


class QuorumNotReached(Exception):
    """``replication.write_quorum`` coordinators did not confirm a write within ``peer_timeout``."""


class MemberLike(Protocol):
    peer_id: str
    name: str
    api_url: str


# =============================================================================================
# Pure parts: coalescing, fan-out, placement per peer, cleanup decision
# =============================================================================================


def coalesce_outbox(entries: Iterable[OutboxEntry]) -> list[Item]:
    """Distinct items to replicate, in first-seen order: overwrites of one key collapse to one item.

    Tasks read the current record, so one item per key sends only the newest version. Buckets
    come first so a peer usually learns a bucket before its objects.
    """
    buckets: dict[Item, None] = {}
    objects: dict[Item, None] = {}
    for entry in entries:
        if entry.kind in (OUTBOX_CREATE_BUCKET, OUTBOX_DELETE_BUCKET):
            buckets[(KIND_BUCKET, entry.bucket, "")] = None
        else:
            objects[(KIND_OBJECT, entry.bucket, entry.key)] = None
    return [*buckets, *objects]


def fan_out(items: Sequence[Item], self_id: str, member_ids: Iterable[str]) -> list[tuple[str, str, str, str]]:
    """(peer, kind, bucket, key) for every item and every other coordinator (metadata goes to all)."""
    peers = sorted({m for m in member_ids if m != self_id})
    return [(peer, kind, bucket, key) for peer in peers for kind, bucket, key in items]


def chunks_for_peer(chunks: Iterable[ChunkRef], peer: str, member_ids: Sequence[str], factor: int) -> list[ChunkRef]:
    """The distinct chunks ``peer`` must hold by placement, in object order."""
    seen: set[str] = set()
    wanted = []
    for ref in chunks:
        if ref.hash in seen:
            continue
        seen.add(ref.hash)
        if peer in place(ref.hash, member_ids, factor):
            wanted.append(ref)
    return wanted


def extra_copies_to_drop(chunks: Iterable[ChunkRef], self_id: str, member_ids: Sequence[str], factor: int,
                         confirmed: Callable[[str], set[str]]) -> list[str]:
    """Hashes the writer may drop: not a holder itself, and every holder confirmed a durable copy."""
    drop = []
    for chunk_hash in dict.fromkeys(ref.hash for ref in chunks):
        holders = place(chunk_hash, member_ids, factor)
        if not holders or self_id in holders:
            continue
        if set(holders) <= confirmed(chunk_hash):
            drop.append(chunk_hash)
    return drop


def fetch_order(chunk_hash: str, self_id: str, member_ids: Sequence[str], factor: int) -> list[str]:
    """Peers to ask for a chunk: its holders by placement first, then everyone else (a holder may
    not have it yet, e.g. while the writer still keeps the only extra copy)."""
    holders = place(chunk_hash, member_ids, factor)
    rest = [m for m in place(chunk_hash, member_ids, len(set(member_ids))) if m not in holders]
    return [m for m in [*holders, *rest] if m != self_id]


# =============================================================================================
# Membership and peer client (the contract of tunnelmesh.node / tunnelmesh.peer_client)
# =============================================================================================


def coordinator_members(settings: Settings) -> list[Any]:
    from tunnelmesh import node

    return list(node.coordinator_members(settings))


def peer_is_up(settings: Settings, peer_id: str) -> bool:
    from tunnelmesh import node

    return bool(node.peer_is_up(settings, peer_id))


def _make_client(settings: Settings) -> Any:
    from tunnelmesh.identity import load_or_create_identity
    from tunnelmesh.peer_client import PeerClient

    return PeerClient(settings, load_or_create_identity(settings.data_dir))


def _timeout(seconds: float) -> tuple[float, float]:
    return (min(5.0, seconds), seconds)


# =============================================================================================
# Concurrency limit across the worker's pool processes
# =============================================================================================


@contextlib.contextmanager
def replication_slot(run_dir: Path, slots: int, wait: float) -> Iterator[None]:
    """Hold one of ``slots`` file locks (shared by every process of this coordinator).

    File locks die with their process, so a SIGKILLed task never leaks a slot. Raises
    PeerUnavailable (retried later) when no slot frees up within ``wait`` seconds.
    """
    lock_dir = run_dir / "replication-slots"
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        with _first_free_lock([lock_dir / f"slot-{index}" for index in range(slots)]) as held:
            if held:
                yield
                return
        if time.monotonic() > deadline:
            raise PeerUnavailable(f"all {slots} replication slots stayed busy for {wait:g}s")
        time.sleep(0.05)


@contextlib.contextmanager
def _first_free_lock(paths: list[Path]) -> Iterator[bool]:
    """Hold the first of ``paths`` whose flock is free (yields True), or none (yields False)."""
    for path in paths:
        handle = open(path, "a+")  # noqa: SIM115 - held across the yield
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        return
    yield False


def per_peer_slots(settings: Settings) -> int:
    """Pushes to ONE peer that may run at once on this coordinator.

    Half of the pushes the worker can run at all, so a peer that crawls (every push to it lasting
    up to ``peer_timeout`` per request) never holds every worker process: the other peers' pushes,
    the outbox drain and the other periodic jobs sharing the pool (heartbeat rounds, which also
    wait on a slow peer) still find one. Needs ``worker.concurrency`` >= 3 to leave a process for
    the others next to a slow heartbeat round; with 1 there is nothing to keep free.
    """
    return max(1, min(settings.replication.concurrency, settings.worker.concurrency) // 2)


@contextlib.contextmanager
def peer_slot(run_dir: Path, peer: str, slots: int) -> Iterator[None]:
    """Hold one of ``slots`` file locks of ``peer`` without waiting; PeerBusy if all are held."""
    lock_dir = run_dir / "replication-peer-slots"
    lock_dir.mkdir(parents=True, exist_ok=True)
    safe_peer = "".join(ch for ch in peer if ch.isalnum())[:64] or "peer"
    with _first_free_lock([lock_dir / f"{safe_peer}-{index}" for index in range(slots)]) as held:
        if held:
            yield
            return
    raise PeerBusy(f"all {slots} push slot(s) of peer {peer} are busy")


# =============================================================================================
# The service
# =============================================================================================


@dataclass(frozen=True, slots=True)
class QuorumOutcome:
    holders: int  # coordinators holding the metadata when the quorum was reached (writer included)
    seconds: float


@dataclass(frozen=True, slots=True)
class PushResult:
    outcome: str  # "sent", "gone" (nothing local to send), "skipped" (peer not a member)
    chunks_sent: int = 0
    chunks_present: int = 0
    dropped_local: int = 0


class ReplicationService:
    """Replication of one coordinator (the worker's tasks and the S3 app's fetcher use it)."""

    def __init__(self, settings: Settings, store: Any = None, ledger: ReplicationLedger | None = None,
                 client: Any = None, self_id: str | None = None) -> None:
        self.settings = settings
        self._store = store
        self._ledger = ledger
        self._client = client
        self._self_id = self_id

    # -- lazily opened parts (a prefork worker builds this after fork) -------------------------
    @property
    def self_id(self) -> str:
        if self._self_id is None:
            from tunnelmesh.identity import load_or_create_identity

            self._self_id = load_or_create_identity(self.settings.data_dir).peer_id
        return self._self_id

    @property
    def store(self) -> Any:
        if self._store is None:
            from storage.objects import ObjectStore

            storage = self.settings.storage
            self._store = ObjectStore(self.settings.data_dir, actor=self.self_id, chunk_size=storage.chunk_size,
                                      fsync=storage.fsync, min_free_space=storage.min_free_space)
        return self._store

    @property
    def ledger(self) -> ReplicationLedger:
        if self._ledger is None:
            self._ledger = ReplicationLedger(ledger_path(self.settings.data_dir))
        return self._ledger

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _make_client(self.settings)
        return self._client

    def members(self) -> list[Any]:
        return coordinator_members(self.settings)

    # -- outbox -> pending items -> tasks --------------------------------------------------------
    def drain_outbox(self, enqueue: Enqueue) -> int:
        """Move outbox intents to per-peer pending items and enqueue their tasks; returns items enqueued.

        The outbox rows are removed only after every enqueue succeeded (an exception leaves them for
        the next drain; duplicates are harmless).
        """
        meta = self.store.meta
        total = 0
        last_seq = 0
        while True:
            entries = meta.outbox_after(last_seq, DRAIN_BATCH)
            if not entries:
                return total
            items = coalesce_outbox(entries)
            member_ids = [m.peer_id for m in self.members()]
            if self.self_id not in member_ids:
                # No usable membership view yet (not bootstrapped, or unreadable): keep the outbox.
                log.warning("outbox not drained: this coordinator is not in its own membership view")
                return total
            work = fan_out(items, self.self_id, member_ids)
            for peer, kind, bucket, key in self.ledger.add(work):
                enqueue(peer, kind, bucket, key)
                total += 1
            meta.outbox_remove(e.seq for e in entries)
            last_seq = entries[-1].seq
            if len(entries) < DRAIN_BATCH:
                return total

    def requeue_pending(self, enqueue: Enqueue, *, older_than: float | None = None) -> int:
        """Re-enqueue queued items (worker start: messages a killed worker held may be stuck unacked)."""
        before = None if older_than is None else int((time.time() - older_than) * 1_000_000)
        items = self.ledger.items(state=STATE_QUEUED, updated_before_us=before)
        self.ledger.requeue(items)
        for item in items:
            enqueue(item.peer, item.kind, item.bucket, item.key)
        return len(items)

    def replay_hints_for(self, peer_id: str, enqueue: Enqueue) -> int:
        """Re-enqueue every hint recorded for ``peer_id`` (call when the peer is seen up)."""
        items = self.ledger.items(peer=peer_id, state=STATE_HINT)
        if not items:
            return 0
        self.ledger.requeue(items)
        for item in items:
            enqueue(item.peer, item.kind, item.bucket, item.key)
        log.info("replaying %d hint(s) for peer %s", len(items), peer_id)
        return len(items)

    def replay_hints(self, enqueue: Enqueue, is_up: Callable[[str], bool] | None = None) -> int:
        """Replay the hints of every peer that is up now (beat check)."""
        is_up = is_up or (lambda peer: peer_is_up(self.settings, peer))
        return sum(self.replay_hints_for(peer, enqueue) for peer in self.ledger.peers_with(STATE_HINT) if is_up(peer))

    def record_hint(self, peer: str, kind: str, bucket: str, key: str, error: str) -> None:
        self.ledger.mark_hint(peer, kind, bucket, key, error)
        log.warning("replication of %s %s/%s to %s failed after %d attempt(s); kept as a hint (%s)",
                    kind, bucket, key, peer, self.settings.replication.max_attempts, error)

    # -- pushing to one peer --------------------------------------------------------------------
    def replicate(self, peer: str, kind: str, bucket: str, key: str) -> PushResult:
        """Make ``peer`` hold the current local version of the item (idempotent, convergent).

        Raises PeerUnavailable (retry) or PeerRejected (permanent). On success the pending item
        is done (unless rewritten meanwhile) and the writer's extra chunk copies may be dropped.
        """
        members = {m.peer_id: m for m in self.members()}
        member = members.get(peer)
        if member is None or peer == self.self_id:
            self.ledger.done(peer, kind, bucket, key, 2**62)  # not a coordinator (any more): nothing to do
            return PushResult("skipped")
        rep = self.settings.replication
        run_dir = self.settings.data_dir / "run"
        # The peer's own slot first, without waiting (PeerBusy: the task comes back later), so a
        # slow peer's backlog never occupies the processes the other peers' pushes need.
        with peer_slot(run_dir, peer, per_peer_slots(self.settings)):
            gen = self.ledger.claim(peer, kind, bucket, key) or 0
            with replication_slot(run_dir, rep.concurrency, rep.peer_timeout):
                if kind == KIND_BUCKET:
                    result = self._push_bucket(member, bucket)
                else:
                    result = self._push_object(member, bucket, key, list(members))
        if gen:
            self.ledger.done(peer, kind, bucket, key, gen)
        return result

    # -- metadata records (also used by the manifest sync's metadata-only pushes) ----------------
    def send_bucket_record(self, member: MemberLike, record: BucketRecord) -> int:
        """Send one bucket record (the receiver applies it by version); returns the body size."""
        body = {"bucket": record.to_dict()}
        self._post_json(member, "/bucket", body)
        return len(json.dumps(body, separators=(",", ":")))

    def send_object_record(self, member: MemberLike, record: ObjectRecord, bucket: BucketRecord | None) -> int:
        """Send one object record or tombstone, with its bucket's record; returns the body size."""
        body: dict[str, Any] = {"object": record.to_dict()}
        if bucket is not None:
            body["bucket"] = bucket.to_dict()
        self._post_json(member, "/object", body)
        return len(json.dumps(body, separators=(",", ":")))

    def get_chunk(self, member: MemberLike, chunk_hash: str) -> bytes:
        """A chunk's bytes as ``member`` holds them (not verified here: callers check the hash)."""
        data: bytes = self._request(member, "GET", f"/chunks/{chunk_hash}").content
        return data

    def _push_bucket(self, member: MemberLike, bucket: str) -> PushResult:
        record = self.store.meta.get_bucket(bucket)
        if record is None:
            return PushResult("gone")
        self.send_bucket_record(member, record)
        return PushResult("sent")

    def _push_object(self, member: MemberLike, bucket: str, key: str, member_ids: list[str]) -> PushResult:
        record: ObjectRecord | None = self.store.meta.get_object(bucket, key)
        if record is None:
            return PushResult("gone")
        confirmed, sent = self._send_record(member, record, member_ids)
        dropped = 0 if record.deleted else self.drop_extra_copies(record.chunks, member_ids)
        return PushResult("sent", sent, len(confirmed) - sent, dropped)

    def _send_record(self, member: MemberLike, record: ObjectRecord, member_ids: list[str]) -> tuple[list[str], int]:
        """Hand ``record`` to ``member``: the chunks placement gives it that it lacks, then the metadata
        (chunks first, so the record never names a chunk its holder does not have). Returns the chunk
        hashes ``member`` now holds durably (recorded in the ledger) and how many were sent."""
        factor = self.settings.replication.factor
        wanted = [] if record.deleted else chunks_for_peer(record.chunks, member.peer_id, member_ids, factor)
        confirmed: list[str] = []
        sent = 0
        if wanted:
            answer = self._post_json(member, "/chunks/have", {"hashes": [ref.hash for ref in wanted]})
            have = set(answer.get("have", [])) if isinstance(answer, dict) else set()
            for ref in wanted:
                if ref.hash not in have:
                    self._put_chunk(member, ref)
                    sent += 1
                confirmed.append(ref.hash)
            self.ledger.confirm_chunks(member.peer_id, confirmed)
        self.send_object_record(member, record, self.store.meta.get_bucket(record.bucket))
        return confirmed, sent

    # -- synchronous write quorum (replication.write_quorum >= 2) -------------------------------
    def push_for_quorum(self, record: ObjectRecord, quorum: int | None = None) -> QuorumOutcome:
        """Before the S3 answer: make ``quorum`` coordinators (this one included) hold ``record``.

        Every other coordinator gets, in parallel, the chunks placement gives it and the metadata
        (as the asynchronous push would). The call returns as soon as every chunk is durable on
        ``quorum`` coordinators and the metadata on ``quorum`` coordinators; pushes still running
        finish in the background. Raises ``QuorumNotReached`` when that is not so within
        ``replication.peer_timeout``: the write stays committed locally and its outbox row still
        replicates it later (the client should retry; a retried PUT is a new, later version).
        Only placement holders count for a chunk (no sloppy quorum): with a holder down, a write
        whose chunk needs that holder to reach the quorum is refused rather than parked elsewhere.
        """
        rep = self.settings.replication
        quorum = rep.write_quorum if quorum is None else quorum
        started = time.monotonic()
        if quorum <= 1:
            return QuorumOutcome(1, 0.0)
        members = {m.peer_id: m for m in self.members()}
        member_ids = list(members)
        if self.self_id not in members:
            raise QuorumNotReached("this coordinator is not in its own membership view yet")
        chunk_hashes = [] if record.deleted else list(dict.fromkeys(ref.hash for ref in record.chunks))
        copies = {h: {self.self_id} for h in chunk_hashes}  # the writer's own copies are durable already
        meta_holders = {self.self_id}
        errors: list[str] = []

        def reached() -> bool:
            return len(meta_holders) >= quorum and all(len(holders) >= quorum for holders in copies.values())

        peers = [members[p] for p in member_ids if p != self.self_id]
        pool = ThreadPoolExecutor(max_workers=max(1, len(peers)), thread_name_prefix="quorum-push")
        try:
            futures = {pool.submit(self._send_record, member, record, member_ids): member for member in peers}
            deadline = started + rep.peer_timeout
            pending = set(futures)
            while pending and not reached():
                done, pending = wait(pending, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=FIRST_COMPLETED)
                if not done:
                    break  # peer_timeout is over
                for future in done:
                    member = futures[future]
                    try:
                        confirmed, _ = future.result()
                    except (PeerUnavailable, PeerRejected, ChunkMissing) as exc:
                        errors.append(f"{member.name}: {exc}")
                        continue
                    meta_holders.add(member.peer_id)
                    for chunk_hash in confirmed:
                        copies[chunk_hash].add(member.peer_id)
        finally:
            pool.shutdown(wait=False)  # stragglers finish on their own; the async push covers them too
        elapsed = time.monotonic() - started
        if not reached():
            short = sum(1 for holders in copies.values() if len(holders) < quorum)
            raise QuorumNotReached(
                f"write quorum {quorum} not reached for {record.bucket}/{record.key} within "
                f"{rep.peer_timeout:g}s: metadata on {len(meta_holders)} coordinator(s), {short} of "
                f"{len(copies)} chunk(s) short of {quorum} copies ({'; '.join(errors) or 'peers too slow'})")
        return QuorumOutcome(len(meta_holders), elapsed)

    def drop_extra_copies(self, chunks: Iterable[ChunkRef], member_ids: Sequence[str]) -> int:
        """The writer cleanup rule (module docstring): drop copies every holder confirmed."""
        factor = self.settings.replication.factor
        drop = extra_copies_to_drop(chunks, self.self_id, member_ids, factor, self.ledger.confirmed_peers)
        dropped = 0
        for chunk_hash in drop:
            if self.store.chunks.delete(chunk_hash):
                dropped += 1
            self.ledger.forget_chunk(chunk_hash)
        return dropped

    def _put_chunk(self, member: MemberLike, ref: ChunkRef) -> None:
        try:
            data = self.store.chunks.read(ref.hash)
        except ChunkMissing:
            # Dropped locally meanwhile (its holders confirmed it) or never here: fetch it from a holder.
            data = ChunkFetcher(self.settings, self).fetch(ref)
        self._request(member, "PUT", f"/chunks/{ref.hash}", data=data,
                      headers={"Content-Type": "application/octet-stream"})

    def _post_json(self, member: MemberLike, path: str, body: dict[str, Any]) -> Any:
        response = self._request(member, "POST", path, json=body)
        try:
            return response.json()
        except ValueError:
            return None

    def _request(self, member: MemberLike, method: str, path: str, **kwargs: Any) -> Any:
        import requests

        url = f"{member.api_url.rstrip('/')}{API_PREFIX}{path}"
        try:
            response = self.client.request(method, url, timeout=_timeout(self.settings.replication.peer_timeout),
                                           **kwargs)
        except requests.RequestException as exc:
            raise PeerUnavailable(f"{method} {url}: {exc.__class__.__name__}: {exc}") from None
        if response.status_code >= 500 or response.status_code in (401, 403, 408, 422, 429):
            # 401/403: the peer may not know us yet (membership still spreading): retry later.
            raise PeerUnavailable(f"{method} {url}: HTTP {response.status_code} {response.text[:200]}")
        if response.status_code >= 400:
            raise PeerRejected(f"{method} {url}: HTTP {response.status_code} {response.text[:200]}")
        return response


# =============================================================================================
# Receiving side (used by web/replication.py)
# =============================================================================================


def apply_object_payload(store: Any, payload: dict[str, Any]) -> bool:
    """Apply a pushed object (and its bucket record); True if the local row changed."""
    if "bucket" in payload and payload["bucket"] is not None:
        store.apply_remote_bucket(BucketRecord.from_dict(payload["bucket"]))
    record = ObjectRecord.from_dict(payload["object"])
    for ref in record.chunks:
        validate_hash(ref.hash)  # ValueError: a record naming something that is not a chunk
    if store.meta.get_bucket(record.bucket) is None:
        raise NoSuchBucket(record.bucket)
    return bool(store.apply_remote_object(record))


# =============================================================================================
# Reads of chunks held elsewhere
# =============================================================================================


class ChunkFetcher:
    """``ObjectStore.chunk_fetcher``: a chunk's bytes from another coordinator, verified.

    Tries the placement holders, then the other members; a peer that is down, answers an error
    or returns bytes that do not match the hash is skipped for the next one.
    """

    def __init__(self, settings: Settings, service: ReplicationService | None = None) -> None:
        self.settings = settings
        self.service = service or ReplicationService(settings)

    def __call__(self, ref: ChunkRef) -> bytes:
        return self.fetch(ref)

    def fetch(self, ref: ChunkRef) -> bytes:
        members = {m.peer_id: m for m in self.service.members()}
        order = fetch_order(ref.hash, self.service.self_id, list(members), self.settings.replication.factor)
        errors = []
        for peer in order:
            try:
                data = self.service.get_chunk(members[peer], ref.hash)
            except (PeerUnavailable, PeerRejected) as exc:
                errors.append(str(exc))
                continue
            if hashlib.sha256(data).hexdigest() != ref.hash:
                log.warning("coordinator %s returned a corrupt copy of chunk %s; trying another", peer, ref.hash)
                errors.append(f"{peer}: corrupt copy")
                continue
            return data
        raise ChunkMissing(ref.hash, f"no coordinator could provide it ({'; '.join(errors) or 'no peers'})")


# =============================================================================================
# The S3 app's nudge: "the outbox has something new", fire-and-forget
# =============================================================================================


NUDGE_BACKOFF = 0.2  # seconds after a failed nudge, doubling per failure in a row
NUDGE_BACKOFF_MAX = 5.0


class OutboxNudger:
    """Asks the worker to drain the outbox soon after a write, without ever delaying the write.

    ``nudge`` only sets an event; one daemon thread per process sends ``tasks.replicate.drain_outbox``
    (by name, on a bare Celery app: the web layer does not import tasks/). Nudges that arrive while
    one is being sent collapse into the next one. A failure (Redis down) is ignored: the outbox row
    is durable and beat drains it every ``replication.drain_interval``.
    """

    TASK = "tasks.replicate.drain_outbox"

    def __init__(self, settings: Settings, debounce: float = 0.02) -> None:
        self.settings = settings
        self.debounce = debounce
        self._event = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._app: Any = None
        self.sent = 0

    def nudge(self) -> None:
        if self._thread is None or self._pid != os.getpid():
            with self._lock:
                if self._thread is None or self._pid != os.getpid():  # threads do not survive fork
                    self._pid, self._app = os.getpid(), None
                    self._thread = threading.Thread(target=self._run, name="outbox-nudger", daemon=True)
                    self._thread.start()
        self._event.set()

    def _celery(self) -> Any:
        if self._app is None:
            from celery import Celery

            from tunnelmesh import redis_server

            self._app = Celery("tunnelmesh-nudger", set_as_current=False)
            self._app.conf.update(broker_url=redis_server.broker_url(self.settings),
                                  broker_connection_timeout=2.0, broker_connection_retry=False)
        return self._app

    def _run(self) -> None:
        failures = 0
        while True:
            self._event.wait()
            time.sleep(self.debounce)  # let a burst of writes collapse into one drain
            self._event.clear()
            try:
                self._celery().send_task(self.TASK, queue="replication", retry=False)
                self.sent += 1
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the outbox keeps the intent; beat drains it
                log.debug("outbox nudge not sent (%s); beat will drain the outbox", exc)
                self._app = None
                failures += 1
                # Redis down: retrying at every write would build a Celery app and dial Redis dozens
                # of times a second, for nothing (beat drains the outbox). Nudges meanwhile collapse.
                time.sleep(min(NUDGE_BACKOFF_MAX, NUDGE_BACKOFF * 2 ** (failures - 1)))
