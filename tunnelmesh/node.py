"""What a coordinator says about itself: advertised URLs, version, admin matching, the local
registry, and registration with another coordinator (the client side of ``POST /api/v1/register``).

Shared by the CLI, the supervisor and the coordination API, so each of them describes the node the
same way. No Flask or Celery here.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import socket
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any

from storage.membership import ACTIVE, HealthTracker, Member, MembershipView
from storage.registry import PeerRecord, PeerRegistry, registry_path
from tunnelmesh.config import Settings, split_listen
from tunnelmesh.identity import NodeIdentity, verify_signature

DISTRIBUTION = "tunnelmesh-coordinator"
REGISTER_PATH = "/api/v1/register"
_WILDCARDS = ("", "0.0.0.0", "::", "*")


@lru_cache(maxsize=1)
def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def _scheme(settings: Settings) -> str:
    return "https" if settings.coordinator.tls.cert else "http"


@lru_cache(maxsize=1)
def _primary_address() -> str:
    """This machine's address on its default route (nothing is sent: UDP connect only picks a route)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def _host_for_others(listen: str) -> str:
    host, _ = split_listen(listen)
    if host in _WILDCARDS:
        return _primary_address()
    return f"[{host}]" if ":" in host else host


def _netloc(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]


def join_address(settings: Settings) -> str:
    """HOST:PORT other coordinators pass to ``tunnelmesh join`` to reach this one."""
    if settings.coordinator.advertise_url:
        return _netloc(settings.coordinator.advertise_url)
    return f"{_host_for_others(settings.coordinator.listen)}:{split_listen(settings.coordinator.listen)[1]}"


def api_url(settings: Settings) -> str:
    """Base URL of this coordinator's coordination API as others should use it."""
    if settings.coordinator.advertise_url:
        return settings.coordinator.advertise_url.rstrip("/")
    return f"{_scheme(settings)}://{join_address(settings)}"


def s3_url(settings: Settings) -> str:
    """Endpoint URL of this coordinator's S3 API (empty when S3 is disabled)."""
    if not settings.s3.enabled:
        return ""
    if settings.s3.advertise_url:
        return settings.s3.advertise_url.rstrip("/")
    port = split_listen(settings.s3.listen)[1]
    return f"{_scheme(settings)}://{_host_for_others(settings.s3.listen)}:{port}"


def local_url(listen: str, *, tls: bool = False) -> str:
    """URL this machine uses to reach its own listener (loopback for wildcard listens)."""
    host, port = split_listen(listen)
    if host in ("0.0.0.0", "*", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


def matches_admin(admin_peers: list[str], peer_id: str, name: str) -> bool:
    """An ``admin_peers`` entry matches a peer ID exactly or the node name as a shell glob."""
    return any(entry == peer_id or fnmatch.fnmatchcase(name, entry) for entry in admin_peers)


def open_registry(settings: Settings) -> PeerRegistry:
    return PeerRegistry(registry_path(settings.data_dir))


_registries: dict[str, PeerRegistry] = {}
_registries_lock = threading.Lock()


def shared_registry(settings: Settings) -> PeerRegistry:
    """One registry handle per data directory and process (it keeps one connection per thread)."""
    key = str(registry_path(settings.data_dir))
    with _registries_lock:
        if key not in _registries:
            _registries[key] = PeerRegistry(registry_path(settings.data_dir))
        return _registries[key]


def member_from_record(record: PeerRecord) -> Member:
    return Member(peer_id=record.peer_id, name=record.name, public_key=record.public_key,
                  api_url=record.api_url, s3_url=record.s3_url, mesh_ip=record.mesh_ip)


def _same_member(a: Member | None, b: Member) -> bool:
    return a is not None and a.state == ACTIVE and (a.name, a.public_key, a.api_url, a.s3_url, a.mesh_ip) == (
        b.name, b.public_key, b.api_url, b.s3_url, b.mesh_ip)


def add_coordinator(registry: PeerRegistry, record: PeerRecord, writer_peer_id: str) -> tuple[MembershipView, bool]:
    """Make ``record`` an active member of the stored view (stamped by ``writer_peer_id``).

    Nothing is written when the view already holds exactly that (re-registration does not bump
    the membership version).
    """
    member = member_from_record(record)

    def change(view: MembershipView) -> MembershipView:
        if _same_member(view.get(member.peer_id), member):
            return view
        return view.add_or_update(member, view.next_stamp(writer_peer_id))

    return registry.update_view(change)


def remove_coordinator(registry: PeerRegistry, peer_id: str, writer_peer_id: str) -> tuple[MembershipView, bool]:
    """Tombstone ``peer_id`` in the stored view (no-op when it is not an active member)."""
    def change(view: MembershipView) -> MembershipView:
        if not view.is_active(peer_id):
            return view
        return view.remove(peer_id, view.next_stamp(writer_peer_id))

    return registry.update_view(change)


def register_self(settings: Settings, identity: NodeIdentity, registry: PeerRegistry) -> PeerRecord:
    """Put this coordinator into its own registry and membership view (bootstrap), keeping a mesh IP
    it already has."""
    record = registry.register(
        peer_id=identity.peer_id, name=settings.name, public_key=identity.public_key_b64,
        addresses=[_host_for_others(settings.coordinator.listen).strip("[]")],
        is_coordinator=True, version=version(), api_url=api_url(settings), s3_url=s3_url(settings),
        mesh_cidr=settings.coordinator.mesh_cidr,
        is_admin=lambda pid, name: matches_admin(settings.coordinator.admin_peers, pid, name))
    add_coordinator(registry, record, identity.peer_id)
    return record


def coordinator_members(settings: Settings) -> list[Member]:
    """Active coordinators of this node's current membership view, incl. self, sorted by peer ID."""
    return shared_registry(settings).load_view().active_members()


def health_tracker(registry: PeerRegistry) -> HealthTracker:
    """Heartbeat times (wall clock) recorded by every process of this node."""
    return HealthTracker(registry.heartbeats())


def peer_is_up(settings: Settings, peer_id: str, *, self_peer_id: str | None = None) -> bool:
    """Heartbeat-based health of coordinator ``peer_id`` as seen by this coordinator (self: up)."""
    if self_peer_id is None:
        from tunnelmesh.identity import load_or_create_identity

        self_peer_id = load_or_create_identity(settings.data_dir).peer_id
    if peer_id == self_peer_id:
        return True
    tracker = health_tracker(shared_registry(settings))
    return tracker.is_up(peer_id, time.time(), settings.coordinator.heartbeat_interval,
                         settings.coordinator.heartbeat_misses)


def coordinator_list(settings: Settings, registry: PeerRegistry, self_peer_id: str,
                     view: MembershipView | None = None) -> list[dict[str, Any]]:
    """The list peers get: active members with health, the answering coordinator first."""
    from storage.membership import coordinator_list as build

    view = registry.load_view() if view is None else view
    entries = build(view, health_tracker(registry), time.time(), settings.coordinator.heartbeat_interval,
                    settings.coordinator.heartbeat_misses, self_peer_id=self_peer_id)
    entries.sort(key=lambda e: e["peer_id"] != self_peer_id)  # stable: the rest stay sorted by peer ID
    return entries


# ---------------------------------------------------------------------------------------------
# Proof of key ownership in registrations
# ---------------------------------------------------------------------------------------------

PROOF_FIELDS = {"name": "", "public_key": "", "addresses": [], "is_coordinator": False, "version": "",
                "api_url": "", "s3_url": ""}


def proof_message(body: dict[str, Any], timestamp: int) -> bytes:
    """What a registrant signs: the registration fields (canonical JSON) and a timestamp."""
    fields = {k: body.get(k, default) for k, default in PROOF_FIELDS.items()}
    return b"tunnelmesh-register-v1\n" + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + (
        f"\n{timestamp}".encode())


def sign_registration(identity: NodeIdentity, payload: dict[str, Any], *, now: float | None = None) -> dict[str, Any]:
    """``payload`` with a ``proof`` that this node holds the private key of ``public_key``."""
    timestamp = int(time.time() if now is None else now)
    signature = identity.sign(proof_message(payload, timestamp))
    return {**payload, "proof": {"timestamp": timestamp, "signature": base64.b64encode(signature).decode()}}


def check_registration_proof(body: dict[str, Any], public_key_b64: str, max_skew: float,
                             *, now: float | None = None) -> str | None:
    """None when ``body['proof']`` is valid; otherwise why not."""
    proof = body.get("proof")
    if not isinstance(proof, dict):
        return "proof: required (a signature with the private key of public_key)"
    timestamp, signature = proof.get("timestamp"), proof.get("signature")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or not isinstance(signature, str):
        return "proof: must be {timestamp: unix seconds, signature: base64}"
    if abs((time.time() if now is None else now) - timestamp) > max_skew:
        return "proof: the timestamp is outside the allowed clock skew"
    try:
        raw = base64.b64decode(signature, validate=True)
    except ValueError:
        return "proof: the signature is not base64"
    if not verify_signature(public_key_b64, proof_message(body, timestamp), raw):
        return "proof: the signature does not match public_key"
    return None


def registration_payload(settings: Settings, identity: NodeIdentity) -> dict[str, Any]:
    """The JSON body (with its proof of key ownership) this coordinator sends to ``POST /api/v1/register``."""
    return sign_registration(identity, {
        "name": settings.name,
        "public_key": identity.public_key_b64,
        "addresses": [_host_for_others(settings.coordinator.listen).strip("[]")],
        "is_coordinator": True,
        "version": version(),
        "api_url": api_url(settings),
        "s3_url": s3_url(settings),
    })


# ---------------------------------------------------------------------------------------------
# Client side of registration
# ---------------------------------------------------------------------------------------------


class RegistrationError(Exception):
    """Registration failed; ``retryable`` when the coordinator could not be reached at all."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class RegistrationResult:
    url: str
    response: dict[str, Any]


def coordinator_url(address: str, settings: Settings) -> str:
    """Base URL from a ``join`` argument: ``HOST:PORT``, ``HOST`` (port 8443) or a full URL.

    Without a scheme, https is used when this node has a TLS certificate configured (a mesh that
    uses TLS uses it everywhere), plain http otherwise.
    """
    address = address.strip().rstrip("/")
    if "://" in address:
        scheme, rest = address.split("://", 1)
        if scheme not in ("http", "https") or "/" in rest or not rest:
            raise RegistrationError(f"{address!r} is not a coordinator address (expected HOST:PORT or http(s)://HOST:PORT)")
        return address
    if not address or "/" in address or any(c.isspace() for c in address):
        raise RegistrationError(f"{address!r} is not a coordinator address (expected HOST:PORT)")
    if address.startswith("["):  # [IPv6]:PORT or [IPv6]
        inside, _, rest = address[1:].partition("]")
        host, port = f"[{inside}]", (rest[1:] if rest.startswith(":") else "8443")
    elif address.count(":") == 1:
        host, port = address.split(":")
    elif ":" not in address:
        host, port = address, "8443"  # the seed's default coordinator port
    else:
        raise RegistrationError(f"{address!r} is not a coordinator address (put IPv6 addresses in brackets)")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RegistrationError(f"{address!r} is not a coordinator address (expected HOST:PORT)")
    return f"{_scheme(settings)}://{host}:{port}"


def register_with(url: str, token: str, payload: dict[str, Any], *, timeout: float = 10.0,
                  verify: str | bool = True) -> RegistrationResult:
    """POST the registration to the coordinator at ``url``; raise RegistrationError if refused.

    ``verify``: TLS verification (a CA bundle path from ``coordinator.tls.ca``, or True).
    """
    import requests  # imported here: the other CLI commands do not need it

    try:
        resp = requests.post(f"{url}{REGISTER_PATH}", json=payload, timeout=(min(5.0, timeout), timeout),
                             headers={"Authorization": f"Bearer {token}"}, verify=verify)
    except requests.RequestException as exc:
        text = str(exc)
        if isinstance(exc, requests.Timeout):
            reason = "timed out"
        elif isinstance(exc, requests.exceptions.SSLError):
            reason = "TLS handshake failed"
        elif "refused" in text.lower():
            reason = "connection refused"
        elif any(s in text for s in ("Name or service not known", "nodename nor servname", "name resolution")):
            reason = "unknown host"
        else:
            reason = exc.__class__.__name__
        raise RegistrationError(f"cannot reach the coordinator at {url} ({reason})", retryable=True) from None
    try:
        body = resp.json()
    except ValueError:
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    if resp.status_code == 401:
        raise RegistrationError(f"the coordinator at {url} refused the mesh token: {message or 'unauthorized'}")
    if resp.status_code >= 500:
        raise RegistrationError(f"the coordinator at {url} failed to register this node (HTTP "
                                f"{resp.status_code}: {message or 'server error'})", retryable=True)
    if resp.status_code != 200:
        raise RegistrationError(f"the coordinator at {url} refused the registration (HTTP "
                                f"{resp.status_code}: {message or resp.reason})")
    if not isinstance(body, dict) or not isinstance(body.get("mesh_ip"), str):
        raise RegistrationError(f"{url} did not answer like a TunnelMesh coordinator (no registration in the response)")
    return RegistrationResult(url=url, response=body)


def decode_public_key(value: Any) -> bytes | None:
    """Raw 32-byte ed25519 key from its base64 form, or None when it is not one."""
    if not isinstance(value, str) or len(value) > 100:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return raw if len(raw) == 32 else None
