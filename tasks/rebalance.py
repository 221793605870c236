"""Rebalance tasks (logic in tunnelmesh/rebalance.py), queue ``rebalance``.

- ``check_membership`` (beat, every ``rebalance.check_interval``): the membership fingerprint
  changed since last seen -> ``request_rebalance``.
- ``request_rebalance(settings)``: records the change time; schedules one ``start`` after
  ``rebalance.debounce`` unless one is already scheduled.
- ``start``: if the last change is younger than the debounce, re-schedules itself for the rest of
  the window (several joins within it: one rebalance); otherwise runs the metadata catch-up
  (``rebalance.catch_up_metadata``: writes that never reached the new member reach it now; a peer
  whose view still differs makes it try again shortly, up to ``MAX_CATCH_UP_ATTEMPTS``), then counts
  a run and queues the first ``cycle``.
- ``cycle(run_id)``: fetches at most ``rebalance.max_bytes_per_cycle`` of missing chunks, records
  progress, queues the next cycle until nothing is missing; then drops confirmed extra copies,
  coming back (state ``dropping``) while some are not confirmed yet because their new holders are
  still fetching them, so a finished run leaves every chunk only where placement says.
  One task per cycle, so replication tasks interleave with a long rebalance.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from tasks.app import app, get_settings
from tunnelmesh import rebalance
from tunnelmesh.config import Settings

log = logging.getLogger("tunnelmesh.rebalance")

QUEUE = "rebalance"
RETRY_DELAY = 2.0  # seconds before a cycle that moved nothing is tried again
MAX_IDLE_CYCLES = 30
MAX_CATCH_UP_ATTEMPTS = 10  # starts deferred while a peer's membership view still differs


def request_rebalance(settings: Settings | None = None) -> bool:
    """A membership change happened now; True if this call scheduled the debounced start."""
    settings = settings or get_settings()
    conn = rebalance._redis(settings)
    debounce = settings.rebalance.debounce
    conn.set(rebalance.REQUESTED_KEY, repr(time.time()))
    if conn.set(rebalance.SCHEDULED_KEY, "1", nx=True, ex=int(debounce * 10 + 300)):
        start.apply_async(countdown=debounce, queue=QUEUE)
        return True
    return False


@app.task(name="tasks.rebalance.check_membership", ignore_result=True)
def check_membership() -> bool:
    settings = get_settings()
    if rebalance.members_changed(settings):
        log.info("membership changed: rebalance requested (debounce %.1fs)", settings.rebalance.debounce)
        request_rebalance(settings)
        return True
    return False


@app.task(name="tasks.rebalance.start", acks_late=True, ignore_result=True)
def start(catch_up_attempt: int = 0) -> str:
    settings = get_settings()
    conn = rebalance._redis(settings)
    requested = float(conn.get(rebalance.REQUESTED_KEY) or 0)
    quiet = time.time() - requested
    if quiet < settings.rebalance.debounce:
        start.apply_async(countdown=settings.rebalance.debounce - quiet, queue=QUEUE)
        return "deferred"
    try:
        catch_up = rebalance.catch_up_metadata(settings)
    except Exception as exc:  # noqa: BLE001 - Redis or peers down: the cycles still run; sync repairs later
        log.warning("rebalance: metadata catch-up failed: %s", exc)
        catch_up = {"membership_agreed": True, "error": str(exc)}
    if not catch_up["membership_agreed"] and catch_up_attempt < MAX_CATCH_UP_ATTEMPTS:
        # A peer has not seen the change yet: what we pulled may be incomplete. Not a run yet.
        log.info("rebalance: a peer's membership view differs; catch-up again in %.1fs", RETRY_DELAY)
        start.apply_async(kwargs={"catch_up_attempt": catch_up_attempt + 1}, countdown=RETRY_DELAY, queue=QUEUE)
        return "waiting for membership agreement"
    conn.delete(rebalance.SCHEDULED_KEY)
    run_id = uuid.uuid4().hex[:12]
    runs = conn.incr(rebalance.RUNS_KEY)
    log.info("rebalance %s started (run %d on this coordinator)", run_id, runs)
    rebalance.record_progress(settings, state="running", run=run_id, cycles=0, moved_bytes=0,
                              moved_chunks=0, remaining_bytes=-1, started=int(time.time()), idle=0,
                              dropped_chunks=0, dropped_bytes=0, extra_kept=0, drop_tries=0)
    cycle.apply_async(args=[run_id], queue=QUEUE)
    return run_id


@app.task(name="tasks.rebalance.cycle", acks_late=True, ignore_result=True)
def cycle(run_id: str) -> dict[str, Any]:
    settings = get_settings()
    progress = rebalance.local_progress(settings)
    if progress.get("run") != run_id:
        return {"outcome": "superseded"}
    rebalancer, _ = rebalance.open_rebalancer(settings)
    budget = settings.rebalance.max_bytes_per_cycle
    report = rebalancer.cycle(budget)
    cycles = int(progress.get("cycles", 0)) + 1
    moved = int(progress.get("moved_bytes", 0)) + report.moved_bytes
    rebalance.record_cycle(settings, {"run": run_id, "cycle": cycles, "budget": budget, **report.to_dict()})
    log.info("rebalance %s cycle %d: moved %d bytes in %d chunk(s) (budget %d), %d failed, %d bytes remaining",
             run_id, cycles, report.moved_bytes, report.moved_chunks, budget, report.failed_chunks,
             report.remaining_bytes)
    idle = 0 if report.moved_chunks else int(progress.get("idle", 0)) + 1
    fields = {"cycles": cycles, "moved_bytes": moved,
              "moved_chunks": int(progress.get("moved_chunks", 0)) + report.moved_chunks,
              "remaining_bytes": report.remaining_bytes, "remaining_chunks": report.remaining_chunks,
              "updated": int(time.time()), "idle": idle}
    if report.remaining_chunks and idle < MAX_IDLE_CYCLES:
        rebalance.record_progress(settings, **fields)
        cycle.apply_async(args=[run_id], queue=QUEUE, countdown=0 if report.moved_chunks else RETRY_DELAY)
        return fields
    dropped, freed, kept = rebalancer.drop_extra_copies_report()
    dropped += int(progress.get("dropped_chunks", 0) or 0)
    freed += int(progress.get("dropped_bytes", 0) or 0)
    drop_tries = int(progress.get("drop_tries", 0) or 0) + bool(kept)
    if kept and drop_tries < MAX_IDLE_CYCLES:
        # Extra copies whose new holders have not fetched them yet: ask again shortly.
        rebalance.record_progress(settings, **fields, state="dropping", dropped_chunks=dropped,
                                  dropped_bytes=freed, extra_kept=kept, drop_tries=drop_tries)
        cycle.apply_async(args=[run_id], queue=QUEUE, countdown=RETRY_DELAY)
        return {**fields, "state": "dropping"}
    state = "done" if not report.remaining_chunks else "incomplete"
    rebalance.record_progress(settings, **fields, state=state, dropped_chunks=dropped, dropped_bytes=freed,
                              extra_kept=kept, finished=int(time.time()))
    log.info("rebalance %s %s after %d cycle(s): %d bytes moved, %d extra copies dropped, %d kept",
             run_id, state, cycles, moved, dropped, kept)
    return {**fields, "state": state}
