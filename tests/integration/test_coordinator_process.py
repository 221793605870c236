"""``tunnelmesh join`` as a real process: its Redis, gunicorns, Celery worker and beat.

What issue 2 asks to be shown: /health answers, the worker consumes a task through the Redis the
coordinator started, SIGTERM leaves no process behind, a second coordinator joins with the printed
token (a wrong or missing one is refused), a queued task survives a SIGKILL of the whole
coordinator, and a crashed child is restarted (or the coordinator gives up, as documented).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.support import Coordinator, processes_with_config, wait_for
from tunnelmesh.identity import s3_credentials
from tunnelmesh.redis_server import redis_binary

pytestmark = pytest.mark.integration

CHILDREN = {"redis", "web", "s3", "worker", "beat"}


def _descendant_of(pid: int, ancestor: int) -> bool:
    try:
        return any(p.pid == ancestor for p in psutil.Process(pid).parents())
    except psutil.NoSuchProcess:
        return False


def test_join_bootstraps_serves_health_runs_tasks_and_stops_cleanly(coordinator: Coordinator) -> None:
    health = coordinator.health()
    assert health is not None
    assert health["status"] == "ok" and health["redis"] == "ok" and health["worker"] == "up"
    assert health["name"] == "coordinator-a"
    assert health["peer_id"] == coordinator.run_cli("id").stdout.strip() == coordinator.peer_id
    assert set(health["processes"]) == CHILDREN
    assert re.fullmatch(r"10\.42\.\d+\.\d+", health["mesh_ip"])

    # The bootstrap printed the token it generated (and stored) with the join command.
    address, token = coordinator.printed_join_command()
    assert address == coordinator.address
    assert token == coordinator.token

    # Every child is part of the process tree, and Redis listens only on the unix socket.
    pids = coordinator.pids()
    assert set(pids) == CHILDREN
    tree = {p.pid for p in coordinator.tree}
    assert set(pids.values()) <= tree
    redis_proc = psutil.Process(pids["redis"])
    assert not [c for c in redis_proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert (coordinator.data_dir / "redis" / "redis.sock").is_socket()

    # The worker consumes a task through this coordinator's Redis.
    marker = coordinator.send_ping()
    record = coordinator.wait_ping(marker, timeout=30)
    assert _descendant_of(record["worker_pid"], pids["worker"]) or record["worker_pid"] == pids["worker"]

    # A second supervisor on the same data directory is refused, without touching the first.
    second = coordinator.join_cli(None)
    assert second.returncode == 2
    assert second.stderr.strip().count("\n") == 0
    assert "is in use by a running coordinator" in second.stderr
    assert coordinator.health() is not None

    assert coordinator.stop() == 0  # also asserts that no process of it is left
    assert not processes_with_config(coordinator.config_path)
    assert "stopping" in coordinator.output() and coordinator.output().rstrip().endswith("stopped")


@pytest.mark.slow
def test_second_coordinator_joins_with_printed_token(make_coordinator: Callable[..., Coordinator]) -> None:
    a = make_coordinator("coordinator-a")
    a.start()
    _, token = a.printed_join_command()
    b = make_coordinator("coordinator-b")

    # Missing token: one clear line, non-zero exit, nothing left running, nothing stored.
    missing = b.join_cli(a)
    assert missing.returncode != 0
    assert missing.stderr.startswith("error: no mesh token") and missing.stderr.count("\n") == 1
    assert "Traceback" not in missing.stderr + missing.stdout
    # Wrong token: refused by coordinator-a.
    wrong = b.join_cli(a, token="tm_this-is-not-the-mesh-token")
    assert wrong.returncode != 0
    assert wrong.stderr.strip() == f"error: the coordinator at {a.api_url} refused the mesh token: invalid mesh token"
    assert not processes_with_config(b.config_path)
    assert b.token is None

    b.start(join=a, token=token)
    assert b.token == token
    assert "registered with the coordinator at" in b.output()

    # Both run side by side, each with its own stack.
    health_a, health_b = a.health(), b.health()
    assert health_a and health_b and health_a["worker"] == health_b["worker"] == "up"
    assert health_a["peer_id"] != health_b["peer_id"]
    assert set(a.pids().values()).isdisjoint(b.pids().values())
    marker_a, marker_b = a.send_ping(), b.send_ping()
    a.wait_ping(marker_a)
    b.wait_ping(marker_b)
    assert a.ping_record(marker_b) is None  # separate Redis servers

    # coordinator-a knows coordinator-b: a node registering now gets both in its coordinator list.
    resp = a.register_peer("peer-1", addresses=["192.0.2.7"])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    names = [c["name"] for c in body["coordinators"]]
    assert names == ["coordinator-a", "coordinator-b"]
    assert body["coord_mesh_ips"][0] == health_a["mesh_ip"]
    entry_b = body["coordinators"][1]
    assert entry_b["peer_id"] == health_b["peer_id"] and entry_b["mesh_ip"] == health_b["mesh_ip"]
    assert entry_b["api_url"] == b.api_url and entry_b["s3_url"] == b.s3_url
    assert body["is_admin"] is False
    creds = s3_credentials(token, body["peer_id"])
    assert body["s3"]["access_key"] == creds.access_key and body["s3"]["secret_key"] == creds.secret_key

    assert b.stop() == 0
    assert a.stop() == 0


@pytest.mark.slow
def test_queued_task_and_stored_objects_survive_sigkill_of_the_whole_coordinator(
        make_coordinator: Callable[..., Coordinator]) -> None:
    coordinator = make_coordinator("coordinator-a", settings={"storage": {"chunk_size": "64KiB"}})
    coordinator.start()
    body = os.urandom(300 * 1024)  # five chunks
    s3 = coordinator.s3_client()
    s3.create_bucket(Bucket="keep")
    s3.put_object(Bucket="keep", Key="dir/object.bin", Body=body)  # acknowledged: must survive
    pids = coordinator.pids()
    worker = psutil.Process(pids["worker"])
    files_before = {p: p.read_bytes() for p in [coordinator.data_dir / "identity" / "node.key",
                                                coordinator.data_dir / "identity" / "mesh_token"]}
    peer_id = coordinator.peer_id

    worker.suspend()  # SIGSTOP: the worker can no longer take the task
    # Let the worker's pending BRPOP (1 s poll) time out: a stopped client must not be handed the message.
    time.sleep(1.5)
    marker = coordinator.send_ping()
    conn = coordinator.redis()
    assert conn.llen("default") == 1  # the task sits in the broker queue, in Redis
    conn.close()
    time.sleep(1.5)  # appendfsync everysec: the AOF now holds it

    coordinator.kill()  # SIGKILL the supervisor; every child (even the stopped worker) dies with it
    assert not processes_with_config(coordinator.config_path)
    for path, content in files_before.items():
        assert path.read_bytes() == content
    assert (coordinator.data_dir / "meta" / "registry.db").exists()

    coordinator.start()
    record = coordinator.wait_ping(marker, timeout=30)
    assert record["marker"] == marker
    assert coordinator.peer_id == peer_id and coordinator.health()["peer_id"] == peer_id
    assert coordinator.s3_client().get_object(Bucket="keep", Key="dir/object.bin")["Body"].read() == body
    assert coordinator.stop() == 0


@pytest.mark.slow
def test_a_crashed_child_is_restarted(coordinator: Coordinator) -> None:
    old_redis = coordinator.kill_child("redis")
    wait_for(lambda: coordinator.pids().get("redis") not in (None, old_redis), 20, "a new redis")
    wait_for(lambda: (coordinator.health() or {}).get("redis") == "ok", 20, "redis back in /health")
    assert f"redis (pid {old_redis}) died unexpectedly with signal SIGKILL; restarting it" in coordinator.output()

    old_worker = coordinator.kill_child("worker")
    wait_for(lambda: coordinator.pids().get("worker") not in (None, old_worker), 20, "a new worker")
    marker = coordinator.send_ping()
    coordinator.wait_ping(marker, timeout=40)  # the new worker consumes through the restarted Redis

    assert coordinator.state()["children"]["redis"]["restarts"] == 1
    coordinator.tree = coordinator.process_tree()  # restarted children are new processes
    assert coordinator.stop() == 0


@pytest.mark.slow
def test_the_coordinator_gives_up_when_a_child_keeps_crashing(
        make_coordinator: Callable[..., Coordinator]) -> None:
    node = make_coordinator("coordinator-a", settings={"supervisor": {"max_restarts": 1, "restart_window": "60s"}})
    node.start()
    first = node.kill_child("beat")
    wait_for(lambda: node.pids().get("beat") not in (None, first), 20, "beat restarted once")
    node.kill_child("beat", signal.SIGKILL)
    assert node.proc.wait(30) == 1
    assert "giving up, stopping the coordinator" in node.output()
    node.assert_no_leftovers()


@pytest.mark.slow
def test_an_external_redis_replaces_the_bundled_one(make_coordinator: Callable[..., Coordinator],
                                                    tm_root: Path) -> None:
    external = tm_root / "external-redis"
    external.mkdir()
    sock = external / "redis.sock"
    server = subprocess.Popen([str(redis_binary()), "--port", "0", "--unixsocket", str(sock), "--dir", str(external),
                               "--save", ""], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_for(sock.exists, 10, "the external redis socket")
        node = make_coordinator("coordinator-a", settings={"redis": {"url": f"unix://{sock}"}})
        node.start()
        assert set(node.pids()) == CHILDREN - {"redis"}
        assert not (node.data_dir / "redis" / "redis.sock").exists()
        node.wait_ping(node.send_ping())
        assert node.stop() == 0
        assert server.poll() is None  # not the coordinator's to stop
    finally:
        server.kill()
        server.wait(10)
