"""The coordination API through Flask's test client (no processes): /health, registration, auth,
validation, JSON errors; and the peer registry under it."""

from __future__ import annotations

import base64
import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest

from storage.membership import MembershipView
from storage.registry import PeerRecord, PeerRegistry, ReservedName
from tunnelmesh.config import Settings, settings_from_dict
from tunnelmesh.identity import load_or_create_identity, peer_id_from_public_key, s3_credentials, store_token
from tunnelmesh.node import open_registry, register_self, sign_registration
from web.coordination import create_app

TOKEN = "tm_unit-test-mesh-token-0123456789"


def new_key() -> tuple[str, str]:
    raw = os.urandom(32)
    return base64.b64encode(raw).decode(), peer_id_from_public_key(raw)


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return settings_from_dict({
        "name": "coordinator-a",
        "coordinator": {"enabled": True, "listen": "127.0.0.1:18443", "data_dir": str(tmp_path / "data"),
                        "admin_peers": ["ops-*", "aaaaaaaaaaaaaaaa"], "max_request_body": "4KiB"},
        "s3": {"listen": "127.0.0.1:19000"},
    }, str(tmp_path / "c.yaml"))


@pytest.fixture()
def client(settings: Settings) -> Any:
    store_token(settings.data_dir, TOKEN)
    register_self(settings, load_or_create_identity(settings.data_dir), open_registry(settings))
    app = create_app(settings)
    app.testing = False  # exercise the real error handlers
    return app.test_client()


def register(client: Any, body: Any, token: str | None = TOKEN, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if isinstance(body, dict | list):
        return client.post("/api/v1/register", json=body, headers=headers, **kwargs)
    return client.post("/api/v1/register", data=body, headers=headers, **kwargs)


def test_health_needs_no_auth_and_reports_what_it_knows(client: Any, settings: Settings) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200
    body = resp.get_json()
    me = load_or_create_identity(settings.data_dir).peer_id
    assert body["name"] == "coordinator-a" and body["peer_id"] == me
    assert body["redis"] == "down" and body["status"] == "degraded" and body["worker"] == "down"  # no Redis here
    assert ipaddress.ip_address(body["mesh_ip"]) in ipaddress.ip_network("10.42.0.0/16")
    assert body["version"]


def test_registration_assigns_an_address_and_returns_the_coordinators(client: Any, settings: Settings) -> None:
    public_key, peer_id = new_key()
    resp = register(client, {"name": "peer-1", "public_key": public_key, "addresses": ["192.0.2.1"],
                             "version": "1.0"})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["peer_id"] == peer_id and body["peer_name"] == "peer-1"
    assert body["mesh_cidr"] == "10.42.0.0/16"
    assert ipaddress.ip_address(body["mesh_ip"]) in ipaddress.ip_network("10.42.0.0/16")
    assert body["is_admin"] is False
    creds = s3_credentials(TOKEN, peer_id)
    assert body["s3"] == {"access_key": creds.access_key, "secret_key": creds.secret_key,
                          "endpoint": "http://127.0.0.1:19000", "region": "us-east-1"}
    me = load_or_create_identity(settings.data_dir).peer_id
    assert [c["peer_id"] for c in body["coordinators"]] == [me]
    assert body["coordinators"][0] == {"name": "coordinator-a", "peer_id": me, "mesh_ip": body["coord_mesh_ips"][0],
                                       "api_url": "http://127.0.0.1:18443", "s3_url": "http://127.0.0.1:19000",
                                       "healthy": True}
    assert body["server_peer_id"] == me and body["server_name"] == "coordinator-a"

    # Re-registration with the same key keeps peer ID and mesh IP.
    again = register(client, {"name": "peer-1", "public_key": public_key}).get_json()
    assert (again["peer_id"], again["mesh_ip"]) == (peer_id, body["mesh_ip"])


def coordinator_body(tmp_path: Path, name: str = "coordinator-b", port: int = 18444) -> tuple[dict[str, Any], str]:
    """A signed coordinator registration (fresh identity under tmp_path) and its peer ID."""
    identity = load_or_create_identity(tmp_path / name)
    body = {"name": name, "public_key": identity.public_key_b64, "is_coordinator": True,
            "api_url": f"http://127.0.0.1:{port}", "s3_url": f"http://127.0.0.1:{port + 1}"}
    return sign_registration(identity, body), identity.peer_id


def test_a_coordinator_joins_the_list(client: Any, tmp_path: Path) -> None:
    body_in, peer_id = coordinator_body(tmp_path)
    resp = register(client, body_in)
    body = resp.get_json()
    assert resp.status_code == 200, body
    assert [c["name"] for c in body["coordinators"]] == ["coordinator-a", "coordinator-b"]
    entry = body["coordinators"][1]
    assert entry["peer_id"] == peer_id and entry["healthy"] is True and entry["api_url"] == "http://127.0.0.1:18444"
    assert body["coord_mesh_ips"][1] == body["mesh_ip"]
    view = MembershipView.from_dict(body["membership"])
    assert {m.peer_id for m in view.active_members()} == {peer_id, body["server_peer_id"]}
    assert body["membership_version"] == view.version


def test_a_coordinator_registration_needs_a_proof_of_key_ownership(client: Any, tmp_path: Path) -> None:
    signed, _ = coordinator_body(tmp_path)
    unsigned = {k: v for k, v in signed.items() if k != "proof"}
    resp = register(client, unsigned)
    assert resp.status_code == 403 and resp.get_json()["error"] == "invalid_proof"
    tampered = {**signed, "api_url": "http://127.0.0.1:9999"}  # proof made for other fields
    assert register(client, tampered).status_code == 403
    other, _ = coordinator_body(tmp_path, "coordinator-c")
    stolen = {**signed, "proof": other["proof"]}  # someone else's signature
    assert register(client, stolen).status_code == 403
    assert register(client, signed).status_code == 200


def test_admin_peers_match_a_peer_id_or_a_name_glob(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    public_key, _ = new_key()
    assert register(client, {"name": "ops-1", "public_key": public_key}).get_json()["is_admin"] is True
    raw = b"\x01" * 32
    monkeypatch.setattr("web.coordination.peer_id_from_public_key", lambda _: "aaaaaaaaaaaaaaaa")
    body = register(client, {"name": "someone", "public_key": base64.b64encode(raw).decode()}).get_json()
    assert body["peer_id"] == "aaaaaaaaaaaaaaaa" and body["is_admin"] is True


def test_a_taken_name_is_renamed(client: Any) -> None:
    first, _ = new_key()
    second, _ = new_key()
    assert register(client, {"name": "laptop", "public_key": first}).get_json()["peer_name"] == "laptop"
    assert register(client, {"name": "laptop", "public_key": second}).get_json()["peer_name"] == "laptop-2"


@pytest.mark.parametrize(("token", "message"), [
    (None, "missing mesh token (send Authorization: Bearer <token>)"),
    ("wrong-token-wrong-token", "invalid mesh token"),
    ("", "missing mesh token (send Authorization: Bearer <token>)"),
])
def test_registration_requires_the_mesh_token(client: Any, token: str | None, message: str) -> None:
    public_key, _ = new_key()
    resp = register(client, {"name": "peer-1", "public_key": public_key}, token=token)
    assert resp.status_code == 401
    assert resp.get_json() == {"error": "unauthorized", "message": message}


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{not json", 400, "the body must be a JSON object"),
    (b"[1, 2]", 400, "the body must be a JSON object"),
    ({"public_key": "x"}, 400, "name: required"),
    ({"name": "Bad Name", "public_key": "x"}, 400, "name: must be 1-63 lowercase letters, digits or '-', "
                                                   "starting and ending with a letter or digit"),
    ({"name": "p", "public_key": "not base64!"}, 400,
     "public_key: must be a base64-encoded 32-byte ed25519 public key"),
    ({"name": "p", "public_key": base64.b64encode(b"short").decode()}, 400,
     "public_key: must be a base64-encoded 32-byte ed25519 public key"),
    ({"name": "p", "public_key": base64.b64encode(b"k" * 32).decode(), "addresses": "1.2.3.4"}, 400,
     "addresses: must be a list of at most 32 host names or IPs"),
    ({"name": "p", "public_key": base64.b64encode(b"k" * 32).decode(), "is_coordinator": "yes"}, 400,
     "is_coordinator: must be true or false"),
    ({"name": "p", "public_key": base64.b64encode(b"k" * 32).decode(), "api_url": "ftp://x"}, 400,
     "api_url: must be an http(s)://host:port URL"),
    ({"name": "admin", "public_key": base64.b64encode(b"k" * 32).decode()}, 403, "name: the name 'admin' is reserved"),
])
def test_bad_registrations_get_json_errors(client: Any, body: Any, status: int, message: str) -> None:
    resp = register(client, body)
    assert resp.status_code == status
    assert resp.is_json and resp.get_json()["message"] == message


def test_oversized_body_is_a_json_413(client: Any) -> None:
    resp = register(client, b"{" + b" " * 8000 + b"}")
    assert resp.status_code == 413
    assert resp.get_json() == {"error": "request_entity_too_large",
                               "message": "the body exceeds coordinator.max_request_body (4096 bytes)"}


def test_routing_errors_and_crashes_are_json(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    resp = client.get("/nope")
    assert resp.status_code == 404 and resp.get_json()["error"] == "not_found"
    resp = client.get("/api/v1/register")
    assert resp.status_code == 405 and resp.get_json()["error"] == "method_not_allowed"
    assert "POST" in resp.headers["Allow"]

    def boom(**_: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(PeerRegistry, "register", lambda self, **kw: boom(**kw))
    public_key, _ = new_key()
    resp = register(client, {"name": "peer-1", "public_key": public_key})
    assert resp.status_code == 500
    assert resp.get_json() == {"error": "internal_error", "message": "internal error (see the coordinator's log)"}
    assert b"secret internals" not in resp.data and b"Traceback" not in resp.data


# ---------------------------------------------------------------------------------------------
# The registry itself
# ---------------------------------------------------------------------------------------------


def test_registry_is_sticky_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    registry = PeerRegistry(path)
    record = registry.register(peer_id="0123456789abcdef", name="n1", public_key="k", mesh_cidr="10.42.0.0/16")
    registry.close()
    reopened = PeerRegistry(path)
    again = reopened.register(peer_id="0123456789abcdef", name="n1-renamed", public_key="k",
                              mesh_cidr="10.42.0.0/16", addresses=["h"])
    assert again.mesh_ip == record.mesh_ip and again.name == "n1-renamed" and again.addresses == ("h",)
    assert again.registered_us == record.registered_us
    assert reopened.by_name("n1") is None and reopened.get("0123456789abcdef") == again


def test_registry_admin_flag_is_sticky(tmp_path: Path) -> None:
    registry = PeerRegistry(tmp_path / "r.db")
    registry.register(peer_id="0123456789abcdef", name="ops", public_key="k", mesh_cidr="10.42.0.0/16",
                      is_admin=lambda *_: True)
    assert registry.register(peer_id="0123456789abcdef", name="ops", public_key="k", mesh_cidr="10.42.0.0/16").is_admin


def test_registry_refuses_reserved_names(tmp_path: Path) -> None:
    with pytest.raises(ReservedName):
        PeerRegistry(tmp_path / "r.db").register(peer_id="0" * 16, name="Health", public_key="k",
                                                 mesh_cidr="10.42.0.0/16")


def test_registry_gives_distinct_addresses(tmp_path: Path) -> None:
    registry = PeerRegistry(tmp_path / "r.db")
    ips = {registry.register(peer_id=f"{i:016x}", name=f"n{i}", public_key="k", mesh_cidr="10.9.0.0/29").mesh_ip
           for i in range(5)}
    assert len(ips) == 5


def test_upsert_replaces_conflicting_rows(tmp_path: Path) -> None:
    registry = PeerRegistry(tmp_path / "r.db")
    mine = registry.register(peer_id="1" * 16, name="a", public_key="k", mesh_cidr="10.42.0.0/16")
    registry.upsert(PeerRecord(peer_id="2" * 16, name="a", public_key="", mesh_ip="10.42.0.9", is_coordinator=True))
    assert registry.get(mine.peer_id) is None and registry.by_name("a").peer_id == "2" * 16
    assert [r.name for r in registry.list_peers(coordinators_only=True)] == ["a"]
    registry.set_state("joined_via", "http://x:1")
    assert registry.get_state("joined_via") == "http://x:1" and registry.get_state("nope") is None
