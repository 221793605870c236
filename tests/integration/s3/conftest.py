"""Fixtures for the S3 API tests: one real gunicorn serving ``web.s3:create_app()`` per session.

The server (bench/_server.py) runs over a tmp data directory with a mesh token and a node
identity, on a free loopback port, and is stopped by PID at the end even when tests fail.
Peers used for access control: ``PEER_X``/``PEER_Y`` are ordinary nodes, ``ADMIN_PEER`` is in
``coordinator.admin_peers``; the node itself is an admin of its own coordinator.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

from bench._server import S3Server

PEER_X = "aaaaaaaaaaaaaaaa"
PEER_Y = "bbbbbbbbbbbbbbbb"
ADMIN_PEER = "cccccccccccccccc"

_bucket_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3srv"), workers=2, threads=8, admin_peers=[ADMIN_PEER])
    server.start()
    try:
        yield server
    finally:
        server.stop()
        if os.environ.get("S3_TEST_SHOW_LOG"):
            print(server.log_tail(200))


@pytest.fixture(scope="session")
def s3(s3_server: S3Server) -> Any:
    """boto3 with the default client config (checksums on: aws-chunked bodies with trailers)."""
    return s3_server.client()


@pytest.fixture(scope="session")
def s3_path(s3_server: S3Server) -> Any:
    """boto3 with path-style addressing forced."""
    return s3_server.client(path_style=True)


@pytest.fixture()
def bucket(s3: Any) -> str:
    """A fresh bucket owned by the node itself."""
    name = f"t{os.getpid()}-{next(_bucket_numbers)}"
    s3.create_bucket(Bucket=name)
    return name


def error_code(excinfo: pytest.ExceptionInfo[Any]) -> str:
    return excinfo.value.response["Error"]["Code"]


def status_of(excinfo: pytest.ExceptionInfo[Any]) -> int:
    return excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"]
