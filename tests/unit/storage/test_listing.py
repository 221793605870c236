"""Listings: prefix, delimiter, start_after, max_keys, pagination without skips or repeats."""

from __future__ import annotations

import bisect
import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.errors import InvalidArgument
from storage.listing import ListPage, list_page, prefix_successor
from storage.objects import ObjectStore
from tests.unit.storage.util import put


def utf8(s: str) -> bytes:
    return s.encode("utf-8")


def expected_entries(keys: list[str], prefix: str, delimiter: str, start_after: str) -> list[str]:
    """The reference model: sorted keys and common prefixes greater than start_after."""
    entries: set[str] = set()
    for key in keys:
        if not key.startswith(prefix):
            continue
        cut = key.find(delimiter, len(prefix)) if delimiter else -1
        entries.add(key[:cut + len(delimiter)] if cut >= 0 else key)
    return sorted((e for e in entries if utf8(e) > utf8(start_after)), key=utf8)


class SortedKeys:
    """An in-memory stand-in for the SQLite range scan; counts the rows it hands out."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = sorted(set(keys))
        self.rows_read = 0
        self.queries = 0

    def scan(self, lower: str, inclusive: bool, upper: str | None, limit: int) -> Iterator[str]:
        self.queries += 1
        i = bisect.bisect_left(self.keys, lower) if inclusive else bisect.bisect_right(self.keys, lower)
        for key in self.keys[i:i + limit]:
            if upper is not None and key >= upper:
                return
            self.rows_read += 1
            yield key

    def page(self, **kwargs: object) -> ListPage[str]:
        return list_page(self.scan, lambda k: k, lambda k: k, **kwargs)  # type: ignore[arg-type]


def all_pages(lister, *, prefix: str, delimiter: str, start_after: str, max_keys: int) -> list[str]:
    """Follow next_marker until the listing ends; check every page on the way."""
    seen: list[str] = []
    marker = start_after
    previous_truncated = False
    for _ in range(10_000):
        page = lister(prefix=prefix, delimiter=delimiter, start_after=marker, max_keys=max_keys)
        keys = [o if isinstance(o, str) else o.key for o in page.objects]
        entries = sorted(keys + page.common_prefixes, key=utf8)
        assert len(entries) <= max_keys
        assert entries or not previous_truncated, "is_truncated was set but nothing followed"
        previous_truncated = page.is_truncated
        assert len(set(page.common_prefixes)) == len(page.common_prefixes)
        if page.is_truncated:
            assert len(entries) == max_keys and page.next_marker == entries[-1]
        seen.extend(entries)
        if not page.is_truncated:
            return seen
        marker = page.next_marker
    raise AssertionError("listing did not terminate")


# -- examples -----------------------------------------------------------------------------------

S3_DOC_KEYS = ["sample.jpg", "photos/2006/January/sample.jpg", "photos/2006/February/sample2.jpg",
               "photos/2006/February/sample3.jpg", "photos/2006/February/sample4.jpg"]


def test_delimiter_examples_from_the_s3_documentation() -> None:
    keys = SortedKeys(S3_DOC_KEYS)
    page = keys.page(delimiter="/")
    assert (page.objects, page.common_prefixes, page.is_truncated) == (["sample.jpg"], ["photos/"], False)
    page = keys.page(prefix="photos/2006/", delimiter="/")
    assert page.objects == []
    assert page.common_prefixes == ["photos/2006/February/", "photos/2006/January/"]
    page = keys.page(prefix="photos/2006/", delimiter="/", max_keys=1)
    assert page.common_prefixes == ["photos/2006/February/"] and page.is_truncated
    page = keys.page(prefix="photos/2006/", delimiter="/", start_after=page.next_marker)
    assert page.common_prefixes == ["photos/2006/January/"] and not page.is_truncated


def test_max_keys_zero_and_empty_bucket() -> None:
    keys = SortedKeys(["a", "b"])
    assert keys.page(max_keys=0) == ListPage([], [], False, "")
    assert SortedKeys([]).page() == ListPage([], [], False, "")


def test_a_common_prefix_costs_one_query_not_one_row_per_key() -> None:
    keys = SortedKeys([f"dir{d}/file{i:05d}" for d in range(3) for i in range(5000)] + ["top"])
    page = keys.page(delimiter="/")
    assert page.common_prefixes == ["dir0/", "dir1/", "dir2/"] and page.objects == ["top"]
    assert keys.rows_read <= 10 and keys.queries <= 6


def test_prefix_successor() -> None:
    assert prefix_successor("") is None
    assert prefix_successor("a") == "b"
    assert prefix_successor("a/") == "a0"
    assert prefix_successor("\ud7ff") == "\ue000"  # jumps over the surrogates
    assert prefix_successor("a\U0010ffff") == "b"
    assert prefix_successor("\U0010ffff") is None


# -- properties ---------------------------------------------------------------------------------

ALPHABET = ["a", "b", "/", ".", "-", "é", "\x01", "\ud7ff", "\ue000", "\uffff", "\U0001f511", "\U0010ffff"]
text = st.text(alphabet=st.sampled_from(ALPHABET), max_size=6)
key_lists = st.lists(text.filter(bool), max_size=40)
delimiters = st.sampled_from(["", "/", "//", "a", "é", "\U0001f511"])


@given(keys=key_lists, prefix=text, delimiter=delimiters, start_after=text,
       max_keys=st.integers(min_value=1, max_value=7))
@settings(max_examples=400, deadline=None)
def test_paging_concatenation_equals_the_sorted_listing(keys: list[str], prefix: str, delimiter: str,
                                                        start_after: str, max_keys: int) -> None:
    store = SortedKeys(keys)
    assert all_pages(store.page, prefix=prefix, delimiter=delimiter, start_after=start_after,
                     max_keys=max_keys) == expected_entries(keys, prefix, delimiter, start_after)


_bucket_numbers = itertools.count()


@pytest.fixture(scope="module")
def sqlite_store() -> Iterator[ObjectStore]:
    with tempfile.TemporaryDirectory() as tmp:
        s = ObjectStore(Path(tmp), "lister", chunk_size=64 * 1024, fsync=False)
        yield s
        s.close()


@given(keys=key_lists, prefix=text, delimiter=delimiters, start_after=text,
       max_keys=st.integers(min_value=1, max_value=5), deleted=st.sets(st.integers(0, 39), max_size=5))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sqlite_listing_matches_the_model(sqlite_store: ObjectStore, keys: list[str], prefix: str,
                                          delimiter: str, start_after: str, max_keys: int,
                                          deleted: set[int]) -> None:
    bucket = f"bucket-{next(_bucket_numbers)}"
    sqlite_store.create_bucket(bucket, "o")
    for key in keys:
        put(sqlite_store, key, b"", bucket=bucket)
    gone = {k for i, k in enumerate(keys) if i in deleted}
    for key in gone:
        sqlite_store.delete_object(bucket, key)  # tombstones are never listed
    live = [k for k in keys if k not in gone]

    def lister(**kwargs: object) -> ListPage:
        return sqlite_store.list_objects(bucket, **kwargs)  # type: ignore[arg-type]

    assert all_pages(lister, prefix=prefix, delimiter=delimiter, start_after=start_after,
                     max_keys=max_keys) == expected_entries(live, prefix, delimiter, start_after)


def test_store_listing_records_and_arguments(store: ObjectStore) -> None:
    for key in ["b/2", "a", "b/1", "c", "é", "Z"]:
        put(store, key, key.encode())
    page = store.list_objects("b", delimiter="/", max_keys=3)
    assert [o.key for o in page.objects] == ["Z", "a"] and page.common_prefixes == ["b/"]
    assert page.is_truncated and page.next_marker == "b/"
    assert page.objects[0].size == 1 and page.objects[0].etag
    rest = store.list_objects("b", delimiter="/", start_after=page.next_marker)
    assert [o.key for o in rest.objects] == ["c", "é"] and not rest.is_truncated
    assert [o.key for o in store.list_objects("b", prefix="b/").objects] == ["b/1", "b/2"]
    assert store.list_objects("b", max_keys=0).objects == []
    with pytest.raises(InvalidArgument):
        store.list_objects("b", max_keys=-1)
    with pytest.raises(InvalidArgument):
        store.list_objects("b", prefix="\udcff")


def test_pagination_is_stable_while_keys_change(store: ObjectStore) -> None:
    for i in range(0, 100, 2):
        put(store, f"k{i:03d}", b"")
    first = store.list_objects("b", max_keys=10)
    put(store, "k001", b"")  # before the marker: not in later pages
    put(store, "k099", b"")  # after the marker: appears once
    store.delete_object("b", "k030")
    rest = all_pages(lambda **kw: store.list_objects("b", **kw), prefix="", delimiter="",
                     start_after=first.next_marker, max_keys=7)
    listed = [o.key for o in first.objects] + rest
    assert len(listed) == len(set(listed))
    assert "k001" not in listed and "k099" in listed and "k030" not in listed
