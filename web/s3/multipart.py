"""Multipart uploads: Create, UploadPart, UploadPartCopy, Complete, Abort, ListParts,
ListMultipartUploads. Parts stream to the chunk store; completing concatenates chunk lists."""

from __future__ import annotations

from urllib.parse import quote

from flask import Response

from storage.errors import NoSuchUpload
from storage.metadata import UploadRecord
from web.s3 import xml
from web.s3.call import S3Call
from web.s3.conditions import parse_copy_source_range
from web.s3.errors import S3Error
from web.s3.headers import content_md5, quote_etag, request_meta
from web.s3.listing import encoder, parse_max
from web.s3.objects import copy_source_record, object_meta, open_upload_body, verified_checksums
from web.s3.responses import empty_response, xml_response

MAX_PART_NUMBER = 10_000
MAX_PART_SIZE = 5 * 1024**3  # S3's limit for one part


def _upload(call: S3Call) -> UploadRecord:
    """The upload named by ?uploadId, which must belong to the request's bucket and key."""
    upload_id = call.param("uploadId") or ""
    try:
        upload = call.store.get_upload(upload_id)
    except NoSuchUpload:
        upload = None
    if upload is None or upload.bucket != call.bucket_name or upload.key != call.key:
        raise S3Error("NoSuchUpload", resource=call.resource, UploadId=upload_id)
    return upload


def _part_number(call: S3Call) -> int:
    text = call.param("partNumber") or ""
    if not text.isdigit() or not 1 <= int(text) <= MAX_PART_NUMBER:
        raise S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive",
                      resource=call.resource, ArgumentName="partNumber", ArgumentValue=text)
    return int(text)


def part_without_upload(call: S3Call) -> Response:
    raise S3Error("InvalidArgument", "A part number needs an uploadId (UploadPart).", resource=call.resource,
                  ArgumentName="uploadId", ArgumentValue="")


def create_multipart_upload(call: S3Call) -> Response:
    call.bucket()
    key = call.checked_key()
    upload = call.store.create_multipart(call.bucket_name, key, call.principal.peer_id,
                                         object_meta(request_meta(call.headers)))
    root = xml.document("InitiateMultipartUploadResult")
    xml.children(root, [("Bucket", call.bucket_name), ("Key", key), ("UploadId", upload.upload_id)])
    headers = {}
    algorithm = call.headers.get("x-amz-checksum-algorithm")
    if algorithm:
        headers["x-amz-checksum-algorithm"] = algorithm
    return xml_response(root, headers=headers)


def upload_part(call: S3Call) -> Response:
    if call.headers.get("x-amz-copy-source") is not None:
        return upload_part_copy(call)
    call.bucket()
    call.checked_key()
    number = _part_number(call)
    upload = _upload(call)
    md5 = content_md5(call.headers)
    reader, length = open_upload_body(call, MAX_PART_SIZE)
    part = call.store.upload_part(upload.upload_id, number, reader, length, content_md5=md5)
    headers = {"ETag": quote_etag(part.etag)}
    headers.update(verified_checksums(reader))
    return empty_response(200, headers)


def upload_part_copy(call: S3Call) -> Response:
    call.bucket()
    call.checked_key()
    number = _part_number(call)
    upload = _upload(call)
    source = copy_source_record(call)
    range_header = call.headers.get("x-amz-copy-source-range")
    start, end = parse_copy_source_range(range_header, source.size) if range_header else (0, source.size)
    if end - start > MAX_PART_SIZE:
        raise S3Error("EntityTooLarge", resource=call.resource, MaxSizeAllowed=str(MAX_PART_SIZE))
    part = call.store.upload_part_copy(upload.upload_id, number, source, start, end)
    root = xml.document("CopyPartResult")
    xml.children(root, [("LastModified", xml.iso8601(part.last_modified_us)), ("ETag", quote_etag(part.etag))])
    return xml_response(root)


def complete_multipart_upload(call: S3Call) -> Response:
    call.bucket()
    key = call.checked_key()
    upload = _upload(call)
    parts = xml.parse_complete_multipart(call.small_body())
    record = call.store.complete_multipart(upload.upload_id, parts)
    call.service.await_write_quorum(record)  # replication.write_quorum >= 2 (issue 5)
    root = xml.document("CompleteMultipartUploadResult")
    host = call.headers.get("Host", "")
    scheme = call.environ.get("wsgi.url_scheme", "http")
    xml.children(root, [
        ("Location", f"{scheme}://{host}/{call.bucket_name}/{quote(key)}"),
        ("Bucket", call.bucket_name), ("Key", key), ("ETag", quote_etag(record.etag)),
    ])
    return xml_response(root)


def abort_multipart_upload(call: S3Call) -> Response:
    call.bucket()
    call.checked_key()
    upload = _upload(call)
    call.store.abort_multipart(upload.upload_id)
    return empty_response(204)


def list_parts(call: S3Call) -> Response:
    bucket = call.bucket()
    key = call.checked_key()
    upload = _upload(call)
    marker_text = call.param("part-number-marker") or "0"
    if not marker_text.isdigit():
        raise S3Error("InvalidArgument", "Provided part-number-marker not an integer or within integer range",
                      resource=call.resource, ArgumentName="part-number-marker", ArgumentValue=marker_text)
    marker = int(marker_text)
    max_parts = parse_max(call, "max-parts", 1000)
    page = call.store.list_parts(upload.upload_id, marker=marker, max_parts=max_parts)
    root = xml.document("ListPartsResult")
    xml.children(root, [("Bucket", call.bucket_name), ("Key", key), ("UploadId", upload.upload_id)])
    xml.owner(root, upload.owner, "Initiator")
    xml.owner(root, bucket.owner)
    xml.child(root, "StorageClass", "STANDARD")
    xml.child(root, "PartNumberMarker", marker)
    parts = list(page.parts)
    xml.child(root, "NextPartNumberMarker", page.next_marker)
    xml.child(root, "MaxParts", max_parts)
    xml.child(root, "IsTruncated", page.is_truncated)
    for part in parts:
        entry = xml.child(root, "Part")
        xml.children(entry, [
            ("PartNumber", part.part_number),
            ("LastModified", xml.iso8601(part.last_modified_us)),
            ("ETag", quote_etag(part.etag)),
            ("Size", part.size),
        ])
    return xml_response(root)


def list_multipart_uploads(call: S3Call) -> Response:
    bucket = call.bucket()
    if call.param("delimiter"):
        raise S3Error("NotImplemented", "ListMultipartUploads with a delimiter is not supported.",
                      resource=call.resource)
    enc, url_encoded = encoder(call)
    prefix = call.param("prefix", "") or ""
    key_marker = call.param("key-marker", "") or ""
    upload_id_marker = call.param("upload-id-marker", "") or ""
    max_uploads = parse_max(call, "max-uploads", 1000)
    page = call.store.list_uploads(call.bucket_name, prefix=prefix, key_marker=key_marker,
                                   upload_id_marker=upload_id_marker, max_uploads=max_uploads)
    uploads = list(page.uploads)
    root = xml.document("ListMultipartUploadsResult")
    xml.children(root, [("Bucket", call.bucket_name), ("KeyMarker", enc(key_marker)),
                        ("UploadIdMarker", upload_id_marker)])
    if page.is_truncated:
        xml.children(root, [("NextKeyMarker", enc(page.next_key_marker)),
                            ("NextUploadIdMarker", page.next_upload_id_marker)])
    xml.children(root, [("Prefix", enc(prefix)), ("MaxUploads", max_uploads),
                        ("IsTruncated", page.is_truncated)])
    if url_encoded:
        xml.child(root, "EncodingType", "url")
    for upload in uploads:
        entry = xml.child(root, "Upload")
        xml.children(entry, [("Key", enc(upload.key)), ("UploadId", upload.upload_id)])
        xml.owner(entry, upload.owner, "Initiator")
        xml.owner(entry, bucket.owner)
        xml.children(entry, [("StorageClass", "STANDARD"), ("Initiated", xml.iso8601(upload.initiated_us))])
    return xml_response(root)
