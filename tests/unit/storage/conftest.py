"""Fixtures for the storage core tests: small chunks keep every test fast."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.objects import ObjectStore
from tests.unit.storage.util import CHUNK


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[ObjectStore]:
    """A store with 64 KiB chunks, 128 KiB minimum multipart parts and one bucket "b"."""
    s = ObjectStore(data_dir, "peer0", chunk_size=CHUNK, min_part_size=2 * CHUNK)
    s.create_bucket("b", "owner")
    yield s
    s.close()
