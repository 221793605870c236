"""Coordinator-to-coordinator data endpoints (served by the coordination app on coordinator.listen).

Only active coordinators may call them (``web.peer_auth.require_coordinator``, checked for every
route of the blueprint). Every answer is JSON except a chunk's bytes.

- ``POST /api/v1/replication/chunks/have`` ``{"hashes": [...]}`` -> ``{"have": [...]}``: which of
  these chunks this coordinator already stores (one request per push instead of one per chunk).
- ``PUT /api/v1/replication/chunks/<sha256>`` (raw bytes): stored only if the bytes hash to the
  name (422 otherwise); idempotent (an existing chunk is not rewritten). 201 ``{hash, size}``.
- ``GET /api/v1/replication/chunks/<sha256>``: the verified bytes, 404 if not held (or corrupt:
  the copy is quarantined and the caller tries another holder).
- ``POST /api/v1/replication/object`` ``{"object": ObjectRecord.to_dict(), "bucket": ...}`` and
  ``POST /api/v1/replication/bucket`` ``{"bucket": BucketRecord.to_dict()}``: applied with
  ``apply_remote_object`` / ``apply_remote_bucket`` (version vectors; no outbox row, so no echo).
  ``{"changed": bool}``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from storage.chunks import validate_hash
from storage.errors import ChunkMissing, CorruptChunk, InsufficientStorage, StorageError
from storage.metadata import BucketRecord
from tunnelmesh.config import Settings
from tunnelmesh.replication import MAX_HAVE_QUERY, apply_object_payload
from web.coordination import json_error

log = logging.getLogger(__name__)

bp = Blueprint("replication", __name__, url_prefix="/api/v1/replication")

MAX_CHUNK_BODY = 64 * 1024 * 1024 + 1024  # storage.chunk_size is at most 64 MiB
MAX_JSON_BODY = 64 * 1024 * 1024  # an object record lists up to ~1.6M chunks (40 bytes each raw)
_STORE_KEY = "tunnelmesh_replication_store"
_lock = threading.Lock()


def _settings() -> Settings:
    ctx = current_app.extensions.get("tunnelmesh")
    settings = getattr(ctx, "settings", None)
    return settings if settings is not None else current_app.extensions["tunnelmesh_settings"]


def _store() -> Any:
    """This process's ObjectStore for the data directory (opened on first use, after fork)."""
    store = current_app.extensions.get(_STORE_KEY)
    if store is None:
        with _lock:
            store = current_app.extensions.get(_STORE_KEY)
            if store is None:
                from storage.objects import ObjectStore
                from tunnelmesh.identity import load_or_create_identity

                settings = _settings()
                storage = settings.storage
                store = ObjectStore(settings.data_dir, actor=load_or_create_identity(settings.data_dir).peer_id,
                                    chunk_size=storage.chunk_size, fsync=storage.fsync,
                                    min_free_space=storage.min_free_space)
                current_app.extensions[_STORE_KEY] = store
    return store


def _authorize() -> Response | None:
    """None if the caller is an active coordinator, else the refusal (the contract's decorator)."""
    from web.peer_auth import require_coordinator

    return require_coordinator(lambda: None)()


@bp.before_request
def _before() -> Response | None:
    # Chunk uploads are far larger than the JSON API's coordinator.max_request_body.
    request.max_content_length = MAX_CHUNK_BODY if request.method == "PUT" else MAX_JSON_BODY
    return _authorize()


def _json_object() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)
    return body if isinstance(body, dict) else {}


def _hash_or_none(value: object) -> str | None:
    try:
        return validate_hash(value)
    except ValueError:
        return None


@bp.post("/chunks/have")
def chunks_have() -> Response:
    hashes = _json_object().get("hashes")
    if not isinstance(hashes, list) or len(hashes) > MAX_HAVE_QUERY:
        return json_error(400, "bad_request", f"hashes: must be a list of at most {MAX_HAVE_QUERY} chunk hashes")
    if any(_hash_or_none(h) is None for h in hashes):
        return json_error(400, "bad_request", "hashes: every entry must be 64 lowercase hex characters")
    chunks = _store().chunks
    return jsonify({"have": [h for h in dict.fromkeys(hashes) if chunks.exists(h)]})


@bp.put("/chunks/<chunk_hash>")
def put_chunk(chunk_hash: str) -> Response:
    if _hash_or_none(chunk_hash) is None:
        return json_error(400, "bad_request", "the chunk name must be its SHA-256 as 64 lowercase hex characters")
    data = request.get_data(cache=False)
    try:
        ref = _store().chunks.write_verified(data, chunk_hash)
    except CorruptChunk as exc:
        return json_error(422, "hash_mismatch", str(exc))
    except InsufficientStorage as exc:
        return json_error(507, "insufficient_storage", str(exc))
    response = jsonify({"hash": ref.hash, "size": ref.size})
    response.status_code = 201
    return response


@bp.get("/chunks/<chunk_hash>")
def get_chunk(chunk_hash: str) -> Response:
    if _hash_or_none(chunk_hash) is None:
        return json_error(400, "bad_request", "the chunk name must be its SHA-256 as 64 lowercase hex characters")
    store = _store()
    try:
        data = store.chunks.read(chunk_hash)
    except ChunkMissing as exc:
        return json_error(404, "no_such_chunk", str(exc))
    except CorruptChunk as exc:
        # Our replica is bad (now quarantined): repair it from another holder, then serve it.
        data = _repair_chunk(store, chunk_hash)
        if data is None:
            return json_error(404, "no_such_chunk", str(exc))
    return Response(data, mimetype="application/octet-stream")


def _repair_chunk(store: Any, chunk_hash: str) -> bytes | None:
    """A good copy of a chunk fetched from another coordinator and stored again, or None."""
    from storage.chunks import ChunkRef
    from tunnelmesh.replication import ChunkFetcher

    try:
        data = ChunkFetcher(_settings()).fetch(ChunkRef(chunk_hash, 0))
        store.chunks.write_verified(data, chunk_hash)
    except Exception:  # noqa: BLE001 - no good copy reachable now: the caller tries another holder
        log.warning("could not repair corrupt chunk %s", chunk_hash, exc_info=True)
        return None
    log.info("repaired corrupt chunk %s from another coordinator", chunk_hash)
    return data


@bp.post("/object")
def put_object_record() -> Response:
    body = _json_object()
    if not isinstance(body.get("object"), dict) or not isinstance(body.get("bucket", {}), dict | None):
        return json_error(400, "bad_request", "object: must be an object record")
    try:
        changed = apply_object_payload(_store(), body)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return json_error(400, "bad_request", f"invalid object record: {exc.__class__.__name__}: {exc}")
    except StorageError as exc:
        return json_error(400 if exc.code != "InsufficientStorage" else 507, "rejected", str(exc))
    return jsonify({"changed": changed, "peer": getattr(g, "peer_id", None)})


@bp.post("/bucket")
def put_bucket_record() -> Response:
    raw = _json_object().get("bucket")
    if not isinstance(raw, dict):
        return json_error(400, "bad_request", "bucket: must be a bucket record")
    try:
        changed = _store().apply_remote_bucket(BucketRecord.from_dict(raw))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return json_error(400, "bad_request", f"invalid bucket record: {exc.__class__.__name__}: {exc}")
    except StorageError as exc:
        return json_error(400, "rejected", str(exc))
    return jsonify({"changed": bool(changed)})
