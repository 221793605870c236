"""GET /metrics on the coordination API: Prometheus text with the coordinator's state, behind the
mesh token like every endpoint but /health."""

from __future__ import annotations

import re

import pytest
import requests

from tests.support import Coordinator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def sample(text: str, name: str, labels: str = "") -> float | None:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def test_metrics_need_the_token_and_report_objects_queues_and_membership(coordinator: Coordinator) -> None:
    url = f"{coordinator.api_url}/metrics"
    refused = requests.get(url, timeout=10)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    wrong = requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401

    s3 = coordinator.s3_client()
    s3.create_bucket(Bucket="metrics")
    for i in range(3):
        s3.put_object(Bucket="metrics", Key=f"k{i}", Body=b"x" * 1000)
    s3.delete_object(Bucket="metrics", Key="k0")

    resp = requests.get(url, headers={"Authorization": f"Bearer {coordinator.token}"}, timeout=10)
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = resp.text
    assert sample(text, "tunnelmesh_objects", '{state="live"}') == 2
    assert sample(text, "tunnelmesh_objects", '{state="tombstone"}') == 1
    assert sample(text, "tunnelmesh_object_bytes") == 2000
    assert sample(text, "tunnelmesh_buckets") == 1
    assert sample(text, "tunnelmesh_corrupt_chunks_total") == 0
    assert sample(text, "tunnelmesh_queue_length", '{queue="replication"}') is not None
    assert sample(text, "tunnelmesh_membership_version") is not None
    up = sample(text, "tunnelmesh_coordinator_up", f'{{name="{coordinator.name}",peer_id="{coordinator.peer_id}"}}')
    assert up == 1
    assert (sample(text, "tunnelmesh_disk_free_bytes") or 0) > 0
