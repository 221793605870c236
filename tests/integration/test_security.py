"""Security of the coordination API on a real coordinator: tokens, signatures, coordinator-only
endpoints, forged coordinator registrations, malformed and oversized bodies on every endpoint
(each refused with a clear JSON error and no state change); and TLS between coordinators.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from storage.registry import PeerRegistry, registry_path
from tests.support import Coordinator, cluster, remove_tree, short_tmp_dir, wait_for
from tunnelmesh.identity import NodeIdentity, load_or_create_identity
from tunnelmesh.node import sign_registration
from tunnelmesh.peer_client import PeerClient

pytestmark = pytest.mark.timeout(240)

LIMIT = 64 * 1024
SETTINGS = {"coordinator": {"max_request_body": LIMIT, "heartbeat_interval": "1s"}}
TOKEN_ENDPOINTS = [("POST", "/api/v1/register"), ("GET", "/api/v1/coordinators")]
COORDINATOR_ENDPOINTS = ["/api/v1/coordinators/heartbeat", "/api/v1/coordinators/registry",
                         "/api/v1/coordinators/remove"]
PEER_ENDPOINTS = ["/api/v1/peers/heartbeat"]


class Env:
    def __init__(self, a: Coordinator, root: Path) -> None:
        self.a = a
        self.root = root
        self.a_identity = load_or_create_identity(a.data_dir)
        self.as_a = PeerClient(a.settings(), self.a_identity)
        self.peer = load_or_create_identity(root / "peer-key")
        self.as_peer = PeerClient(a.settings(), self.peer)

    def state(self) -> tuple[str, str]:
        registry = PeerRegistry(registry_path(self.a.data_dir))
        try:
            return registry.digest(), registry.load_view().digest()
        finally:
            registry.close()


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    root = short_tmp_dir()
    try:
        with cluster(root, 1, settings=SETTINGS) as (a,):
            e = Env(a, root)
            body = sign_registration(e.peer, {"name": "laptop", "public_key": e.peer.public_key_b64})
            assert a.register_peer("laptop", public_key=e.peer.public_key_b64, proof=body["proof"]).status_code == 200
            yield e
    finally:
        remove_tree(root)


def assert_json_error(resp: requests.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error", "message"} and body["message"], body
    return body


def call(env: Env, method: str, path: str, *, token: str | None = None, data: bytes | None = None,
         json: Any = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if data is not None:
        headers["Content-Type"] = "application/json"
    return requests.request(method, env.a.api_url + path, headers=headers, data=data, json=json, timeout=10)


def test_no_token_or_a_wrong_token_is_401_and_changes_nothing(env: Env) -> None:
    before = env.state()
    body = {"name": "intruder", "public_key": base64.b64encode(b"i" * 32).decode()}
    for method, path in TOKEN_ENDPOINTS:
        for token in (None, "wrong-token-0123456789"):
            data = call(env, method, path, token=token, json=body if method == "POST" else None)
            assert assert_json_error(data, 401)["error"] == "unauthorized"
    # Signed endpoints: no signature (with or without the mesh token) is 401 too.
    for path in COORDINATOR_ENDPOINTS + PEER_ENDPOINTS:
        for token in (None, env.a.token):
            assert_json_error(call(env, "POST", path, token=token, json={}), 401)
    assert call(env, "GET", "/health").status_code == 200  # the only endpoint without auth
    assert env.state() == before


def test_a_peer_calling_coordinator_only_endpoints_gets_403(env: Env) -> None:
    before = env.state()
    for path in COORDINATOR_ENDPOINTS:
        resp = env.as_peer.request("POST", env.a.api_url + path, json={"peer_id": env.a_identity.peer_id},
                                   timeout=10)
        assert assert_json_error(resp, 403)["error"] == "forbidden"
    # ... while its own heartbeat endpoint answers it.
    resp = env.as_peer.request("POST", env.a.api_url + PEER_ENDPOINTS[0], json={}, timeout=10)
    assert resp.status_code == 200 and resp.json()["coordinators"][0]["peer_id"] == env.a_identity.peer_id
    assert env.state() == before


def test_forged_coordinator_registrations_are_refused(env: Env) -> None:
    before = env.state()
    a = env.a
    # Someone else's key (A's own) without its private key: any proof made with another key fails.
    forger = load_or_create_identity(env.root / "forger")
    claim = {"name": "coordinator-z", "public_key": env.a_identity.public_key_b64, "is_coordinator": True,
             "api_url": "http://127.0.0.1:1"}
    for proof in (None, sign_registration(forger, claim)["proof"]):
        resp = a.register_peer(**{**claim, **({"proof": proof} if proof else {})})
        assert assert_json_error(resp, 403)["error"] == "invalid_proof"
    # The key of the registered peer "laptop", presented as a coordinator by someone else.
    stolen = {**claim, "name": "laptop", "public_key": env.peer.public_key_b64}
    assert_json_error(a.register_peer(**{**stolen, "proof": sign_registration(forger, stolen)["proof"]}), 403)
    # A replayed proof for other fields.
    genuine = sign_registration(forger, {**claim, "public_key": forger.public_key_b64})
    assert_json_error(a.register_peer(**{**genuine, "api_url": "http://127.0.0.1:2"}), 403)
    # A reserved name, even with a valid proof.
    reserved = sign_registration(forger, {**claim, "name": "admin", "public_key": forger.public_key_b64})
    assert_json_error(a.register_peer(**reserved), 403)
    assert env.state() == before


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b"\xff\xfe", b'"text"'])
def test_malformed_json_on_every_endpoint_is_400(env: Env, body: bytes) -> None:
    before = env.state()
    assert_json_error(call(env, "POST", "/api/v1/register", token=env.a.token, data=body), 400)
    for path in COORDINATOR_ENDPOINTS:
        resp = env.as_a.request("POST", env.a.api_url + path, data=body, timeout=10,
                                headers={"Content-Type": "application/json"})
        assert_json_error(resp, 400)
    for path in PEER_ENDPOINTS:
        resp = env.as_peer.request("POST", env.a.api_url + path, data=body, timeout=10,
                                   headers={"Content-Type": "application/json"})
        assert_json_error(resp, 400)
    assert env.state() == before


@pytest.mark.parametrize(("path", "body"), [
    ("/api/v1/coordinators/heartbeat", {"membership": {"format": 1, "members": "x"}}),
    ("/api/v1/coordinators/heartbeat", {"membership": {"format": 1, "members": [{"peer_id": "zz"}]}}),
    ("/api/v1/coordinators/registry", {"records": 5}),
    ("/api/v1/coordinators/registry", {"records": [{"peer_id": "x"}]}),
    ("/api/v1/coordinators/remove", {"peer_id": "not-a-peer-id"}),
])
def test_well_formed_json_of_the_wrong_shape_is_400(env: Env, path: str, body: dict[str, Any]) -> None:
    before = env.state()
    assert_json_error(env.as_a.request("POST", env.a.api_url + path, json=body, timeout=10), 400)
    assert env.state() == before


def post_raw(url: str, headers: dict[str, str], body: bytes) -> tuple[int, str, dict[str, Any]]:
    """POST with http.client, reading the answer even when the server answered (413) and closed
    before taking the whole body (requests would report only the reset of the connection)."""
    import http.client
    import json as jsonlib
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        try:
            conn.request("POST", parts.path, body=body, headers={**headers, "Content-Type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            pass
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), jsonlib.loads(resp.read())
    finally:
        conn.close()


def test_oversized_bodies_on_every_endpoint_are_413(env: Env) -> None:
    import hashlib

    from tunnelmesh.peer_client import sign_headers

    before = env.state()
    big = b'{"name": "' + b"x" * (LIMIT + 10) + b'"}'
    digest = hashlib.sha256(big).hexdigest()
    targets = [("/api/v1/register", {"Authorization": f"Bearer {env.a.token}"})]
    targets += [(p, sign_headers(env.a_identity, "POST", p, digest)) for p in COORDINATOR_ENDPOINTS]
    targets += [(p, sign_headers(env.peer, "POST", p, digest)) for p in PEER_ENDPOINTS]
    for path, headers in targets:
        status, content_type, body = post_raw(env.a.api_url + path, headers, big)
        assert (status, content_type) == (413, "application/json"), (path, status, body)
        assert body["error"] == "request_entity_too_large" and "max_request_body" in body["message"]
    assert env.state() == before


def test_someone_elses_name_is_renamed_and_the_same_key_keeps_id_and_ip(env: Env) -> None:
    newcomer = load_or_create_identity(env.root / "newcomer")
    # Runs last: an accepted coordinator registration changes the membership (by design).
    claim = {"name": env.a.name, "public_key": newcomer.public_key_b64, "is_coordinator": True,
             "api_url": "http://127.0.0.1:1"}
    first = env.a.register_peer(**sign_registration(newcomer, claim)).json()
    assert first["peer_name"] == f"{env.a.name}-2" and first["peer_id"] == newcomer.peer_id
    again = env.a.register_peer(**sign_registration(newcomer, claim)).json()
    assert (again["peer_id"], again["mesh_ip"], again["peer_name"]) == (
        first["peer_id"], first["mesh_ip"], first["peer_name"])
    assert again["membership_version"] == first["membership_version"]  # nothing new: no new version


# -- TLS ---------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunnelmesh-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_coordinators_talk_https_and_verify_each_other() -> None:
    root = short_tmp_dir()
    try:
        cert, key = self_signed(root)
        tls = {"coordinator": {"heartbeat_interval": "0.5s",
                               "tls": {"cert": str(cert), "key": str(key), "ca": str(cert)}}}
        with cluster(root, 2, settings=tls) as (a, b):
            assert a.api_url.startswith("https://")

            def agreed() -> bool:
                answers = [requests.get(f"{c.api_url}/api/v1/coordinators", verify=str(cert), timeout=2,
                                        headers={"Authorization": f"Bearer {a.token}"}).json() for c in (a, b)]
                return (len({x["membership_digest"] for x in answers}) == 1
                        and all(len(x["coordinators"]) == 2 and all(e["healthy"] for e in x["coordinators"])
                                for x in answers))

            # Heartbeats only succeed when each verifies the other's certificate with tls.ca.
            wait_for(agreed, 20, "both coordinators to list each other as healthy over HTTPS")
            # Without the CA (system store) the certificate is refused: verification is on.
            untrusting = PeerClient(a.settings().model_copy(update={"coordinator": a.settings().coordinator.model_copy(
                update={"tls": a.settings().coordinator.tls.model_copy(update={"ca": ""})})}),
                NodeIdentity(load_or_create_identity(a.data_dir).private_key))
            with pytest.raises(requests.exceptions.SSLError):
                untrusting.request("POST", b.api_url + "/api/v1/coordinators/heartbeat", json={}, timeout=5)
            with pytest.raises(requests.RequestException):  # plain HTTP is not served on a TLS listener
                requests.get(f"http://127.0.0.1:{a.api_port}/health", timeout=3).raise_for_status()
    finally:
        remove_tree(root)
