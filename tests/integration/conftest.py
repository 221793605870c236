"""Fixtures for tests with real coordinators (tests/support).

- ``tm_root``: a short temporary directory (unix socket paths must stay under ~100 bytes),
  removed afterwards.
- ``make_coordinator(name="coordinator-a", settings=None)``: a configured, not yet started
  :class:`~tests.support.Coordinator`; every one made is cleaned up (SIGTERM, then SIGKILL of
  anything left) after the test, even when it failed.
- ``coordinator``: a running bootstrap coordinator ``coordinator-a``.
- ``make_cluster(n, settings=None)``: ``n`` running coordinators (first bootstraps, others join).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Coordinator, cluster, remove_tree, short_tmp_dir


@pytest.fixture()
def tm_root() -> Iterator[Path]:
    root = short_tmp_dir()
    try:
        yield root
    finally:
        remove_tree(root)


@pytest.fixture()
def make_coordinator(tm_root: Path) -> Iterator[Callable[..., Coordinator]]:
    made: list[Coordinator] = []

    def make(name: str = "coordinator-a", settings: dict[str, Any] | None = None) -> Coordinator:
        coordinator = Coordinator(tm_root, name, settings=settings)
        made.append(coordinator)
        return coordinator

    try:
        yield make
    finally:
        for coordinator in made:
            coordinator.cleanup()


@pytest.fixture()
def coordinator(make_coordinator: Callable[..., Coordinator]) -> Coordinator:
    node = make_coordinator("coordinator-a")
    node.start()
    return node


@pytest.fixture()
def make_cluster(tm_root: Path) -> Iterator[Callable[..., list[Coordinator]]]:
    with contextlib.ExitStack() as stack:
        def make(n: int, settings: dict[str, Any] | None = None) -> list[Coordinator]:
            return stack.enter_context(cluster(tm_root, n, settings=settings))

        yield make
