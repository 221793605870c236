"""Authentication (SigV4 headers and presigned URLs, clock skew, wrong secrets) and bucket access."""

from __future__ import annotations

import datetime as dt
import os
from unittest import mock

import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError

from bench._server import S3Server
from tests.integration.s3.conftest import ADMIN_PEER, PEER_X, PEER_Y, error_code, status_of
from tests.integration.s3.rawhttp import RawResponse, send, sign, signed_chunks_put

pytestmark = pytest.mark.integration

NO_RETRIES = {"retries": {"max_attempts": 1, "mode": "standard"}}


def test_wrong_secret(s3_server, bucket) -> None:
    client = s3_server.client(secret="d3JvbmcgX3NlY3JldCBmb3IgdGhpcyBwZWVyISE=", **NO_RETRIES)
    for call in (lambda: client.list_buckets(), lambda: client.put_object(Bucket=bucket, Key="k", Body=b"x")):
        with pytest.raises(ClientError) as excinfo:
            call()
        assert (error_code(excinfo), status_of(excinfo)) == ("SignatureDoesNotMatch", 403)


def test_unknown_access_key(s3_server) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          aws_access_key_id="AKIAIOSFODNN7EXAMPLE", aws_secret_access_key="x" * 40,
                          config=Config(**NO_RETRIES))
    with pytest.raises(ClientError) as excinfo:
        client.list_buckets()
    assert (error_code(excinfo), status_of(excinfo)) == ("InvalidAccessKeyId", 403)


def test_anonymous_and_malformed_authorization(s3_server, bucket) -> None:
    response = send(s3_server, "GET", f"/{bucket}")
    assert (response.status, response.code) == (403, "AccessDenied")
    headers = {"Authorization": "AWS4-HMAC-SHA256 Credential=broken", "x-amz-date": "20250101T000000Z",
               "x-amz-content-sha256": "UNSIGNED-PAYLOAD"}
    response = send(s3_server, "GET", f"/{bucket}", headers=headers)
    assert (response.status, response.code) == (400, "AuthorizationHeaderMalformed")


def test_skewed_clock(s3_server) -> None:
    skewed = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=20)
    client = s3_server.client(**NO_RETRIES)
    with mock.patch("botocore.auth.get_current_datetime", return_value=skewed.replace(tzinfo=None)):
        with pytest.raises(ClientError) as excinfo:
            client.list_buckets()
    assert (error_code(excinfo), status_of(excinfo)) == ("RequestTimeTooSkewed", 403)
    # 10 minutes off is within S3's 15-minute window
    near = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    with mock.patch("botocore.auth.get_current_datetime", return_value=near.replace(tzinfo=None)):
        client.list_buckets()


def test_presigned_get_with_requests(s3, s3_server, bucket) -> None:
    s3.put_object(Bucket=bucket, Key="shared/ü file.txt", Body=b"presigned body", ContentType="text/plain")
    v4 = s3_server.client(signature_version="s3v4")
    url = v4.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "shared/ü file.txt"},
                                    ExpiresIn=300)
    assert "X-Amz-Signature=" in url
    response = requests.get(url, timeout=10)
    assert response.status_code == 200 and response.content == b"presigned body"
    assert response.headers["Content-Type"] == "text/plain"
    # a range with a presigned URL (Range is not signed, and need not be)
    assert requests.get(url, headers={"Range": "bytes=0-8"}, timeout=10).content == b"presigned"
    # tampering with the signed query fails
    response = requests.get(url.replace("X-Amz-Expires=300", "X-Amz-Expires=301"), timeout=10)
    assert response.status_code == 403 and b"<Code>SignatureDoesNotMatch</Code>" in response.content
    # boto3's default presign for a custom endpoint (SigV2 query auth) works as well
    url = s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "shared/ü file.txt"})
    assert requests.get(url, timeout=10).content == b"presigned body"


def test_presigned_get_of_longest_key(s3, s3_server, bucket) -> None:
    """1024 bytes of 3-byte characters: 3,072 characters once percent-encoded, plus the query."""
    key = "日" * 341 + "x"
    s3.put_object(Bucket=bucket, Key=key, Body=b"long")
    v4 = s3_server.client(signature_version="s3v4")
    url = v4.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=300)
    assert requests.get(url, timeout=10).content == b"long"


def test_presigned_put(s3, s3_server, bucket) -> None:
    v4 = s3_server.client(signature_version="s3v4")
    url = v4.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": "uploaded"}, ExpiresIn=300)
    assert requests.put(url, data=b"via presigned put", timeout=10).status_code == 200
    assert s3.get_object(Bucket=bucket, Key="uploaded")["Body"].read() == b"via presigned put"


def test_expired_presigned_url(s3, s3_server, bucket) -> None:
    s3.put_object(Bucket=bucket, Key="old", Body=b"x")
    v4 = s3_server.client(signature_version="s3v4")
    two_hours_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)).replace(tzinfo=None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=two_hours_ago):
        url = v4.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "old"}, ExpiresIn=60)
    response = requests.get(url, timeout=10)
    assert response.status_code == 403
    assert b"<Code>AccessDenied</Code>" in response.content and b"expired" in response.content


def test_presign_expiry_over_a_week(s3_server, bucket) -> None:
    v4 = s3_server.client(signature_version="s3v4")
    url = v4.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"}, ExpiresIn=8 * 86400)
    response = requests.get(url, timeout=10)
    assert response.status_code == 400
    assert b"AuthorizationQueryParametersError" in response.content


def test_payload_hash_mismatch(s3_server, s3, bucket) -> None:
    headers = sign(s3_server, "PUT", f"/{bucket}/tampered", body=b"signed body")
    response = send(s3_server, "PUT", f"/{bucket}/tampered", headers=headers, body=b"other body!")
    assert (response.status, response.code) == (400, "XAmzContentSHA256Mismatch")
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="tampered")


def test_signed_payload_hash(s3_server, bucket) -> None:
    """x-amz-content-sha256 = the body's SHA-256 (boto3 with payload signing, no checksum)."""
    client = s3_server.client(s3={"payload_signing_enabled": True}, request_checksum_calculation="when_required")
    client.put_object(Bucket=bucket, Key="signed-body", Body=b"abc" * 100_000)
    assert client.get_object(Bucket=bucket, Key="signed-body")["Body"].read() == b"abc" * 100_000


def test_signed_chunks(s3_server, s3, bucket) -> None:
    """STREAMING-AWS4-HMAC-SHA256-PAYLOAD: every chunk signature verified; the framing is not stored."""
    payload = os.urandom(300_000)
    response = signed_chunks_put(s3_server, f"/{bucket}/chunks", payload)
    assert response.status == 200, response.body
    assert s3.get_object(Bucket=bucket, Key="chunks")["Body"].read() == payload
    response = signed_chunks_put(s3_server, f"/{bucket}/tampered-chunks", payload, tamper_chunk=2)
    assert (response.status, response.code) == (403, "SignatureDoesNotMatch")
    with pytest.raises(ClientError):
        s3.head_object(Bucket=bucket, Key="tampered-chunks")


# ---------------------------------------------------------------------------------------------
# Access control
# ---------------------------------------------------------------------------------------------


def test_bucket_of_peer_x_is_denied_to_peer_y(s3_server) -> None:
    x, y, admin = (s3_server.client(p, **NO_RETRIES) for p in (PEER_X, PEER_Y, ADMIN_PEER))
    x.create_bucket(Bucket="x-owned")
    x.put_object(Bucket="x-owned", Key="secret", Body=b"x data")
    denied = [
        lambda: y.list_objects_v2(Bucket="x-owned"), lambda: y.get_object(Bucket="x-owned", Key="secret"),
        lambda: y.put_object(Bucket="x-owned", Key="k", Body=b"y"), lambda: y.delete_bucket(Bucket="x-owned"),
        lambda: y.delete_object(Bucket="x-owned", Key="secret"), lambda: y.head_object(Bucket="x-owned", Key="secret"),
        lambda: y.create_multipart_upload(Bucket="x-owned", Key="k"),
        lambda: y.copy_object(Bucket="x-owned", Key="c", CopySource={"Bucket": "x-owned", "Key": "secret"}),
    ]
    for call in denied:
        with pytest.raises(ClientError) as excinfo:
            call()
        assert status_of(excinfo) == 403
    y.create_bucket(Bucket="y-owned")
    with pytest.raises(ClientError) as excinfo:  # copying out of X's bucket into Y's own
        y.copy_object(Bucket="y-owned", Key="c", CopySource={"Bucket": "x-owned", "Key": "secret"})
    assert error_code(excinfo) == "AccessDenied"
    assert "x-owned" not in [b["Name"] for b in y.list_buckets()["Buckets"]]
    assert [b["Name"] for b in x.list_buckets()["Buckets"]] == ["x-owned"]
    # an admin peer (coordinator.admin_peers) and the node itself may use every bucket
    assert admin.get_object(Bucket="x-owned", Key="secret")["Body"].read() == b"x data"
    admin.put_object(Bucket="x-owned", Key="from-admin", Body=b"a")
    names = [b["Name"] for b in admin.list_buckets()["Buckets"]]
    assert "x-owned" in names and "y-owned" in names
    node = s3_server.client()
    assert node.get_object(Bucket="x-owned", Key="from-admin")["Body"].read() == b"a"
    # X still owns it
    assert x.list_objects_v2(Bucket="x-owned")["KeyCount"] == 2


def test_no_mesh_token_refuses_everything(tmp_path) -> None:
    with S3Server(tmp_path, workers=1, threads=2, with_mesh_token=False) as server:
        client = server.client(**NO_RETRIES)  # signed with a token the node does not have
        with pytest.raises(ClientError) as excinfo:
            client.list_buckets()
        assert (error_code(excinfo), status_of(excinfo)) == ("ServiceUnavailable", 503)
        assert "mesh token" in excinfo.value.response["Error"]["Message"]
        response: RawResponse = send(server, "GET", "/")
        assert (response.status, response.code) == (503, "ServiceUnavailable")
