"""A standalone S3 server for tests and benchmarks: one gunicorn serving ``web.s3:create_app()``
on a free loopback port, over a fresh data directory with a mesh token and a node identity.

It is started exactly as the supervisor starts a coordinator's S3 process (same command line,
gunicorn settings and environment: ``tunnelmesh.supervisor.role_argv("s3")``), but alone: no
Redis and no other coordinator process, since the S3 API needs only the storage core. Everything
started here is stopped by PID (master, then any worker left), also when a test fails.

    with S3Server(tmp_path) as server:
        client = server.client()          # boto3, this node's own (admin) credentials
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tunnelmesh import identity  # noqa: E402
from tunnelmesh.config import load_config  # noqa: E402
from tunnelmesh.supervisor import child_env, role_argv  # noqa: E402

REGION = "us-east-1"


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now, for a server started a moment later.

    Drawn below the kernel's ephemeral range: a port the OS picks for ``bind(0)`` is also one it
    may give the next outgoing connection as its local port, and a server started afterwards on
    it then fails with "address in use". Never the same port twice in one process.
    """
    ephemeral_low = _ephemeral_low()
    low, high = (20000, ephemeral_low - 1) if ephemeral_low > 21000 else (1024, 65535)
    for _ in range(200):
        port = random.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # fall back on the OS's choice
        sock.bind((host, 0))
        return sock.getsockname()[1]


class S3Server:
    def __init__(self, root: Path, *, workers: int = 2, threads: int = 8, admin_peers: list[str] | None = None,
                 config: dict[str, Any] | None = None, extra_args: list[str] | None = None,
                 with_mesh_token: bool = True) -> None:
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.config_path = self.root / "s3.yaml"
        self.log_path = self.root / "gunicorn.log"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.threads = threads
        self.admin_peers = admin_peers or []
        self.extra_config = config or {}
        self.extra_args = extra_args or []
        self.with_mesh_token = with_mesh_token
        self.process: subprocess.Popen[bytes] | None = None
        self.token = ""
        self.node_peer_id = ""

    # -- lifecycle ------------------------------------------------------------------------------

    def write_config(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.token = identity.read_token(self.data_dir) or identity.generate_token()
        if self.with_mesh_token:  # without one, the node has not joined a mesh yet
            identity.store_token(self.data_dir, self.token)
        self.node_peer_id = identity.load_or_create_identity(self.data_dir).peer_id
        document: dict[str, Any] = {
            "name": "s3-test",
            "coordinator": {"enabled": True, "listen": f"127.0.0.1:{free_port()}",
                            "data_dir": str(self.data_dir), "admin_peers": self.admin_peers},
            "s3": {"listen": f"127.0.0.1:{self.port}", "region": REGION},
            "web": {"workers": self.workers, "threads": self.threads},
        }
        for section, values in self.extra_config.items():
            if isinstance(values, dict):
                document.setdefault(section, {}).update(values)
            else:
                document[section] = values
        self.config_path.write_text(yaml.safe_dump(document))

    def start(self, timeout: float = 30.0) -> S3Server:
        self.write_config()
        settings = load_config(self.config_path)
        command = role_argv("s3", settings)
        command[-1:-1] = self.extra_args
        env = child_env(settings, self.config_path, "s3")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=self.root)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.endpoint + "/_health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer within {timeout}s:\n{self.log_tail()}")

    def pids(self) -> list[int]:
        """The master and its workers (for RSS measurements)."""
        if self.process is None or self.process.poll() is not None:
            return []
        try:
            master = psutil.Process(self.process.pid)
            return [master.pid] + [child.pid for child in master.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None:
            return
        workers = [pid for pid in self.pids() if pid != self.process.pid]
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for pid in workers:  # a worker outliving its master would keep the port
            try:
                worker = psutil.Process(pid)
                worker.kill()
                worker.wait(5)
            except psutil.NoSuchProcess:
                pass
        self.process = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- clients --------------------------------------------------------------------------------

    def credentials(self, peer_id: str | None = None) -> identity.S3Credentials:
        """The S3 key pair of ``peer_id`` in this mesh (default: this node, an admin)."""
        return identity.s3_credentials(self.token, peer_id or self.node_peer_id)

    def client(self, peer_id: str | None = None, *, path_style: bool = False, secret: str | None = None,
               **config: Any) -> Any:
        """A boto3 S3 client; default client config (checksums on) unless ``config`` says otherwise."""
        import boto3
        from botocore.config import Config

        creds = self.credentials(peer_id)
        options: dict[str, Any] = dict(config)
        if path_style:
            options["s3"] = {"addressing_style": "path"}
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=creds.access_key,
                            aws_secret_access_key=secret or creds.secret_key,
                            config=Config(**options))
