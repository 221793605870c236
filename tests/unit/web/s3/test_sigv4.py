"""SigV4 verification against requests signed by botocore itself (and AWS's documented examples)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock
from urllib.parse import quote, urlsplit

import boto3
import pytest
from botocore.auth import HmacV1QueryAuth, S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.utils import percent_encode_sequence
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import EnvironHeaders, Headers
from werkzeug.test import EnvironBuilder

from tunnelmesh.identity import peer_id_from_access_key, s3_credentials
from web.s3.errors import S3Error
from web.s3.sigv4 import (
    EMPTY_SHA256,
    STREAMING_SIGNED,
    STREAMING_SIGNED_TRAILER,
    STREAMING_UNSIGNED_TRAILER,
    UNSIGNED_PAYLOAD,
    AuthResult,
    derive_signing_key,
    verify_request,
)

MESH_TOKEN = "tm_unit-test-mesh-token"
PEER_ID = "0123456789abcdef"
CREDS = s3_credentials(MESH_TOKEN, PEER_ID)
UNKNOWN_PEER_CREDS = s3_credentials(MESH_TOKEN, "fedcba9876543210")  # well-formed key, not in the mesh
REGION = "us-east-1"
NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
ENDPOINT = "http://127.0.0.1:9000"

# AWS's documented example credentials (sigv4-*.html examples), as a key outside the TMAK scheme.
AWS_EXAMPLE_KEY = "AKIAIOSFODNN7EXAMPLE"
AWS_EXAMPLE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_EXAMPLE_NOW = datetime(2013, 5, 24, 0, 0, 0, tzinfo=UTC)


def lookup_secret(access_key: str) -> str | None:
    return CREDS.secret_key if peer_id_from_access_key(access_key) == PEER_ID else None


@dataclass(frozen=True)
class Wire:
    """A request as the server sees it: raw target, headers (Host included) and body."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes = b""

    def with_header(self, name: str, value: str | None) -> Wire:
        headers = {k: v for k, v in self.headers.items() if k.lower() != name.lower()}
        if value is not None:
            headers[name] = value
        return replace(self, headers=headers)


def wire_from(method: str, url: str, headers: Any, body: bytes = b"") -> Wire:
    parts = urlsplit(url)
    values = {str(k): (v.decode() if isinstance(v, bytes) else str(v)) for k, v in headers.items()}
    if not any(k.lower() == "host" for k in values):
        values["Host"] = parts.netloc  # what the HTTP client adds
    return Wire(method, parts.path, parts.query, values, body)


class _FixedPayloadAuth(S3SigV4Auth):
    """botocore's S3 signer with x-amz-content-sha256 chosen by the test (UNSIGNED, STREAMING-*...)."""

    def __init__(self, credentials: Credentials, payload_hash: str | None) -> None:
        super().__init__(credentials, "s3", REGION)
        self._payload_hash = payload_hash

    def payload(self, request: AWSRequest) -> str:
        return self._payload_hash or super().payload(request)


def botocore_credentials(access_key: str = CREDS.access_key, secret_key: str = CREDS.secret_key) -> Credentials:
    return Credentials(access_key, secret_key)


def sign_request(method: str, url: str, headers: dict[str, str] | None = None, body: bytes = b"", *,
                 credentials: Credentials | None = None, when: datetime = NOW,
                 payload_hash: str | None = None, region: str = REGION) -> Wire:
    """Sign with botocore's S3SigV4Auth at a fixed time (the URL is used exactly as given)."""
    request = AWSRequest(method=method, url=url, headers=dict(headers or {}), data=body)
    auth = _FixedPayloadAuth(credentials or botocore_credentials(), payload_hash)
    auth._region_name = region
    with mock.patch("botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)):
        auth.add_auth(request)
    return wire_from(method, request.url, request.headers, body)


def presign(method: str, url: str, *, expires: int = 3600, when: datetime = NOW,
            headers: dict[str, str] | None = None) -> Wire:
    request = AWSRequest(method=method, url=url, headers=dict(headers or {}))
    auth = S3SigV4QueryAuth(botocore_credentials(), "s3", REGION, expires=expires)
    with mock.patch("botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)):
        auth.add_auth(request)
    return wire_from(method, request.url, request.headers)


def verify(wire: Wire, **options: Any) -> AuthResult:
    arguments: dict[str, Any] = {"lookup_secret": lookup_secret, "region": REGION, "now": NOW}
    arguments.update(options)
    return verify_request(wire.method, wire.path, wire.query, wire.headers, **arguments)


def expect_error(code: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> S3Error:
    with pytest.raises(S3Error) as info:
        call(*args, **kwargs)
    assert info.value.code == code, f"{info.value.code}: {info.value.message}"
    return info.value


def object_url(key: str, *, bucket: str = "bkt", encode: Callable[[str], str] | None = None,
               query: str = "") -> str:
    encoded = encode(key) if encode else quote(key, safe="/~")  # botocore's encoding
    return f"{ENDPOINT}/{bucket}/{encoded}" + (f"?{query}" if query else "")


# --- Real boto3 clients, requests captured before they are sent ----------------------------------------

class _EmptyRaw:
    def stream(self, **_: Any) -> Any:
        return iter([b""])

    def read(self, *_: Any, **__: Any) -> bytes:
        return b""


def boto3_client(endpoint: str = ENDPOINT, **config: Any) -> tuple[Any, list[Any]]:
    """A boto3 S3 client whose requests are recorded (and answered 200, empty) instead of sent."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                          aws_access_key_id=CREDS.access_key, aws_secret_access_key=CREDS.secret_key,
                          config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **config))
    captured: list[Any] = []

    def before_send(request: Any, **_: Any) -> AWSResponse:
        captured.append(request)
        return AWSResponse(request.url, 200, {}, _EmptyRaw())

    client.meta.events.register("before-send.s3", before_send)
    return client, captured


def captured_wire(request: Any) -> Wire:
    body = request.body
    if body is None:
        data = b""
    elif isinstance(body, bytes | bytearray):
        data = bytes(body)
    else:
        data = body.read()
    return wire_from(request.method, request.url, request.headers, data)


# --- Accepted requests -----------------------------------------------------------------------------------

KEYS = [
    "plain.txt",
    "with space.txt",
    "ünïcödé/日本語.txt",
    "a+b+c",
    "tilde~name",
    "k=v&x=y",
    "dir//double///slash",
    "../up/./x/..",
    "trailing/",
    "sp3c!al$'()*,;:@",
    "percent%20literal",
    "emoji-🎉",
    "\x01ctrl",
]


def _minimal_encoding(key: str) -> str:
    # Clients such as s3cmd or hand-written ones leave RFC 3986 sub-delims raw in the path.
    return quote(key, safe="/~!$&'()*+,;=:@")


@pytest.mark.parametrize("method", ["GET", "PUT", "HEAD", "DELETE"])
@pytest.mark.parametrize("key", KEYS)
def test_accepts_botocore_signed_requests_for_every_key(method: str, key: str) -> None:
    body = b"payload" if method == "PUT" else b""
    wire = sign_request(method, object_url(key), body=body)
    result = verify(wire)
    assert result.access_key == CREDS.access_key
    assert result.peer_id == PEER_ID
    assert result.payload_mode == "SHA256"
    assert result.payload_sha256 == hashlib.sha256(body).hexdigest()
    assert result.presigned is False


@pytest.mark.parametrize("key", KEYS)
def test_accepts_paths_signed_as_sent_by_clients_that_encode_less(key: str) -> None:
    wire = sign_request("GET", object_url(key, encode=_minimal_encoding))
    assert verify(wire).peer_id == PEER_ID


def test_auth_result_carries_what_the_body_reader_needs() -> None:
    wire = sign_request("PUT", object_url("k"), body=b"x", payload_hash=STREAMING_SIGNED)
    result = verify(wire)
    authorization = wire.headers["Authorization"]
    assert result.seed_signature == authorization.rsplit("Signature=", 1)[1]
    assert result.amz_date == "20260501T120000Z"
    assert result.scope == "20260501/us-east-1/s3/aws4_request"
    assert result.signing_key == derive_signing_key(CREDS.secret_key, "20260501", REGION)
    assert result.payload_mode == STREAMING_SIGNED and result.payload_sha256 is None


@pytest.mark.parametrize("payload_hash, mode", [
    (UNSIGNED_PAYLOAD, UNSIGNED_PAYLOAD),
    (STREAMING_SIGNED, STREAMING_SIGNED),
    (STREAMING_SIGNED_TRAILER, STREAMING_SIGNED_TRAILER),
    (STREAMING_UNSIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER),
    (EMPTY_SHA256.upper(), "SHA256"),
])
def test_payload_modes(payload_hash: str, mode: str) -> None:
    result = verify(sign_request("PUT", object_url("k"), payload_hash=payload_hash))
    assert result.payload_mode == mode
    assert result.payload_sha256 == (EMPTY_SHA256 if mode == "SHA256" else None)


QUERY_CASES = [
    {"list-type": "2", "prefix": "a b+c/ü~=&?", "delimiter": "/", "continuation-token": "1ZhKv+/x==",
     "start-after": "k?x", "encoding-type": "url", "max-keys": "7", "fetch-owner": "true"},
    {"uploadId": "2~abc+/=", "partNumber": "3"},
    {"uploads": ""},
    {"delete": ""},
    {"marker": "日本", "prefix": "", "max-keys": "1000"},
    {"versionId": "null", "response-content-disposition": 'attachment; filename="ü x.txt"'},
]


@pytest.mark.parametrize("params", QUERY_CASES)
def test_accepts_query_strings_encoded_as_botocore_does(params: dict[str, str]) -> None:
    wire = sign_request("GET", object_url("", query=percent_encode_sequence(params)))
    assert verify(wire).peer_id == PEER_ID


@pytest.mark.parametrize("raw_query", [
    "uploads",                                  # no "=" at all
    "prefix=a/b:c&delimiter=/",                 # "/" and ":" left raw
    "prefix=a%2fb&list-type=2",                 # lowercase percent-encoding
    "prefix=a%20b&prefix=a%20a",                # a repeated parameter, sorted by value
    "x-id=PutObject&partNumber=1&uploadId=u",   # boto3's x-id marker
])
def test_accepts_query_strings_as_other_clients_send_them(raw_query: str) -> None:
    wire = sign_request("GET", object_url("k", query=raw_query))
    assert verify(wire).peer_id == PEER_ID


def test_query_plus_means_space_like_werkzeug() -> None:
    # Signed as "%20" by a client, sent as "+" (form encoding): the same parameter value.
    wire = sign_request("GET", object_url("", query="prefix=a%20b"))
    assert verify(replace(wire, query="prefix=a+b")).peer_id == PEER_ID


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30),
       value=st.text(st.characters(blacklist_categories=("Cs",)), max_size=20))
def test_any_key_and_query_value_signed_by_botocore_verifies(key: str, value: str) -> None:
    url = object_url(key, query=percent_encode_sequence({"prefix": value, "list-type": "2"}))
    assert verify(sign_request("GET", url)).peer_id == PEER_ID


def test_accepts_the_date_header_instead_of_x_amz_date() -> None:
    wire = sign_request("GET", object_url("k"), headers={"Date": "Thu, 01 Jan 1970 00:00:00 GMT"})
    assert "X-Amz-Date" not in wire.headers and "Date" in wire.headers
    assert verify(wire).amz_date == "20260501T120000Z"


def test_header_values_are_trimmed_and_multiple_values_joined() -> None:
    wire = sign_request("PUT", object_url("k"), headers={"x-amz-meta-note": "  spaced   out  value "})
    assert verify(wire).peer_id == PEER_ID
    # A header sent twice is signed as its values joined by commas.
    request = AWSRequest(method="GET", url=object_url("k"))
    request.headers.add_header("x-amz-meta-twice", "one")
    request.headers.add_header("x-amz-meta-twice", "two")
    auth = _FixedPayloadAuth(botocore_credentials(), None)
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        auth.add_auth(request)
    headers = Headers([(k, v) for k, v in request.headers.items()] + [("Host", "127.0.0.1:9000")])
    assert headers.getlist("x-amz-meta-twice") == ["one", "two"]
    result = verify_request("GET", "/bkt/k", "", headers, lookup_secret=lookup_secret, region=REGION, now=NOW)
    assert result.peer_id == PEER_ID


@pytest.mark.parametrize("sent_as", ["latin-1", "utf-8"])
def test_accepts_werkzeug_environ_headers_and_a_full_request_target(sent_as: str) -> None:
    wire = sign_request("PUT", object_url("dir/ü k.txt"), body=b"abc",
                        headers={"Content-Type": "text/plain", "x-amz-meta-note": "välue"})
    builder = EnvironBuilder(method="PUT", path="/ignored", content_type="text/plain", data=b"abc",
                             headers=[(k, v) for k, v in wire.headers.items() if k.lower() != "content-type"])
    environ = builder.get_environ()
    # WSGI hands header bytes over as latin-1 text, whichever encoding the client used.
    environ["HTTP_X_AMZ_META_NOTE"] = "välue".encode(sent_as).decode("latin-1")
    assert environ["HTTP_HOST"] == "127.0.0.1:9000"
    raw_uri = wire.path + "?"  # e.g. environ["RAW_URI"], query included
    result = verify_request("PUT", raw_uri, "", EnvironHeaders(environ), lookup_secret=lookup_secret,
                            region=REGION, now=NOW)
    assert result.peer_id == PEER_ID


def test_naive_now_is_utc_and_skew_within_the_limit_is_accepted() -> None:
    wire = sign_request("GET", object_url("k"))
    assert verify(wire, now=NOW.replace(tzinfo=None) + timedelta(minutes=14)).peer_id == PEER_ID
    assert verify(wire, now=NOW - timedelta(minutes=14)).peer_id == PEER_ID


def test_real_boto3_client_requests_verify() -> None:
    client, captured = boto3_client()
    client.put_object(Bucket="bkt", Key="a b/ü+~=//x/../y", Body=b"hello world", Metadata={"k": "v"})
    client.get_object(Bucket="bkt", Key="a b/ü+~=//x/../y", Range="bytes=0-3")
    client.head_object(Bucket="bkt", Key="k")
    client.delete_object(Bucket="bkt", Key="k")
    client.list_objects_v2(Bucket="bkt", Prefix="a b+/ü", Delimiter="/", ContinuationToken="x=y+z/",
                           StartAfter="a")
    client.list_objects(Bucket="bkt", Marker="m+n", Prefix="p q")
    client.create_multipart_upload(Bucket="bkt", Key="big")
    client.upload_part(Bucket="bkt", Key="big", UploadId="up+id/=", PartNumber=2, Body=b"x" * 1000)
    client.delete_objects(Bucket="bkt", Delete={"Objects": [{"Key": "a"}, {"Key": "b c"}]})
    client.copy_object(Bucket="bkt", Key="dst", CopySource={"Bucket": "bkt", "Key": "src ü+"})
    client.list_buckets()
    client.create_bucket(Bucket="new-bucket")
    now = datetime.now(UTC)
    assert len(captured) == 12
    for request in captured:
        result = verify(captured_wire(request), now=now)
        assert result.peer_id == PEER_ID and result.presigned is False


def test_real_boto3_client_over_https_uses_streaming_trailer_mode() -> None:
    client, captured = boto3_client("https://s3.mesh.test")
    client.put_object(Bucket="bkt", Key="k", Body=b"data")
    result = verify(captured_wire(captured[0]), now=datetime.now(UTC))
    assert result.payload_mode == STREAMING_UNSIGNED_TRAILER


# --- AWS's documented examples (known-answer tests) -------------------------------------------------------

def _aws_example(method: str, path: str, query: str, headers: dict[str, str]) -> AuthResult:
    return verify_request(method, path, query, headers, lookup_secret=lambda k: AWS_EXAMPLE_SECRET,
                          region="us-east-1", now=AWS_EXAMPLE_NOW, peer_id_of=lambda k: "aws-example")


def test_aws_example_get_object() -> None:
    result = _aws_example("GET", "/test.txt", "", {
        "Host": "examplebucket.s3.amazonaws.com", "Range": "bytes=0-9",
        "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": "20130524T000000Z",
        "Authorization": "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
                         "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
                         "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"})
    assert result.payload_sha256 == EMPTY_SHA256


def test_aws_example_put_object_with_date_and_dollar_in_key() -> None:
    # "$" is sent raw and canonicalised as %24: the RFC 3986 form.
    result = _aws_example("PUT", "/test$file.text", "", {
        "Host": "examplebucket.s3.amazonaws.com", "Date": "Fri, 24 May 2013 00:00:00 GMT",
        "x-amz-date": "20130524T000000Z", "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "x-amz-content-sha256": "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072",
        "Authorization": "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
                         "SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class,"
                         "Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"})
    assert result.payload_sha256 == hashlib.sha256(b"Welcome to Amazon S3.").hexdigest()


@pytest.mark.parametrize("query, signature", [
    ("lifecycle", "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"),
    ("max-keys=2&prefix=J", "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
])
def test_aws_example_bucket_requests(query: str, signature: str) -> None:
    _aws_example("GET", "/", query, {
        "Host": "examplebucket.s3.amazonaws.com", "x-amz-date": "20130524T000000Z",
        "x-amz-content-sha256": EMPTY_SHA256,
        "Authorization": "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
                         f"SignedHeaders=host;x-amz-content-sha256;x-amz-date,Signature={signature}"})


def test_aws_example_presigned_get() -> None:
    result = _aws_example("GET", "/test.txt",
                          "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2F"
                          "us-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400"
                          "&X-Amz-SignedHeaders=host&X-Amz-Signature="
                          "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404",
                          {"Host": "examplebucket.s3.amazonaws.com"})
    assert result.presigned and result.payload_mode == UNSIGNED_PAYLOAD


def test_aws_example_plus_in_key_is_canonicalised_as_2b() -> None:
    # The STREAMING-UNSIGNED-PAYLOAD-TRAILER example puts to "/Key+": S3 signs "/Key%2B".
    _aws_example("PUT", "/Key+", "", {
        "Host": "amzn-s3-demo-bucket.s3.amazonaws.com", "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": "17408", "x-amz-content-sha256": STREAMING_UNSIGNED_TRAILER,
        "x-amz-trailer": "x-amz-checksum-crc32", "x-amz-date": "20130524T000000Z",
        "Authorization": "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
                         "SignedHeaders=content-encoding;host;x-amz-content-sha256;x-amz-date;"
                         "x-amz-decoded-content-length;x-amz-trailer,"
                         "Signature=8fdf2b7a7005b82789d2a9cec832705457298e8a6a908f8c85f17e44c707aa64"})


# --- Presigned URLs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["plain.txt", "a b+c/ü~=", "dir//x/../y"])
def test_presigned_get_verifies_until_it_expires(key: str) -> None:
    wire = presign("GET", object_url(key), expires=600)
    result = verify(wire)
    assert result.presigned and result.payload_mode == UNSIGNED_PAYLOAD and result.peer_id == PEER_ID
    assert verify(wire, now=NOW + timedelta(seconds=600)).presigned
    error = expect_error("AccessDenied", verify, wire, now=NOW + timedelta(seconds=601))
    assert error.message == "Request has expired" and error.status == 403
    assert error.extra["X-Amz-Expires"] == "600"


def test_presigned_with_operation_parameters() -> None:
    url = object_url("big", query=percent_encode_sequence({"uploadId": "u+/=", "partNumber": "4"}))
    assert verify(presign("PUT", url)).presigned


def test_presigned_url_from_a_boto3_client_configured_for_sigv4() -> None:
    client, _ = boto3_client(signature_version="s3v4")
    url = client.generate_presigned_url("get_object", Params={"Bucket": "bkt", "Key": "a b+ü",
                                                              "ResponseContentType": "text/plain"},
                                        ExpiresIn=300)
    assert verify(wire_from("GET", url, {}), now=datetime.now(UTC)).presigned


def test_presigned_expiry_above_the_maximum_is_refused() -> None:
    wire = presign("GET", object_url("k"), expires=604801)
    expect_error("AuthorizationQueryParametersError", verify, wire)
    assert verify(wire, max_presign_expiry=700000).presigned


def test_presigned_from_the_future_is_not_valid_yet() -> None:
    wire = presign("GET", object_url("k"), when=NOW + timedelta(hours=1))
    assert expect_error("AccessDenied", verify, wire).message == "Request is not valid yet"


@pytest.mark.parametrize("tamper", [
    lambda w: replace(w, path=w.path + "x"),
    lambda w: replace(w, query=w.query + "&extra=1"),
    lambda w: replace(w, query=w.query.replace("X-Amz-Expires=3600", "X-Amz-Expires=3599")),
    lambda w: replace(w, method="DELETE"),
    lambda w: w.with_header("Host", "evil.example"),
])
def test_tampered_presigned_url_is_refused(tamper: Callable[[Wire], Wire]) -> None:
    expect_error("SignatureDoesNotMatch", verify, tamper(presign("GET", object_url("k"))))


@pytest.mark.parametrize("drop, code", [
    ("X-Amz-Signature", "AuthorizationQueryParametersError"),
    ("X-Amz-Expires", "AuthorizationQueryParametersError"),
    ("X-Amz-Date", "AuthorizationQueryParametersError"),
    ("X-Amz-SignedHeaders", "AuthorizationQueryParametersError"),
])
def test_presigned_url_missing_a_parameter(drop: str, code: str) -> None:
    wire = presign("GET", object_url("k"))
    query = "&".join(p for p in wire.query.split("&") if not p.startswith(drop + "="))
    expect_error(code, verify, replace(wire, query=query))


@pytest.mark.parametrize("old, new, message_part", [
    ("X-Amz-Algorithm=AWS4-HMAC-SHA256", "X-Amz-Algorithm=AWS4-HMAC-SHA512", "only supports"),
    ("us-east-1", "eu-west-1", "the region 'eu-west-1' is wrong; expecting 'us-east-1'"),
    ("%2Fs3%2F", "%2Fec2%2F", 'incorrect service "ec2"'),
    ("X-Amz-Date=20260501T120000Z", "X-Amz-Date=2026-05-01T12:00:00Z", "ISO8601"),
    ("X-Amz-Expires=3600", "X-Amz-Expires=-1", "non-negative"),
    ("X-Amz-Expires=3600", "X-Amz-Expires=soon", "number"),
])
def test_malformed_presigned_parameters(old: str, new: str, message_part: str) -> None:
    wire = presign("GET", object_url("k"))
    assert old in wire.query
    error = expect_error("AuthorizationQueryParametersError", verify, replace(wire, query=wire.query.replace(old, new)))
    assert message_part in error.message


def test_presigned_and_authorization_header_together_are_refused() -> None:
    wire = presign("GET", object_url("k")).with_header("Authorization", "AWS4-HMAC-SHA256 Credential=x")
    assert expect_error("InvalidArgument", verify, wire).message.startswith("Only one auth mechanism allowed")


def test_presigned_with_an_unsigned_amz_header_is_refused() -> None:
    wire = presign("GET", object_url("k")).with_header("x-amz-meta-sneaky", "1")
    assert expect_error("AccessDenied", verify, wire).extra["HeadersNotSigned"] == "x-amz-meta-sneaky"


# --- SigV2 -------------------------------------------------------------------------------------------------

def _sigv2_presigned_url(key: str, expires: int = 600) -> str:
    request = AWSRequest(method="GET", url=object_url(key))
    HmacV1QueryAuth(botocore_credentials(), expires=expires).add_auth(request)
    return request.url


def test_sigv2_is_refused_by_default() -> None:
    message = "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256."
    wire = wire_from("GET", _sigv2_presigned_url("k"), {})
    assert expect_error("InvalidRequest", verify, wire, now=datetime.now(UTC)).message == message
    header_wire = sign_request("GET", object_url("k")).with_header("Authorization", f"AWS {CREDS.access_key}:c2ln")
    assert expect_error("InvalidRequest", verify, header_wire).message == message


def test_sigv2_presigned_urls_when_allowed() -> None:
    # What `aws s3 presign` and boto3's generate_presigned_url produce for a custom endpoint by default.
    client, _ = boto3_client()
    url = client.generate_presigned_url("get_object", Params={"Bucket": "bkt", "Key": "a b+ü/x",
                                                              "ResponseContentDisposition": "inline"},
                                        ExpiresIn=300)
    assert "AWSAccessKeyId=" in url
    now = datetime.now(UTC)
    result = verify(wire_from("GET", url, {}), now=now, allow_sigv2_presigned=True)
    assert result.presigned and result.peer_id == PEER_ID and result.payload_mode == UNSIGNED_PAYLOAD
    tampered = wire_from("GET", url.replace("/bkt/", "/other/"), {})
    expect_error("SignatureDoesNotMatch", verify, tampered, now=now, allow_sigv2_presigned=True)
    expired = expect_error("AccessDenied", verify, wire_from("GET", url, {}), now=now + timedelta(seconds=400),
                           allow_sigv2_presigned=True)
    assert expired.message == "Request has expired"


# --- Refused header-signed requests ------------------------------------------------------------------

def test_wrong_secret_is_signature_does_not_match() -> None:
    wire = sign_request("GET", object_url("k"), credentials=botocore_credentials(secret_key="not-the-secret"))
    error = expect_error("SignatureDoesNotMatch", verify, wire)
    assert error.status == 403


def test_unknown_access_keys_are_invalid() -> None:
    other = botocore_credentials(UNKNOWN_PEER_CREDS.access_key, UNKNOWN_PEER_CREDS.secret_key)
    error = expect_error("InvalidAccessKeyId", verify, sign_request("GET", object_url("k"), credentials=other))
    assert error.status == 403
    foreign = botocore_credentials("AKIAIOSFODNN7EXAMPLE", "x")  # not a mesh key at all
    expect_error("InvalidAccessKeyId", verify, sign_request("GET", object_url("k"), credentials=foreign))


@pytest.mark.parametrize("tamper", [
    pytest.param(lambda w: replace(w, path=w.path.replace("/k", "/K")), id="path"),
    pytest.param(lambda w: replace(w, path=w.path + "/"), id="path-slash"),
    pytest.param(lambda w: replace(w, query="list-type=2"), id="query-added"),
    pytest.param(lambda w: replace(w, method="DELETE"), id="method"),
    pytest.param(lambda w: w.with_header("x-amz-meta-owner", "mallory"), id="signed-header-value"),
    pytest.param(lambda w: w.with_header("Range", "bytes=0-99"), id="range"),
    pytest.param(lambda w: w.with_header("Host", "other:9000"), id="host"),
    pytest.param(lambda w: w.with_header("x-amz-content-sha256", EMPTY_SHA256), id="payload-hash"),
    pytest.param(lambda w: w.with_header("X-Amz-Date", "20260501T120001Z"), id="date"),
])
def test_tampered_requests_are_refused(tamper: Callable[[Wire], Wire]) -> None:
    wire = sign_request("PUT", object_url("k"), headers={"x-amz-meta-owner": "alice", "Range": "bytes=0-9"},
                        body=b"body")
    expect_error("SignatureDoesNotMatch", verify, tamper(wire))


def test_unsigned_amz_headers_and_unsigned_host_are_refused() -> None:
    wire = sign_request("GET", object_url("k"))
    error = expect_error("AccessDenied", verify, wire.with_header("x-amz-acl", "public-read"))
    assert error.extra["HeadersNotSigned"] == "x-amz-acl"
    no_host = wire.with_header("Authorization", wire.headers["Authorization"].replace("host;", ""))
    assert "host" in expect_error("AccessDenied", verify, no_host).extra["HeadersNotSigned"]


@pytest.mark.parametrize("offset", [timedelta(minutes=16), -timedelta(minutes=16), timedelta(days=2)])
def test_skewed_clock_is_refused(offset: timedelta) -> None:
    wire = sign_request("GET", object_url("k"), when=NOW + offset)
    error = expect_error("RequestTimeTooSkewed", verify, wire)
    assert error.status == 403 and error.extra["MaxAllowedSkewMilliseconds"] == "900000"
    assert error.extra["ServerTime"] == "2026-05-01T12:00:00Z"


def test_missing_or_invalid_content_sha256() -> None:
    wire = sign_request("GET", object_url("k"))
    error = expect_error("InvalidRequest", verify, wire.with_header("X-Amz-Content-SHA256", None))
    assert error.message == "Missing required header for this request: x-amz-content-sha256"
    bad = sign_request("GET", object_url("k"), payload_hash="not-a-hash")
    expect_error("InvalidArgument", verify, bad)


def test_missing_or_invalid_date() -> None:
    wire = sign_request("GET", object_url("k"))
    for value in (None, "yesterday"):
        error = expect_error("AccessDenied", verify, wire.with_header("X-Amz-Date", value))
        assert error.message == "AWS authentication requires a valid Date or x-amz-date header"


SIGNATURE = "0" * 64
CREDENTIAL = f"{CREDS.access_key}/20260501/us-east-1/s3/aws4_request"


@pytest.mark.parametrize("authorization, message_part", [
    (f"AWS4-HMAC-SHA256 Credential={CREDENTIAL}, SignedHeaders=host", "three components"),
    (f"AWS4-HMAC-SHA256 Credential={CREDENTIAL}, Signature={SIGNATURE}", "three components"),
    ("AWS4-HMAC-SHA256", "three components"),
    (f"AWS4-HMAC-SHA256 Credential={CREDENTIAL}, SignedHeaders=host, Signature={SIGNATURE}, Foo=bar",
     'component "Foo=bar" is malformed'),
    (f"AWS4-HMAC-SHA256 Credential={CREDENTIAL} SignedHeaders=host, Signature={SIGNATURE}", "malformed"),
    (f"AWS4-HMAC-SHA256 Credential={CREDS.access_key}/20260501/us-east-1/s3, SignedHeaders=host, "
     f"Signature={SIGNATURE}", "the Credential is mal-formed"),
    (f"AWS4-HMAC-SHA256 Credential=/20260501/us-east-1/s3/aws4_request, SignedHeaders=host, "
     f"Signature={SIGNATURE}", "non-empty Access Key"),
    (f"AWS4-HMAC-SHA256 Credential={CREDS.access_key}/20260501/eu-west-1/s3/aws4_request, "
     f"SignedHeaders=host, Signature={SIGNATURE}", "the region 'eu-west-1' is wrong; expecting 'us-east-1'"),
    (f"AWS4-HMAC-SHA256 Credential={CREDS.access_key}/20260501/us-east-1/ec2/aws4_request, "
     f"SignedHeaders=host, Signature={SIGNATURE}", 'incorrect service "ec2"'),
    (f"AWS4-HMAC-SHA256 Credential={CREDS.access_key}/20260501/us-east-1/s3/aws5_request, "
     f"SignedHeaders=host, Signature={SIGNATURE}", 'incorrect terminal "aws5_request"'),
    (f"AWS4-HMAC-SHA256 Credential={CREDS.access_key}/20260502/us-east-1/s3/aws4_request, "
     f"SignedHeaders=host, Signature={SIGNATURE}", 'Invalid credential date "20260502"'),
    (f"AWS4-HMAC-SHA256 Credential={CREDENTIAL}, SignedHeaders=, Signature={SIGNATURE}", "SignedHeaders"),
    (f"AWS4-HMAC-SHA256 Credential={CREDENTIAL}, SignedHeaders=host;;x-amz-date, Signature={SIGNATURE}",
     "SignedHeaders"),
])
def test_malformed_authorization_headers(authorization: str, message_part: str) -> None:
    wire = sign_request("GET", object_url("k")).with_header("Authorization", authorization)
    error = expect_error("AuthorizationHeaderMalformed", verify, wire)
    assert error.status == 400 and message_part in error.message
    if "region" in message_part:
        assert error.extra["Region"] == "us-east-1"


def test_malformed_signature_values_do_not_match() -> None:
    wire = sign_request("GET", object_url("k"))
    for signature in ("zz" * 32, "abc", "é" * 64, ""):
        authorization = wire.headers["Authorization"].rsplit("Signature=", 1)[0] + f"Signature={signature}"
        expect_error("SignatureDoesNotMatch", verify, wire.with_header("Authorization", authorization))


@pytest.mark.parametrize("authorization, code", [
    ("Bearer abc", "InvalidArgument"),
    ("AWS4-HMAC-SHA512 Credential=x, SignedHeaders=host, Signature=y", "InvalidArgument"),
    ("AWS4-ECDSA-P256-SHA256 Credential=x, SignedHeaders=host, Signature=y", "InvalidRequest"),
])
def test_unsupported_authorization_types(authorization: str, code: str) -> None:
    wire = sign_request("GET", object_url("k")).with_header("Authorization", authorization)
    expect_error(code, verify, wire)


@pytest.mark.parametrize("authorization", [None, "", "   "])
def test_anonymous_requests_are_access_denied(authorization: str | None) -> None:
    wire = Wire("GET", "/bkt/k", "", {"Host": "127.0.0.1:9000"})
    if authorization is not None:
        wire = wire.with_header("Authorization", authorization)
    error = expect_error("AccessDenied", verify, wire)
    assert error.status == 403


def test_session_tokens_are_refused() -> None:
    wire = sign_request("GET", object_url("k"), headers={"X-Amz-Security-Token": "session"})
    expect_error("InvalidToken", verify, wire)


# --- Garbage in: only S3Error out (never a 500) -------------------------------------------------------

_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "PUT", "HEAD", "POST", "DELETE", "get", ""]), path=_TEXT, query=_TEXT,
       headers=st.dictionaries(st.sampled_from(["Authorization", "X-Amz-Date", "Date", "x-amz-content-sha256",
                                                "Host", "x-amz-meta-a", "X-Amz-Security-Token"]), _TEXT))
def test_garbage_requests_only_raise_s3_errors(method: str, path: str, query: str, headers: dict[str, str]) -> None:
    try:
        verify_request(method, path, query, headers, lookup_secret=lookup_secret, region=REGION, now=NOW)
    except S3Error:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(credential=_TEXT, signed_headers=_TEXT, signature=_TEXT, date=_TEXT, expires=_TEXT,
       presigned=st.booleans(), sigv2=st.booleans())
def test_garbage_auth_parameters_only_raise_s3_errors(credential: str, signed_headers: str, signature: str,
                                                      date: str, expires: str, presigned: bool, sigv2: bool) -> None:
    quoted = {name: quote(value, safe="") for name, value in
              {"c": credential, "h": signed_headers, "s": signature, "d": date, "e": expires}.items()}
    headers = {"Host": "127.0.0.1:9000", "x-amz-content-sha256": EMPTY_SHA256}
    if sigv2:
        query = f"AWSAccessKeyId={quoted['c']}&Expires={quoted['e']}&Signature={quoted['s']}"
    elif presigned:
        query = (f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={quoted['c']}&X-Amz-Date={quoted['d']}"
                 f"&X-Amz-Expires={quoted['e']}&X-Amz-SignedHeaders={quoted['h']}&X-Amz-Signature={quoted['s']}")
    else:
        query = ""
        headers["X-Amz-Date"] = date
        headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={credential}, SignedHeaders={signed_headers}, "
                                    f"Signature={signature}")
    try:
        verify_request("GET", "/bkt/k", query, headers, lookup_secret=lookup_secret, region=REGION, now=NOW,
                       allow_sigv2_presigned=True)
    except S3Error:
        pass
