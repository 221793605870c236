"""Object operations: PutObject, GetObject, HeadObject, DeleteObject, DeleteObjects, CopyObject."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from urllib.parse import unquote

from flask import Response

from storage.errors import StorageError
from storage.metadata import ObjectRecord
from storage.objects import ObjectMeta
from web.s3 import xml
from web.s3.call import RequestBody, S3Call
from web.s3.conditions import Preconditions, check_copy_source, etag_list, evaluate, parse_range
from web.s3.errors import S3Error, from_storage_error
from web.s3.headers import (
    CHECKSUM_PREFIX,
    RequestMeta,
    content_md5,
    http_date,
    object_headers,
    quote_etag,
    request_meta,
)
from web.s3.responses import body_stream, empty_response, request_id, stream_response, xml_response
from web.s3.target import check_key

# Query parameters of a GET that override response headers (used by presigned download links).
RESPONSE_OVERRIDES = {
    "response-content-type": "Content-Type",
    "response-content-language": "Content-Language",
    "response-expires": "Expires",
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
}


def object_meta(meta: RequestMeta) -> ObjectMeta:
    return ObjectMeta(content_type=meta.content_type, headers=meta.headers, user_meta=meta.user_meta)


# ---------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------


def open_upload_body(call: S3Call, limit: int,
                     checksum_sink: dict[str, str] | None = None) -> tuple[RequestBody, int | None]:
    """(reader, decoded length or None) for an object or part body, after the length checks S3
    makes before reading: MissingContentLength, EntityTooLarge. Verified checksums go to
    ``checksum_sink`` (the stored headers) when the body has been read."""
    headers = call.headers
    chunked_transfer = "chunked" in headers.get("Transfer-Encoding", "").lower()
    if headers.get("Content-Length") is None and not chunked_transfer:
        raise S3Error("MissingContentLength", resource=call.resource)
    reader = call.body(limit)
    if checksum_sink is not None:
        reader.store_checksums_in(checksum_sink)
    length = reader.content_length
    if length is not None and length > limit:
        raise S3Error("EntityTooLarge", resource=call.resource, ProposedSize=str(length),
                      MaxSizeAllowed=str(limit))
    if length == 0:
        reader.finish()  # the store reads nothing: verify the (empty) payload's framing now
    return reader, length


def checksum_headers_of(stored: Mapping[str, str]) -> dict[str, str]:
    """The x-amz-checksum-<algorithm> entries of an object's stored headers."""
    return {name: value for name, value in stored.items() if name.lower().startswith(CHECKSUM_PREFIX)}


def verified_checksums(reader: RequestBody) -> dict[str, str]:
    """Checksums the body reader verified (header or trailer), to store and echo like S3."""
    return {name.lower(): value for name, value in reader.checksums.items()}


# ---------------------------------------------------------------------------------------------
# PutObject
# ---------------------------------------------------------------------------------------------


def put_object(call: S3Call) -> Response:
    if call.headers.get("x-amz-copy-source") is not None:
        return copy_object(call)
    call.bucket()
    key = call.checked_key()
    if_match = call.headers.get("If-Match")
    if_none_match = call.headers.get("If-None-Match")
    if if_none_match is not None and if_none_match.strip() != "*":
        raise S3Error("NotImplemented", "If-None-Match on PUT only supports '*'.", resource=call.resource)
    md5 = content_md5(call.headers)
    meta = request_meta(call.headers)
    stored_headers = dict(meta.headers)
    reader, length = open_upload_body(call, call.service.settings.s3.max_object_size, stored_headers)
    record = call.store.put_object(
        call.bucket_name, key, reader, content_length=length,
        meta=ObjectMeta(content_type=meta.content_type, headers=stored_headers, user_meta=meta.user_meta),
        content_md5=md5, if_none_match_any=if_none_match is not None,
        if_match=etag_list(if_match) if if_match is not None else None)
    call.service.await_write_quorum(record)  # replication.write_quorum >= 2 (issue 5)
    response_headers = {"ETag": quote_etag(record.etag)}
    response_headers.update(checksum_headers_of(record.headers) or verified_checksums(reader))
    return empty_response(200, response_headers)


# ---------------------------------------------------------------------------------------------
# GetObject / HeadObject
# ---------------------------------------------------------------------------------------------


def _part_range(call: S3Call, record: ObjectRecord) -> tuple[int, int] | None:
    """The byte range of ``?partNumber=N`` (a multipart object's part N; part 1 of a single PUT is
    the whole object)."""
    text = call.param("partNumber")
    if text is None:
        return None
    if not text.isdigit() or not 1 <= int(text) <= 10000:
        raise S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive",
                      resource=call.resource, ArgumentName="partNumber", ArgumentValue=text)
    number = int(text)
    sizes = record.parts or (record.size,)
    if number > len(sizes):
        raise S3Error("InvalidPartNumber", "The requested partnumber is not satisfiable",
                      status=416, resource=call.resource,
                      headers={"Content-Range": f"bytes */{record.size}"})
    start = sum(sizes[: number - 1])
    return start, start + sizes[number - 1]


def get_object(call: S3Call, *, head: bool = False) -> Response:
    call.bucket()
    key = call.checked_key()
    record = call.store.head_object(call.bucket_name, key)
    outcome = evaluate(Preconditions.from_headers(call.headers), record.etag, record.last_modified_us)
    if outcome == 412:
        raise S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold",
                      resource=call.resource)
    if outcome == 304:
        return empty_response(304, {"ETag": quote_etag(record.etag),
                                    "Last-Modified": http_date(record.last_modified_us)})
    byte_range = _part_range(call, record)
    if byte_range is None:
        byte_range = parse_range(call.headers.get("Range"), record.size)
    # Stored checksums cover the whole object: S3 returns them only for whole-object reads, and
    # only when the client asks (boto3 does by default, and then verifies them).
    whole = byte_range is None or byte_range == (0, record.size)
    with_checksums = whole and call.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED"
    headers = object_headers(record, with_checksums=with_checksums)
    for param, header in RESPONSE_OVERRIDES.items():
        value = call.param(param)
        if value is not None:
            headers[header] = value
    start, end = byte_range if byte_range is not None else (0, record.size)
    status = 200
    if byte_range is not None and (call.param("partNumber") is not None or call.headers.get("Range")):
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{record.size}" if end > start else \
            f"bytes */{record.size}"
    if head:
        response = empty_response(status, headers)
        response.headers["Content-Length"] = str(end - start)
        return response
    blocks = call.store.read_object(record, start, end)
    # Read the first block before answering: a missing or corrupt first chunk is then still an
    # S3 error response instead of a connection cut after a 200.
    first = next(blocks, b"")
    body = body_stream(first, blocks, request_id(), call.resource)
    return stream_response(body, status, headers, end - start)


def head_object(call: S3Call) -> Response:
    return get_object(call, head=True)


# ---------------------------------------------------------------------------------------------
# DeleteObject / DeleteObjects
# ---------------------------------------------------------------------------------------------


def delete_object(call: S3Call) -> Response:
    call.bucket()
    _, tombstone = call.store.write_tombstone(call.bucket_name, call.checked_key())
    if tombstone is not None:
        call.service.await_write_quorum(tombstone)  # a delete is a write too (issue 5)
    return empty_response(204)


def delete_objects(call: S3Call) -> Response:
    call.bucket()
    body = call.small_body()
    md5 = content_md5(call.headers)
    if md5 is not None and hashlib.md5(body, usedforsecurity=False).digest() != md5:
        raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.",
                      resource=call.resource)
    quiet, keys = xml.parse_delete(body)
    # Every tombstone is committed first; then the write quorum is awaited for all of them at once.
    outcomes: list[S3Error | None] = []
    tombstones: dict[int, ObjectRecord] = {}
    for index, key in enumerate(keys):
        try:
            check_key(key, f"/{call.bucket_name}/{key}")
            _, tombstone = call.store.write_tombstone(call.bucket_name, key)
        except (S3Error, StorageError) as exc:
            outcomes.append(exc if isinstance(exc, S3Error) else from_storage_error(exc))
            continue
        outcomes.append(None)
        if tombstone is not None:  # a key that was a tombstone already waits for nothing
            tombstones[index] = tombstone
    for index, error in zip(tombstones, call.service.await_write_quorums(list(tombstones.values())), strict=True):
        outcomes[index] = error
    root = xml.document("DeleteResult")
    for key, error in zip(keys, outcomes, strict=True):
        if error is not None:
            entry = xml.child(root, "Error")
            xml.children(entry, [("Key", key), ("Code", error.code), ("Message", error.message)])
        elif not quiet:
            xml.child(xml.child(root, "Deleted"), "Key", key)
    return xml_response(root)


# ---------------------------------------------------------------------------------------------
# CopyObject
# ---------------------------------------------------------------------------------------------


def check_version_id(version_id: str | None, resource: str) -> None:
    """Objects here have one version, S3's "null" version (versioning never enabled): any other
    version ID cannot exist."""
    if version_id is not None and version_id != "null":
        raise S3Error("InvalidArgument", "Invalid version id specified", resource=resource,
                      ArgumentName="versionId", ArgumentValue=version_id)


def parse_copy_source(call: S3Call) -> tuple[str, str]:
    """(bucket, key) of x-amz-copy-source: ``[/]bucket/key[?versionId=v]``, URL-encoded."""
    value = call.headers.get("x-amz-copy-source", "")
    path, _, query = value.partition("?")
    if query:
        check_version_id(query.partition("versionId=")[2] or None, call.resource)
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        decoded = ""
    bucket, _, key = decoded.lstrip("/").partition("/")
    if not bucket or not key:
        raise S3Error("InvalidArgument", "Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
                      resource=call.resource, ArgumentName="x-amz-copy-source", ArgumentValue=value)
    check_key(key, f"/{bucket}/{key}")
    return bucket, key


def copy_source_record(call: S3Call) -> ObjectRecord:
    """The source object of a copy (read access checked, x-amz-copy-source-if-* evaluated)."""
    src_bucket, src_key = parse_copy_source(call)
    call.bucket(src_bucket)
    try:
        source = call.store.head_object(src_bucket, src_key)
    except StorageError as exc:
        raise from_storage_error(exc, resource=f"/{src_bucket}/{src_key}") from exc
    check_copy_source(Preconditions.from_headers(call.headers, "x-amz-copy-source-"),
                      source.etag, source.last_modified_us)
    return source


def copy_object(call: S3Call) -> Response:
    call.bucket()
    key = call.checked_key()
    directive = call.headers.get("x-amz-metadata-directive", "COPY").strip().upper()
    if directive not in ("COPY", "REPLACE"):
        raise S3Error("InvalidArgument", "Unknown metadata directive.", resource=call.resource,
                      ArgumentName="x-amz-metadata-directive", ArgumentValue=directive)
    source = copy_source_record(call)
    if (source.bucket, source.key) == (call.bucket_name, key) and directive == "COPY":
        raise S3Error("InvalidRequest",
                      "This copy request is illegal because it is trying to copy an object to itself without "
                      "changing the object's metadata, storage class, website redirect location or "
                      "encryption attributes.", resource=call.resource)
    max_size = call.service.settings.s3.max_object_size
    if source.size > max_size:
        raise S3Error("InvalidRequest", "The specified copy source is larger than the maximum allowable size "
                      f"for a copy source: {max_size}", resource=call.resource)
    meta = None
    if directive == "REPLACE":
        replaced = request_meta(call.headers)
        # The content does not change, so its checksums still hold.
        replaced.headers.update(checksum_headers_of(source.headers))
        meta = object_meta(replaced)
    record = call.store.copy_object(source.bucket, source.key, call.bucket_name, key, meta)
    call.service.await_write_quorum(record)  # replication.write_quorum >= 2 (issue 5)
    root = xml.document("CopyObjectResult")
    xml.children(root, [("LastModified", xml.iso8601(record.last_modified_us)),
                        ("ETag", quote_etag(record.etag))])
    for name, value in checksum_headers_of(record.headers).items():
        xml.child(root, "Checksum" + name.rsplit("-", 1)[-1].upper(), value)
    return xml_response(root)

