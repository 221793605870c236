"""The process supervisor behind ``tunnelmesh join``: starts, watches and stops one coordinator's stack.

Children (each gets ``TUNNELMESH_CONFIG``; argv from :func:`role_argv`, shared with ``tunnelmesh run``):

==========  =====================================================================  =============
name        command                                                                ready when
==========  =====================================================================  =============
``redis``   bundled ``redis-server data_dir/redis/redis.conf`` (not with redis.url) PING answers
``web``     ``gunicorn web.coordination:create_app()`` on ``coordinator.listen``    GET /health 200
``s3``      ``gunicorn web.s3:create_app()`` on ``s3.listen`` (if s3.enabled)       any HTTP answer
``worker``  ``celery -A tasks.app worker`` (queues replication, manifest,          alive key set in
            rebalance, default)                                                    Redis
``beat``    ``celery -A tasks.app beat`` (schedule in data_dir/run)                 running
``flower``  ``celery -A tasks.app flower`` (only if worker.flower)                 GET /healthcheck
==========  =====================================================================  =============

Start: Redis first (polled until it answers PING), then all the others at once; the start
succeeds when every probe passes within ``supervisor.startup_timeout``. A child that exits during
the start fails the start (no restarts: a crash at start is almost always a configuration or
installation problem, best shown at once). No fixed sleeps: readiness is polled.

Child death policy (after the start): the death is logged with the child's name, pid and exit
status; then the child is restarted after ``supervisor.restart_backoff`` seconds, doubling per
crash of that child up to ``supervisor.restart_backoff_max``. When one child crashes more than
``supervisor.max_restarts`` times within ``supervisor.restart_window`` seconds, the supervisor
gives up: it stops every child and exits with code 1 (a process manager such as systemd or
Docker then decides what to do). Celery and gunicorn reconnect to a restarted Redis by themselves.

Stop (SIGTERM, SIGINT or SIGHUP to the supervisor; or giving up): flower, beat, worker, s3 and web
receive SIGTERM together (warm shutdown: the worker finishes or requeues its tasks, gunicorn
finishes requests); after ``supervisor.stop_timeout`` their process groups get SIGKILL. Redis is
stopped last, the same way, so the others can still talk to it while they shut down (and it fsyncs
its append-only file on SIGTERM). A second signal during the stop kills everything at once.

No orphans: every child runs in its own process group (so a terminal's Ctrl-C reaches only the
supervisor, which then stops the children in order) and has ``PR_SET_PDEATHSIG`` = SIGKILL, so
it dies with the supervisor even when the supervisor is SIGKILLed. Grandchildren (gunicorn
workers, Celery pool processes) set the same signal towards their own parent (gunicorn
``post_fork``, Celery ``worker_process_init``). Children are only ever spawned from the main
thread: the kernel sends the parent-death signal when the *thread* that forked the child exits.

Output: every line a child prints goes to the supervisor's stdout prefixed with the child's name
(``web    | ...``); the supervisor's own lines are prefixed ``tunnelmesh |``. Under honcho or
systemd that is the one log stream of the coordinator.

Files (all under the data directory, so two coordinators on one machine never collide):
``run/supervisor.lock`` (flock: one supervisor per data directory), ``run/supervisor.json`` (pids
and states of the children, read by /health and by tests), ``run/*.pid``,
``run/celerybeat-schedule``, ``run/gunicorn-*.ctl``, ``redis/``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tunnelmesh import redis_server
from tunnelmesh.config import CONFIG_ENV, ConfigError, Settings, split_listen

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

# Stop order: lower phases first. Redis is last so the others can shut down cleanly against it.
APP_PHASE, REDIS_PHASE = 0, 1
QUEUES = "membership,replication,manifest,rebalance,default"
GUNICORN_ROLE_ENV = "TUNNELMESH_GUNICORN_ROLE"
POLL_INTERVAL = 0.1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent (thread) dies (Linux only)."""
    if _libc is None:
        return
    if _libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def run_dir(settings: Settings) -> Path:
    return settings.data_dir / "run"


def state_path(settings: Settings) -> Path:
    return run_dir(settings) / "supervisor.json"


def read_state(settings: Settings) -> dict[str, Any] | None:
    """The supervisor's last written state (pids and states of the children), or None."""
    try:
        return json.loads(state_path(settings).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Pre-start checks: one supervisor per data directory, free ports, short enough socket paths
# ---------------------------------------------------------------------------------------------


class DataDirLock:
    """An exclusive flock on ``run/supervisor.lock`` held for the supervisor's lifetime."""

    def __init__(self, settings: Settings) -> None:
        run_dir(settings).mkdir(parents=True, exist_ok=True)
        self.path = run_dir(settings) / "supervisor.lock"
        # O_CLOEXEC: children must not inherit the lock (it would outlive a killed supervisor).
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise ConfigError(settings.source, "coordinator.data_dir",
                              f"{str(settings.data_dir)!r} is in use by a running coordinator (pid {holder})") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def listeners(settings: Settings) -> list[tuple[str, str]]:
    """(config key, listen address) of every TCP listener this coordinator opens."""
    result = [("coordinator.listen", settings.coordinator.listen)]
    if settings.s3.enabled:
        result.append(("s3.listen", settings.s3.listen))
    if settings.worker.flower:
        result.append(("worker.flower_listen", settings.worker.flower_listen))
    return result


def check_port_free(source: str, key: str, listen: str) -> None:
    """Bind ``listen`` briefly; raise ConfigError naming the file and key if that fails."""
    host, port = split_listen(listen)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(source, key, f"cannot listen on {listen}: unknown host {host!r} ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # Same option gunicorn uses, so a port in TIME_WAIT is not mistaken for a busy one.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
            probe.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                problem = f"{host}:{port} is already in use by another process"
            elif exc.errno == errno.EADDRNOTAVAIL:
                problem = f"cannot listen on {host}:{port}: not an address of this machine"
            elif exc.errno == errno.EACCES:
                problem = f"cannot listen on {host}:{port}: permission denied (ports below 1024 need privileges)"
            else:
                problem = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            raise ConfigError(source, key, problem) from None


def preflight(settings: Settings) -> None:
    """Everything that can be checked before starting a process; raises ConfigError."""
    for key, listen in listeners(settings):
        check_port_free(settings.source, key, listen)
    if redis_server.uses_bundled_redis(settings):
        sock = str(redis_server.socket_path(settings))
        if len(sock.encode()) > redis_server.MAX_UNIX_SOCKET_PATH:
            raise ConfigError(settings.source, "coordinator.data_dir",
                              f"too long for the Redis unix socket ({sock!r} exceeds "
                              f"{redis_server.MAX_UNIX_SOCKET_PATH} bytes); use a shorter path or set redis.url")
        try:
            redis_server.redis_binary()
        except FileNotFoundError as exc:
            raise ConfigError(settings.source, "redis.url", f"empty, but the bundled Redis cannot be used: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Children: commands, environment, readiness probes
# ---------------------------------------------------------------------------------------------


def gunicorn_bind(listen: str) -> str:
    host, port = split_listen(listen)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def role_argv(role: str, settings: Settings) -> list[str]:
    """The command line of one child (``tunnelmesh run ROLE`` execs the same)."""
    python = sys.executable
    run = run_dir(settings)
    level = settings.log_level
    if role == "redis":
        return redis_server.server_argv(settings)
    if role in ("web", "s3"):
        app = "web.coordination:create_app()" if role == "web" else "web.s3:create_app()"
        return [python, "-m", "gunicorn", "-c", "python:tunnelmesh.gunicorn_conf", app]
    if role == "worker":
        return [python, "-m", "celery", "-A", "tasks.app", "worker",
                "--hostname", f"{settings.name}@%h", "--queues", QUEUES,
                "--concurrency", str(settings.worker.concurrency), "--pool", settings.worker.pool,
                "--loglevel", level, "--pidfile", str(run / "worker.pid"),
                # One worker per broker: mingle and gossip would only add start-up delay and chatter.
                "--without-mingle", "--without-gossip"]
    if role == "beat":
        return [python, "-m", "celery", "-A", "tasks.app", "beat", "--loglevel", level,
                "--schedule", str(run / "celerybeat-schedule"), "--pidfile", str(run / "beat.pid")]
    if role == "flower":
        host, port = split_listen(settings.worker.flower_listen)
        return [python, "-m", "celery", "-A", "tasks.app", "flower", f"--address={host}", f"--port={port}"]
    raise ValueError(f"unknown role {role!r}")


def child_env(settings: Settings, config_path: Path, role: str) -> dict[str, str]:
    env = dict(os.environ)
    env[CONFIG_ENV] = str(config_path)
    # Children run in data_dir/run: make this project importable there even when it is used from
    # a source tree rather than installed.
    project_root = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if project_root not in paths:
        env["PYTHONPATH"] = os.pathsep.join([project_root, *paths])
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the log as they are written
    env.pop("TUNNELMESH_TOKEN", None)  # children read the token from the data directory
    env.pop(GUNICORN_ROLE_ENV, None)
    if role in ("web", "s3"):
        env[GUNICORN_ROLE_ENV] = role
    return env


def pidfiles(settings: Settings, role: str) -> list[Path]:
    run = run_dir(settings)
    return {
        "redis": [run / "redis.pid"], "web": [run / "gunicorn-web.pid"], "s3": [run / "gunicorn-s3.pid"],
        "worker": [run / "worker.pid"], "beat": [run / "beat.pid"],
    }.get(role, [])


def _http_answers(url: str, *, require_ok: bool, timeout: float = 1.0) -> bool:
    import ssl

    context = ssl._create_unverified_context() if url.startswith("https") else None  # loopback probe only
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.status == 200 or not require_ok
    except urllib.error.HTTPError:
        return not require_ok  # an HTTP error status still proves a worker answered
    except (OSError, ValueError):
        return False


def _worker_alive(settings: Settings) -> bool:
    try:
        conn = redis_server.client(settings, timeout=1.0)
        try:
            return bool(conn.exists(redis_server.WORKER_ALIVE_KEY))
        finally:
            conn.close()
    except Exception:  # noqa: BLE001 - not reachable means not ready yet
        return False


def readiness_probe(role: str, settings: Settings) -> Callable[[], bool] | None:
    from tunnelmesh.node import local_url

    tls = bool(settings.coordinator.tls.cert)
    if role == "redis":
        return lambda: redis_server.ping(settings, timeout=0.5)
    if role == "web":
        return lambda: _http_answers(local_url(settings.coordinator.listen, tls=tls) + "/health", require_ok=True)
    if role == "s3":
        return lambda: _http_answers(local_url(settings.s3.listen, tls=tls) + "/", require_ok=False)
    if role == "worker":
        return lambda: _worker_alive(settings)
    if role == "flower":
        return lambda: _http_answers(local_url(settings.worker.flower_listen) + "/healthcheck", require_ok=True)
    return None  # beat: running is all there is to check


def roles(settings: Settings) -> list[str]:
    """This coordinator's children, in start order."""
    result = ["redis"] if redis_server.uses_bundled_redis(settings) else []
    result.append("web")
    if settings.s3.enabled:
        result.append("s3")
    result += ["worker", "beat"]
    if settings.worker.flower:
        result.append("flower")
    return result


# ---------------------------------------------------------------------------------------------
# Restart policy (pure, unit-tested)
# ---------------------------------------------------------------------------------------------


class CrashPolicy:
    """Backoff and give-up decisions for one child.

    ``record_crash(now)`` returns the delay before the restart, or None when the child crashed
    more than ``max_restarts`` times within ``window`` seconds (give up).
    """

    def __init__(self, *, max_restarts: int, window: float, backoff: float, backoff_max: float) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._crashes: deque[float] = deque()

    def record_crash(self, now: float) -> float | None:
        self._crashes.append(now)
        while self._crashes and self._crashes[0] < now - self.window:
            self._crashes.popleft()
        recent = len(self._crashes)
        if recent > self.max_restarts:
            return None
        return min(self.backoff * (2 ** (recent - 1)), self.backoff_max)

    @property
    def recent_crashes(self) -> int:
        return len(self._crashes)


# ---------------------------------------------------------------------------------------------
# The supervisor
# ---------------------------------------------------------------------------------------------


class StartupError(Exception):
    """The stack did not come up; the message names the child and what happened."""


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    phase: int
    probe: Callable[[], bool] | None
    policy: CrashPolicy
    proc: subprocess.Popen[bytes] | None = None
    state: str = "stopped"  # stopped | starting | running | backoff | stopping | exited
    restarts: int = 0
    restart_at: float = 0.0
    started_at: float = 0.0
    reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


class Supervisor:
    """Runs one coordinator's children. Use from the main thread: ``start()``, then ``run()``."""

    def __init__(self, settings: Settings, config_path: Path, *, out: IO[str] | None = None) -> None:
        self.settings = settings
        self.config_path = Path(config_path).resolve()
        self._out = out if out is not None else sys.stdout
        self._out_lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._signals_received = 0
        self._stopped = False
        self.exit_code = 0
        sup = settings.supervisor
        self.children = [
            Child(name=role, argv=role_argv(role, settings), env=child_env(settings, self.config_path, role),
                  phase=REDIS_PHASE if role == "redis" else APP_PHASE,
                  probe=readiness_probe(role, settings),
                  policy=CrashPolicy(max_restarts=sup.max_restarts, window=sup.restart_window,
                                     backoff=sup.restart_backoff, backoff_max=sup.restart_backoff_max))
            for role in roles(settings)
        ]

    # -- output -------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        self._emit("tunnelmesh", message)

    def _emit(self, prefix: str, line: str) -> None:
        with self._out_lock:
            try:
                self._out.write(f"{prefix:<6} | {line}\n")
                self._out.flush()
            except (OSError, ValueError):
                pass  # stdout gone (e.g. honcho exited): keep supervising regardless

    def _pump(self, child: Child, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self._emit(child.name, raw.decode("utf-8", errors="replace").rstrip("\n"))
        stream.close()

    # -- signals ------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals_received += 1
        if self._signals_received == 1:
            self._stop_requested.set()
        else:  # a second signal: no more waiting
            self._kill_all()

    def request_stop(self) -> None:
        self._stop_requested.set()

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    # -- spawning -----------------------------------------------------------------------------

    def _prepare(self, child: Child) -> None:
        # The lock guarantees no other supervisor owns this data directory, so any pid file left
        # here is stale (a SIGKILLed run); gunicorn and celery refuse to start if its pid is alive.
        for path in pidfiles(self.settings, child.name):
            path.unlink(missing_ok=True)
        if child.name == "redis":
            redis_server.write_config(self.settings)
        if child.name == "worker":
            self._clear_worker_alive()  # a mark left by a killed worker must not count as ready

    def _clear_worker_alive(self) -> None:
        try:
            conn = redis_server.client(self.settings, timeout=1.0)
            conn.delete(redis_server.WORKER_ALIVE_KEY)
            conn.close()
        except Exception:  # noqa: BLE001 - Redis not up: nothing stale to clear either
            pass

    def _spawn(self, child: Child) -> None:
        assert threading.current_thread() is threading.main_thread(), "PDEATHSIG is tied to the spawning thread"
        self._prepare(child)
        parent = os.getpid()

        def preexec() -> None:  # runs in the child between fork and exec
            set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != parent:  # the supervisor died before prctl took effect
                os._exit(1)

        child.proc = subprocess.Popen(
            child.argv, env=child.env, cwd=run_dir(self.settings), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=0, preexec_fn=preexec,
            close_fds=True)
        child.state = "starting"
        child.started_at = time.time()
        child.reader = threading.Thread(target=self._pump, args=(child, child.proc.stdout),
                                        name=f"output-{child.name}", daemon=True)
        child.reader.start()
        self.log(f"started {child.name} (pid {child.proc.pid})")
        self._write_state()

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(), "name": self.settings.name, "config": str(self.config_path),
            "stopping": self.stopping,
            "children": {c.name: {"pid": c.pid if c.alive() else None, "state": c.state,
                                  "restarts": c.restarts, "started_at": c.started_at} for c in self.children},
        }
        path = state_path(self.settings)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # the state file is informational

    # -- start --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every child and wait until each is ready; raise StartupError otherwise."""
        run_dir(self.settings).mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.settings.supervisor.startup_timeout
        first = [c for c in self.children if c.phase == REDIS_PHASE]
        rest = [c for c in self.children if c.phase != REDIS_PHASE]
        for group in (first, rest):
            for child in group:
                self._spawn(child)
            self._wait_ready(group, deadline)
        self._write_state()

    def _wait_ready(self, group: list[Child], deadline: float) -> None:
        pending = list(group)
        while pending:
            if self.stopping:
                raise StartupError("interrupted while starting")
            for child in list(pending):
                if not child.alive():
                    raise StartupError(f"{child.name} exited during startup with "
                                       f"{describe_exit(child.proc.returncode)} (see its output above)")
                if child.probe is None or child.probe():
                    child.state = "running"
                    pending.remove(child)
                    self.log(f"{child.name} is ready")
            if pending and time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise StartupError(f"{names} not ready within {self.settings.supervisor.startup_timeout:g}s "
                                   "(supervisor.startup_timeout; see the output above)")
            if pending:
                self._stop_requested.wait(POLL_INTERVAL)

    # -- supervise ----------------------------------------------------------------------------

    def run(self) -> int:
        """Watch the children until a stop is requested or the restart policy gives up."""
        try:
            while not self.stopping:
                self._stop_requested.wait(0.2)
                if not self.stopping:
                    self._check_children(time.monotonic())
        finally:
            self.stop()
        return self.exit_code

    def _check_children(self, now: float) -> None:
        for child in self.children:
            if child.state == "running" and not child.alive():
                rc = child.proc.returncode
                self._kill_group(child, signal.SIGKILL)  # grandchildren it may have left
                delay = child.policy.record_crash(now)
                if delay is None:
                    child.state = "exited"
                    self.log(f"{child.name} (pid {child.pid}) died with {describe_exit(rc)}; it crashed "
                             f"{child.policy.recent_crashes} times within {self.settings.supervisor.restart_window:g}s: "
                             "giving up, stopping the coordinator")
                    self.exit_code = 1
                    self._stop_requested.set()
                    return
                child.state = "backoff"
                child.restart_at = now + delay
                self.log(f"{child.name} (pid {child.pid}) died unexpectedly with {describe_exit(rc)}; "
                         f"restarting it in {delay:g}s")
                self._write_state()
            elif child.state == "backoff" and now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)
                child.state = "running"  # liveness is watched from here on; readiness is its own business
                self._write_state()

    # -- stop ---------------------------------------------------------------------------------

    def _kill_group(self, child: Child, sig: int) -> None:
        if child.proc is None:
            return
        try:
            os.killpg(child.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_all(self) -> None:
        for child in self.children:
            self._kill_group(child, signal.SIGKILL)

    def stop(self) -> None:
        """Stop every child in order (apps, then Redis); bounded waits, then SIGKILL."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_requested.set()
        self.log("stopping")
        timeout = self.settings.supervisor.stop_timeout
        for phase in (APP_PHASE, REDIS_PHASE):
            group = [c for c in self.children if c.phase == phase and c.proc is not None]
            for child in group:
                if child.alive():
                    child.state = "stopping"
                    try:
                        child.proc.send_signal(signal.SIGTERM)  # the child's main process: a warm shutdown
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + timeout
            for child in group:
                try:
                    child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.log(f"{child.name} (pid {child.pid}) did not stop within {timeout:g}s: killing it")
                self._kill_group(child, signal.SIGKILL)  # the child and anything left in its group
                try:
                    child.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:  # stuck in the kernel (D state): nothing more to do
                    self.log(f"{child.name} (pid {child.pid}) survived SIGKILL for 10s")
                child.state = "stopped"
        for child in self.children:
            if child.reader is not None:
                child.reader.join(timeout=2.0)
        self._write_state()
        self.log("stopped")
