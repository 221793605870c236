"""The supervisor's pure parts: restart policy, child commands, pre-start checks, Redis config,
gunicorn settings; and one real run with stand-in children to check stop order and PDEATHSIG."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support import free_port, wait_for
from tunnelmesh import redis_server
from tunnelmesh.config import ConfigError, settings_from_dict
from tunnelmesh.supervisor import (
    CrashPolicy,
    Supervisor,
    child_env,
    preflight,
    readiness_probe,
    role_argv,
    roles,
)


def settings(tmp_path: Path, **sections: dict[str, object]) -> object:
    data = {"name": "coordinator-a", "coordinator": {"data_dir": str(tmp_path / "d"), "listen": "127.0.0.1:1"}}
    data.update(sections)
    return settings_from_dict(data, str(tmp_path / "c.yaml"))


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = CrashPolicy(max_restarts=10, window=60, backoff=1, backoff_max=5)
    assert [policy.record_crash(t) for t in (0, 1, 2, 3, 4)] == [1, 2, 4, 5, 5]


def test_gives_up_after_too_many_crashes_within_the_window() -> None:
    policy = CrashPolicy(max_restarts=5, window=60, backoff=1, backoff_max=30)
    assert all(policy.record_crash(t) is not None for t in range(5))
    assert policy.record_crash(5) is None


def test_old_crashes_leave_the_window() -> None:
    policy = CrashPolicy(max_restarts=2, window=10, backoff=1, backoff_max=30)
    assert policy.record_crash(0) == 1 and policy.record_crash(1) == 2
    assert policy.record_crash(20) == 1  # the first two are forgotten: backoff starts over
    assert policy.recent_crashes == 1


def test_zero_restarts_means_the_first_crash_stops_everything() -> None:
    assert CrashPolicy(max_restarts=0, window=60, backoff=1, backoff_max=1).record_crash(0) is None


def test_roles_follow_the_config(tmp_path: Path) -> None:
    assert roles(settings(tmp_path)) == ["redis", "web", "s3", "worker", "beat"]
    assert roles(settings(tmp_path, redis={"url": "redis://r:6379"}, s3={"enabled": False},
                          worker={"flower": True})) == ["web", "worker", "beat", "flower"]


def test_child_commands(tmp_path: Path) -> None:
    s = settings(tmp_path, worker={"concurrency": 3, "pool": "threads"})
    run = tmp_path / "d" / "run"
    assert role_argv("redis", s) == [str(redis_server.redis_binary()), str(tmp_path / "d" / "redis" / "redis.conf")]
    web = role_argv("web", s)
    assert web[1:] == ["-m", "gunicorn", "-c", "python:tunnelmesh.gunicorn_conf", "web.coordination:create_app()"]
    assert role_argv("s3", s)[-1] == "web.s3:create_app()"
    worker = role_argv("worker", s)
    assert worker[1:6] == ["-m", "celery", "-A", "tasks.app", "worker"]
    for option in (["--queues", "membership,replication,manifest,rebalance,default"], ["--concurrency", "3"],
                   ["--pool", "threads"], ["--hostname", "coordinator-a@%h"], ["--pidfile", str(run / "worker.pid")]):
        index = worker.index(option[0])
        assert worker[index:index + 2] == option
    beat = role_argv("beat", s)
    assert beat[beat.index("--schedule") + 1] == str(run / "celerybeat-schedule")
    with pytest.raises(ValueError):
        role_argv("nope", s)


def test_children_get_the_config_and_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNNELMESH_TOKEN", "secret-not-for-children")
    env = child_env(settings(tmp_path), tmp_path / "c.yaml", "s3")
    assert env["TUNNELMESH_CONFIG"] == str(tmp_path / "c.yaml")
    assert env["TUNNELMESH_GUNICORN_ROLE"] == "s3"
    assert "TUNNELMESH_TOKEN" not in env
    assert str(Path(__file__).resolve().parents[2]) in env["PYTHONPATH"].split(os.pathsep)


def test_redis_config_is_durable_and_socket_only(tmp_path: Path) -> None:
    s = settings(tmp_path, redis={"appendfsync": "always"})
    text = redis_server.render_config(s)
    for line in ("port 0", f'unixsocket "{tmp_path}/d/redis/redis.sock"', f'dir "{tmp_path}/d/redis"',
                 "appendonly yes", "appendfsync always", "maxmemory-policy noeviction", 'save ""'):
        assert line in text.splitlines()


def test_redis_urls(tmp_path: Path) -> None:
    s = settings(tmp_path)
    sock = tmp_path / "d" / "redis" / "redis.sock"
    assert redis_server.broker_url(s) == f"redis+socket://{sock}?virtual_host=0"
    assert redis_server.result_backend_url(s) == f"redis+socket://{sock}?virtual_host=1"
    assert redis_server.client_url(s) == f"unix://{sock}?db=0"
    external = settings(tmp_path, redis={"url": "redis://:pw@r.example:6380/9", "broker_db": 2, "result_db": 3})
    assert redis_server.broker_url(external) == "redis://:pw@r.example:6380/2"
    assert redis_server.result_backend_url(external) == "redis://:pw@r.example:6380/3"


def test_preflight_refuses_a_socket_path_that_is_too_long(tmp_path: Path) -> None:
    long_dir = tmp_path / ("x" * 120)
    s = settings_from_dict({"name": "a", "coordinator": {"data_dir": str(long_dir), "listen": f"127.0.0.1:{free_port()}"},
                            "s3": {"enabled": False}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml: coordinator.data_dir: too long for the Redis unix socket"):
        preflight(s)


def test_gunicorn_settings_come_from_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"name: a\ncoordinator:\n  data_dir: {tmp_path / 'd'}\n  listen: ':8443'\n"
                      "s3:\n  listen: '[::1]:9000'\nweb:\n  workers: 3\n  threads: 5\n  timeout: 2m\n")
    monkeypatch.setenv("TUNNELMESH_CONFIG", str(config))
    monkeypatch.setenv("TUNNELMESH_GUNICORN_ROLE", "s3")
    conf = runpy.run_module("tunnelmesh.gunicorn_conf")
    assert conf["bind"] == ["[::1]:9000"]
    assert (conf["worker_class"], conf["workers"], conf["threads"], conf["timeout"]) == ("gthread", 3, 5, 120)
    assert conf["pidfile"] == str(tmp_path / "d" / "run" / "gunicorn-s3.pid")
    assert conf["control_socket"] == str(tmp_path / "d" / "run" / "gunicorn-s3.ctl")
    monkeypatch.setenv("TUNNELMESH_GUNICORN_ROLE", "web")
    assert runpy.run_module("tunnelmesh.gunicorn_conf")["bind"] == ["0.0.0.0:8443"]


# ---------------------------------------------------------------------------------------------
# A real supervisor with stand-in children (no Redis, gunicorn or Celery): order and orphans
# ---------------------------------------------------------------------------------------------

STAND_IN = """
import signal, sys, time
name, log = sys.argv[1], sys.argv[2]
def term(*_):
    with open(log, "a") as f:
        f.write(name + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
print(name, "up", flush=True)
while True:
    time.sleep(0.05)
"""


def _stand_in_supervisor(tmp_path: Path, out: object) -> Supervisor:
    s = settings(tmp_path, supervisor={"stop_timeout": "5s", "restart_backoff": "0.1s"})
    sup = Supervisor(s, tmp_path / "c.yaml", out=out)  # type: ignore[arg-type]
    log = tmp_path / "stops.log"
    for child in sup.children:
        child.argv = [sys.executable, "-c", STAND_IN, child.name, str(log)]
        child.probe = None
    return sup


def test_stop_order_apps_first_redis_last(tmp_path: Path) -> None:
    out = (tmp_path / "out.log").open("w")
    sup = _stand_in_supervisor(tmp_path, out)
    sup.start()
    try:
        pids = {c.name: c.pid for c in sup.children}
        assert all(psutil.pid_exists(p) for p in pids.values())
        # Stand-ins handle SIGTERM only once they run: wait until each has said so.
        wait_for(lambda: (tmp_path / "out.log").read_text().count(" up\n") == 5, 20, "stand-ins up")
    finally:
        sup.stop()
    stops = (tmp_path / "stops.log").read_text().split()
    assert stops[-1] == "redis" and set(stops) == {"redis", "web", "s3", "worker", "beat"}
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids.values())
    text = (tmp_path / "out.log").read_text()
    assert "web    | web up" in text and "tunnelmesh | stopped" in text


def test_a_dead_child_is_restarted_with_backoff(tmp_path: Path) -> None:
    out = (tmp_path / "out.log").open("w")
    sup = _stand_in_supervisor(tmp_path, out)
    sup.start()
    try:
        beat = next(c for c in sup.children if c.name == "beat")
        old = beat.pid
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (beat.pid == old or not beat.alive()):
            sup._check_children(time.monotonic())
            time.sleep(0.05)
        assert beat.pid != old and beat.alive() and beat.restarts == 1
    finally:
        sup.stop()
    assert f"beat (pid {old}) died unexpectedly with signal SIGKILL; restarting it in 0.1s" in \
        (tmp_path / "out.log").read_text()


def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    """PDEATHSIG: SIGKILL a supervisor process; its (stand-in) children must not survive it."""
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from pathlib import Path
from tests.unit.test_supervisor import _stand_in_supervisor
sup = _stand_in_supervisor(Path({str(tmp_path)!r}), sys.stdout)
sup.start()
print("PIDS", " ".join(str(c.pid) for c in sup.children), flush=True)
sup.run()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = ""
        deadline = time.monotonic() + 30
        while not line.startswith("PIDS") and time.monotonic() < deadline:
            line = proc.stdout.readline()
        children = [psutil.Process(int(p)) for p in line.split()[1:]]
        assert len(children) == 5
        proc.kill()
        proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()


def test_probes_exist_for_children_that_can_be_probed(tmp_path: Path) -> None:
    s = settings(tmp_path)
    assert readiness_probe("beat", s) is None
    for role in ("redis", "web", "s3", "worker"):
        probe = readiness_probe(role, s)
        assert probe is not None and probe() is False  # nothing runs: not ready, and no exception
