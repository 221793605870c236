"""ETag lists of If-Match / If-None-Match headers, as S3 reads them."""

from __future__ import annotations

import pytest

from web.s3.conditions import etag_list, etag_matches


@pytest.mark.parametrize("header,etags", [
    ('"abc"', {"abc"}),
    ('"abc", W/"def" ,ghi', {"abc", "def", "ghi"}),
    ("*", {"*"}),
    ('"*"', {"*"}),
    ("", {""}),
])
def test_etag_list(header: str, etags: set[str]) -> None:
    assert etag_list(header) == etags


def test_etag_matches() -> None:
    assert etag_matches('"x", "abc"', "abc")
    assert etag_matches("*", "anything")
    assert not etag_matches('"abcd"', "abc")
