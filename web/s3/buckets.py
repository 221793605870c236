"""Service and bucket operations: ListBuckets, CreateBucket, HeadBucket, DeleteBucket,
GetBucketLocation, and the minimal GET ?versioning / ?acl documents some clients ask for."""

from __future__ import annotations

import ipaddress
import re

from flask import Response

from web.s3 import xml
from web.s3.access import visible_buckets
from web.s3.call import S3Call
from web.s3.errors import S3Error
from web.s3.responses import empty_response, xml_response

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def bucket_name_problem(name: str) -> str | None:
    """Why ``name`` breaks S3's bucket naming rules, or None when it is valid."""
    if not 3 <= len(name) <= 63:
        return "Bucket names must be between 3 and 63 characters long."
    if not _BUCKET_NAME.match(name):
        return ("Bucket names can consist only of lowercase letters, numbers, dots and hyphens, "
                "and must begin and end with a letter or number.")
    if ".." in name or ".-" in name or "-." in name:
        return "Bucket names must not contain two adjacent periods, or a period next to a hyphen."
    try:
        ipaddress.IPv4Address(name)
        return "Bucket names must not be formatted as an IP address."
    except ValueError:
        pass
    if name.startswith(_RESERVED_PREFIXES) or name.endswith(_RESERVED_SUFFIXES):
        return "Bucket names must not use a prefix or suffix that S3 reserves."
    return None


def list_buckets(call: S3Call) -> Response:
    prefix = call.param("prefix", "") or ""
    buckets = [b for b in call.store.list_buckets() if not b.deleted and b.name.startswith(prefix)]
    root = xml.document("ListAllMyBucketsResult")
    xml.owner(root, call.principal.peer_id)
    listed = xml.child(root, "Buckets")
    for bucket in sorted(visible_buckets(call.principal, buckets), key=lambda b: b.name):
        entry = xml.child(listed, "Bucket")
        xml.child(entry, "Name", bucket.name)
        xml.child(entry, "CreationDate", xml.iso8601(bucket.created_us))
        xml.child(entry, "BucketRegion", call.service.settings.s3.region)
    if prefix:
        xml.child(root, "Prefix", prefix)
    return xml_response(root)


def create_bucket(call: S3Call) -> Response:
    name = call.bucket_name
    problem = bucket_name_problem(name)
    if problem:
        raise S3Error("InvalidBucketName", problem, resource=call.resource, BucketName=name)
    if call.headers.get("x-amz-bucket-object-lock-enabled", "").lower() == "true":
        raise S3Error("NotImplemented", "Object Lock is not supported.", resource=call.resource)
    location = xml.parse_create_bucket(call.small_body(64 * 1024))
    region = call.service.settings.s3.region
    if location and location != region:
        raise S3Error("IllegalLocationConstraintException",
                      f"The {location} location constraint is incompatible for the region specific endpoint "
                      f"this request was sent to ({region}).", resource=call.resource)
    call.store.create_bucket(name, owner=call.principal.peer_id)
    return empty_response(200, {"Location": f"/{name}"})


def head_bucket(call: S3Call) -> Response:
    call.bucket()
    return empty_response(200, {"x-amz-bucket-region": call.service.settings.s3.region})


def delete_bucket(call: S3Call) -> Response:
    call.bucket()
    call.store.delete_bucket(call.bucket_name)
    return empty_response(204)


def get_bucket_location(call: S3Call) -> Response:
    call.bucket()
    region = call.service.settings.s3.region
    root = xml.document("LocationConstraint")
    # S3 answers an empty constraint for us-east-1 (the "classic" region).
    if region != "us-east-1":
        root.text = region
    return xml_response(root)


def get_bucket_versioning(call: S3Call) -> Response:
    """Versioning was never enabled: S3 answers an empty configuration."""
    call.bucket()
    return xml_response(xml.document("VersioningConfiguration"))


def get_acl(call: S3Call) -> Response:
    """GET ?acl on a bucket or object: the owner has FULL_CONTROL (the only ACL there is)."""
    bucket = call.bucket()
    if call.key:
        call.store.head_object(call.bucket_name, call.checked_key())
    root = xml.document("AccessControlPolicy")
    xml.owner(root, bucket.owner)
    grants = xml.child(root, "AccessControlList")
    grant = xml.child(grants, "Grant")
    grantee = xml.child(grant, "Grantee")
    grantee.set("xmlns:xsi", "http://www.w3.org/2001/XMLSchema-instance")
    grantee.set("xsi:type", "CanonicalUser")
    xml.child(grantee, "ID", bucket.owner)
    xml.child(grantee, "DisplayName", bucket.owner)
    xml.child(grant, "Permission", "FULL_CONTROL")
    return xml_response(root)
