"""Dispatch: every S3 request goes through one view that parses the target, authenticates, and
picks the operation from the method and the sub-resource in the query string (S3 routes on
those, not on paths Werkzeug could match)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, request

from web.s3 import buckets, listing, multipart, objects
from web.s3.call import S3Call
from web.s3.errors import S3Error
from web.s3.service import S3Service
from web.s3.sigv4 import verify_request
from web.s3.target import Target, parse_target

Operation = Callable[[S3Call], Response]

METHODS = ["GET", "HEAD", "PUT", "POST", "DELETE"]
# Unauthenticated liveness probe for the supervisor and tests; "_health" can never be a bucket
# (S3 names have no underscores).
HEALTH_PATH = "/_health"

# (method, sub-resource or None) -> operation, per level of the path.
SERVICE_OPERATIONS: dict[tuple[str, str | None], Operation] = {
    ("GET", None): buckets.list_buckets,
}
BUCKET_OPERATIONS: dict[tuple[str, str | None], Operation] = {
    ("GET", None): listing.list_objects,
    ("GET", "location"): buckets.get_bucket_location,
    ("GET", "uploads"): multipart.list_multipart_uploads,
    ("GET", "versioning"): buckets.get_bucket_versioning,
    ("GET", "acl"): buckets.get_acl,
    ("HEAD", None): buckets.head_bucket,
    ("PUT", None): buckets.create_bucket,
    ("DELETE", None): buckets.delete_bucket,
    ("POST", "delete"): objects.delete_objects,
}
OBJECT_OPERATIONS: dict[tuple[str, str | None], Operation] = {
    ("GET", None): objects.get_object,
    ("GET", "partNumber"): objects.get_object,
    ("GET", "uploadId"): multipart.list_parts,
    ("GET", "acl"): buckets.get_acl,
    ("HEAD", None): objects.head_object,
    ("HEAD", "partNumber"): objects.head_object,
    ("PUT", None): objects.put_object,
    ("PUT", "uploadId"): multipart.upload_part,
    ("PUT", "partNumber"): multipart.part_without_upload,
    ("POST", "uploads"): multipart.create_multipart_upload,
    ("POST", "uploadId"): multipart.complete_multipart_upload,
    ("DELETE", None): objects.delete_object,
    ("DELETE", "uploadId"): multipart.abort_multipart_upload,
}


def choose_operation(method: str, target: Target) -> Operation:
    if not target.bucket:
        table, level = SERVICE_OPERATIONS, "service"
    elif not target.key:
        table, level = BUCKET_OPERATIONS, "bucket"
    else:
        table, level = OBJECT_OPERATIONS, "object"
    subresource = target.subresource
    if subresource == "versionId":  # only the "null" version exists (see objects.check_version_id)
        objects.check_version_id(target.params["versionId"], target.resource)
    operation = table.get((method, subresource))
    if operation is not None:
        return operation
    if level == "service":
        raise S3Error("MethodNotAllowed", resource="/", Method=method, ResourceType="SERVICE")
    message = f"{method} ?{subresource}" if subresource else f"{method} on an {level} URL"
    raise S3Error("NotImplemented", f"{message} is not implemented by this server.", resource=target.resource)


def service() -> S3Service:
    return current_app.extensions["tunnelmesh_s3"]


def virtual_host_bases(s3_service: S3Service) -> list[str]:
    bases = ["localhost"]
    advertise = s3_service.settings.s3.advertise_url
    if advertise:
        host = urlsplit(advertise).hostname
        if host:
            bases.append(host)
    return bases


def handle() -> Response:
    """The whole S3 API. Runs as a before_request hook, so Werkzeug's URL matching (which would
    merge slashes or refuse keys with newlines) never decides anything."""
    s3 = service()
    if request.path == HEALTH_PATH and request.method in ("GET", "HEAD"):
        return Response(b"ok\n", content_type="text/plain")
    target = parse_target(request.environ, virtual_host_bases(s3))
    if request.method not in METHODS:
        raise S3Error("MethodNotAllowed", resource=target.resource, Method=request.method,
                      ResourceType="OBJECT" if target.key else "BUCKET" if target.bucket else "SERVICE")
    s3.mesh_token()  # refuse everything, with a clear message, until the node has joined a mesh
    settings = s3.settings.s3
    auth = verify_request(request.method, target.raw_path, target.raw_query, request.headers,
                          lookup_secret=s3.lookup_secret, region=settings.region, now=datetime.now(UTC),
                          max_skew=settings.max_clock_skew, max_presign_expiry=settings.max_presign_expiry,
                          # `aws s3 presign` and boto3 presign with SigV2 for custom endpoints
                          allow_sigv2_presigned=True)
    operation = choose_operation(request.method, target)
    call = S3Call(method=request.method, target=target, headers=request.headers, environ=request.environ,
                  auth=auth, principal=s3.principal(auth.peer_id), service=s3)
    return operation(call)


def register(app: Flask) -> None:
    app.before_request(handle)
