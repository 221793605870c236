"""``tunnelmesh.cluster.broadcast_removal`` (what ``tunnelmesh leave`` sends) against two tiny real
HTTP servers on loopback standing in for the other coordinators: a member that does not answer
200 at first is asked again (a removal is idempotent); a refusal is final."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from storage.registry import PeerRecord
from tunnelmesh import cluster, node
from tunnelmesh.config import Settings, settings_from_dict
from tunnelmesh.identity import load_or_create_identity


class ScriptedCoordinator:
    """Answers POSTs to the removal path with the given statuses in turn (the last one repeats)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.bodies: list[dict[str, object]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert self.path == cluster.REMOVE_PATH
                status = scripted.statuses[min(len(scripted.bodies), len(scripted.statuses) - 1)]
                scripted.bodies.append(body)
                payload = b'{"ok": true}' if status == 200 else b'{"error": "scripted"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return settings_from_dict({
        "name": "coordinator-c",
        "coordinator": {"enabled": True, "listen": "127.0.0.1:18447", "data_dir": str(tmp_path / "data")},
        "replication": {"max_attempts": 3, "retry_backoff": "0.05s", "peer_timeout": "5s"},
    }, str(tmp_path / "c.yaml"))


@pytest.fixture()
def servers() -> Iterator[list[ScriptedCoordinator]]:
    started: list[ScriptedCoordinator] = []
    yield started
    for server in started:
        server.server.shutdown()
        server.server.server_close()


def add_member(settings: Settings, name: str, url: str) -> None:
    identity = load_or_create_identity(Path(settings.data_dir).parent / name)
    record = PeerRecord(peer_id=identity.peer_id, name=name, public_key=identity.public_key_b64,
                        mesh_ip="10.99.0.9", is_coordinator=True, api_url=url, s3_url=url)
    node.add_coordinator(node.open_registry(settings), record, identity.peer_id)


def test_a_busy_member_is_asked_again_and_a_refusal_is_final(
        settings: Settings, servers: list[ScriptedCoordinator]) -> None:
    identity = load_or_create_identity(settings.data_dir)
    node.register_self(settings, identity, node.open_registry(settings))
    busy = ScriptedCoordinator([503, 200])  # e.g. still busy with the leaver's last drain
    refusing = ScriptedCoordinator([403])
    servers.extend([busy, refusing])
    add_member(settings, "coordinator-a", busy.url)
    add_member(settings, "coordinator-b", refusing.url)

    accepted = cluster.broadcast_removal(settings, identity, identity.peer_id)

    assert accepted == ["coordinator-a"]
    assert busy.bodies == [{"peer_id": identity.peer_id}] * 2
    assert len(refusing.bodies) == 1  # 403: not asked again


def test_a_member_that_never_answers_200_is_given_up_after_max_attempts(
        settings: Settings, servers: list[ScriptedCoordinator]) -> None:
    identity = load_or_create_identity(settings.data_dir)
    node.register_self(settings, identity, node.open_registry(settings))
    failing = ScriptedCoordinator([500])
    servers.append(failing)
    add_member(settings, "coordinator-a", failing.url)

    assert cluster.broadcast_removal(settings, identity, identity.peer_id) == []
    assert len(failing.bodies) == settings.replication.max_attempts
