"""The Celery app built from the config: Redis-broker safety settings, queues, routes, beat hook."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.app import QUEUES, beat_schedule, make_celery, module_exists, visibility_timeout
from tunnelmesh.config import Settings, settings_from_dict


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return settings_from_dict({"name": "a", "coordinator": {"data_dir": str(tmp_path)},
                               "worker": {"task_time_limit": "10m"},
                               "replication": {"retry_backoff_max": "2m"}, "sync": {"interval": "5m"}})


def test_broker_and_results_live_in_separate_databases_of_the_coordinators_redis(settings: Settings,
                                                                                  tmp_path: Path) -> None:
    conf = make_celery(settings).conf
    assert conf.broker_url == f"redis+socket://{tmp_path}/redis/redis.sock?virtual_host=0"
    assert conf.result_backend == f"redis+socket://{tmp_path}/redis/redis.sock?virtual_host=1"


def test_delivery_settings_fit_a_redis_broker(settings: Settings) -> None:
    conf = make_celery(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_ignore_result is True
    assert conf.broker_connection_retry_on_startup is True
    assert conf.worker_send_task_events and conf.task_send_sent_event
    assert conf.worker_cancel_long_running_tasks_on_connection_loss


def test_visibility_timeout_exceeds_the_longest_task_and_backoff_everywhere(settings: Settings) -> None:
    conf = make_celery(settings).conf
    vt = visibility_timeout(settings)
    assert vt > settings.worker.task_time_limit + settings.replication.retry_backoff_max
    # Celery reads it in three places; setting only one is the classic mistake.
    assert conf.broker_transport_options["visibility_timeout"] == vt
    assert conf.result_backend_transport_options["visibility_timeout"] == vt
    assert conf.visibility_timeout == vt
    assert conf.task_time_limit == 600 and conf.task_soft_time_limit < conf.task_time_limit


def test_queues_and_routes(settings: Settings) -> None:
    app = make_celery(settings)
    assert [q.name for q in app.conf.task_queues] == list(QUEUES)
    assert app.conf.task_default_queue == "default"
    router = app.amqp.router
    assert router.route({}, "tasks.replicate.push_object")["queue"].name == "replication"
    assert router.route({}, "tasks.manifest_sync.run")["queue"].name == "manifest"
    assert router.route({}, "tasks.rebalance.run")["queue"].name == "rebalance"
    assert router.route({}, "tasks.health.ping")["queue"].name == "default"


def test_manifest_sync_is_scheduled_once_its_module_exists(settings: Settings) -> None:
    schedule = beat_schedule(settings)
    if module_exists("tasks.manifest_sync"):
        entry = schedule["manifest-sync"]
        assert entry["task"] == "tasks.manifest_sync.run" and entry["schedule"] == 300.0
        assert 0 < entry["options"]["expires"] < 300.0 and entry["options"]["queue"] == "manifest"
    else:
        assert "manifest-sync" not in schedule


def test_the_ping_task_is_registered() -> None:
    import tasks.health  # noqa: F401 - registers on the module-level app, which workers use
    from tasks.app import app as worker_app

    assert "tasks.health.ping" in worker_app.tasks
    assert worker_app.tasks["tasks.health.ping"].ignore_result is False
