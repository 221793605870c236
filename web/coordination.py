"""The coordination API of a coordinator (JSON over HTTP on ``coordinator.listen``).

- ``GET /health`` (no auth): ``{status, name, peer_id, mesh_ip, version, redis, worker, processes}``.
  Always 200 while the API answers; ``status`` is ``ok`` when Redis answers, else ``degraded``.
- ``POST /api/v1/register`` (``Authorization: Bearer <mesh token>``): registers a node (see
  :func:`register`). Request ``{name, public_key, addresses, is_coordinator, version, api_url,
  s3_url}``; response ``{peer_id, peer_name, mesh_ip, mesh_cidr, is_admin, s3, coordinators,
  coord_mesh_ips, server_name, server_peer_id, server_version}``.

Every error is JSON ``{"error": <code>, "message": <text>}`` with the HTTP status, never an HTML
page or a traceback.

Cluster endpoints (issue 4; logic in :mod:`tunnelmesh.cluster`):

- ``GET /api/v1/coordinators`` (mesh token): ``{membership_version, membership_digest,
  coordinators, server_peer_id}``.
- ``POST /api/v1/coordinators/heartbeat``, ``POST /api/v1/coordinators/registry``,
  ``POST /api/v1/coordinators/remove``: signed by an active coordinator (:mod:`web.peer_auth`).
- ``POST /api/v1/peers/heartbeat``: signed by any registered node; answers the coordinator list.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from typing import Any

import redis
from flask import Blueprint, Flask, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from storage import meship
from storage.membership import is_peer_id
from storage.registry import PeerRegistry, ReservedName
from tunnelmesh import cluster, node, redis_server, supervisor
from tunnelmesh.config import Settings, load_config
from tunnelmesh.identity import load_or_create_identity, peer_id_from_public_key, read_token, s3_credentials
from web.peer_auth import require_coordinator, require_peer

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_ADDRESSES = 32
MAX_FIELD = 512

bp = Blueprint("coordination", __name__)


class ApiError(Exception):
    """An error answered as JSON with ``status``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Coordination:
    """Per-process state of the API: settings, identity, registry, mesh token, Redis client."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.identity = load_or_create_identity(settings.data_dir)
        self.registry: PeerRegistry = node.shared_registry(settings)
        self._token: str | None = None
        self._redis: redis.Redis | None = None

    @property
    def token(self) -> str | None:
        # Read lazily and cached: the supervisor writes it before starting the API.
        if self._token is None:
            self._token = read_token(self.settings.data_dir)
        return self._token

    def redis_ok(self) -> bool:
        try:
            if self._redis is None:
                self._redis = redis_server.client(self.settings, timeout=0.5)
            return bool(self._redis.ping())
        except (redis.RedisError, OSError):
            return False

    def worker_alive(self) -> bool:
        try:
            return self._redis is not None and bool(self._redis.exists(redis_server.WORKER_ALIVE_KEY))
        except (redis.RedisError, OSError):
            return False


def _ctx() -> Coordination:
    return current_app.extensions["tunnelmesh"]


def json_error(status: int, code: str, message: str) -> Any:
    """The JSON error every coordinator endpoint answers: {"error": code, "message": text}."""
    response = jsonify({"error": code, "message": message})
    response.status_code = status
    return response


def require_mesh_token() -> None:
    """401 unless the request carries ``Authorization: Bearer <mesh token>`` (constant-time compare)."""
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "unauthorized", "missing mesh token (send Authorization: Bearer <token>)")
    token = _ctx().token
    if token is None:
        raise ApiError(503, "not_ready", "this coordinator has no mesh token yet")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "unauthorized", "invalid mesh token")


def _json_object() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)  # force: any content type; silent: None if malformed
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


def _string(body: dict[str, Any], key: str, *, required: bool = False, limit: int = MAX_FIELD) -> str:
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError(400, "bad_request", f"{key}: required")
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise ApiError(400, "bad_request", f"{key}: must be a string of at most {limit} characters")
    return value


def _url(body: dict[str, Any], key: str) -> str:
    value = _string(body, key)
    if value and not re.match(r"^https?://[^\s/]+$", value.rstrip("/")):
        raise ApiError(400, "bad_request", f"{key}: must be an http(s)://host:port URL")
    return value.rstrip("/")


@bp.get("/health")
def health() -> Any:
    ctx = _ctx()
    me = ctx.registry.get(ctx.identity.peer_id)
    redis_up = ctx.redis_ok()
    state = supervisor.read_state(ctx.settings) or {}
    processes = {name: info.get("state") for name, info in state.get("children", {}).items()}
    return jsonify({
        "status": "ok" if redis_up else "degraded",
        "name": ctx.settings.name,
        "peer_id": ctx.identity.peer_id,
        "mesh_ip": me.mesh_ip if me else None,
        "version": node.version(),
        "redis": "ok" if redis_up else "down",
        "worker": "up" if redis_up and ctx.worker_alive() else "down",
        "processes": processes,
    })


@bp.post("/api/v1/register")
def register() -> Any:
    """Register (or refresh) a node: validates the body, stores it, answers with its assignment.

    A coordinator registration (and any registration of a key that belongs to a coordinator) must
    carry ``proof``: a signature with the private key of ``public_key`` over the registration
    fields and a timestamp (see :func:`tunnelmesh.node.sign_registration`), so nobody can register
    or rename someone else's coordinator. A plain peer's proof is checked when present.
    """
    require_mesh_token()
    ctx = _ctx()
    settings = ctx.settings
    body = _json_object()
    name = _string(body, "name", required=True, limit=63)
    if not NAME_RE.match(name):
        raise ApiError(400, "bad_request", "name: must be 1-63 lowercase letters, digits or '-', "
                                           "starting and ending with a letter or digit")
    public_key = node.decode_public_key(body.get("public_key"))
    if public_key is None:
        raise ApiError(400, "bad_request", "public_key: must be a base64-encoded 32-byte ed25519 public key")
    addresses = body.get("addresses", [])
    if not isinstance(addresses, list) or len(addresses) > MAX_ADDRESSES or not all(
            isinstance(a, str) and 0 < len(a) <= 255 for a in addresses):
        raise ApiError(400, "bad_request", f"addresses: must be a list of at most {MAX_ADDRESSES} host names or IPs")
    is_coordinator = body.get("is_coordinator", False)
    if not isinstance(is_coordinator, bool):
        raise ApiError(400, "bad_request", "is_coordinator: must be true or false")
    version = _string(body, "version", limit=64)
    api_url, s3_url = _url(body, "api_url"), _url(body, "s3_url")
    if is_coordinator and not api_url:
        raise ApiError(400, "bad_request", "api_url: required for a coordinator")

    peer_id = peer_id_from_public_key(public_key)
    self_id = ctx.identity.peer_id
    view = ctx.registry.load_view()
    holds_coordinator_key = view.get(peer_id) is not None or peer_id == self_id
    if is_coordinator or holds_coordinator_key or "proof" in body:
        problem = node.check_registration_proof(body, body["public_key"], settings.coordinator.max_clock_skew)
        if problem is not None:
            raise ApiError(403, "invalid_proof", f"{problem}; a coordinator must prove it holds its key")
    if peer_id == self_id:
        raise ApiError(409, "conflict", "a coordinator does not register with itself")
    try:
        record = ctx.registry.register(
            peer_id=peer_id, name=name, public_key=body["public_key"], addresses=addresses,
            is_coordinator=is_coordinator or holds_coordinator_key, version=version, api_url=api_url, s3_url=s3_url,
            mesh_cidr=settings.coordinator.mesh_cidr,
            is_admin=lambda pid, n: node.matches_admin(settings.coordinator.admin_peers, pid, n))
    except ReservedName as exc:
        raise ApiError(403, "reserved_name", f"name: {exc}") from None
    except meship.AddressPoolExhausted as exc:
        raise ApiError(507, "mesh_full", str(exc)) from None
    log.info("registered %s (peer %s, mesh IP %s, coordinator=%s)", record.name, peer_id, record.mesh_ip,
             is_coordinator)
    if is_coordinator:
        # The registrar just heard from it, and spreads the new member to everyone at once.
        ctx.registry.record_heartbeat(peer_id, time.time())
        view, changed = node.add_coordinator(ctx.registry, record, self_id)
        if changed:
            cluster.trigger_round(settings)

    coordinators = node.coordinator_list(settings, ctx.registry, self_id, view)
    credentials = s3_credentials(ctx.token or "", peer_id)
    answer = {
        "peer_id": peer_id,
        "peer_name": record.name,
        "mesh_ip": record.mesh_ip,
        "mesh_cidr": settings.coordinator.mesh_cidr,
        "is_admin": record.is_admin,
        "s3": {"access_key": credentials.access_key, "secret_key": credentials.secret_key,
               "endpoint": node.s3_url(settings), "region": settings.s3.region},
        "coordinators": coordinators,
        "coord_mesh_ips": [c["mesh_ip"] for c in coordinators],
        "membership_version": view.version,
        "membership_digest": view.digest(),
        "server_name": settings.name,
        "server_peer_id": self_id,
        "server_version": node.version(),
    }
    if is_coordinator:
        answer["membership"] = view.to_dict()  # the joining coordinator learns every member
    return jsonify(answer)


def _list_answer(ctx: Coordination) -> dict[str, Any]:
    view = ctx.registry.load_view()
    return {
        "membership_version": view.version,
        "membership_digest": view.digest(),
        "coordinators": node.coordinator_list(ctx.settings, ctx.registry, ctx.identity.peer_id, view),
        "server_peer_id": ctx.identity.peer_id,
    }


@bp.get("/api/v1/coordinators")
def list_coordinators() -> Any:
    """The coordinator list with health and the membership version (mesh token)."""
    require_mesh_token()
    return jsonify(_list_answer(_ctx()))


@bp.post(cluster.HEARTBEAT_PATH)
@require_coordinator
def coordinator_heartbeat() -> Any:
    """A heartbeat from another coordinator: merge its view, answer with ours."""
    ctx = _ctx()
    body = _json_object()
    try:
        answer, changed = cluster.receive_heartbeat(ctx.settings, ctx.registry, g.peer_id, body)
    except ValueError as exc:
        raise ApiError(400, "bad_request", f"membership: {exc}") from None
    if changed:
        cluster.trigger_round(ctx.settings)  # pass the news on without waiting for the next round
    return jsonify(answer)


@bp.post(cluster.REGISTRY_SYNC_PATH)
@require_coordinator
def registry_sync() -> Any:
    """Registry anti-entropy: merge the sender's records, answer with all of ours."""
    ctx = _ctx()
    body = _json_object()
    try:
        records = cluster.parse_records(body.get("records"))
    except ValueError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    return jsonify(cluster.receive_records(ctx.settings, ctx.registry, records))


@bp.post(cluster.REMOVE_PATH)
@require_coordinator
def remove_coordinator() -> Any:
    """Admin removal of a coordinator (itself, or anyone when the caller is an admin coordinator)."""
    ctx = _ctx()
    body = _json_object()
    target = body.get("peer_id")
    if not is_peer_id(target):
        raise ApiError(400, "bad_request", "peer_id: must be 16 lowercase hex characters")
    if not cluster.may_remove(ctx.settings, ctx.registry, g.peer_id, target):
        raise ApiError(403, "forbidden", "only the coordinator itself or an admin coordinator may remove it")
    view, changed = cluster.remove_member(ctx.settings, ctx.registry, target, ctx.identity.peer_id)
    if changed:
        cluster.trigger_round(ctx.settings)
    return jsonify({"removed": target, "membership_version": view.version})


@bp.post("/api/v1/peers/heartbeat")
@require_peer
def peer_heartbeat() -> Any:
    """A mesh peer's heartbeat: answered with the coordinator list (``membership_version`` tells
    the peer whether it changed; health flags may change without a new version)."""
    ctx = _ctx()
    body = _json_object()
    known = body.get("membership_version")
    if known is not None and (not isinstance(known, int) or isinstance(known, bool)):
        raise ApiError(400, "bad_request", "membership_version: must be an integer")
    ctx.registry.touch(g.peer_id)
    answer = _list_answer(ctx)
    answer["coord_mesh_ips"] = [c["mesh_ip"] for c in answer["coordinators"]]
    return jsonify(answer)


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Any:
        return json_error(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        code = re.sub(r"[^a-z0-9]+", "_", (exc.name or "error").lower()).strip("_")
        message = exc.description or exc.name or "error"
        if exc.code == 413:
            message = f"the body exceeds coordinator.max_request_body ({current_app.config['MAX_CONTENT_LENGTH']} bytes)"
        response = json_error(exc.code or 500, code, message)
        if exc.code == 405 and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_error(500, "internal_error", "internal error (see the coordinator's log)")


def create_app(settings: Settings | None = None) -> Flask:
    """The coordination Flask app (config from ``$TUNNELMESH_CONFIG`` unless ``settings`` is given)."""
    settings = settings if settings is not None else load_config(check_data_dir=False)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.coordinator.max_request_body
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["tunnelmesh"] = Coordination(settings)
    app.register_blueprint(bp)
    try:
        from web.replication import bp as replication_bp  # written by the replication issue
    except ModuleNotFoundError as exc:
        if exc.name != "web.replication":
            raise
    else:
        app.register_blueprint(replication_bp)
    from web.sync import bp as sync_bp  # issue 6: manifest sync and rebalance endpoints

    app.register_blueprint(sync_bp)
    from web.metrics import bp as metrics_bp

    app.register_blueprint(metrics_bp)
    _register_error_handlers(app)
    return app
