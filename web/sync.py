"""Coordinator endpoints of the manifest sync and the rebalance (logic in tunnelmesh/sync.py and
tunnelmesh/rebalance.py), served by the coordination app on ``coordinator.listen``.

- ``POST /api/v1/sync/<op>`` (active coordinators only): one step of a sync round, answered by
  ``SyncService.handle``: ``digest``, ``ranges``, ``summaries``, ``entries``, ``records``,
  ``purge``, ``confirm`` (which of these chunks do you hold, with your membership fingerprint).
- ``GET /api/v1/sync/progress`` (active coordinators and admins): this node's rebalance progress.
- ``POST /api/v1/sync/run`` (active coordinators and admins): one manifest-sync run now; answers
  its report (``{"skipped": ...}`` when a run is already in progress).
"""

from __future__ import annotations

import threading
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from storage.errors import StorageError
from tunnelmesh.config import Settings
from web.coordination import json_error

bp = Blueprint("sync", __name__, url_prefix="/api/v1/sync")

MAX_BODY = 64 * 1024 * 1024  # a fresh node's catch-up asks for every name at once
OPERATIONS = ("digest", "ranges", "summaries", "entries", "records", "purge", "confirm")
_SERVICE_KEY = "tunnelmesh_sync_service"
_lock = threading.Lock()


def _settings() -> Settings:
    return current_app.extensions["tunnelmesh"].settings  # type: ignore[no-any-return]


def _service() -> Any:
    service = current_app.extensions.get(_SERVICE_KEY)
    if service is None:
        with _lock:
            service = current_app.extensions.get(_SERVICE_KEY)
            if service is None:
                from tunnelmesh.sync import open_service

                service = open_service(_settings(), with_links=False)[0]
                current_app.extensions[_SERVICE_KEY] = service
    return service


def _admin_or_coordinator() -> Response | None:
    """None when the signed caller is an active coordinator or an admin peer, else the refusal."""
    from web.peer_auth import AuthFailure, authenticate

    try:
        peer_id = authenticate(coordinators_only=False)
    except AuthFailure as exc:
        return json_error(exc.status, exc.code, exc.message)
    registry = current_app.extensions["tunnelmesh"].registry
    member = registry.load_view().get(peer_id)
    record = registry.get(peer_id)
    if (member is not None and member.state == "active") or (record is not None and record.is_admin):
        return None
    return json_error(403, "forbidden", "only coordinators and admins of this mesh may call this endpoint")


@bp.before_request
def _before() -> Response | None:
    request.max_content_length = MAX_BODY
    if request.endpoint in ("sync.run_now", "sync.progress"):
        return _admin_or_coordinator()
    from web.peer_auth import require_coordinator

    return require_coordinator(lambda: None)()  # type: ignore[no-any-return]


@bp.post("/run")
def run_now() -> Response:
    from tunnelmesh.sync import run_sync_once

    return jsonify(run_sync_once(_settings()))


@bp.get("/progress")
def progress() -> Response:
    from tunnelmesh.rebalance import local_progress

    return jsonify(local_progress(_settings()))


@bp.post("/<op>")
def operation(op: str) -> Response:
    if op not in OPERATIONS:
        return json_error(404, "not_found", f"unknown sync operation {op!r}")
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        return json_error(400, "bad_request", "the body must be a JSON object")
    try:
        return jsonify(_service().handle(op, body))
    except (KeyError, TypeError, ValueError) as exc:
        return json_error(400, "bad_request", f"{op}: {exc.__class__.__name__}: {exc}")
    except StorageError as exc:
        return json_error(409, "rejected", f"{op}: {exc}")
