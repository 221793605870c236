"""ListBuckets, CreateBucket, HeadBucket, DeleteBucket, GetBucketLocation, unsupported sub-resources."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from tests.integration.s3.conftest import error_code, status_of
from tests.integration.s3.rawhttp import S3_NS, signed

pytestmark = pytest.mark.integration


def test_create_list_head_delete(s3, s3_path) -> None:
    response = s3.create_bucket(Bucket="lifecycle-bucket")
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert response["Location"] == "/lifecycle-bucket"
    names = [b["Name"] for b in s3_path.list_buckets()["Buckets"]]
    assert "lifecycle-bucket" in names
    head = s3.head_bucket(Bucket="lifecycle-bucket")
    assert head["ResponseMetadata"]["HTTPHeaders"]["x-amz-bucket-region"] == "us-east-1"
    assert s3.delete_bucket(Bucket="lifecycle-bucket")["ResponseMetadata"]["HTTPStatusCode"] == 204
    with pytest.raises(ClientError) as excinfo:
        s3.head_bucket(Bucket="lifecycle-bucket")
    assert status_of(excinfo) == 404
    assert "lifecycle-bucket" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_list_buckets_document(s3_server, bucket) -> None:
    response = signed(s3_server, "GET", "/")
    assert response.status == 200
    assert response.headers["content-type"] == "application/xml"
    root = response.xml()
    assert root.tag == f"{S3_NS}ListAllMyBucketsResult"
    assert root.findtext(f"{S3_NS}Owner/{S3_NS}ID") == s3_server.node_peer_id
    names = [b.findtext(f"{S3_NS}Name") for b in root.iter(f"{S3_NS}Bucket")]
    assert bucket in names and names == sorted(names)
    created = [b.findtext(f"{S3_NS}CreationDate") for b in root.iter(f"{S3_NS}Bucket")]
    assert all(c and c.endswith("Z") and "T" in c for c in created)


@pytest.mark.parametrize("name", [
    "ab", "a" * 64, "UpperCase", "under_score", "-leading", "trailing-", "two..dots", "dot.-dash",
    "192.168.1.1", "xn--punycode", "sthree-bucket", "bucket-s3alias", "has space", "bucket--ol-s3",
])
def test_invalid_bucket_names(s3_server, name) -> None:
    from urllib.parse import quote

    response = signed(s3_server, "PUT", "/" + quote(name))
    assert response.status == 400
    assert response.code == "InvalidBucketName"


def test_valid_edge_names(s3) -> None:
    for name in ("abc", "a" * 63, "with.dots.ok", "with-dash-1"):
        s3.create_bucket(Bucket=name)
        s3.delete_bucket(Bucket=name)


def test_already_owned_by_you(s3, bucket) -> None:
    with pytest.raises(ClientError) as excinfo:
        s3.create_bucket(Bucket=bucket)
    assert error_code(excinfo) == "BucketAlreadyOwnedByYou"
    assert status_of(excinfo) == 409


def test_already_exists_for_another_peer(s3_server, bucket) -> None:
    from tests.integration.s3.conftest import PEER_X

    with pytest.raises(ClientError) as excinfo:
        s3_server.client(PEER_X).create_bucket(Bucket=bucket)
    assert error_code(excinfo) == "BucketAlreadyExists"
    assert status_of(excinfo) == 409


def test_create_bucket_configuration(s3, s3_server) -> None:
    # boto3 refuses LocationConstraint=us-east-1 itself, so the document is sent by hand.
    body = (b'<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            b"<LocationConstraint>us-east-1</LocationConstraint></CreateBucketConfiguration>")
    assert signed(s3_server, "PUT", "/configured-bucket", body=body).status == 200
    wrong = body.replace(b"us-east-1", b"eu-west-3")
    response = signed(s3_server, "PUT", "/configured-bucket-2", body=wrong)
    assert (response.status, response.code) == (400, "IllegalLocationConstraintException")
    response = signed(s3_server, "PUT", "/configured-bucket-3", body=b"<CreateBucketConfiguration><oops")
    assert (response.status, response.code) == (400, "MalformedXML")
    response = signed(s3_server, "PUT", "/configured-bucket-4",
                      body=b'<!DOCTYPE x [<!ENTITY a "b">]><CreateBucketConfiguration/>')
    assert (response.status, response.code) == (400, "MalformedXML")
    with pytest.raises(ClientError):
        s3.head_bucket(Bucket="configured-bucket-2")


def test_delete_bucket_not_empty(s3, bucket) -> None:
    s3.put_object(Bucket=bucket, Key="keep", Body=b"x")
    with pytest.raises(ClientError) as excinfo:
        s3.delete_bucket(Bucket=bucket)
    assert error_code(excinfo) == "BucketNotEmpty"
    assert status_of(excinfo) == 409
    s3.delete_object(Bucket=bucket, Key="keep")
    s3.delete_bucket(Bucket=bucket)


def test_no_such_bucket(s3) -> None:
    for call in (lambda: s3.list_objects_v2(Bucket="missing-bucket"),
                 lambda: s3.delete_bucket(Bucket="missing-bucket"),
                 lambda: s3.get_bucket_location(Bucket="missing-bucket"),
                 lambda: s3.put_object(Bucket="missing-bucket", Key="k", Body=b"x"),
                 lambda: s3.get_object(Bucket="missing-bucket", Key="k")):
        with pytest.raises(ClientError) as excinfo:
            call()
        assert error_code(excinfo) == "NoSuchBucket"
        assert status_of(excinfo) == 404


def test_get_bucket_location(s3, s3_server, bucket) -> None:
    assert s3.get_bucket_location(Bucket=bucket)["LocationConstraint"] is None  # us-east-1 is empty
    root = signed(s3_server, "GET", f"/{bucket}", query="location").xml()
    assert root.tag == f"{S3_NS}LocationConstraint"


def test_versioning_and_acl_documents(s3, bucket) -> None:
    assert "Status" not in s3.get_bucket_versioning(Bucket=bucket)
    acl = s3.get_bucket_acl(Bucket=bucket)
    assert acl["Grants"][0]["Permission"] == "FULL_CONTROL"
    s3.put_object(Bucket=bucket, Key="k", Body=b"x")
    assert s3.get_object_acl(Bucket=bucket, Key="k")["Grants"][0]["Permission"] == "FULL_CONTROL"


@pytest.mark.parametrize("method,query", [
    ("GET", "policy"), ("PUT", "policy"), ("GET", "lifecycle"), ("PUT", "versioning"), ("GET", "cors"),
    ("GET", "tagging"), ("DELETE", "website"), ("GET", "versions"), ("PUT", "acl"), ("POST", ""),
])
def test_unsupported_bucket_subresources(s3_server, bucket, method, query) -> None:
    response = signed(s3_server, method, f"/{bucket}", query=query)
    assert (response.status, response.code) == (501, "NotImplemented")


def test_unsupported_through_boto3(s3, bucket) -> None:
    with pytest.raises(ClientError) as excinfo:
        s3.get_bucket_policy(Bucket=bucket)
    assert error_code(excinfo) == "NotImplemented"
    with pytest.raises(ClientError) as excinfo:
        s3.put_object_tagging(Bucket=bucket, Key="k", Tagging={"TagSet": []})
    assert error_code(excinfo) == "NotImplemented"
