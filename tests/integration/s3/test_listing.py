"""ListObjects v1 and v2: prefixes, delimiters, pagination of 2,500 keys, encoding-type=url, order."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.s3.conftest import error_code
from tests.integration.s3.rawhttp import S3_NS, signed

pytestmark = pytest.mark.integration

DIRS, SUBDIRS, FILES, TOP = 20, 5, 20, 500  # 20*5*20 + 500 = 2,500 keys


def utf8_sorted(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode("utf-8"))


@pytest.fixture(scope="module")
def many(s3) -> tuple[str, list[str]]:
    name = f"many-{os.getpid()}"
    s3.create_bucket(Bucket=name)
    keys = [f"d{d:02}/s{s}/f{f:03}" for d in range(DIRS) for s in range(SUBDIRS) for f in range(FILES)]
    keys += [f"top-{n:03}" for n in range(TOP)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket=name, Key=key, Body=b""), keys))
    return name, utf8_sorted(keys)


def pages_v1(s3: Any, **params: Any) -> list[dict[str, Any]]:
    """Manual v1 pagination the way S3 defines it: NextMarker with a delimiter, else the last key."""
    pages, marker = [], ""
    while True:
        page = s3.list_objects(Marker=marker, **params)
        pages.append(page)
        if not page["IsTruncated"]:
            return pages
        if params.get("Delimiter"):
            marker = page["NextMarker"]
        else:
            assert "NextMarker" not in page
            marker = page["Contents"][-1]["Key"]


def pages_v2(s3: Any, **params: Any) -> list[dict[str, Any]]:
    pages, token = [], None
    while True:
        page = s3.list_objects_v2(**params, **({"ContinuationToken": token} if token else {}))
        pages.append(page)
        assert page["KeyCount"] == len(page.get("Contents", [])) + len(page.get("CommonPrefixes", []))
        if not page["IsTruncated"]:
            assert "NextContinuationToken" not in page
            return pages
        token = page["NextContinuationToken"]


def flatten(pages: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    keys = [o["Key"] for p in pages for o in p.get("Contents", [])]
    prefixes = [c["Prefix"] for p in pages for c in p.get("CommonPrefixes", [])]
    return keys, prefixes


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("page_size", [1000, 333])
def test_pagination_without_delimiter(s3, many, version, page_size) -> None:
    bucket, keys = many
    pages = (pages_v1 if version == 1 else pages_v2)(s3, Bucket=bucket, MaxKeys=page_size)
    listed, prefixes = flatten(pages)
    assert listed == keys  # every key once, in UTF-8 byte order: no skip, no repeat
    assert prefixes == []
    assert len(pages) == -(-len(keys) // page_size)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("page_size", [7, 1000])
def test_pagination_with_delimiter(s3, many, version, page_size) -> None:
    bucket, keys = many
    pages = (pages_v1 if version == 1 else pages_v2)(s3, Bucket=bucket, Delimiter="/", MaxKeys=page_size)
    listed, prefixes = flatten(pages)
    assert prefixes == [f"d{d:02}/" for d in range(DIRS)]
    assert listed == [k for k in keys if k.startswith("top-")]
    entries = [e for p in pages for e in
               [o["Key"] for o in p.get("Contents", [])] + [c["Prefix"] for c in p.get("CommonPrefixes", [])]]
    assert len(entries) == len(set(entries)) == DIRS + TOP
    assert all(len(p.get("Contents", [])) + len(p.get("CommonPrefixes", [])) <= page_size for p in pages)


@pytest.mark.parametrize("version", [1, 2])
def test_prefix_and_delimiter(s3, many, version) -> None:
    bucket, keys = many
    pages = (pages_v1 if version == 1 else pages_v2)(s3, Bucket=bucket, Prefix="d03/", Delimiter="/", MaxKeys=2)
    listed, prefixes = flatten(pages)
    assert listed == [] and prefixes == [f"d03/s{s}/" for s in range(SUBDIRS)]
    pages = (pages_v1 if version == 1 else pages_v2)(s3, Bucket=bucket, Prefix="d03/s1/", Delimiter="/")
    listed, prefixes = flatten(pages)
    assert listed == [f"d03/s1/f{f:03}" for f in range(FILES)] and prefixes == []


def test_boto3_paginators(s3, many) -> None:
    bucket, keys = many
    for operation in ("list_objects", "list_objects_v2"):
        paginator = s3.get_paginator(operation)
        listed = [o["Key"] for page in paginator.paginate(Bucket=bucket, PaginationConfig={"PageSize": 400})
                  for o in page.get("Contents", [])]
        assert listed == keys, operation


def test_start_after_and_marker(s3, many) -> None:
    bucket, keys = many
    page = s3.list_objects_v2(Bucket=bucket, StartAfter="d19/s4/f010", MaxKeys=5)
    assert [o["Key"] for o in page["Contents"]] == keys[keys.index("d19/s4/f010") + 1:][:5]
    assert page["StartAfter"] == "d19/s4/f010"
    page = s3.list_objects(Bucket=bucket, Marker="top-497")
    assert [o["Key"] for o in page["Contents"]] == ["top-498", "top-499"]
    assert page["Marker"] == "top-497"


def test_v1_next_marker_only_with_delimiter(s3_server, many) -> None:
    bucket, _ = many
    root = signed(s3_server, "GET", f"/{bucket}", query="max-keys=3").xml()
    assert root.findtext(f"{S3_NS}IsTruncated") == "true"
    assert root.find(f"{S3_NS}NextMarker") is None
    root = signed(s3_server, "GET", f"/{bucket}", query="delimiter=%2F&max-keys=3").xml()
    assert root.findtext(f"{S3_NS}NextMarker") == "d02/"
    assert root.find(f"{S3_NS}Contents/{S3_NS}Owner/{S3_NS}ID") is None  # only prefixes on this page


def test_owner_and_fetch_owner(s3, s3_server, bucket) -> None:
    s3.put_object(Bucket=bucket, Key="o", Body=b"x")
    assert s3.list_objects(Bucket=bucket)["Contents"][0]["Owner"]["ID"] == s3_server.node_peer_id
    assert "Owner" not in s3.list_objects_v2(Bucket=bucket)["Contents"][0]
    assert s3.list_objects_v2(Bucket=bucket, FetchOwner=True)["Contents"][0]["Owner"]["ID"] == s3_server.node_peer_id
    entry = s3.list_objects_v2(Bucket=bucket)["Contents"][0]
    assert entry["Size"] == 1 and entry["StorageClass"] == "STANDARD" and entry["ETag"].startswith('"')


def test_utf8_byte_order(s3, bucket) -> None:
    # UTF-16 order would put U+1F600 (a surrogate pair) before U+FF5E; UTF-8 byte order does not.
    keys = ["z\U0001f600", "z\uff5e", "z\u00e9", "zz", "z~", "Z", "z"]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"")
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert listed == utf8_sorted(keys) == ["Z", "z", "zz", "z~", "z\u00e9", "z\uff5e", "z\U0001f600"]
    listed = [o["Key"] for p in pages_v2(s3, Bucket=bucket, MaxKeys=2) for o in p.get("Contents", [])]
    assert listed == utf8_sorted(keys)


def test_encoding_type_url(s3_server, bucket, s3) -> None:
    keys = ["a b/c+d", "a b/e%f", "é/ü"]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"")
    root = signed(s3_server, "GET", f"/{bucket}", query="delimiter=%2F&encoding-type=url&prefix=a%20b%2F").xml()
    assert root.findtext(f"{S3_NS}EncodingType") == "url"
    assert root.findtext(f"{S3_NS}Prefix") == "a%20b/"
    assert [e.text for e in root.iter(f"{S3_NS}Key")] == ["a%20b/c%2Bd", "a%20b/e%25f"]
    # boto3 asks for url encoding and decodes it back
    assert [o["Key"] for o in s3.list_objects(Bucket=bucket)["Contents"]] == utf8_sorted(keys)
    assert [c["Prefix"] for c in s3.list_objects_v2(Bucket=bucket, Delimiter="/")["CommonPrefixes"]] == \
        ["a b/", "é/"]


def test_max_keys_zero_and_invalid(s3_server, bucket) -> None:
    root = signed(s3_server, "GET", f"/{bucket}", query="max-keys=0&list-type=2").xml()
    assert root.findtext(f"{S3_NS}KeyCount") == "0"
    for query in ("max-keys=-1", "max-keys=abc", "encoding-type=base64", "list-type=3",
                  "list-type=2&continuation-token=garbage!"):
        response = signed(s3_server, "GET", f"/{bucket}", query=query)
        assert (response.status, response.code) == (400, "InvalidArgument"), query
    root = signed(s3_server, "GET", f"/{bucket}", query="max-keys=5000").xml()
    assert root.findtext(f"{S3_NS}MaxKeys") == "1000"


def test_invalid_continuation_token(s3, bucket) -> None:
    with pytest.raises(ClientError) as excinfo:
        s3.list_objects_v2(Bucket=bucket, ContinuationToken="bm90LW91cnM=")
    assert error_code(excinfo) == "InvalidArgument"
