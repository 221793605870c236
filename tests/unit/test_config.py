"""The config schema: seed defaults, path resolution, and bad configs rejected through the real CLI
with one exact line naming the file, the key and what is wrong (never a traceback)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port, tunnelmesh_command
from tunnelmesh.cli import main
from tunnelmesh.config import Settings, load_config, parse_duration, parse_size, settings_from_dict
from tunnelmesh.supervisor import DataDirLock


def test_seed_values_are_the_defaults() -> None:
    s = settings_from_dict({"name": "coordinator-a"})
    assert s.coordinator.enabled is False
    assert s.coordinator.listen == ":8443"
    assert s.coordinator.data_dir == "/var/lib/tunnelmesh"
    assert s.coordinator.admin_peers == []
    assert s.replication.concurrency == 5
    assert s.replication.peer_timeout == 60.0
    assert s.replication.max_attempts == 3
    assert s.sync.interval == 300.0
    assert s.rebalance.debounce == 10.0
    assert s.rebalance.max_bytes_per_cycle == 50_000_000
    assert s.redis.appendfsync == "everysec"
    # Process settings added by the supervisor (documented in docs/configuration.md).
    assert (s.supervisor.max_restarts, s.supervisor.restart_window) == (5, 60.0)
    assert (s.supervisor.restart_backoff, s.supervisor.restart_backoff_max) == (1.0, 30.0)
    assert s.supervisor.stop_timeout == 20.0 and s.supervisor.startup_timeout == 60.0
    assert s.worker.pool == "prefork" and s.worker.task_time_limit == 1800.0
    assert (s.redis.broker_db, s.redis.result_db) == (0, 1)


def test_the_seed_example_loads_as_is(tmp_path: Path) -> None:
    config = tmp_path / "coordinator-a.yaml"
    config.write_text(f"""
name: "coordinator-a"

coordinator:
  enabled: true
  listen: ":8443"
  data_dir: "{tmp_path / 'data'}"
  admin_peers:
    - "a1b2c3d4e5f6g7h8"   # coordinator-a's peer ID
    - "b2c3d4e5f6g7h8i9"   # coordinator-b's peer ID
""")
    s = load_config(config)
    assert s.coordinator.enabled and s.coordinator.listen == ":8443"
    assert s.coordinator.admin_peers == ["a1b2c3d4e5f6g7h8", "b2c3d4e5f6g7h8i9"]
    assert s.data_dir.is_dir()


def test_relative_data_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "examples").mkdir()
    config = tmp_path / "examples" / "c.yaml"
    config.write_text("name: c\ncoordinator:\n  data_dir: ../var/c\n")
    assert load_config(config).data_dir == (tmp_path / "var" / "c").resolve()


def test_the_example_configs_are_valid(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    for name in ("coordinator-a", "coordinator-b"):
        s = load_config(repo / "examples" / f"{name}.yaml", check_data_dir=False)
        assert s.name == name and s.coordinator.enabled
        assert s.data_dir == (repo / "var" / name).resolve()


@pytest.mark.parametrize(("text", "seconds"), [("10s", 10), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25), (2.5, 2.5)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("50MB", 50_000_000), ("4MiB", 4 * 1024**2), (1024, 1024), ("1k", 1000)])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


# ---------------------------------------------------------------------------------------------
# Bad configs through the CLI
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        yield listener.getsockname()[1]


# (case id, config text with {data} = a fresh data dir / {busy} = a port in use / {free} = a free
#  port, the exact message after "error: <file>: ").
BAD_CONFIGS = [
    ("unknown key", "name: a\ncoordinator:\n  data_dir: {data}\n  bogus: 1\n",
     "coordinator.bogus: unknown key"),
    ("unknown section", "name: a\nmesh: {{}}\n", "mesh: unknown key"),
    ("wrong type", "name: a\nweb:\n  workers: many\n",
     "web.workers: Input should be a valid integer, unable to parse string as an integer (got 'many')"),
    ("wrong type (bool)", "name: a\ncoordinator:\n  enabled: maybe\n",
     "coordinator.enabled: Input should be a valid boolean, unable to interpret input (got 'maybe')"),
    ("bad duration", "name: a\ncoordinator:\n  heartbeat_interval: 10 parsecs\n",
     "coordinator.heartbeat_interval: expected a duration such as 10s, 5m or 1h, got '10 parsecs'"),
    ("bad size", "name: a\nrebalance:\n  max_bytes_per_cycle: 50 MBs\n",
     "rebalance.max_bytes_per_cycle: expected a size such as 50MB or 4MiB, got '50 MBs'"),
    ("invalid YAML", "name: a\ncoordinator:\n  listen: [\n",
     "invalid YAML at line 4, column 1: expected the node content, but found '<stream end>'"),
    ("not a mapping", "- a\n- b\n", "the file must contain a YAML mapping (key: value lines)"),
    ("bad listen", "name: a\ncoordinator:\n  listen: localhost\n",
     "coordinator.listen: expected host:port or :port, got 'localhost'"),
    ("bad port", "name: a\ncoordinator:\n  listen: ':70000'\n",
     "coordinator.listen: port must be a number from 1 to 65535, got '70000'"),
    ("bad name", "name: Coordinator A\n",
     "name: must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"),
    ("missing name", "coordinator:\n  enabled: true\n", "name: required key is missing"),
    ("bad admin_peers", "name: a\ncoordinator:\n  admin_peers: peer\n",
     "coordinator.admin_peers: expected a list of peer IDs or name globs"),
    ("bad appendfsync", "name: a\nredis:\n  appendfsync: sometimes\n",
     "redis.appendfsync: expected one of always, everysec, no"),
    ("bad redis url", "name: a\nredis:\n  url: http://x\n",
     "redis.url: expected a redis://, rediss:// or unix:// URL, got 'http://x'"),
    ("bad pool", "name: a\nworker:\n  pool: gevent\n", "worker.pool: expected one of prefork, threads, solo"),
    ("same port twice", "name: a\ncoordinator:\n  listen: ':{free}'\ns3:\n  listen: '127.0.0.1:{free}'\n",
     "s3.listen: must use a different port than coordinator.listen"),
    ("unwritable data dir", "name: a\ncoordinator:\n  data_dir: {file}/data\n",
     "coordinator.data_dir: '{file}/data' is not a writable directory (Not a directory)"),
    ("coordinator port in use", "name: a\ncoordinator:\n  listen: 127.0.0.1:{busy}\n  data_dir: {data}\n",
     "coordinator.listen: 127.0.0.1:{busy} is already in use by another process"),
    ("s3 port in use",
     "name: a\ncoordinator:\n  listen: 127.0.0.1:{free}\n  data_dir: {data}\ns3:\n  listen: 127.0.0.1:{busy}\n",
     "s3.listen: 127.0.0.1:{busy} is already in use by another process"),
    ("listen address not on this machine",
     "name: a\ncoordinator:\n  listen: 192.0.2.1:{free}\n  data_dir: {data}\n",
     "coordinator.listen: cannot listen on 192.0.2.1:{free}: not an address of this machine"),
    ("flower port in use",
     "name: a\ncoordinator:\n  listen: 127.0.0.1:{free}\n  data_dir: {data}\ns3:\n  enabled: false\n"
     "worker:\n  flower: true\n  flower_listen: 127.0.0.1:{busy}\n",
     "worker.flower_listen: 127.0.0.1:{busy} is already in use by another process"),
]


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


@pytest.mark.parametrize(("case", "text", "expected"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_clear_line(case: str, text: str, expected: str, tmp_path: Path, busy_port: int,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    values = {"data": tmp_path / "data", "busy": busy_port, "free": free_port(), "file": blocker}
    config = tmp_path / "bad.yaml"
    config.write_text(text.format(**values))
    code, out, err = _run_main(["join", "--config", str(config)], capsys)
    assert code == 2
    assert err == f"error: {config}: {expected.format(**values)}\n"
    assert out == ""


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"
    for command in (["join"], ["id"], ["credentials"]):
        code, _, err = _run_main([*command, "--config", str(missing)], capsys)
        assert (code, err) == (2, f"error: {missing}: file not found\n")


def test_data_dir_used_by_a_running_coordinator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"name: a\ncoordinator:\n  listen: 127.0.0.1:{free_port()}\n  data_dir: {tmp_path / 'd'}\n")
    lock = DataDirLock(load_config(config))  # as a running supervisor holds it
    try:
        code, _, err = _run_main(["join", "--config", str(config)], capsys)
    finally:
        lock.release()
    assert code == 2
    assert err.startswith(f"error: {config}: coordinator.data_dir: '{tmp_path / 'd'}' is in use by a running coordinator (pid ")


def test_bad_config_through_the_console_script(tmp_path: Path) -> None:
    """The same path as an operator: a subprocess, exit code 2, one line, no traceback."""
    config = tmp_path / "c.yaml"
    config.write_text("name: a\ncoordinator:\n  bogus: 1\n")
    result = subprocess.run([*tunnelmesh_command(), "join", "--config", str(config)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == f"error: {config}: coordinator.bogus: unknown key\n"
    assert result.stdout == ""


def test_settings_object_is_frozen() -> None:
    s: Settings = settings_from_dict({"name": "a"})
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError
        s.name = "b"  # type: ignore[misc]


def _keys(model: type, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    keys = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_every_setting_is_documented() -> None:
    """docs/configuration.md names every key of the schema (in a table row of its section)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    missing = []
    for key in _keys(Settings):
        section, _, rest = key.partition(".")
        row_key = rest if rest else section  # rows name the key within its section: `tls.cert`
        if f"| `{row_key}` |" not in text:
            missing.append(key)
    assert not missing, f"undocumented settings: {missing}"
