"""Coordinators as a cluster: heartbeats, membership and registry anti-entropy, removal.

The logic behind ``tasks.membership`` (Celery) and the coordinator endpoints of
``web.coordination``; no Flask or Celery objects here except the fire-and-forget trigger.

One heartbeat round (every ``coordinator.heartbeat_interval``, by Celery beat; also on demand after
a membership change): this coordinator POSTs a signed heartbeat to every other active member,
carrying its whole membership view (a few hundred bytes per coordinator: cheaper than a
digest round trip) and the digest of its peer registry. The receiver records the heartbeat, merges
the view and answers with its merged view and registry digest. The sender merges that view too;
when the registry digests differ, it pushes all its records and merges the receiver's records from
the answer. Merges are commutative and idempotent, so membership and registry spread transitively:
every coordinator that (directly or through others) exchanges with every other converges on the
same view and the same registry within a round or two.

Health is local: a member is up while heard from (its heartbeat arrived, or it answered ours)
within ``heartbeat_interval x heartbeat_misses``; a down member stays a member.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from storage.membership import Member, MembershipView
from storage.registry import PeerRecord, PeerRegistry
from tunnelmesh import node
from tunnelmesh.config import Settings
from tunnelmesh.identity import NodeIdentity, load_or_create_identity
from tunnelmesh.peer_client import PeerClient

log = logging.getLogger(__name__)

HEARTBEAT_PATH = "/api/v1/coordinators/heartbeat"
REGISTRY_SYNC_PATH = "/api/v1/coordinators/registry"
REMOVE_PATH = "/api/v1/coordinators/remove"
ROUND_TASK = "tasks.membership.heartbeat_round"
MAX_RECORDS = 100_000


class PeerCallError(Exception):
    """A coordinator did not answer as expected."""


def _timeout(settings: Settings) -> tuple[float, float]:
    interval = settings.coordinator.heartbeat_interval
    return min(2.0, max(0.5, interval)), max(2.0, 2 * interval)


def heartbeat_body(registry: PeerRegistry, view: MembershipView | None = None) -> dict[str, Any]:
    view = registry.load_view() if view is None else view
    return {"membership": view.to_dict(), "registry_digest": registry.digest()}


def parse_records(raw: object) -> list[PeerRecord]:
    """Records of a registry sync body; ValueError when malformed."""
    if not isinstance(raw, list) or len(raw) > MAX_RECORDS:
        raise ValueError(f"records: must be a list of at most {MAX_RECORDS} peer records")
    records = []
    for index, item in enumerate(raw):
        try:
            records.append(PeerRecord.from_dict(item))
        except ValueError as exc:
            raise ValueError(f"records[{index}]: {exc}") from None
    return records


def records_body(registry: PeerRegistry) -> dict[str, Any]:
    return {"records": [r.replicated() for r in registry.list_peers()]}


# -- receiving side (called by the web endpoints) ---------------------------------------------


def receive_heartbeat(settings: Settings, registry: PeerRegistry, sender: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Merge a heartbeat from coordinator ``sender``; (answer body, whether our view changed).

    Raises ValueError for a malformed view (nothing is changed then).
    """
    remote = MembershipView.from_dict(body.get("membership"))
    registry.record_heartbeat(sender, time.time())
    view, changed = registry.merge_view(remote)
    return heartbeat_body(registry, view), changed


def receive_records(settings: Settings, registry: PeerRegistry, records: list[PeerRecord]) -> dict[str, Any]:
    registry.merge_records(records, mesh_cidr=settings.coordinator.mesh_cidr)
    return records_body(registry)


# -- sending side ------------------------------------------------------------------------------


def _exchange(settings: Settings, client: PeerClient, registry: PeerRegistry, member: Member,
              view: MembershipView) -> dict[str, Any]:
    url = member.api_url.rstrip("/")
    resp = client.request("POST", url + HEARTBEAT_PATH, json=heartbeat_body(registry, view),
                          timeout=_timeout(settings))
    if resp.status_code != 200:
        raise PeerCallError(f"heartbeat to {member.name} ({url}): HTTP {resp.status_code} {resp.text[:200]}")
    answer = resp.json()
    registry.record_heartbeat(member.peer_id, time.time())
    _, view_changed = registry.merge_view(MembershipView.from_dict(answer.get("membership")))
    synced = False
    if answer.get("registry_digest") != registry.digest():
        resp = client.request("POST", url + REGISTRY_SYNC_PATH, json=records_body(registry),
                              timeout=_timeout(settings))
        if resp.status_code != 200:
            raise PeerCallError(f"registry sync with {member.name}: HTTP {resp.status_code} {resp.text[:200]}")
        registry.merge_records(parse_records(resp.json().get("records")), mesh_cidr=settings.coordinator.mesh_cidr)
        synced = True
    return {"ok": True, "view_changed": view_changed, "registry_synced": synced}


def heartbeat_round(settings: Settings, identity: NodeIdentity | None = None) -> dict[str, Any]:
    """Heartbeat every other active member once, in parallel; returns peer_id -> outcome."""
    identity = identity or load_or_create_identity(settings.data_dir)
    registry = node.shared_registry(settings)
    view = registry.load_view()
    if not view.is_active(identity.peer_id):
        return {}  # not (or no longer) a member: nothing to say to anyone
    others = [m for m in view.active_members() if m.peer_id != identity.peer_id]
    if not others:
        return {}
    client = PeerClient(settings, identity)

    def one(member: Member) -> dict[str, Any]:
        try:
            return _exchange(settings, client, registry, member, view)
        except (requests.RequestException, PeerCallError, ValueError) as exc:
            log.info("heartbeat to %s failed: %s", member.name, exc)
            return {"ok": False, "error": str(exc)[:300]}

    with ThreadPoolExecutor(max_workers=min(16, len(others))) as pool:
        outcomes = list(pool.map(one, others))
    return {m.peer_id: outcome for m, outcome in zip(others, outcomes, strict=True)}


ROUND_LOCK = "tm:membership:round-lock"


def heartbeat_round_once(settings: Settings) -> dict[str, Any]:
    """A heartbeat round unless one is already running on this coordinator.

    Beat starts a round every interval, but a round against a slow peer can last up to its read
    timeout (two intervals): without this guard rounds pile up and starve the worker's other
    queues (replication among them).
    """
    from tunnelmesh import redis_server

    interval = settings.coordinator.heartbeat_interval
    lock = redis_server.client(settings, timeout=5.0).lock(
        ROUND_LOCK, timeout=max(5.0, 4 * interval), blocking=False)
    if not lock.acquire():
        return {"skipped": "a heartbeat round is already running"}
    try:
        return heartbeat_round(settings)
    finally:
        try:
            lock.release()
        except Exception:  # noqa: BLE001 - expired meanwhile: nothing to release
            pass


def remove_member(settings: Settings, registry: PeerRegistry, target: str, writer: str) -> tuple[MembershipView, bool]:
    """Tombstone ``target`` in this node's view (the next round spreads it)."""
    view, changed = node.remove_coordinator(registry, target, writer)
    if changed:
        log.info("coordinator %s removed from the membership view (by %s)", target, writer)
    return view, changed


def may_remove(settings: Settings, registry: PeerRegistry, requester: str, target: str) -> bool:
    """A coordinator may remove itself; an admin coordinator may remove anyone."""
    if requester == target:
        return True
    record = registry.get(requester)
    return record is not None and (record.is_admin or node.matches_admin(
        settings.coordinator.admin_peers, record.peer_id, record.name))


def broadcast_removal(settings: Settings, identity: NodeIdentity, target: str) -> list[str]:
    """Ask every other active member to remove ``target``; returns the names that accepted.

    The members are asked side by side. A removal is idempotent, so a member that did not answer
    (unreachable, timed out, 5xx) is asked again, up to ``replication.max_attempts`` times with
    growing delays: a coordinator busy with the leaver's last drain must not turn a leave into a
    partial one. The read timeout is ``replication.peer_timeout``, not the heartbeat's short one.
    A refusal (4xx) is final.
    """
    client = PeerClient(settings, identity)
    rep = settings.replication
    timeout = (_timeout(settings)[0], rep.peer_timeout)
    others = [m for m in node.shared_registry(settings).load_view().active_members()
              if m.peer_id != identity.peer_id]

    def ask(member: Member) -> bool:
        for attempt in range(rep.max_attempts):
            if attempt:
                time.sleep(min(rep.retry_backoff * 2 ** (attempt - 1), rep.retry_backoff_max))
            try:
                resp = client.request("POST", member.api_url.rstrip("/") + REMOVE_PATH,
                                      json={"peer_id": target}, timeout=timeout)
            except requests.RequestException as exc:
                log.info("removal request to %s failed (attempt %d): %s", member.name, attempt + 1, exc)
                continue
            if resp.status_code == 200:
                return True
            log.info("removal request to %s answered HTTP %d (attempt %d)", member.name, resp.status_code,
                     attempt + 1)
            if resp.status_code < 500:
                return False
        return False

    if not others:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(others))) as pool:
        answers = list(pool.map(ask, others))
    return [m.name for m, ok in zip(others, answers, strict=True) if ok]


# -- fire-and-forget trigger of a round (from the web process) ---------------------------------

_celery_apps: dict[str, Any] = {}
_celery_lock = threading.Lock()


def trigger_round(settings: Settings) -> None:
    """Ask this node's worker for a heartbeat round now (spreads a change at once).

    Runs in a daemon thread: an unreachable Redis must never delay the HTTP answer; a lost trigger
    only means the change spreads with the next scheduled round.
    """
    def send() -> None:
        try:
            from celery import Celery

            from tunnelmesh import redis_server

            with _celery_lock:
                app = _celery_apps.get(settings.name)
                if app is None:
                    app = Celery("tunnelmesh-trigger", broker=redis_server.broker_url(settings))
                    app.conf.broker_connection_retry_on_startup = False
                    _celery_apps[settings.name] = app
            app.send_task(ROUND_TASK, queue="membership", expires=max(1.0, 5 * settings.coordinator.heartbeat_interval),
                          retry=False)
        except Exception as exc:  # noqa: BLE001 - best effort: the beat round follows anyway
            log.info("could not trigger a heartbeat round: %s", exc)

    threading.Thread(target=send, name="trigger-heartbeat-round", daemon=True).start()
