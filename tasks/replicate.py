"""Replication tasks (thin: the logic is in tunnelmesh/replication.py). Queue ``replication``.

- ``drain_outbox``: outbox -> per-peer pending items -> one ``replicate_object`` per (item, peer).
  Nudged by the S3 app after each write, run by beat every ``replication.drain_interval`` and when
  the worker starts (``worker_ready``), so nothing acknowledged waits on a lost nudge.
- ``replicate_object(peer, kind, bucket, key)``: push the current local version to one peer. Late
  ack (redelivered if the worker dies; the push is convergent). A ``PeerUnavailable`` is retried
  with exponential backoff (``replication.retry_backoff`` doubling per attempt up to
  ``retry_backoff_max``, with jitter: the delay is drawn from [50 %, 100 %] of that, so delays
  still visibly grow) up to ``replication.max_attempts`` attempts in all; after the last one the
  item stays in the ledger as a hint. The retry is explicit rather than ``autoretry_for`` because
  the last failure must record the hint, and because autoretry rounds the backoff factor to whole
  seconds with full jitter (0..delay), which hides the growth. ``rate_limit`` from the settings.
  A push whose peer already has ``per_peer_slots`` pushes running (a slow peer) is *deferred*: sent
  again after ~0.5 s as a new message carrying its attempt count, so it never holds a worker process
  that pushes to the other peers need (a slow peer never delays the others).
- ``replay_hints(peer_id=None)``: re-enqueue hints of ``peer_id`` (heartbeat handler: call
  :func:`replay_hints_for`) or of every peer that is up (beat, every ``replication.hint_interval``),
  plus queued items older than the visibility timeout whose message may have been lost.
- ``startup``: after a worker (re)start, re-enqueue every queued item (messages a killed worker held
  stay unacked until the visibility timeout) and drain the outbox.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

from celery import signals

from tasks.app import app, get_settings, visibility_timeout
from tunnelmesh.config import ReplicationSettings, Settings
from tunnelmesh.replication import PeerBusy, PeerRejected, PeerUnavailable, ReplicationService

log = logging.getLogger("tunnelmesh.replication")

QUEUE = "replication"
REPLICATE = "tasks.replicate.replicate_object"
DRAIN = "tasks.replicate.drain_outbox"
REPLAY = "tasks.replicate.replay_hints"
STARTUP = "tasks.replicate.startup"
DEFER_SECONDS = (0.3, 0.6)  # a push deferred because its peer's slots are busy comes back after this

_loaded: Settings | None = getattr(app, "tunnelmesh_settings", None)
_rep = _loaded.replication if _loaded is not None else ReplicationSettings()
_service_cache: dict[int, ReplicationService] = {}


def service() -> ReplicationService:
    """One service per process (prefork children build their own after fork)."""
    pid = os.getpid()
    if pid not in _service_cache:
        _service_cache.clear()
        _service_cache[pid] = ReplicationService(get_settings())
    return _service_cache[pid]


def retry_delay(rep: ReplicationSettings, retries: int) -> float:
    """Seconds before attempt ``retries + 2``: base x 2^retries capped, drawn from [50 %, 100 %]."""
    ceiling = min(rep.retry_backoff_max, rep.retry_backoff * (2**retries))
    return ceiling * random.uniform(0.5, 1.0)


def enqueue_replication(peer: str, kind: str, bucket: str, key: str) -> None:
    replicate_object.apply_async(args=[peer, kind, bucket, key], queue=QUEUE)


@app.task(name=REPLICATE, bind=True, acks_late=True, ignore_result=False, max_retries=_rep.max_attempts - 1,
          rate_limit=_rep.rate_limit or None)
def replicate_object(self: Any, peer: str, kind: str, bucket: str, key: str,
                     attempts_before: int = 0) -> dict[str, Any]:
    # ``attempts_before``: failed attempts of this item carried over a deferral (a new message).
    attempt = attempts_before + self.request.retries + 1
    try:
        result = service().replicate(peer, kind, bucket, key)
    except PeerBusy:
        # The peer's push slots are all taken (a slow peer): free this process for other peers'
        # pushes and come back shortly. Not an attempt: nothing was tried.
        replicate_object.apply_async(args=[peer, kind, bucket, key], kwargs={"attempts_before": attempt - 1},
                                     countdown=random.uniform(*DEFER_SECONDS), queue=QUEUE)
        return {"outcome": "deferred", "attempts": attempt - 1}
    except PeerUnavailable as exc:
        rep = get_settings().replication
        if attempt >= rep.max_attempts:
            service().record_hint(peer, kind, bucket, key, str(exc))
            return {"outcome": "hint", "attempts": attempt, "error": str(exc)}
        delay = retry_delay(rep, self.request.retries)
        log.warning("replicate %s %s/%s to %s: attempt %d of %d failed (%s); retrying in %.2fs",
                    kind, bucket, key, peer, attempt, rep.max_attempts, exc, delay)
        # The retry carries the object in its message so that Celery's own retry log line and Flower
        # say which object waits, not only which peer failed.
        raise self.retry(exc=PeerUnavailable(f"{kind} {bucket}/{key} to {peer}: {exc}"), countdown=delay,
                         max_retries=rep.max_attempts - 1) from None
    except PeerRejected as exc:
        # The peer refuses this record: retrying now would not help; keep it as a hint for later.
        service().record_hint(peer, kind, bucket, key, str(exc))
        return {"outcome": "rejected", "attempts": attempt, "error": str(exc)}
    log.info("replicated %s %s/%s to %s (attempt %d): %s, %d chunk(s) sent, %d present, %d local extra dropped",
             kind, bucket, key, peer, attempt, result.outcome, result.chunks_sent, result.chunks_present,
             result.dropped_local)
    return {"outcome": result.outcome, "attempts": attempt, "chunks_sent": result.chunks_sent}


@app.task(name=DRAIN, acks_late=True)
def drain_outbox() -> int:
    return service().drain_outbox(enqueue_replication)


@app.task(name=REPLAY, acks_late=True)
def replay_hints(peer_id: str | None = None) -> int:
    svc = service()
    if peer_id:
        return svc.replay_hints_for(peer_id, enqueue_replication)
    stale = svc.requeue_pending(enqueue_replication, older_than=visibility_timeout(get_settings()))
    return svc.replay_hints(enqueue_replication) + stale


@app.task(name=STARTUP, acks_late=True)
def startup() -> int:
    svc = service()
    return svc.requeue_pending(enqueue_replication) + svc.drain_outbox(enqueue_replication)


def replay_hints_for(peer_id: str) -> bool:
    """For the heartbeat handler: ask the worker to replay ``peer_id``'s hints (never blocks on a
    Redis that is down; returns False if the request could not be queued)."""
    try:
        replay_hints.apply_async(args=[peer_id], queue=QUEUE, retry=False)
        return True
    except Exception:  # noqa: BLE001 - the beat check replays hints anyway
        return False


@signals.worker_ready.connect(weak=False)
def _drain_on_worker_start(**_: Any) -> None:
    if getattr(app, "tunnelmesh_settings", None) is None:
        return
    try:
        startup.apply_async(queue=QUEUE, retry=False)
    except Exception:  # noqa: BLE001 - the beat drain covers it
        log.warning("could not queue the replication start-up drain", exc_info=True)
