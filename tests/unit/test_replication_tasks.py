"""The replication tasks' retry/hint behaviour, run eagerly with a fake service."""

from __future__ import annotations

from typing import Any

import pytest

import tasks.replicate as replicate_tasks
from tunnelmesh.config import settings_from_dict
from tunnelmesh.replication import PeerUnavailable, PushResult


class FakeService:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.hints: list[tuple[str, ...]] = []

    def replicate(self, peer: str, kind: str, bucket: str, key: str) -> PushResult:
        self.calls += 1
        if self.calls <= self.failures:
            raise PeerUnavailable("connection refused")
        return PushResult("sent", 1, 0, 0)

    def record_hint(self, *item: str) -> None:
        self.hints.append(item)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Any:
    settings = settings_from_dict({"name": "t", "replication": {"max_attempts": 3, "retry_backoff": 0.01}})
    monkeypatch.setattr(replicate_tasks, "get_settings", lambda: settings)

    def make(failures: int) -> FakeService:
        service = FakeService(failures)
        monkeypatch.setattr(replicate_tasks, "service", lambda: service)
        return service

    return make


def test_a_transient_failure_is_retried_then_succeeds(fake: Any) -> None:
    service = fake(2)
    result = replicate_tasks.replicate_object.apply(args=["p", "object", "b", "k"]).get()
    assert result["outcome"] == "sent" and result["attempts"] == 3 and service.calls == 3
    assert service.hints == []


def test_after_the_last_attempt_the_item_becomes_a_hint(fake: Any, caplog: pytest.LogCaptureFixture) -> None:
    service = fake(100)
    with caplog.at_level("WARNING", logger="tunnelmesh.replication"):
        result = replicate_tasks.replicate_object.apply(args=["p", "object", "b", "k"]).get()
    assert result["outcome"] == "hint" and service.calls == 3
    assert service.hints[0][:4] == ("p", "object", "b", "k")
    assert sum("retrying in" in r.getMessage() for r in caplog.records) == 2


def test_task_options_fit_a_redis_broker() -> None:
    task = replicate_tasks.replicate_object
    assert task.acks_late and task.max_retries == 2 and not task.ignore_result
