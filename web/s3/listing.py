"""ListObjects (v1, marker) and ListObjectsV2 (list-type=2, continuation tokens).

The store lists in UTF-8 byte order and returns ``next_marker`` (the last key or common prefix
of a page); passing it back as ``start_after`` continues without skipping or repeating. v1 hands
it out as NextMarker (only with a delimiter, as S3: without one, clients continue from the last
key), v2 wraps it in an opaque continuation token.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from urllib.parse import quote

from flask import Response

from web.s3 import xml
from web.s3.call import S3Call
from web.s3.errors import S3Error
from web.s3.headers import quote_etag
from web.s3.responses import xml_response

MAX_KEYS = 1000
_TOKEN_PREFIX = b"tm1:"  # versions the token format, so it can change without confusing old clients


def encode_token(last_key: str) -> str:
    return base64.urlsafe_b64encode(_TOKEN_PREFIX + last_key.encode("utf-8", "surrogatepass")).decode()


def decode_token(token: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii"))
        if not raw.startswith(_TOKEN_PREFIX):
            raise ValueError("not one of our tokens")
        return raw[len(_TOKEN_PREFIX):].decode("utf-8", "surrogatepass")
    except (ValueError, UnicodeError, binascii.Error):
        raise S3Error("InvalidArgument", "The continuation token provided is incorrect",
                      ArgumentName="continuation-token") from None


def parse_max(call: S3Call, name: str, limit: int) -> int:
    text = call.param(name)
    if text is None or text == "":
        return limit
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise S3Error("InvalidArgument", f"Provided {name} not an integer or within integer range",
                      resource=call.resource, ArgumentName=name, ArgumentValue=text)
    return min(value, limit)


def encoder(call: S3Call) -> tuple[Callable[[str], str], bool]:
    """The function applied to keys and prefixes in the response, and whether it URL-encodes."""
    encoding = call.param("encoding-type")
    if encoding is None:
        return (lambda text: text), False
    if encoding.lower() != "url":
        raise S3Error("InvalidArgument", "Invalid Encoding Method specified in Request",
                      resource=call.resource, ArgumentName="encoding-type", ArgumentValue=encoding)
    # botocore decodes with unquote_plus: '+' must therefore be escaped, '/' may stay.
    return (lambda text: quote(text, safe="/", errors="surrogatepass")), True


def list_objects(call: S3Call) -> Response:
    bucket = call.bucket()
    list_type = call.param("list-type")
    if list_type not in (None, "1", "2"):
        raise S3Error("InvalidArgument", "Invalid List Type specified in Request", resource=call.resource,
                      ArgumentName="list-type", ArgumentValue=list_type)
    version_2 = list_type == "2"
    enc, url_encoded = encoder(call)
    prefix = call.param("prefix", "") or ""
    delimiter = call.param("delimiter", "") or ""
    max_keys = parse_max(call, "max-keys", MAX_KEYS)
    token = call.param("continuation-token") if version_2 else None
    start_after_param = call.param("start-after", "") if version_2 else call.param("marker", "")
    start_after = decode_token(token) if token else (start_after_param or "")

    if max_keys == 0:
        objects, prefixes, truncated, next_marker = [], [], False, ""
    else:
        page = call.store.list_objects(call.bucket_name, prefix=prefix, delimiter=delimiter,
                                       start_after=start_after, max_keys=max_keys)
        objects, prefixes = page.objects, page.common_prefixes
        truncated, next_marker = page.is_truncated, page.next_marker

    root = xml.document("ListBucketResult")
    xml.children(root, [("Name", call.bucket_name), ("Prefix", enc(prefix))])
    if version_2:
        xml.children(root, [
            ("ContinuationToken", token),
            ("StartAfter", enc(start_after_param) if start_after_param else None),
            ("KeyCount", len(objects) + len(prefixes)),
        ])
    else:
        xml.child(root, "Marker", enc(start_after_param or ""))
    xml.child(root, "MaxKeys", max_keys)
    if delimiter:
        xml.child(root, "Delimiter", enc(delimiter))
    xml.child(root, "IsTruncated", truncated)
    if truncated and version_2:
        xml.child(root, "NextContinuationToken", encode_token(next_marker))
    elif truncated and delimiter:
        xml.child(root, "NextMarker", enc(next_marker))
    if url_encoded:
        xml.child(root, "EncodingType", "url")
    with_owner = not version_2 or (call.param("fetch-owner", "") or "").lower() == "true"
    for record in objects:
        entry = xml.child(root, "Contents")
        xml.children(entry, [
            ("Key", enc(record.key)),
            ("LastModified", xml.iso8601(record.last_modified_us)),
            ("ETag", quote_etag(record.etag)),
            ("Size", record.size),
        ])
        if with_owner:
            xml.owner(entry, bucket.owner)
        xml.child(entry, "StorageClass", "STANDARD")
    for common_prefix in prefixes:
        xml.child(xml.child(root, "CommonPrefixes"), "Prefix", enc(common_prefix))
    return xml_response(root)
