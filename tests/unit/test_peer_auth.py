"""Signed node-to-coordinator requests: tunnelmesh.peer_client signs, web.peer_auth verifies
(Flask test client, no processes)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, g, jsonify

from storage.membership import Member
from tunnelmesh import node
from tunnelmesh.config import Settings, settings_from_dict
from tunnelmesh.identity import NodeIdentity, load_or_create_identity
from tunnelmesh.peer_client import (
    HEADER_CONTENT,
    HEADER_DATE,
    HEADER_PROTOCOL,
    UNSIGNED,
    InsecureTransport,
    check_transport,
    sign_headers,
)
from web.coordination import Coordination
from web.peer_auth import require_coordinator, require_peer


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return settings_from_dict({"name": "coordinator-a", "coordinator": {
        "enabled": True, "listen": "127.0.0.1:18443", "data_dir": str(tmp_path / "a"), "max_clock_skew": "60s",
        "max_request_body": "4KiB"}})


@pytest.fixture()
def nodes(settings: Settings, tmp_path: Path) -> dict[str, NodeIdentity]:
    """Self (A), another coordinator B, a plain registered peer P and an outsider X."""
    registry = node.shared_registry(settings)
    me = load_or_create_identity(settings.data_dir)
    node.register_self(settings, me, registry)
    ids = {name: load_or_create_identity(tmp_path / name) for name in ("b", "p", "x")}
    b = registry.register(peer_id=ids["b"].peer_id, name="coordinator-b", public_key=ids["b"].public_key_b64,
                          is_coordinator=True, api_url="http://127.0.0.1:18444", mesh_cidr="10.42.0.0/16")
    node.add_coordinator(registry, b, me.peer_id)
    registry.register(peer_id=ids["p"].peer_id, name="laptop", public_key=ids["p"].public_key_b64,
                      mesh_cidr="10.42.0.0/16")
    return {"a": me, **ids}


@pytest.fixture()
def client(settings: Settings, nodes: dict[str, NodeIdentity]) -> Any:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.coordinator.max_request_body
    app.extensions["tunnelmesh"] = Coordination(settings)

    @app.post("/coord/<path:rest>")
    @require_coordinator
    def coord(rest: str) -> Any:
        return jsonify({"peer": g.peer_id})

    @app.post("/peer")
    @require_peer
    def peer() -> Any:
        return jsonify({"peer": g.peer_id})

    return app.test_client()


def signed(identity: NodeIdentity, path: str, body: bytes = b"", *, content: str | None = None,
           now: float | None = None, method: str = "POST") -> dict[str, str]:
    content = content if content is not None else hashlib.sha256(body).hexdigest()
    return sign_headers(identity, method, path, content, now=now)


def post(client: Any, path: str, headers: dict[str, str], body: bytes = b"",
         content_type: str = "application/json") -> Any:
    return client.post(path, data=body, headers=headers, content_type=content_type)


def test_an_active_coordinator_is_accepted(client: Any, nodes: dict[str, NodeIdentity]) -> None:
    body = json.dumps({"x": 1}).encode()
    path = "/coord/a%20b?q=1&r=two"
    resp = post(client, path, signed(nodes["b"], path, body), body)
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json() == {"peer": nodes["b"].peer_id}


@pytest.mark.parametrize("tamper", ["path", "query", "body", "date", "method", "signature"])
def test_tampering_is_refused(client: Any, nodes: dict[str, NodeIdentity], tamper: str) -> None:
    body = b'{"x":1}'
    path = "/coord/x?q=1"
    headers = signed(nodes["b"], path, body)
    send_path, send_body = path, body
    if tamper == "path":
        send_path = "/coord/y?q=1"
    elif tamper == "query":
        send_path = "/coord/x?q=2"
    elif tamper == "body":
        send_body = b'{"x":2}'
    elif tamper == "date":
        headers[HEADER_DATE] = str(int(headers[HEADER_DATE]) + 1)
    elif tamper == "signature":
        headers["X-TM-Signature"] = signed(nodes["x"], path, body)["X-TM-Signature"]
    if tamper == "method":
        resp = client.put(send_path, data=send_body, headers=headers, content_type="application/json")
        assert resp.status_code == 405  # no such route for PUT; the signature never helps
        headers = signed(nodes["b"], path, body, method="PUT")
        resp = post(client, path, headers, body)
    else:
        resp = post(client, send_path, headers, send_body)
    assert resp.status_code == 401
    assert resp.get_json()["error"] in ("bad_signature", "bad_content_hash")


def test_unknown_peer_and_missing_headers_get_401(client: Any, nodes: dict[str, NodeIdentity]) -> None:
    resp = post(client, "/coord/x", signed(nodes["x"], "/coord/x"))
    assert resp.status_code == 401 and resp.get_json()["error"] == "unknown_peer"
    resp = post(client, "/coord/x", {"Authorization": "Bearer whatever"})
    assert resp.status_code == 401 and "missing request signature" in resp.get_json()["message"]


def test_a_plain_peer_gets_403_on_coordinator_endpoints_but_may_call_peer_ones(
        client: Any, nodes: dict[str, NodeIdentity]) -> None:
    resp = post(client, "/coord/x", signed(nodes["p"], "/coord/x"))
    assert resp.status_code == 403 and resp.get_json()["error"] == "forbidden"
    resp = post(client, "/peer", signed(nodes["p"], "/peer"))
    assert resp.status_code == 200 and resp.get_json() == {"peer": nodes["p"].peer_id}


def test_a_removed_coordinator_is_no_longer_accepted(client: Any, settings: Settings,
                                                     nodes: dict[str, NodeIdentity]) -> None:
    node.remove_coordinator(node.shared_registry(settings), nodes["b"].peer_id, nodes["a"].peer_id)
    resp = post(client, "/coord/x", signed(nodes["b"], "/coord/x"))
    assert resp.status_code == 403


@pytest.mark.parametrize("offset", [-120, 120])
def test_a_replay_outside_the_skew_window_is_refused(client: Any, nodes: dict[str, NodeIdentity],
                                                     offset: int) -> None:
    resp = post(client, "/coord/x", signed(nodes["b"], "/coord/x", now=time.time() + offset))
    assert resp.status_code == 401 and resp.get_json()["error"] == "request_expired"
    assert post(client, "/coord/x", signed(nodes["b"], "/coord/x", now=time.time() - 30)).status_code == 200


@pytest.mark.parametrize(("protocol", "status"), [("2", 400), ("", 400), ("1.7", 200), ("0", 400)])
def test_protocol_major_version(client: Any, nodes: dict[str, NodeIdentity], protocol: str, status: int) -> None:
    headers = signed(nodes["b"], "/coord/x")
    headers[HEADER_PROTOCOL] = protocol
    resp = post(client, "/coord/x", headers)
    assert resp.status_code == status
    if status == 400:
        assert resp.get_json()["error"] == "unsupported_protocol" and "protocol 1" in resp.get_json()["message"]


def test_unsigned_json_is_refused_but_unsigned_streams_pass(client: Any, nodes: dict[str, NodeIdentity]) -> None:
    headers = signed(nodes["b"], "/coord/x", content=UNSIGNED)
    assert post(client, "/coord/x", headers, b'{"a":1}').status_code == 401
    resp = post(client, "/coord/x", headers, b"raw chunk bytes", content_type="application/octet-stream")
    assert resp.status_code == 200


def test_oversized_signed_json_is_413(client: Any, nodes: dict[str, NodeIdentity]) -> None:
    body = b'{"a":"' + b"x" * 8000 + b'"}'
    resp = post(client, "/coord/x", signed(nodes["b"], "/coord/x", body), body)
    assert resp.status_code == 413


def test_peer_client_signs_what_it_sends(settings: Settings, nodes: dict[str, NodeIdentity],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from tunnelmesh import peer_client

    sent: dict[str, Any] = {}

    def fake_send(prepared: Any, **kwargs: Any) -> Any:
        sent.update(prepared=prepared, kwargs=kwargs)
        return "response"

    monkeypatch.setattr(peer_client.session(), "send", fake_send)
    client = peer_client.PeerClient(settings, nodes["a"])
    assert client.request("POST", "http://127.0.0.1:1/p/a b?x=1", json={"k": [1]}, timeout=3) == "response"
    prepared = sent["prepared"]
    assert prepared.headers[HEADER_CONTENT] == hashlib.sha256(prepared.body).hexdigest()
    assert prepared.headers["X-TM-Peer"] == nodes["a"].peer_id and prepared.headers[HEADER_PROTOCOL] == "1"
    assert sent["kwargs"]["timeout"] == 3 and sent["kwargs"]["verify"] is True
    client.request("PUT", "http://127.0.0.1:1/c", data=iter([b"a", b"b"]), timeout=3)
    assert sent["prepared"].headers[HEADER_CONTENT] == UNSIGNED


def test_plain_http_to_public_addresses_needs_explicit_permission(settings: Settings) -> None:
    check_transport(settings, "http://127.0.0.1:8443")
    check_transport(settings, "http://10.1.2.3:8443")
    check_transport(settings, "https://1.1.1.1:8443")
    with pytest.raises(InsecureTransport):
        check_transport(settings, "http://1.1.1.1:8443")
    allowed = settings.model_copy(update={"coordinator": settings.coordinator.model_copy(update={
        "tls": settings.coordinator.tls.model_copy(update={"allow_insecure_http": True})})})
    check_transport(allowed, "http://1.1.1.1:8443")  # allowed, with a logged warning


def test_coordinator_members_and_peer_is_up(settings: Settings, nodes: dict[str, NodeIdentity]) -> None:
    members = node.coordinator_members(settings)
    assert [m.peer_id for m in members] == sorted([nodes["a"].peer_id, nodes["b"].peer_id])
    assert all(isinstance(m, Member) for m in members)
    assert node.peer_is_up(settings, nodes["a"].peer_id)  # self
    assert not node.peer_is_up(settings, nodes["b"].peer_id)  # never heard from
    node.shared_registry(settings).record_heartbeat(nodes["b"].peer_id, time.time())
    assert node.peer_is_up(settings, nodes["b"].peer_id)
    node.shared_registry(settings).record_heartbeat(nodes["b"].peer_id, time.time() - 1000)  # never moves back
    assert node.peer_is_up(settings, nodes["b"].peer_id)
