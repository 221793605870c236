"""Real coordinators for tests: ``tunnelmesh join`` as a subprocess, with everything it starts.

``Coordinator`` writes a YAML config (free loopback ports, short intervals, data under its own
directory) and runs ``tunnelmesh join`` in a session of its own, its output appended to
``output.log``. It can wait until the coordinator is ready, stop it with SIGTERM, SIGKILL it (or
only one child), restart it, and find every process it left (by the process tree recorded when it
was ready, and by the ``TUNNELMESH_CONFIG`` every child carries in its environment).

``cluster(root, n)`` starts ``n`` coordinators, the first bootstrapping the mesh and the others
joining it with the token parsed from the first one's output.

Always clean up with ``cleanup()`` (the fixtures in tests/integration/conftest.py do), which
SIGKILLs whatever is left even when a test failed half way.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml

from bench._server import free_port
from tunnelmesh.identity import S3Credentials, load_or_create_identity, read_token, s3_credentials

JOIN_COMMAND = re.compile(r"tunnelmesh join (\S+) --token (\S+) --config \S+")
NAMES = [f"coordinator-{c}" for c in "abcdefghij"]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def tunnelmesh_command() -> list[str]:
    """The installed console script when there is one, else ``python -m tunnelmesh.cli``."""
    script = Path(sys.executable).parent / "tunnelmesh"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tunnelmesh.cli"]


def processes_with_config(config_path: Path) -> list[psutil.Process]:
    """Every live process whose environment has ``TUNNELMESH_CONFIG`` = ``config_path``."""
    wanted = str(config_path)
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("TUNNELMESH_CONFIG") == wanted and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


class Coordinator:
    """One coordinator under test. ``root`` should be short (unix socket paths are limited)."""

    def __init__(self, root: Path, name: str = "coordinator-a", *, settings: dict[str, Any] | None = None) -> None:
        self.name = name
        self.dir = Path(root) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = (self.dir / "config.yaml").resolve()
        self.data_dir = (self.dir / "data").resolve()
        self.log_path = self.dir / "output.log"
        self.api_port = free_port()
        self.s3_port = free_port()
        self.overrides = settings or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.tree: list[psutil.Process] = []  # supervisor + descendants, recorded when ready
        self.write_config()

    # -- config ---------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        base = {
            "name": self.name,
            "coordinator": {
                "enabled": True, "listen": f"127.0.0.1:{self.api_port}", "data_dir": str(self.data_dir),
                "admin_peers": ["coordinator-*"], "heartbeat_interval": "1s",
            },
            "s3": {"listen": f"127.0.0.1:{self.s3_port}"},
            "storage": {"min_free_space": 0},
            "sync": {"interval": "30s"},
            "rebalance": {"debounce": "1s"},
            "web": {"workers": 1, "threads": 4, "timeout": "30s", "graceful_timeout": "5s"},
            "worker": {"concurrency": 1, "task_time_limit": "60s"},
            "supervisor": {"startup_timeout": "60s", "stop_timeout": "10s", "restart_backoff": "0.2s",
                           "restart_backoff_max": "2s"},
        }
        return deep_merge(base, self.overrides)

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))

    @property
    def scheme(self) -> str:
        """https when the config names a TLS certificate (then both listeners serve HTTPS)."""
        return "https" if self.config()["coordinator"].get("tls", {}).get("cert") else "http"

    @property
    def tls_ca(self) -> str | bool:
        """What requests should verify this coordinator's certificate with."""
        return self.config()["coordinator"].get("tls", {}).get("ca") or True

    @property
    def api_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.api_port}"

    @property
    def s3_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.s3_port}"

    @property
    def address(self) -> str:
        """HOST:PORT another coordinator joins through."""
        return f"127.0.0.1:{self.api_port}"

    # -- identity -------------------------------------------------------------------------

    @property
    def token(self) -> str | None:
        return read_token(self.data_dir)

    @property
    def peer_id(self) -> str:
        """This node's peer ID (its identity is created on first use, as ``tunnelmesh id`` does)."""
        return load_or_create_identity(self.data_dir).peer_id

    def credentials(self) -> S3Credentials:
        token = self.token
        assert token, f"{self.name} has no mesh token yet"
        return s3_credentials(token, self.peer_id)

    def member_ids(self) -> list[str]:
        """Peer IDs of the active coordinators this one knows (empty while its registry is busy)."""
        from tunnelmesh import node

        try:
            return sorted(m.peer_id for m in node.coordinator_members(self.settings()))
        except Exception:  # noqa: BLE001 - the registry may be mid-write
            return []

    def s3_client(self, endpoint: Coordinator | None = None, **config: Any) -> Any:
        """boto3 S3 client with this node's credentials (path style), against this coordinator's
        S3 API or ``endpoint``'s (one mesh: every coordinator verifies every node's signature)."""
        import boto3
        from botocore.config import Config

        creds = self.credentials()
        return boto3.client(
            "s3", endpoint_url=(endpoint or self).s3_url, region_name="us-east-1", aws_access_key_id=creds.access_key,
            aws_secret_access_key=creds.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **config))

    # -- running --------------------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("TUNNELMESH_TOKEN", None)
        # Marks the supervisor too, so leftover detection by environment covers every process.
        env["TUNNELMESH_CONFIG"] = str(self.config_path)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def run_cli(self, *args: str, timeout: float = 60, env: dict[str, str] | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        """A one-shot ``tunnelmesh ARGS --config <this config>`` (not ``join``: that one runs on)."""
        result = subprocess.run([*tunnelmesh_command(), *args, "--config", str(self.config_path)],
                                capture_output=True, text=True, timeout=timeout, env=self.env(env))
        if check and result.returncode != 0:
            raise AssertionError(f"tunnelmesh {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def start(self, join: Coordinator | str | None = None, token: str | None = None, *, wait: bool = True,
              timeout: float = 90, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        """Run ``tunnelmesh join [ADDRESS] [--token T] --config <config>`` in the background."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is already running"
        self._start_args = {"join": join, "token": token, "extra_args": extra_args, "env": env}
        argv = [*tunnelmesh_command(), "join"]
        if join is not None:
            argv.append(join.address if isinstance(join, Coordinator) else join)
        if token is not None:
            argv += ["--token", token]
        argv += [*extra_args, "--config", str(self.config_path)]
        self._log_mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {' '.join(argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env(env), start_new_session=True)
        if wait:
            self.wait_ready(timeout)

    def join_cli(self, join: Coordinator | str | None, token: str | None = None,
                 timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``tunnelmesh join`` expected to fail quickly: returns its result (it must not keep running)."""
        argv = [*tunnelmesh_command(), "join"]
        if join is not None:
            argv.append(join.address if isinstance(join, Coordinator) else join)
        if token is not None:
            argv += ["--token", token]
        argv += ["--config", str(self.config_path)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env(),
                              start_new_session=True)

    def health(self, timeout: float = 2.0) -> dict[str, Any] | None:
        try:
            resp = requests.get(f"{self.api_url}/health", timeout=timeout, verify=self.tls_ca)
        except requests.RequestException:
            return None
        return resp.json() if resp.status_code == 200 else None

    def wait_ready(self, timeout: float = 90) -> None:
        """Until /health answers and the supervisor reports every child running."""
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} while starting:\n"
                                     f"{self.output()[-4000:]}")
            health = self.health()
            return bool(health and health.get("processes")
                        and all(state == "running" for state in health["processes"].values())
                        and "is ready in" in self.output(since_start=True))

        try:
            wait_for(ready, timeout, f"{self.name} to be ready", interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- output of {self.name} ---\n{self.output()[-4000:]}") from None
        self.tree = self.process_tree()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def state(self) -> dict[str, Any]:
        """The supervisor's state file (children pids and states)."""
        return json.loads((self.data_dir / "run" / "supervisor.json").read_text())

    def pids(self) -> dict[str, int]:
        """name -> pid of the supervisor's children that are alive (redis, web, s3, worker, beat)."""
        return {name: info["pid"] for name, info in self.state()["children"].items() if info.get("pid")}

    def process_tree(self) -> list[psutil.Process]:
        """The supervisor and all its descendants right now."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except (psutil.NoSuchProcess, AttributeError):
            return []

    def output(self, since_start: bool = False) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        if since_start:
            data = data[getattr(self, "_log_mark", 0):]
        return data.decode("utf-8", errors="replace")

    def printed_join_command(self) -> tuple[str, str]:
        """(address, token) of the ``tunnelmesh join`` command the bootstrap printed."""
        match = JOIN_COMMAND.search(self.output())
        assert match, f"no join command in the output of {self.name}:\n{self.output()[-3000:]}"
        return match.group(1), match.group(2)

    # -- stopping -------------------------------------------------------------------------

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this coordinator still alive: from the recorded tree or by environment."""
        alive = {p.pid: p for p in self.tree if _alive(p)}
        for proc in processes_with_config(self.config_path):
            alive.setdefault(proc.pid, proc)
        return list(alive.values())

    def assert_no_leftovers(self, timeout: float = 15) -> None:
        try:
            wait_for(lambda: not self.leftovers(), timeout, f"every process of {self.name} to exit", interval=0.2)
        except AssertionError:
            described = [f"{p.pid} {_cmdline(p)}" for p in self.leftovers()]
            raise AssertionError(f"processes of {self.name} left behind: {described}") from None

    def stop(self, timeout: float = 40) -> int:
        """SIGTERM the supervisor, wait for it, check nothing is left; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_everything()
            raise AssertionError(f"{self.name} did not stop within {timeout:g}s after SIGTERM") from None
        self.assert_no_leftovers()
        return code

    def kill(self, timeout: float = 15) -> None:
        """SIGKILL the supervisor only; its children must die with it (PDEATHSIG)."""
        assert self.proc is not None
        tree = self.tree or self.process_tree()
        self.proc.kill()
        self.proc.wait(timeout)
        wait_for(lambda: not [p for p in tree if _alive(p)], timeout,
                 f"the children of {self.name} to die with their supervisor", interval=0.1)

    def kill_child(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to one child (redis, web, s3, worker, beat); returns its pid."""
        pid = self.pids()[name]
        os.kill(pid, sig)
        return pid

    def restart(self, **start_args: Any) -> None:
        """Stop (SIGTERM) if running, then start again with the previous arguments unless given."""
        if self.running():
            self.stop()
        self.start(**{**getattr(self, "_start_args", {}), **start_args})

    def kill_everything(self) -> None:
        """SIGKILL every process of this coordinator (cleanup; never fails)."""
        victims = {p.pid: p for p in self.process_tree()}
        for proc in self.leftovers():
            victims.setdefault(proc.pid, proc)
        for proc in victims.values():
            with contextlib.suppress(psutil.Error, OSError):
                proc.send_signal(signal.SIGCONT)  # a stopped process dies on SIGKILL anyway; be explicit
                proc.kill()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        psutil.wait_procs(list(victims.values()), timeout=10)

    def cleanup(self) -> None:
        """Stop gracefully if running; kill whatever is left no matter what."""
        try:
            if self.running():
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(20)
        except (subprocess.TimeoutExpired, OSError):
            pass
        finally:
            self.kill_everything()

    def register_peer(self, name: str, *, public_key: str | None = None, token: str | None = None,
                      **fields: Any) -> requests.Response:
        """POST /api/v1/register for a node called ``name`` (a fresh key unless given)."""
        if public_key is None:
            public_key = base64.b64encode(os.urandom(32)).decode()
        body = {"name": name, "public_key": public_key, **fields}
        return requests.post(f"{self.api_url}/api/v1/register", json=body, timeout=10, verify=self.tls_ca,
                             headers={"Authorization": f"Bearer {token or self.token}"})

    # -- Redis and Celery of this coordinator ---------------------------------------------

    def settings(self) -> Any:
        from tunnelmesh.config import load_config

        return load_config(self.config_path, check_data_dir=False)

    def redis(self) -> Any:
        from tunnelmesh import redis_server

        return redis_server.client(self.settings(), timeout=5.0)

    def celery(self) -> Any:
        from tasks.app import make_celery

        return make_celery(self.settings())

    def send_ping(self, marker: str | None = None) -> str:
        """Enqueue ``tasks.health.ping`` through this coordinator's Redis; returns the marker."""
        marker = marker or uuid.uuid4().hex
        app = self.celery()
        try:
            app.send_task("tasks.health.ping", args=[marker])
        finally:
            app.close()
        return marker

    def ping_record(self, marker: str) -> dict[str, Any] | None:
        from tasks.health import read_ping

        conn = self.redis()
        try:
            return read_ping(conn, marker)
        finally:
            conn.close()

    def wait_ping(self, marker: str, timeout: float = 30) -> dict[str, Any]:
        """Wait until the worker executed the ping with ``marker``; returns what it recorded."""
        return wait_for(lambda: self._safe_ping_record(marker), timeout, f"ping {marker} on {self.name}", 0.2)

    def _safe_ping_record(self, marker: str) -> dict[str, Any] | None:
        try:
            return self.ping_record(marker)
        except Exception:  # noqa: BLE001 - Redis may be restarting
            return None


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:160]
    except psutil.Error:
        return "?"


@contextlib.contextmanager
def cluster(root: Path, n: int, *, settings: dict[str, Any] | None = None,
            timeout: float = 120) -> Iterator[list[Coordinator]]:
    """``n`` running coordinators: the first bootstraps, the others join it with its printed token.

    Everything is stopped (and, failing that, killed) when the block exits.
    """
    coordinators = [Coordinator(root, NAMES[i], settings=settings) for i in range(n)]
    try:
        first = coordinators[0]
        first.start(timeout=timeout)
        _, token = first.printed_join_command()
        for other in coordinators[1:]:
            other.start(join=first, token=token, timeout=timeout)
        yield coordinators
        for coordinator in reversed(coordinators):
            if coordinator.running():
                coordinator.stop()
    finally:
        for coordinator in coordinators:
            coordinator.cleanup()


def wait_converged(coordinators: list[Coordinator], timeout: float = 60) -> None:
    """Until every coordinator lists exactly these coordinators as members (membership spreads by
    heartbeats, so a node that joined through the first learns of the others a moment later)."""
    ids = sorted(c.peer_id for c in coordinators)
    for c in coordinators:
        wait_for(lambda c=c: c.member_ids() == ids, timeout, f"{c.name} to know every coordinator", 0.3)


def short_tmp_dir(prefix: str = "tm-") -> Path:
    """A short directory under /tmp (pytest's tmp paths can exceed the unix socket path limit)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
