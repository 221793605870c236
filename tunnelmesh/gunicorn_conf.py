"""gunicorn settings for both HTTP apps of a coordinator, from the YAML config.

Used as ``gunicorn -c python:tunnelmesh.gunicorn_conf 'web.coordination:create_app()'`` (and the
same for ``web.s3:create_app()``). ``$TUNNELMESH_CONFIG`` names the config file and
``$TUNNELMESH_GUNICORN_ROLE`` (``web`` or ``s3``) picks the listener. gthread workers: object
bodies are streamed, and a sync worker would be blocked (and killed after ``timeout``) by one slow
client.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from tunnelmesh.config import load_config
from tunnelmesh.supervisor import GUNICORN_ROLE_ENV, gunicorn_bind, run_dir, set_parent_death_signal

_settings = load_config(check_data_dir=False)
_role = os.environ.get(GUNICORN_ROLE_ENV, "web")
if _role not in ("web", "s3"):
    raise SystemExit(f"{GUNICORN_ROLE_ENV} must be 'web' or 's3', not {_role!r}")
_run = run_dir(_settings)
_run.mkdir(parents=True, exist_ok=True)

bind = [gunicorn_bind(_settings.coordinator.listen if _role == "web" else _settings.s3.listen)]
worker_class = "gthread"
workers = _settings.web.workers
threads = _settings.web.threads
timeout = int(_settings.web.timeout)
graceful_timeout = int(_settings.web.graceful_timeout)
keepalive = 5
# A 1024-byte key is up to 3,072 characters percent-encoded; with a presigned query and response-*
# overrides the request line can pass gunicorn's 4,094 default, which would answer HTML, not S3 XML.
limit_request_line = 8190 if _role == "s3" else 4094
preload_app = False  # each worker builds its own app: no sockets or SQLite handles shared over fork
proc_name = f"tunnelmesh-{_settings.name}-{_role}"
pidfile = str(_run / f"gunicorn-{_role}.pid")
loglevel = _settings.log_level
errorlog = "-"
accesslog = "-" if _settings.web.access_log else None
# The worker heartbeat file: on tmpfs when there is one (fchmod on a disk can stall the worker).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None

# gunicorn >= 25.1 opens a control socket, by default one per user ($HOME/.gunicorn/gunicorn.ctl),
# which two gunicorns would fight over: keep it in this coordinator's run directory.
_control = str(_run / f"gunicorn-{_role}.ctl")
if len(_control.encode()) < 100:
    control_socket = _control
else:
    control_socket_disable = True

if _settings.coordinator.tls.cert:
    certfile = _settings.coordinator.tls.cert
    keyfile = _settings.coordinator.tls.key
    if _settings.coordinator.tls.ca:
        ca_certs = _settings.coordinator.tls.ca


def post_fork(server: Any, worker: Any) -> None:
    # Workers die with the master even when it is SIGKILLed (it dies with the supervisor).
    set_parent_death_signal(signal.SIGKILL)
