"""How to run the S3 app: the gunicorn command line for a node's settings.

gthread workers, because object bodies stream for as long as the transfer takes (a sync worker
would be killed by the timeout mid-transfer and would serve one client at a time). The request
line limit is raised to gunicorn's maximum so that a 1024-byte key, percent-encoded (up to
3 bytes per byte), plus a presigned query string still fits.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tunnelmesh.config import Settings, split_listen

APP = "web.s3:create_app()"
REPO_ROOT = Path(__file__).resolve().parents[2]


def gunicorn_command(settings: Settings, *, bind: str | None = None, pid_file: Path | None = None) -> list[str]:
    """argv that serves the S3 API of ``settings`` (run it with ``TUNNELMESH_CONFIG`` set)."""
    host, port = split_listen(settings.s3.listen)
    web = settings.web
    command = [
        sys.executable, "-m", "gunicorn",
        "--chdir", str(REPO_ROOT),
        "--bind", bind or f"{host}:{port}",
        "--worker-class", "gthread",
        "--workers", str(web.workers),
        "--threads", str(web.threads),
        "--timeout", str(int(web.timeout)),
        "--graceful-timeout", str(int(web.graceful_timeout)),
        "--keep-alive", "5",
        "--limit-request-line", "8190",
        "--limit-request-field_size", "16380",
        "--worker-tmp-dir", "/dev/shm" if Path("/dev/shm").is_dir() else "/tmp",
        "--no-control-socket",  # gunicorn 27 would share ~/.gunicorn/gunicorn.ctl between instances
        "--error-logfile", "-",
        "--log-level", settings.log_level,
    ]
    if web.access_log:
        command += ["--access-logfile", "-"]
    tls = settings.coordinator.tls
    if tls.cert and tls.key:
        command += ["--certfile", tls.cert, "--keyfile", tls.key]
    if pid_file is not None:
        command += ["--pid", str(pid_file)]
    command.append(APP)
    return command
