"""A real mesh peer for tests: ``tunnelmesh join HOST:PORT --token T`` on a node without coordinator
mode (the peer agent), as a subprocess in its own session, output in ``output.log``.

Always ``cleanup()`` (SIGKILL of the agent by PID, even after a failed test).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.support.coordinator import Coordinator, free_port, tunnelmesh_command


class PeerNode:
    def __init__(self, root: Path, name: str = "peer-1", *, heartbeat_interval: str = "1s",
                 settings: dict[str, Any] | None = None) -> None:
        self.name = name
        self.dir = Path(root) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = (self.dir / "config.yaml").resolve()
        self.data_dir = (self.dir / "data").resolve()
        self.log_path = self.dir / "output.log"
        config = {
            "name": name,
            # Not a coordinator: listen ports are never opened, but must not clash in validation.
            "coordinator": {"enabled": False, "data_dir": str(self.data_dir), "listen": f"127.0.0.1:{free_port()}",
                            "heartbeat_interval": heartbeat_interval},
            "s3": {"enabled": False},
            **(settings or {}),
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("TUNNELMESH_TOKEN", None)
        env["TUNNELMESH_CONFIG"] = str(self.config_path)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, coordinator: Coordinator | str, token: str) -> None:
        address = coordinator.address if isinstance(coordinator, Coordinator) else coordinator
        argv = [*tunnelmesh_command(), "join", address, "--token", token, "--config", str(self.config_path)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env(), start_new_session=True)

    def state(self) -> dict[str, Any] | None:
        """The agent's state file (coordinator list, coordinator in use, peer ID, mesh IP)."""
        try:
            return json.loads((self.data_dir / "peer" / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def status(self, *, as_json: bool = True) -> Any:
        args = [*tunnelmesh_command(), "status", "--config", str(self.config_path)] + (["--json"] if as_json else [])
        result = subprocess.run(args, capture_output=True, text=True, timeout=30, env=self.env())
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout) if as_json else result.stdout

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cleanup(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
