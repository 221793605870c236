"""The Celery app of a coordinator, built from its validated config.

``celery -A tasks.app worker|beat|flower`` (started by ``tunnelmesh join``) imports this module with
``$TUNNELMESH_CONFIG`` set; the module-level :data:`app` is configured from that file. Code that
holds a :class:`~tunnelmesh.config.Settings` object (tests, tools) builds its own with
:func:`make_celery`.

Settings follow the Redis-broker rules (docs/configuration.md, "Celery"):

- Late acks + ``task_reject_on_worker_lost``: a task whose worker dies is redelivered, so every
  task must be idempotent (replication tasks are convergent: "make peer P hold version V").
- The visibility timeout (after which kombu redelivers an unacked message) is derived from the
  longest task run and the longest retry countdown, so a running or retrying task is never
  delivered twice (:func:`visibility_timeout`). It is set in all three places Celery reads it.
- Prefetch 1: long replication tasks do not sit reserved behind each other.
- Results are ignored unless a task asks for one; they live in ``redis.result_db``.
- Queues: ``membership``, ``replication``, ``manifest``, ``rebalance``, ``default`` (routes below).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import time
from typing import Any

from celery import Celery, signals
from kombu import Queue

from tunnelmesh import redis_server
from tunnelmesh.config import CONFIG_ENV, Settings, load_config

log = logging.getLogger(__name__)

# "membership": coordinator heartbeats (issue 4), kept apart so they never sit in (or inflate) the
# default queue, and listed first so the worker polls it first.
QUEUES = ("membership", "replication", "manifest", "rebalance", "default")
DEFAULT_QUEUE = "default"

# Task modules of the project. Each is included only once it exists, so later issues add a module
# (tasks/replicate.py, tasks/manifest_sync.py, tasks/rebalance.py, ...) without touching this list
# beyond naming it here.
TASK_MODULES = (
    "tasks.health",
    "tasks.membership",
    "tasks.replicate",
    "tasks.replication",
    "tasks.outbox",
    "tasks.manifest_sync",
    "tasks.rebalance",
    "tasks.gc",
)

TASK_ROUTES = {
    "tasks.replicate.*": {"queue": "replication"},
    "tasks.replication.*": {"queue": "replication"},
    "tasks.outbox.*": {"queue": "replication"},
    "tasks.manifest_sync.*": {"queue": "manifest"},
    "tasks.rebalance.*": {"queue": "rebalance"},
    "tasks.membership.*": {"queue": "membership"},
    "tasks.gc.*": {"queue": "manifest"},
}


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def visibility_timeout(settings: Settings) -> int:
    """Seconds an unacked message stays with its consumer before kombu redelivers it.

    Must exceed the longest task run (``worker.task_time_limit``) plus the longest retry
    countdown (``replication.retry_backoff_max``: a retry is a message held unacked until its
    countdown ends), with a margin for clock and scheduling slack.
    """
    return int(settings.worker.task_time_limit + settings.replication.retry_backoff_max + 60)


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Periodic jobs of one coordinator (its own beat; one beat per coordinator stack)."""
    schedule: dict[str, dict[str, Any]] = {}
    # Issue 4: coordinator heartbeats + membership/registry anti-entropy, once per interval; a run
    # that waited longer than an interval is dropped (the next one supersedes it).
    if module_exists("tasks.membership"):
        heartbeat = settings.coordinator.heartbeat_interval
        schedule["membership-heartbeat"] = {
            "task": "tasks.membership.heartbeat_round",
            "schedule": heartbeat,
            "options": {"expires": max(0.5, heartbeat), "queue": "membership"},
        }
    # HOOK (issue 6): the safety-net manifest sync, scheduled as soon as tasks/manifest_sync.py
    # exists and defines the task ``tasks.manifest_sync.run``. ``expires`` drops a run that backed
    # up behind the next one instead of letting them pile up.
    if module_exists("tasks.manifest_sync"):
        interval = settings.sync.interval
        schedule["manifest-sync"] = {
            "task": "tasks.manifest_sync.run",
            "schedule": interval,
            "options": {"expires": max(1.0, interval * 0.9), "queue": "manifest"},
        }
    # Issue 5: the outbox drain (bounds the delay when the S3 app's nudge was lost) and the hint
    # replay for peers that are up again. Expiring runs never pile up behind a busy worker.
    if module_exists("tasks.replicate"):
        for name, task, interval in (
                ("replication-drain", "tasks.replicate.drain_outbox", settings.replication.drain_interval),
                ("replication-hints", "tasks.replicate.replay_hints", settings.replication.hint_interval)):
            schedule[name] = {"task": task, "schedule": interval,
                              "options": {"expires": max(1.0, interval * 0.9), "queue": "replication"}}
    # Issue 6: garbage collection, and the membership watcher that triggers a debounced rebalance.
    if module_exists("tasks.gc"):
        schedule["gc"] = {"task": "tasks.gc.run", "schedule": settings.storage.gc_interval,
                          "options": {"expires": max(1.0, settings.storage.gc_interval * 0.9), "queue": "manifest"}}
    if module_exists("tasks.rebalance"):
        check = settings.rebalance.check_interval
        schedule["rebalance-check"] = {"task": "tasks.rebalance.check_membership", "schedule": check,
                                       "options": {"expires": max(0.5, check), "queue": "rebalance"}}
    return schedule


def celery_config(settings: Settings) -> dict[str, Any]:
    vt = visibility_timeout(settings)
    time_limit = settings.worker.task_time_limit
    return {
        "broker_url": redis_server.broker_url(settings),
        "result_backend": redis_server.result_backend_url(settings),
        "broker_connection_retry_on_startup": True,  # a worker may start before its Redis answers
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,  # keep trying: Redis is restarted by the supervisor
        "broker_transport_options": {"visibility_timeout": vt, "health_check_interval": 30},
        "result_backend_transport_options": {"visibility_timeout": vt},
        "visibility_timeout": vt,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        "task_ignore_result": True,
        "result_expires": 86400,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_time_limit": time_limit,
        "task_soft_time_limit": time_limit * 0.9,
        "worker_soft_shutdown_timeout": min(10.0, settings.supervisor.stop_timeout / 2),
        "worker_max_tasks_per_child": settings.worker.max_tasks_per_child,
        "worker_send_task_events": True,  # Flower
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "task_default_queue": DEFAULT_QUEUE,
        "task_queues": [Queue(name, routing_key=name) for name in QUEUES],
        "task_create_missing_queues": True,
        "task_routes": TASK_ROUTES,
        "beat_schedule": beat_schedule(settings),
    }


def make_celery(settings: Settings) -> Celery:
    """A Celery app wired to ``settings``' Redis, with this project's task modules."""
    celery = Celery("tunnelmesh", include=[m for m in TASK_MODULES if module_exists(m)])
    celery.config_from_object(celery_config(settings))
    celery.tunnelmesh_settings = settings  # type: ignore[attr-defined]
    return celery


def _settings_from_env() -> Settings | None:
    if not os.environ.get(CONFIG_ENV):
        return None
    return load_config(check_data_dir=False)


_settings = _settings_from_env()
# Without $TUNNELMESH_CONFIG (unit tests importing task modules) the app is left unconfigured
# rather than pointed at a guessed broker: sending a task then fails loudly.
app: Celery = make_celery(_settings) if _settings else Celery(
    "tunnelmesh", include=[m for m in TASK_MODULES if module_exists(m)])


def get_settings() -> Settings:
    """The config this process was started with (raises ConfigError if there is none)."""
    settings = getattr(app, "tunnelmesh_settings", None)
    return settings if settings is not None else load_config(check_data_dir=False)


# ---------------------------------------------------------------------------------------------
# Worker process hooks
# ---------------------------------------------------------------------------------------------

_alive_client = None


def _mark_worker_alive(**_: Any) -> None:
    global _alive_client
    settings = getattr(app, "tunnelmesh_settings", None)
    if settings is None:
        return
    try:
        if _alive_client is None:
            _alive_client = redis_server.client(settings, timeout=2.0)
        _alive_client.set(redis_server.WORKER_ALIVE_KEY, f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}",
                          ex=redis_server.WORKER_ALIVE_TTL)
    except Exception:  # noqa: BLE001 - a liveness mark must never disturb the worker
        _alive_client = None


@signals.worker_process_init.connect
def _die_with_worker(**_: Any) -> None:
    # Pool processes are grandchildren of the supervisor: make them die with the worker's main
    # process even when it is SIGKILLed (the supervisor's PDEATHSIG covers only its children).
    from tunnelmesh.supervisor import set_parent_death_signal

    set_parent_death_signal(signal.SIGKILL)


signals.worker_ready.connect(_mark_worker_alive, weak=False)
signals.heartbeat_sent.connect(_mark_worker_alive, weak=False)


@signals.worker_shutdown.connect
def _mark_worker_gone(**_: Any) -> None:
    settings = getattr(app, "tunnelmesh_settings", None)
    if settings is None:
        return
    try:
        conn = redis_server.client(settings, timeout=1.0)
        conn.delete(redis_server.WORKER_ALIVE_KEY)
        conn.close()
    except Exception:  # noqa: BLE001 - Redis may already be gone at shutdown
        pass
