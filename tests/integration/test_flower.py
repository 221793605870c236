"""Flower under the supervisor (`worker.flower: true`): it serves its health check and Prometheus
metrics on `worker.flower_listen`, sees this coordinator's worker, and stops with the stack."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests

from tests.support import Coordinator, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_flower_runs_with_the_stack_and_sees_the_worker(make_coordinator: Callable[..., Coordinator]) -> None:
    port = free_port()
    node = make_coordinator("coordinator-a", settings={"worker": {"flower": True,
                                                                   "flower_listen": f"127.0.0.1:{port}"}})
    node.start()
    base = f"http://127.0.0.1:{port}"

    def answers(path: str) -> requests.Response | None:
        try:
            response = requests.get(base + path, timeout=3)
        except requests.RequestException:
            return None
        return response if response.status_code == 200 else None

    health = wait_for(lambda: answers("/healthcheck"), 60, "Flower's health check")
    assert health.text.strip().upper() == "OK"
    node.send_ping("flower-test")
    node.wait_ping("flower-test")
    # Flower learns of workers from their events; its metrics then name this coordinator's worker.
    metrics = wait_for(lambda: (r := answers("/metrics")) is not None and "flower_worker_online" in r.text
                       and r, 60, "Flower to report the worker")
    assert "flower_events_total" in metrics.text
    assert node.stop() == 0
    node.assert_no_leftovers()
