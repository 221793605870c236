"""The safety-net manifest sync between coordinators (issue 6; pure rules in ``storage.manifest``).

"Locally owned"
---------------
Every coordinator holds every object's and bucket's metadata. Objects (and buckets, as the entry
``(bucket, "")``) are split into ``storage.manifest.DEFAULT_RANGES`` = 256 ranges by a hash of their
name (``range_of``). An object is *locally owned* by coordinator X when
``storage.placement.owner_of_range(range_of(bucket, key), M) == X``, where M is the set of peer IDs
of the ACTIVE coordinators in X's membership view (``tunnelmesh.node.coordinator_members``; X
itself included). Rendezvous hashing gives every range exactly one owner for a given M, and the
same owner on every node that has the same M. A round is only run between two nodes that agree on
M (they compare ``members_fingerprint`` first and skip the round otherwise), so for the two nodes
of any round each object has exactly one owner, and the owner's manifest is authoritative only for
the ranges it owns: it compares only those ranges (``top_for``/``diff_ranges`` over its ranges).

A round (owner O, peer P), run by O's worker; cost grows with what differs
-------------------------------------------------------------------------
1. ``digest``: O sends its fingerprint; P answers the digest over O's ranges (about 200 bytes).
   Equal: done.
2. ``ranges``: P's 256 range digests (about 7 KB); O keeps the differing ranges it owns.
3. ``summaries``: for those ranges only, 16 bytes per object; O finds the differing names.
4. ``entries``: P's full manifest entries for those names only; O runs ``reconcile``.
5. The plan: ``delete_on_peer`` and ``send_to_peer`` are pushed by the replication service (the
   current local record with its chunks, applied on P by ``apply_remote_*``, i.e. through
   ``choose_winner`` against P's current version); ``send_to_owner`` records are pulled from P
   (``records``) and applied locally the same way, after fetching the chunks O must hold.

Why no round deletes what it should not
---------------------------------------
* A deletion on P happens only by applying O's tombstone whose vector dominates P's copy (the
  ``storage.manifest`` rule): never because something is absent, never a write O has not seen.
* A node whose store is new, empty or still starting never acts as owner: before its first owner
  round it must finish a *catch-up* with its peers (pull only: compare every range with every
  reachable peer, apply what they have that it lacks or holds older; push nothing). The state is
  kept per metadata incarnation (``data_dir/meta/sync_state.json``), so a wiped data directory
  (a new incarnation) starts over with a catch-up. An empty store also holds no tombstones, so even
  without the gate it could only receive.
* Entries a peer returned may be stale by the time the plan runs; every action goes through the
  version-vector apply rule against the current version, so a newer write still wins.

Tombstones: after a round, every tombstone in O's ranges that was identical on every current
member is recorded as confirmed (``storage.gc.TombstoneLedger``); once confirmed for
``storage.tombstone_grace`` it is purged on O and on every peer (exact version only). A tombstone a
peer still holds after O purged it comes back to O by ``send_to_owner`` and is purged again later.

One run at a time per coordinator (a Redis lock, ``SYNC_LOCK``); ``run_sync_once(settings)`` is
what the beat task, the admin endpoint and ``tunnelmesh sync --once`` call.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from storage.chunks import ChunkRef
from storage.errors import StorageError
from storage.gc import TombstoneLedger, purge_tombstones, tombstone_ledger_path
from storage.manifest import (
    DEFAULT_RANGES,
    ManifestEntry,
    RangeDigests,
    RangeSummary,
    differing_names,
    name_id,
    reconcile,
)
from storage.metadata import BucketRecord, ManifestRow, ObjectRecord
from storage.placement import members_fingerprint, owner_of_range, place
from storage.versions import VersionVector
from tunnelmesh.config import Settings

log = logging.getLogger("tunnelmesh.sync")

API_PREFIX = "/api/v1/sync"
SYNC_LOCK = "tm:sync:lock"
LAST_REPORT_KEY = "tm:sync:last_report"
KIND_OBJECT = "object"
KIND_BUCKET = "bucket"
PULL_BATCH = 500  # records per "records" request

Row = ManifestRow  # bucket, key ("" = bucket), vv json, stamp, deleted, etag, writer


# =============================================================================================
# The local manifest (range digests as the metadata store keeps them; rows read per range)
# =============================================================================================


def row_entry(row: Row) -> ManifestEntry:
    bucket, key, vv, stamp, deleted, etag, writer = row
    return ManifestEntry(bucket, key, VersionVector.from_json(vv), stamp, bool(deleted), etag, writer)


class LocalManifest:
    """A store's manifest as one sync round sees it: the range digests and tombstones read in one
    snapshot (the digests kept up to date by the metadata store on every write, so nothing is
    hashed here), and the rows of a range read only when a round needs them (a differing range).

    Tombstones come from the same snapshot as the digests: a round confirms the tombstones of
    ranges whose digests matched, so they must be exactly the tombstones those digests cover.
    Rows read later may be newer than the digests; a round only compares them, and every change
    it makes goes through the version-vector apply rule against the current version.
    """

    def __init__(self, meta: Any, digests: RangeDigests, tombstones: Sequence[tuple[int, Row]]) -> None:
        self.meta = meta
        self.ranges = digests.ranges
        self.digests = digests
        self._tombstones: dict[int, list[Row]] = {}
        for index, row in tombstones:
            self._tombstones.setdefault(index, []).append(row)
        self._rows: dict[int, list[Row]] = {}
        self._rows_lock = threading.Lock()

    @classmethod
    def load(cls, meta: Any) -> LocalManifest:
        with meta.read() as tx:
            counts, hashes = tx.range_digests()
            tombstones = tx.manifest_rows(range(len(counts)), deleted_only=True)
        return cls(meta, RangeDigests(tuple(counts), tuple(hashes)), tombstones)

    def prefetch(self, ranges: Iterable[int]) -> None:
        """Read the rows of ``ranges`` (one query for all of them, one snapshot)."""
        with self._rows_lock:
            missing = sorted({int(r) for r in ranges if 0 <= int(r) < self.ranges} - self._rows.keys())
            if not missing:
                return
            with self.meta.read() as tx:
                found = tx.manifest_rows(missing)
            by_range: dict[int, list[Row]] = {index: [] for index in missing}
            for index, row in found:
                by_range[index].append(row)
            self._rows.update(by_range)

    def rows(self, index: int) -> list[Row]:
        self.prefetch([index])
        return self._rows.get(index, [])

    def tombstones(self, ranges: Iterable[int]) -> list[ManifestEntry]:
        """The tombstones of ``ranges`` in the digests' snapshot."""
        return [row_entry(row) for index in ranges for row in self._tombstones.get(index, [])]

    def entries(self, ranges: Iterable[int]) -> list[ManifestEntry]:
        ranges = list(ranges)
        self.prefetch(ranges)
        return [row_entry(row) for index in ranges for row in self.rows(index)]

    def summary(self, index: int) -> RangeSummary:
        return RangeSummary.of(self.entries([index]))

    def select(self, ranges: Iterable[int], ids: set[int]) -> list[ManifestEntry]:
        ranges = list(ranges)
        self.prefetch(ranges)
        return [row_entry(row) for index in ranges for row in self.rows(index) if name_id(row[0], row[1]) in ids]


def owned_ranges(owner: str, members: Sequence[str], ranges: int = DEFAULT_RANGES) -> list[int]:
    """The ranges ``owner`` is authoritative for under ``members`` (module docstring)."""
    if owner not in members:
        return []
    return [index for index in range(ranges) if owner_of_range(index, members) == owner]


# =============================================================================================
# Catch-up state (a node refuses to act as owner until it caught up with its peers)
# =============================================================================================


def state_path(data_dir: Path) -> Path:
    return Path(data_dir) / "meta" / "sync_state.json"


def read_state(data_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(state_path(data_dir).read_text())
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def is_caught_up(data_dir: Path, incarnation: str) -> bool:
    state = read_state(data_dir)
    return state.get("incarnation") == incarnation and bool(state.get("caught_up_us"))


def mark_caught_up(data_dir: Path, incarnation: str) -> None:
    path = state_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"incarnation": incarnation, "caught_up_us": time.time_ns() // 1000}))
    tmp.replace(path)


# =============================================================================================
# Links to a peer (HTTP in production; in-process for unit tests and the benchmark)
# =============================================================================================


class PeerLink(Protocol):
    peer_id: str
    bytes_sent: int
    bytes_received: int

    def call(self, op: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def push(self, kind: str, bucket: str, key: str) -> None: ...

    def fetch_chunk(self, chunk_hash: str) -> bytes: ...


class SyncError(Exception):
    """A round could not complete (peer unreachable, refused, or answered nonsense)."""


# =============================================================================================
# Reports
# =============================================================================================


@dataclass(slots=True)
class RoundReport:
    peer: str
    mode: str  # "owner" or "catch-up"
    outcome: str = "equal"  # equal, repaired, skipped (membership differs), failed
    ranges_compared: int = 0
    ranges_differing: int = 0
    names_differing: int = 0
    deleted_on_peer: int = 0
    sent_to_peer: int = 0
    pulled: int = 0
    deleted_locally: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    error: str = ""
    confirmed_tombstones: list[ManifestEntry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "peer", "mode", "outcome", "ranges_compared", "ranges_differing", "names_differing",
            "deleted_on_peer", "sent_to_peer", "pulled", "deleted_locally", "bytes_sent", "bytes_received",
            "error")}


# =============================================================================================
# The service
# =============================================================================================


class SyncService:
    """Both sides of the manifest sync for one store.

    ``members`` returns the active coordinators' peer IDs (self included); ``links`` returns a
    link per other member (built lazily, after fork).
    """

    def __init__(self, store: Any, self_id: str, members: Callable[[], list[str]], *,
                 tombstone_grace: float = 86400.0, factor: int = 2,
                 chunk_fetcher: Callable[[str], bytes] | None = None, fetch_chunks: bool = True) -> None:
        self.store = store
        self.self_id = self_id
        self.members = members
        self.tombstone_grace = tombstone_grace
        self.factor = factor
        self.chunk_fetcher = chunk_fetcher
        # False for the metadata catch-up at the start of a rebalance: its budgeted cycles move the
        # chunks, so pulled records must not fetch them outside the budget.
        self.fetch_chunks = fetch_chunks
        self._cache: dict[str, tuple[float, LocalManifest]] = {}
        self._cache_lock = threading.Lock()
        self._tombstones: TombstoneLedger | None = None

    @property
    def tombstones(self) -> TombstoneLedger:
        if self._tombstones is None:
            self._tombstones = TombstoneLedger(tombstone_ledger_path(self.store.data_dir))
        return self._tombstones

    @property
    def incarnation(self) -> str:
        return str(self.store.meta.incarnation)

    def caught_up(self) -> bool:
        return is_caught_up(self.store.data_dir, self.incarnation)

    def _db_state(self) -> tuple[int, int, int]:
        # Unchanged exactly when nothing was committed: PRAGMA data_version moves on commits by
        # other connections, total_changes on this connection's own.
        with self.store.meta.read() as tx:
            version = tx.conn.execute("PRAGMA data_version").fetchone()[0]
            return (id(tx.conn), int(version), int(tx.conn.total_changes))

    def manifest(self, round_id: str | None = None) -> LocalManifest:
        """The local manifest: rebuilt only when the database changed (or, within one round with
        the same ``round_id``, built once and reused even across connections)."""
        state = self._db_state()
        last = getattr(self, "_last", None)
        if last is not None and last[0] == state:
            return last[1]  # type: ignore[no-any-return]
        if not round_id:
            built = LocalManifest.load(self.store.meta)
            self._last = (state, built)
            return built
        now = time.monotonic()
        with self._cache_lock:
            for key in [k for k, (at, _) in self._cache.items() if now - at > 60]:
                del self._cache[key]
            cached = self._cache.get(round_id)
        if cached is not None:
            return cached[1]
        built = LocalManifest.load(self.store.meta)
        self._last = (state, built)
        with self._cache_lock:
            if len(self._cache) >= 4:
                self._cache.pop(min(self._cache, key=lambda k: self._cache[k][0]))
            self._cache[round_id] = (now, built)
        return built

    # -- answering side (web/sync.py calls handle) ------------------------------------------------
    def handle(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise ValueError(f"unknown sync operation {op!r}")
        return handler(body)

    def _op_digest(self, body: dict[str, Any]) -> dict[str, Any]:
        members = self.members()
        fingerprint = members_fingerprint(members)
        answer: dict[str, Any] = {"fp": fingerprint, "ready": self.caught_up()}
        if body.get("fp") != fingerprint:
            return answer
        manifest = self.manifest(body.get("round"))
        ranges = owned_ranges(str(body.get("owner", "")), members) if body.get("owner") else range(manifest.ranges)
        answer["top"] = manifest.digests.top_for(ranges)
        return answer

    def _op_ranges(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"table": self.manifest(body.get("round")).digests.to_json()}

    def _op_summaries(self, body: dict[str, Any]) -> dict[str, Any]:
        manifest = self.manifest(body.get("round"))
        ranges = [int(r) for r in body.get("ranges", [])]
        manifest.prefetch(ranges)
        return {"summaries": {str(r): manifest.summary(r).to_json() for r in ranges}}

    def _op_entries(self, body: dict[str, Any]) -> dict[str, Any]:
        manifest = self.manifest(body.get("round"))
        ids = {int(i) for i in body.get("ids", [])}
        ranges = [int(r) for r in body.get("ranges", [])]
        return {"rows": [entry.to_row() for entry in manifest.select(ranges, ids)]}

    def _op_records(self, body: dict[str, Any]) -> dict[str, Any]:
        objects, buckets = [], {}
        meta = self.store.meta
        for bucket, key in body.get("names", []):
            if key == "":
                record = meta.get_bucket(bucket)
                if record is not None:
                    buckets[bucket] = record.to_dict()
                continue
            obj = meta.get_object(bucket, key)
            if obj is None:
                continue
            objects.append(obj.to_dict())
            if bucket not in buckets:
                bucket_record = meta.get_bucket(bucket)
                if bucket_record is not None:
                    buckets[bucket] = bucket_record.to_dict()
        return {"objects": objects, "buckets": list(buckets.values())}

    def _op_purge(self, body: dict[str, Any]) -> dict[str, Any]:
        entries = [ManifestEntry.from_row(row) for row in body.get("rows", [])]
        purged = purge_tombstones(self.store.meta, entries)
        return {"purged": len(purged)}

    def _op_confirm(self, body: dict[str, Any]) -> dict[str, Any]:
        """Which of these chunks this node holds durably, with its membership fingerprint (the
        asker drops its copy only if both agree on who the holders are)."""
        chunks = self.store.chunks
        hashes = [h for h in body.get("hashes", []) if isinstance(h, str)]
        have = []
        for chunk_hash in hashes:
            try:
                if chunks.exists(chunk_hash):
                    have.append(chunk_hash)
            except ValueError:
                continue
        return {"fp": members_fingerprint(self.members()), "have": have}

    # -- initiating side ---------------------------------------------------------------------------
    def compare(self, link: PeerLink, *, mode: str) -> RoundReport:
        """One round with ``link``'s peer: ``owner`` (my ranges, push and pull) or ``catch-up``
        (every range, pull only)."""
        report = RoundReport(link.peer_id, mode)
        sent0, received0 = link.bytes_sent, link.bytes_received
        try:
            self._compare(link, report)
        except SyncError as exc:
            report.outcome, report.error = "failed", str(exc)
        finally:
            report.bytes_sent = link.bytes_sent - sent0
            report.bytes_received = link.bytes_received - received0
        return report

    def _compare(self, link: PeerLink, report: RoundReport) -> None:
        members = self.members()
        fingerprint = members_fingerprint(members)
        round_id = uuid.uuid4().hex
        mine = self.manifest(round_id)
        if report.mode == "owner":
            ranges = owned_ranges(self.self_id, members, mine.ranges)
            answer = link.call("digest", {"fp": fingerprint, "owner": self.self_id, "round": round_id})
        else:
            ranges = list(range(mine.ranges))
            answer = link.call("digest", {"fp": fingerprint, "round": round_id})
        report.ranges_compared = len(ranges)
        if answer.get("fp") != fingerprint:
            report.outcome = "skipped"
            report.error = "the peer's membership view differs (no round until both agree)"
            return
        if answer.get("top") == mine.digests.top_for(ranges):
            report.confirmed_tombstones = mine.tombstones(ranges)
            return
        try:
            theirs = RangeDigests.from_json(link.call("ranges", {"round": round_id})["table"])
        except (KeyError, ValueError) as exc:
            raise SyncError(f"invalid range table from {link.peer_id}: {exc}") from None
        wanted = set(ranges)
        differing = [
            r for r in ranges
            if mine.digests.counts[r] != theirs.counts[r] or mine.digests.hashes[r] != theirs.hashes[r]
        ] if theirs.ranges == mine.ranges else sorted(wanted)
        report.ranges_differing = len(differing)
        same = [r for r in ranges if r not in set(differing)]
        confirmed = mine.tombstones(same)
        summaries = link.call("summaries", {"round": round_id, "ranges": differing}).get("summaries", {})
        mine.prefetch(differing)
        ids: set[int] = set()
        for r in differing:
            try:
                their_summary = RangeSummary.from_json(summaries[str(r)])
            except (KeyError, ValueError) as exc:
                raise SyncError(f"invalid range summary from {link.peer_id}: {exc}") from None
            ids |= differing_names(mine.summary(r), their_summary)
        report.names_differing = len(ids)
        rows = link.call("entries", {"round": round_id, "ranges": differing, "ids": sorted(ids)}).get("rows", [])
        try:
            peer_entries = [ManifestEntry.from_row(row) for row in rows]
        except ValueError as exc:
            raise SyncError(f"invalid entries from {link.peer_id}: {exc}") from None
        my_entries = mine.select(differing, ids)
        # Tombstones in differing ranges whose name did not differ are held identically by the peer.
        confirmed += [e for r in differing for e in mine.entries([r]) if e.deleted and name_id(e.bucket, e.key) not in ids]
        report.confirmed_tombstones = confirmed
        if report.mode == "owner":
            plan = reconcile(my_entries, peer_entries)
            to_push = [*plan.delete_on_peer, *plan.send_to_peer]
            to_pull = list(plan.send_to_owner)
            report.deleted_on_peer = len(plan.delete_on_peer)
        else:
            # Catch-up: the peer's manifest plays the owner; I only take what it has newer.
            plan = reconcile(peer_entries, my_entries)
            to_push = []
            to_pull = [*plan.delete_on_peer, *plan.send_to_peer]
            report.deleted_locally = len(plan.delete_on_peer)
        for entry in sorted(to_push, key=lambda e: e.key != ""):  # buckets before their objects
            try:
                link.push(KIND_BUCKET if entry.key == "" else KIND_OBJECT, entry.bucket, entry.key)
            except Exception as exc:  # noqa: BLE001 - one failed push must not stop the round
                raise SyncError(f"pushing {entry.bucket}/{entry.key} to {link.peer_id}: {exc}") from None
        report.sent_to_peer = len(to_push)
        if to_pull:
            report.pulled = self._pull(link, to_pull, members)
        report.outcome = "repaired" if (to_push or to_pull) else "equal"

    def _pull(self, link: PeerLink, entries: list[ManifestEntry], members: list[str]) -> int:
        """Fetch the peer's records for ``entries`` and apply them (after the chunks I must hold)."""
        changed = 0
        ordered = sorted(entries, key=lambda e: e.key != "")  # buckets first
        for start in range(0, len(ordered), PULL_BATCH):
            batch = ordered[start:start + PULL_BATCH]
            answer = link.call("records", {"names": [[e.bucket, e.key] for e in batch]})
            changed += self._apply_records(link, answer, members)
        return changed

    def _apply_records(self, link: PeerLink, answer: dict[str, Any], members: list[str]) -> int:
        changed = 0
        for raw in answer.get("buckets", []):
            try:
                changed += bool(self.store.apply_remote_bucket(BucketRecord.from_dict(raw)))
            except (KeyError, TypeError, ValueError, StorageError) as exc:
                log.warning("sync: bucket record from %s not applied: %s", link.peer_id, exc)
        for raw in answer.get("objects", []):
            try:
                record = ObjectRecord.from_dict(raw)
                if not record.deleted and self.fetch_chunks:
                    self._fetch_chunks(link, record.chunks, members)
                if self.store.meta.get_bucket(record.bucket) is None:
                    continue
                changed += bool(self.store.apply_remote_object(record))
            except (KeyError, TypeError, ValueError, StorageError) as exc:
                log.warning("sync: object record from %s not applied: %s", link.peer_id, exc)
        return changed

    def _fetch_chunks(self, link: PeerLink, chunks: Iterable[ChunkRef], members: list[str]) -> None:
        store = self.store.chunks
        for ref in {r.hash: r for r in chunks}.values():
            if self.self_id not in place(ref.hash, members, self.factor) or store.exists(ref.hash):
                continue
            try:
                data = link.fetch_chunk(ref.hash)
            except Exception:  # noqa: BLE001 - the peer may not hold it: ask the others
                if self.chunk_fetcher is None:
                    log.warning("sync: chunk %s not available from %s", ref.hash, link.peer_id)
                    continue
                try:
                    data = self.chunk_fetcher(ref.hash)
                except Exception as exc:  # noqa: BLE001 - reads fall back to other holders
                    log.warning("sync: chunk %s not available anywhere yet: %s", ref.hash, exc)
                    continue
            store.write_verified(data, ref.hash)

    # -- a whole run -------------------------------------------------------------------------------
    def run(self, links: Sequence[PeerLink], *, now_us: int | None = None, catch_up: bool = False) -> dict[str, Any]:
        """One sync run: catch-up first if needed (or asked: ``catch_up``), then an owner round
        with every peer, then tombstone purge. Returns the report.

        ``catch_up=True`` is what a rebalance starts with: after a membership change every node
        pulls, over every range, whatever a peer holds that it lacks (writes whose replication
        fanned out before the writer knew this node), before working out what it must hold.
        """
        started = time.monotonic()
        members = self.members()
        report: dict[str, Any] = {"node": self.self_id, "members": len(members), "rounds": [], "purged": 0}
        was_caught_up = self.caught_up()
        if catch_up or not was_caught_up:
            rounds = [self.compare(link, mode="catch-up") for link in links]
            report["rounds"] += [r.to_dict() for r in rounds]
            done = [r for r in rounds if r.outcome in ("equal", "repaired")]
            if links and not done and not was_caught_up:
                report["caught_up"] = False
                report["seconds"] = round(time.monotonic() - started, 3)
                return report  # nobody reachable: stay a pull-only node
            if not was_caught_up:
                mark_caught_up(self.store.data_dir, self.incarnation)
        report["caught_up"] = True
        owner_rounds = [self.compare(link, mode="owner") for link in links]
        report["rounds"] += [r.to_dict() for r in owner_rounds]
        report["purged"] = self._purge_tombstones(owner_rounds, links, members, now_us)
        report["seconds"] = round(time.monotonic() - started, 3)
        return report

    def _purge_tombstones(self, rounds: list[RoundReport], links: Sequence[PeerLink], members: list[str],
                          now_us: int | None) -> int:
        """Purge the tombstones every member has held for tombstone_grace (module docstring)."""
        from storage.gc import tombstones_due

        peers = {m for m in members if m != self.self_id}
        ok = {r.peer: r for r in rounds if r.outcome in ("equal", "repaired")}
        if set(ok) != peers or len(peers) != len(links):
            return 0  # some member was not compared: nobody may purge yet
        now_us = time.time_ns() // 1000 if now_us is None else now_us
        if peers:
            common = set.intersection(*({(e.name, e.vv) for e in r.confirmed_tombstones} for r in ok.values()))
        else:
            common = {(e.name, e.vv) for e in self.manifest().tombstones(owned_ranges(self.self_id, members))}
        mine = self.manifest().tombstones(owned_ranges(self.self_id, members))
        held = [e for e in mine if (e.name, e.vv) in common]
        self.tombstones.confirm(held, now_us)
        due = tombstones_due(held, self.tombstones.since(), now_us, int(self.tombstone_grace * 1_000_000))
        if not due:
            return 0
        rows = [e.to_row() for e in due]
        for link in links:
            try:
                link.call("purge", {"rows": rows})
            except Exception as exc:  # noqa: BLE001 - that peer keeps it; it comes back and goes again
                log.warning("sync: purge on %s failed: %s", link.peer_id, exc)
        purged = purge_tombstones(self.store.meta, due)
        self.tombstones.forget(e.name for e in due)
        return len(purged)


# =============================================================================================
# In-process link (unit tests, bench/sync_cost.py)
# =============================================================================================


class LocalLink:
    """A link to a ``SyncService`` in this process; bodies go through JSON so byte counts are real."""

    def __init__(self, local: SyncService, remote: SyncService, *, metadata_only: bool = False) -> None:
        self.local = local
        self.remote = remote
        self.metadata_only = metadata_only
        self.peer_id = remote.self_id
        self.bytes_sent = 0
        self.bytes_received = 0

    def call(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        request = json.dumps(body, separators=(",", ":")).encode()
        answer = json.dumps(self.remote.handle(op, json.loads(request)), separators=(",", ":")).encode()
        self.bytes_sent += len(request)
        self.bytes_received += len(answer)
        return json.loads(answer)

    def push(self, kind: str, bucket: str, key: str) -> None:
        meta = self.local.store.meta
        bucket_record = meta.get_bucket(bucket)
        if bucket_record is not None:
            self.remote.store.apply_remote_bucket(bucket_record)
        if kind == KIND_BUCKET:
            return
        record = meta.get_object(bucket, key)
        if record is None:
            return
        members = self.local.members()
        for ref in record.chunks if not (record.deleted or self.metadata_only) else ():
            if self.peer_id in place(ref.hash, members, self.local.factor) and not self.remote.store.chunks.exists(ref.hash):
                data = self.local.store.chunks.read(ref.hash)
                self.remote.store.chunks.write_verified(data, ref.hash)
                self.bytes_sent += len(data)
        self.bytes_sent += len(json.dumps(record.to_dict()))
        self.remote.store.apply_remote_object(record)

    def fetch_chunk(self, chunk_hash: str) -> bytes:
        data: bytes = self.remote.store.chunks.read(chunk_hash)
        self.bytes_received += len(data)
        return data


# =============================================================================================
# HTTP link and the settings-level entry points
# =============================================================================================


class HttpLink:
    """A link over the signed coordinator API; pushes reuse the replication service."""

    def __init__(self, settings: Settings, member: Any, client: Any, replication: Any, *,
                 metadata_only: bool = False) -> None:
        self.settings = settings
        self.metadata_only = metadata_only  # push records without their chunks (rebalance catch-up)
        self.member = member
        self.peer_id = member.peer_id
        self.client = client
        self.replication = replication
        self.bytes_sent = 0
        self.bytes_received = 0

    def call(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        import requests

        url = f"{self.member.api_url.rstrip('/')}{API_PREFIX}/{op}"
        timeout = self.settings.replication.peer_timeout
        try:
            response = self.client.request("POST", url, json=body, timeout=(min(5.0, timeout), timeout))
        except requests.RequestException as exc:
            raise SyncError(f"{op} on {self.peer_id}: {exc.__class__.__name__}: {exc}") from None
        self.bytes_sent += len(json.dumps(body, separators=(",", ":")))
        self.bytes_received += len(response.content)
        if response.status_code != 200:
            raise SyncError(f"{op} on {self.peer_id}: HTTP {response.status_code} {response.text[:200]}")
        try:
            answer = response.json()
        except ValueError:
            raise SyncError(f"{op} on {self.peer_id}: the answer is not JSON") from None
        if not isinstance(answer, dict):
            raise SyncError(f"{op} on {self.peer_id}: the answer is not a JSON object")
        return answer

    def push(self, kind: str, bucket: str, key: str) -> None:
        if not self.metadata_only:
            self.replication.replicate(self.peer_id, kind, bucket, key)
            return
        # Metadata only (the replication receiver's own endpoints): the rebalance cycles fetch the
        # chunks within their budget, and reads fall back to the current holders meanwhile.
        meta = self.replication.store.meta
        bucket_record = meta.get_bucket(bucket)
        if kind == KIND_BUCKET or bucket_record is None:
            if bucket_record is not None:
                self.replication.send_bucket_record(self.member, bucket_record)
            return
        record = meta.get_object(bucket, key)
        if record is None:
            return
        self.bytes_sent += self.replication.send_object_record(self.member, record, bucket_record)

    def fetch_chunk(self, chunk_hash: str) -> bytes:
        data = self.replication.get_chunk(self.member, chunk_hash)
        self.bytes_received += len(data)
        return data


def open_service(settings: Settings, *, with_links: bool = True,
                 metadata_only: bool = False) -> tuple[SyncService, list[HttpLink]]:
    """The sync service of this coordinator and a link to every other active coordinator
    (``metadata_only``: records move without their chunks, both ways)."""
    from tunnelmesh import node
    from tunnelmesh.identity import load_or_create_identity
    from tunnelmesh.peer_client import PeerClient
    from tunnelmesh.replication import ChunkFetcher, ReplicationService

    identity = load_or_create_identity(settings.data_dir)
    replication = ReplicationService(settings, self_id=identity.peer_id)
    store = replication.store
    fetcher = ChunkFetcher(settings, replication)

    def members() -> list[str]:
        return [m.peer_id for m in node.coordinator_members(settings)]

    service = SyncService(store, identity.peer_id, members, tombstone_grace=settings.storage.tombstone_grace,
                          factor=settings.replication.factor,
                          chunk_fetcher=lambda h: fetcher.fetch(ChunkRef(h, 0)), fetch_chunks=not metadata_only)
    if not with_links:
        return service, []
    client = PeerClient(settings, identity)
    links = [HttpLink(settings, m, client, replication, metadata_only=metadata_only)
             for m in node.coordinator_members(settings) if m.peer_id != identity.peer_id]
    return service, links


def run_sync_once(settings: Settings, *, lock_timeout: float = 0.0, catch_up: bool = False,
                  metadata_only: bool = False) -> dict[str, Any]:
    """One manifest-sync run of this coordinator (beat task, admin API, ``tunnelmesh sync --once``).

    Guarded by a Redis lock so runs never overlap; when another run holds it, returns
    ``{"skipped": "another sync is running"}`` (after waiting up to ``lock_timeout`` seconds).
    ``catch_up`` and ``metadata_only``: the metadata catch-up a rebalance starts with
    (``SyncService.run``, ``open_service``).
    """
    from tunnelmesh import redis_server

    conn = redis_server.client(settings, timeout=5.0)
    lock = conn.lock(SYNC_LOCK, timeout=max(60.0, settings.worker.task_time_limit), blocking_timeout=lock_timeout)
    if not lock.acquire(blocking=lock_timeout > 0):
        return {"skipped": "another sync is running"}
    try:
        service, links = open_service(settings, metadata_only=metadata_only)
        report = service.run(links, catch_up=catch_up)
        log.info("manifest sync: %s", json.dumps(_summary(report)))
        try:
            conn.set(LAST_REPORT_KEY, json.dumps(report), ex=7 * 86400)
        except Exception:  # noqa: BLE001 - the report is informative only
            pass
        return report
    finally:
        try:
            lock.release()
        except Exception:  # noqa: BLE001 - expired: the next run simply takes it
            pass


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    rounds = report.get("rounds", [])
    return {
        "caught_up": report.get("caught_up"), "rounds": len(rounds),
        "failed": sum(r["outcome"] == "failed" for r in rounds),
        "deleted_on_peers": sum(r["deleted_on_peer"] for r in rounds),
        "sent": sum(r["sent_to_peer"] for r in rounds), "pulled": sum(r["pulled"] for r in rounds),
        "bytes": sum(r["bytes_sent"] + r["bytes_received"] for r in rounds), "purged": report.get("purged", 0),
        "seconds": report.get("seconds"),
    }
