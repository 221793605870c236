"""Faults against a real coordinator (``tunnelmesh join`` with its Redis, gunicorns, Celery worker
and beat), driven with boto3 and raw sockets, each test showing what survives.

The rule these tests check: acknowledged data is never lost, and nothing half-written is ever
visible. Every fault below gets its own coordinator (they start in about two seconds), and every
test ends by stopping it with SIGTERM and finding none of its processes left:

* the whole coordinator SIGKILLed at random moments during a stream of S3 writes;
* its Redis SIGKILLed (the supervisor restarts it) while a task is queued and S3 writes go on;
* a chunk file corrupted on disk;
* a full disk: ``storage.min_free_space`` above the free space, and a real ENOSPC on a small tmpfs;
* clients that disconnect half way through an upload while others write;
* the Celery worker SIGKILLed;
* the gunicorn worker of the S3 API SIGKILLed in the middle of an upload and of a download.

``TUNNELMESH_FAULT_SEED`` replays the random choices of the kill test (the seed used is printed).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import psutil
import pytest
import requests
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import BotoCoreError, ClientError

from storage.metadata import OUTBOX_DELETE, OUTBOX_PUT
from tests.support import Coordinator, wait_for
from tests.support.coordinator import deep_merge

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024
SMALL_CHUNKS = {"storage": {"chunk_size": "64KiB"}}
SIZES = [0, 1, 100, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7]
ABSENT = "absent"  # the state of a key that does not exist (never written, or deleted)
BUCKET = "faults"


# -- helpers ---------------------------------------------------------------------------------


def client(node: Coordinator, *, attempts: int = 1, read_timeout: float = 15) -> Any:
    """A boto3 client for ``node``'s S3 API with short timeouts (and ``attempts`` tries)."""
    creds = node.credentials()
    return boto3.client(
        "s3", endpoint_url=node.s3_url, region_name="us-east-1", aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key,
        config=Config(s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=read_timeout,
                      retries={"max_attempts": attempts, "mode": "standard"}))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324 - S3 ETags are MD5


def list_all(s3: Any, bucket: str) -> dict[str, tuple[str, int]]:
    """key -> (ETag without quotes, size) of every listed object, through every page."""
    found: dict[str, tuple[str, int]] = {}
    token: str | None = None
    while True:
        page = s3.list_objects_v2(Bucket=bucket, MaxKeys=100, **({"ContinuationToken": token} if token else {}))
        for item in page.get("Contents", []):
            assert item["Key"] not in found, f"{item['Key']} listed twice"
            found[item["Key"]] = (item["ETag"].strip('"'), item["Size"])
        if not page.get("IsTruncated"):
            return found
        token = page["NextContinuationToken"]


def read_back(s3: Any, bucket: str, key: str) -> tuple[bytes, str]:
    """The object's full bytes (the read must complete) and its ETag."""
    response = s3.get_object(Bucket=bucket, Key=key)
    return response["Body"].read(), response["ETag"].strip('"')


def assert_store_consistent(s3: Any, bucket: str) -> dict[str, bytes]:
    """Every listed object reads back fully, its length is the listed size and its bytes hash to
    its ETag (all single PUTs here): no partial or mixed object is visible. Returns key -> bytes."""
    contents = {}
    for key, (etag, size) in list_all(s3, bucket).items():
        data, got_etag = read_back(s3, bucket, key)
        assert got_etag == etag, f"{key}: GET ETag {got_etag} != listed {etag}"
        assert len(data) == size, f"{key}: read {len(data)} bytes, listed size {size}"
        assert md5(data) == etag, f"{key}: bytes do not match the ETag (a half-written or mixed object)"
        contents[key] = data
    return contents


def chunk_files(node: Coordinator) -> set[str]:
    return {p.name for p in (node.data_dir / "chunks").rglob("*") if p.is_file()}


def tmp_files(node: Coordinator) -> list[str]:
    return sorted(p.name for p in (node.data_dir / "tmp").iterdir())


def chunk_path(node: Coordinator, chunk_hash: str) -> Path:
    return node.data_dir / "chunks" / chunk_hash[:2] / chunk_hash


def signed_put_headers(node: Coordinator, key: str, length: int) -> dict[str, str]:
    """SigV4 headers (UNSIGNED-PAYLOAD) for a raw ``PUT /BUCKET/key`` of ``length`` bytes."""
    creds = node.credentials()
    request = AWSRequest(method="PUT", url=f"{node.s3_url}/{BUCKET}/{key}",
                         headers={"Content-Length": str(length), "x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
    S3SigV4Auth(Credentials(creds.access_key, creds.secret_key), "s3", "us-east-1").add_auth(request)
    return dict(request.headers.items())


def open_partial_put(node: Coordinator, key: str, body: bytes, send_bytes: int) -> socket.socket:
    """A raw, correctly signed PUT whose headers announce ``len(body)`` bytes, of which only the
    first ``send_bytes`` are sent. The socket is returned open (the caller cuts or continues)."""
    headers = {"Host": f"127.0.0.1:{node.s3_port}", **signed_put_headers(node, key, len(body))}
    head = f"PUT /{BUCKET}/{key} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock = socket.create_connection(("127.0.0.1", node.s3_port), timeout=10)
    sock.sendall(head.encode("latin-1") + body[:send_bytes])
    return sock


def s3_gunicorn_workers(node: Coordinator) -> list[psutil.Process]:
    """The worker processes of the S3 API's gunicorn (children of the ``s3`` child)."""
    try:
        return psutil.Process(node.pids()["s3"]).children()
    except (psutil.NoSuchProcess, KeyError):
        return []


def kill_every_process_at_once(node: Coordinator) -> None:
    """SIGKILL the supervisor and all its descendants in one sweep (a power cut, in effect)."""
    victims = node.process_tree()
    for proc in victims:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    assert node.proc is not None
    node.proc.wait(15)
    psutil.wait_procs(victims, timeout=15)


def outbox(node: Coordinator) -> set[tuple[str, str, str]]:
    """(kind, bucket, key) of every replication intent waiting in the metadata database."""
    conn = sqlite3.connect(f"file:{node.data_dir / 'meta' / 'metadata.db'}?mode=ro", uri=True, timeout=10)
    try:
        return {tuple(row) for row in conn.execute("SELECT kind, bucket, key FROM outbox")}
    finally:
        conn.close()


def sqlite_integrity(node: Coordinator) -> str:
    conn = sqlite3.connect(node.data_dir / "meta" / "metadata.db", timeout=10)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def s3_error_document(response: requests.Response) -> tuple[str, str]:
    """(Code, Message) of an S3 XML error response (asserting that it is one)."""
    assert "xml" in response.headers.get("Content-Type", ""), response.headers
    root = ET.fromstring(response.content)
    assert root.tag == "Error", response.text
    assert root.findtext("RequestId"), response.text
    return root.findtext("Code") or "", root.findtext("Message") or ""


def reconfigure(node: Coordinator, settings: dict[str, Any]) -> None:
    """Merge ``settings`` into the coordinator's overrides and rewrite its config file."""
    node.overrides = deep_merge(node.overrides, settings)
    node.write_config()


def stop_and_check_nothing_left(node: Coordinator) -> None:
    """SIGTERM; exit code 0; no process of the coordinator is left (by tree and by environment)."""
    assert node.stop() == 0, node.output()[-3000:]
    node.assert_no_leftovers()


# -- 1. kill -9 of the whole coordinator during a stream of S3 writes -------------------------


@dataclass
class KeyLog:
    """What a writer knows about one key: its last acknowledged state, and the states of writes
    sent after it that were not acknowledged (the coordinator died while they were in flight)."""

    acked: tuple[str, int] | str = ABSENT
    pending: list[tuple[str, int] | str] = field(default_factory=list)

    def allowed(self) -> list[tuple[str, int] | str]:
        return [self.acked, *self.pending]


@dataclass
class Writer:
    """A client thread that PUTs, overwrites and deletes its own keys until a request fails."""

    node: Coordinator
    name: str
    rng: random.Random
    keys: dict[str, KeyLog]
    acks: int = 0
    failure: str | None = None
    failed_at: float = 0.0
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self.thread.start()

    def run(self) -> None:
        s3 = client(self.node, read_timeout=10)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            key = self.rng.choice(sorted(self.keys))
            log = self.keys[key]
            delete = self.rng.random() < 0.2
            if delete:
                state: tuple[str, int] | str = ABSENT
            else:
                size = self.rng.choice([*SIZES, self.rng.randrange(5 * CHUNK)])
                body = self.rng.randbytes(size)
                state = (sha(body), size)
            log.pending.append(state)  # from now on the write may or may not have happened
            try:
                if delete:
                    s3.delete_object(Bucket=BUCKET, Key=key)
                else:
                    etag = s3.put_object(Bucket=BUCKET, Key=key, Body=body)["ETag"].strip('"')
                    assert etag == md5(body), f"PUT {key}: ETag {etag} != MD5 of the body"
            except Exception as exc:  # noqa: BLE001 - the coordinator died (checked by the test)
                self.failure, self.failed_at = f"{type(exc).__name__}: {exc}", time.monotonic()
                return
            log.acked, log.pending = state, []  # acknowledged: must survive
            self.acks += 1
        self.failure = "the writer ran for 60 s without the coordinator being killed"


def started(writers: list[Writer]) -> bool:
    return sum(w.acks for w in writers) >= 3 or any(w.failure for w in writers)


@pytest.mark.slow
def test_acknowledged_writes_survive_sigkill_of_the_coordinator_at_random_moments(
        make_coordinator: Callable[..., Coordinator]) -> None:
    """Several rounds of: two client threads PUT (0 B to five 64 KiB chunks), overwrite and
    delete keys, recording a write only after its 2xx; the whole coordinator is SIGKILLed at a
    random moment (alternately the supervisor alone, its children dying by PDEATHSIG, and every
    process at once). Shows: no process survives the kill; after the restart every key holds its
    last acknowledged state or the one write in flight at the kill, nothing older; every listed
    object reads back fully and matches its ETag (nothing half-written is visible); SQLite is
    intact."""
    seed = int(os.environ.get("TUNNELMESH_FAULT_SEED") or random.randrange(2**32))
    print(f"TUNNELMESH_FAULT_SEED={seed}")
    rng = random.Random(seed)
    node = make_coordinator("coordinator-a", settings=SMALL_CHUNKS)
    node.start()
    client(node).create_bucket(Bucket=BUCKET)
    keys: dict[str, dict[str, KeyLog]] = {
        writer: {f"{writer}/k{i}": KeyLog() for i in range(5)} for writer in ("w1", "w2")}
    in_flight_at_kill = 0
    for round_no in range(4):
        writers = [Writer(node, name, random.Random(rng.random()), keys[name]) for name in keys]
        for writer in writers:
            writer.start()
        wait_for(functools.partial(started, writers), 30, "the first acknowledged writes")
        assert not any(w.failure for w in writers), [w.failure for w in writers]
        time.sleep(rng.uniform(0.0, 0.8))
        killed_at = time.monotonic()
        if round_no % 2 == 0:
            node.kill()  # the supervisor only: every child must die with it
        else:
            kill_every_process_at_once(node)
        node.assert_no_leftovers(timeout=10)
        for writer in writers:
            assert writer.thread is not None
            writer.thread.join(30)
            assert not writer.thread.is_alive(), f"{writer.name} still blocked 30 s after the kill"
            # A request may only fail because of the kill, never before it.
            assert writer.failure and writer.failed_at >= killed_at, (seed, writer.failure)
        in_flight_at_kill += sum(1 for logs in keys.values() for log in logs.values() if log.pending)
        assert sqlite_integrity(node) == "ok"

        node.start()
        s3 = client(node)
        contents = assert_store_consistent(s3, BUCKET)
        all_logs = {key: log for logs in keys.values() for key, log in logs.items()}
        assert set(contents) <= set(all_logs), f"unknown keys listed: {set(contents) - set(all_logs)}"
        for key, log in all_logs.items():
            if key in contents:
                state: tuple[str, int] | str = (sha(contents[key]), len(contents[key]))
            else:
                with pytest.raises(ClientError) as missing:
                    s3.head_object(Bucket=BUCKET, Key=key)
                assert missing.value.response["Error"]["Code"] in ("404", "NoSuchKey")
                state = ABSENT
            assert state in log.allowed(), (
                f"seed {seed} round {round_no}: {key} is {state}, expected its last acknowledged state "
                f"{log.acked} or an in-flight one {log.pending}")
            log.acked, log.pending = state, []  # what the next round starts from
    print(f"{in_flight_at_kill} writes were in flight at the kills")
    stop_and_check_nothing_left(node)


# -- 2. Redis SIGKILLed and restarted by the supervisor ---------------------------------------


@pytest.mark.slow
def test_redis_killed_queued_task_runs_after_restart_and_s3_keeps_writing(
        make_coordinator: Callable[..., Coordinator]) -> None:
    """The worker is paused (SIGSTOP), a task is queued and left >1 s for the AOF (everysec),
    then the Redis child is SIGKILLed; the supervisor restarts it after a 3 s backoff. Shows:
    during the outage S3 PUT/DELETE/GET keep answering, and their replication intents wait
    durably in the SQLite outbox; after the restart the task queued before the kill is executed,
    and every object written before and during the outage reads back identical."""
    node = make_coordinator("coordinator-a", settings=deep_merge(SMALL_CHUNKS, {
        "supervisor": {"restart_backoff": "3s", "restart_backoff_max": "3s"}}))
    node.start()
    s3 = client(node)
    s3.create_bucket(Bucket=BUCKET)
    before = {f"before/{i}": os.urandom(size) for i, size in enumerate([10, CHUNK + 5, 4 * CHUNK])}
    for key, data in before.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)

    worker = psutil.Process(node.pids()["worker"])
    worker.suspend()
    try:
        time.sleep(1.5)  # the worker's pending BRPOP (1 s) times out: the message stays in Redis
        marker = node.send_ping()
        conn = node.redis()
        # The task sits in the broker queue in Redis (the argsrepr header names the marker).
        assert any(marker.encode() in message for message in conn.lrange("default", 0, -1))
        conn.close()
        time.sleep(1.5)  # appendfsync everysec: the AOF holds the task now

        old_redis = node.kill_child("redis")
        during = {f"during/{i}": os.urandom(size) for i, size in enumerate([0, 3 * CHUNK + 1])}
        for key, data in during.items():
            assert s3.put_object(Bucket=BUCKET, Key=key, Body=data)["ETag"].strip('"') == md5(data)
        s3.delete_object(Bucket=BUCKET, Key="before/0")
        assert read_back(s3, BUCKET, "before/1")[0] == before["before/1"]
        # Those requests really happened while Redis was down.
        with pytest.raises(Exception):  # noqa: B017 - any connection error of redis-py
            conn = node.redis()
            try:
                conn.ping()
            finally:
                conn.close()
        intents = outbox(node)
        for key in during:
            assert (OUTBOX_PUT, BUCKET, key) in intents, intents
        assert (OUTBOX_DELETE, BUCKET, "before/0") in intents, intents

        wait_for(lambda: node.pids().get("redis") not in (None, old_redis), 20, "redis restarted")
        wait_for(lambda: (node.health() or {}).get("redis") == "ok", 20, "redis back in /health")
    finally:
        worker.resume()
    record = node.wait_ping(marker, timeout=40)
    assert record["marker"] == marker
    assert f"redis (pid {old_redis}) died unexpectedly" in node.output()

    contents = assert_store_consistent(s3, BUCKET)
    expected = {**before, **during}
    del expected["before/0"]
    assert contents == expected
    # The worker consumes new tasks too.
    node.wait_ping(node.send_ping(), timeout=30)
    stop_and_check_nothing_left(node)


# -- 3. a corrupt chunk on disk ---------------------------------------------------------------


def corrupt(path: Path) -> None:
    """Flip bytes in the middle of a chunk file, keeping its size."""
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(middle + 16, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_chunk_is_never_served_and_is_quarantined(make_coordinator: Callable[..., Coordinator]) -> None:
    """Bytes flipped in a chunk file. Shows: a GET whose first chunk is corrupt answers an S3
    InternalError (500, XML); one whose third chunk is corrupt is cut after the good prefix (the
    client gets an error, never the corrupt bytes); each corrupt chunk is moved to quarantine/ and
    counted once; other objects read back intact; re-uploading the same bytes heals the object."""
    node = make_coordinator("coordinator-a", settings=SMALL_CHUNKS)
    node.start()
    s3 = client(node)
    s3.create_bucket(Bucket=BUCKET)
    bodies = {name: os.urandom(3 * CHUNK) for name in ("first-bad", "third-bad", "bystander")}
    for key, data in bodies.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    bad_first = sha(bodies["first-bad"][:CHUNK])
    bad_third = sha(bodies["third-bad"][2 * CHUNK:])
    corrupt(chunk_path(node, bad_first))
    corrupt(chunk_path(node, bad_third))
    quarantine = node.data_dir / "quarantine"

    # First chunk corrupt: a proper S3 error, before any byte of the body.
    url = s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "first-bad"}, ExpiresIn=600)
    response = requests.get(url, timeout=15)
    assert response.status_code == 500
    assert s3_error_document(response)[0] == "InternalError"
    assert bad_first not in response.text  # no chunk hash leaked to the client
    rid = response.headers["x-amz-request-id"]
    wait_for(lambda: rid in node.output(), 10, "the error logged with its request ID")
    with pytest.raises(ClientError) as error:
        s3.get_object(Bucket=BUCKET, Key="first-bad")["Body"].read()
    assert error.value.response["Error"]["Code"] == "InternalError"

    # Third chunk corrupt: the headers are out when it is read; the connection is cut.
    response = requests.get(s3.generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": "third-bad"}, ExpiresIn=600), stream=True, timeout=15)
    assert response.status_code == 200
    got = bytearray()
    with contextlib.suppress(requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError):
        for piece in response.iter_content(8192):
            got += piece
    assert len(got) <= 2 * CHUNK and bytes(got) == bodies["third-bad"][:len(got)]
    with pytest.raises((BotoCoreError, ClientError)):
        s3.get_object(Bucket=BUCKET, Key="third-bad")["Body"].read()  # boto3 sees the short body

    for chunk_hash in (bad_first, bad_third):
        assert not chunk_path(node, chunk_hash).exists()
        moved = [p for p in quarantine.iterdir() if p.name.startswith(chunk_hash)]
        assert len(moved) == 1, moved
        assert sha(moved[0].read_bytes()) != chunk_hash
    assert (quarantine / "corrupt_count").read_text().strip() == "2"  # each counted once

    # Other objects are unaffected, the service is healthy; metadata still lists the victims.
    assert read_back(s3, BUCKET, "bystander")[0] == bodies["bystander"]
    assert s3.head_object(Bucket=BUCKET, Key="first-bad")["ContentLength"] == 3 * CHUNK
    assert (node.health() or {}).get("status") == "ok"

    # The same bytes uploaded again restore the chunk: the object reads back whole.
    s3.put_object(Bucket=BUCKET, Key="copy-of-first-bad", Body=bodies["first-bad"])
    assert read_back(s3, BUCKET, "first-bad")[0] == bodies["first-bad"]
    stop_and_check_nothing_left(node)


# -- 4. full disk -----------------------------------------------------------------------------


@pytest.mark.slow
def test_min_free_space_refuses_writes_cleanly_and_writes_resume_after_reconfiguring(
        make_coordinator: Callable[..., Coordinator]) -> None:
    """``storage.min_free_space`` set far above the free space (1000 TiB). Shows: PUT and
    UploadPart answer S3 InsufficientStorage (507, XML); no chunk, temporary file or object is
    left; existing objects still read back; after a restart with a normal setting writes work."""
    node = make_coordinator("coordinator-a", settings=SMALL_CHUNKS)
    node.start()
    s3 = client(node)
    s3.create_bucket(Bucket=BUCKET)
    existing = {"old/a": os.urandom(2 * CHUNK), "old/b": b"small"}
    for key, data in existing.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    node.stop()
    reconfigure(node, {"storage": {"min_free_space": "1000TiB"}})
    node.start()
    chunks_before = chunk_files(node)

    with pytest.raises(ClientError) as error:
        s3.put_object(Bucket=BUCKET, Key="new/big", Body=os.urandom(3 * CHUNK))
    assert error.value.response["Error"]["Code"] == "InsufficientStorage"
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 507
    url = s3.generate_presigned_url("put_object", Params={"Bucket": BUCKET, "Key": "new/raw"}, ExpiresIn=600)
    response = requests.put(url, data=os.urandom(1000), timeout=15)
    assert response.status_code == 507
    assert s3_error_document(response)[0] == "InsufficientStorage"
    upload = s3.create_multipart_upload(Bucket=BUCKET, Key="new/multi")["UploadId"]
    with pytest.raises(ClientError) as error:
        s3.upload_part(Bucket=BUCKET, Key="new/multi", UploadId=upload, PartNumber=1, Body=os.urandom(CHUNK))
    assert error.value.response["Error"]["Code"] == "InsufficientStorage"
    assert s3.list_parts(Bucket=BUCKET, Key="new/multi", UploadId=upload).get("Parts", []) == []
    s3.abort_multipart_upload(Bucket=BUCKET, Key="new/multi", UploadId=upload)

    assert chunk_files(node) == chunks_before
    assert tmp_files(node) == []
    assert assert_store_consistent(s3, BUCKET) == existing

    node.stop()
    reconfigure(node, {"storage": {"min_free_space": 0}})
    node.start()
    data = os.urandom(2 * CHUNK + 3)
    s3.put_object(Bucket=BUCKET, Key="new/big", Body=data)
    assert assert_store_consistent(s3, BUCKET) == {**existing, "new/big": data}
    stop_and_check_nothing_left(node)


def mount_tmpfs(directory: Path, size_mb: int) -> None:
    """Mount (or, if mounted, resize) a tmpfs of ``size_mb`` MiB on ``directory``; skip the test
    when this machine does not let us."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small file system for a real ENOSPC")
    options = f"size={size_mb}m" + (",remount" if os.path.ismount(directory) else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({mounted.stderr.strip()}): no real ENOSPC test")


@pytest.fixture()
def make_tmpfs_coordinator(make_coordinator: Callable[..., Coordinator]) -> Iterator[Callable[..., Coordinator]]:
    """``make(settings)``: a coordinator (not started) whose whole data directory is a 24 MiB tmpfs;
    the test is skipped when mounting is not permitted. Killed, then unmounted, at the end."""
    made: list[Coordinator] = []

    def make(settings: dict[str, Any] | None = None) -> Coordinator:
        node = make_coordinator("coordinator-a", settings=deep_merge(SMALL_CHUNKS, settings or {}))
        node.data_dir.mkdir(parents=True, exist_ok=True)
        made.append(node)
        mount_tmpfs(node.data_dir, 24)
        return node

    try:
        yield make
    finally:
        for node in made:
            node.cleanup()
            if os.path.ismount(node.data_dir) and subprocess.run(
                    ["umount", str(node.data_dir)], capture_output=True, timeout=30).returncode != 0:
                subprocess.run(["umount", "-l", str(node.data_dir)], capture_output=True, timeout=30)


def fill_until_full(s3: Any, prefix: str, size: int = 1024 * 1024,
                    limit: int = 64) -> tuple[dict[str, bytes], str, ClientError]:
    """PUT ``size``-byte objects until one fails; (acknowledged objects, failed key, its error)."""
    acked: dict[str, bytes] = {}
    for i in range(limit):
        key, data = f"{prefix}{i:03d}", os.urandom(size)
        try:
            s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        except ClientError as exc:
            return acked, key, exc
        acked[key] = data
    raise AssertionError(f"{limit} PUTs of {size} bytes all succeeded on a 24 MiB file system")


def fill_remaining_space(directory: Path) -> None:
    """Write a filler file until the file system says ENOSPC."""
    block = b"\0" * 65536
    with open(directory / "filler", "wb") as filler:
        with contextlib.suppress(OSError):
            while True:
                filler.write(block)
                filler.flush()
        with contextlib.suppress(OSError):
            os.fsync(filler.fileno())


@pytest.mark.slow
def test_real_enospc_fails_the_write_cleanly_and_keeps_the_store_readable(
        make_tmpfs_coordinator: Callable[..., Coordinator]) -> None:
    """The data directory is a 24 MiB tmpfs, filled with 1 MiB PUTs until the disk is really full
    (ENOSPC, storage.min_free_space = 0). Shows: the failing PUT gets an S3 error (507
    InsufficientStorage, XML) and leaves no object; every acknowledged object still reads back
    identical; a DELETE either works or fails cleanly (507) leaving the object whole; reads and
    /health keep answering; after the operator grows the file system and restarts, everything is
    there and writes work again."""
    node = make_tmpfs_coordinator({"storage": {"min_free_space": 0}})
    node.start()
    s3 = client(node)
    s3.create_bucket(Bucket=BUCKET)
    acked, failed_key, error = fill_until_full(s3, "fill/")
    assert len(acked) >= 5, f"only {len(acked)} MiB stored on a 24 MiB file system"
    assert error.response["Error"]["Code"] == "InsufficientStorage", error.response
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 507
    # Another write fails the same clean way (or fits); nothing partial either way.
    url = s3.generate_presigned_url("put_object", Params={"Bucket": BUCKET, "Key": "fill/raw"}, ExpiresIn=600)
    response = requests.put(url, data=os.urandom(512 * 1024), timeout=15)
    if response.status_code != 200:
        assert (response.status_code, s3_error_document(response)[0]) == (507, "InsufficientStorage")
    else:
        acked["fill/raw"] = s3.get_object(Bucket=BUCKET, Key="fill/raw")["Body"].read()
    victim = sorted(acked)[0]
    try:
        s3.delete_object(Bucket=BUCKET, Key=victim)
        del acked[victim]
    except ClientError as exc:  # no room for the tombstone: refused cleanly, the object stays whole
        assert exc.response["Error"]["Code"] == "InsufficientStorage", exc.response

    contents = assert_store_consistent(s3, BUCKET)
    assert failed_key not in contents
    assert contents == acked
    assert tmp_files(node) == []
    assert node.health() is not None
    stop_and_check_nothing_left(node)

    mount_tmpfs(node.data_dir, 64)  # the operator adds space
    node.start()
    s3 = client(node)
    assert assert_store_consistent(s3, BUCKET) == acked
    s3.put_object(Bucket=BUCKET, Key=failed_key, Body=b"room again")
    assert read_back(s3, BUCKET, failed_key)[0] == b"room again"
    stop_and_check_nothing_left(node)


@pytest.mark.slow
def test_restart_on_a_full_disk_says_so_clearly(make_tmpfs_coordinator: Callable[..., Coordinator]) -> None:
    """Disk filled to the last byte, coordinator restarted. Shows (when fixed): either it starts
    and serves the stored objects, or `tunnelmesh join` exits with one clear line saying the disk
    is full; never an internal error."""
    node = make_tmpfs_coordinator({"storage": {"min_free_space": 0},
                                   "supervisor": {"startup_timeout": "20s"}})
    node.start()
    s3 = client(node)
    s3.create_bucket(Bucket=BUCKET)
    acked, _, _ = fill_until_full(s3, "fill/")
    stop_and_check_nothing_left(node)
    fill_remaining_space(node.data_dir)

    node.start(wait=False)
    assert node.proc is not None
    outcome = wait_for(lambda: "exited" if node.proc.poll() is not None else (
        "ready" if "is ready in" in node.output(since_start=True) else None), 40, "start or exit")
    if outcome == "exited":
        last = node.output(since_start=True).strip().splitlines()[-1]
        assert node.proc.returncode != 0
        assert "unexpected" not in last and ("full" in last or "space" in last), last
    else:
        assert assert_store_consistent(client(node), BUCKET) == acked
    node.cleanup()
    node.assert_no_leftovers()


@pytest.mark.slow
def test_deleting_objects_frees_space_for_new_writes(make_tmpfs_coordinator: Callable[..., Coordinator]) -> None:
    """A 24 MiB data directory with storage.min_free_space 4 MiB filled until writes are refused,
    then every object deleted (gc_grace 1 s, gc_interval 1 s). Shows: the deletes succeed (the
    reserve leaves room for tombstones), garbage collection removes the unreferenced chunks and
    new writes succeed again; the objects written later read back."""
    node = make_tmpfs_coordinator({"storage": {"min_free_space": "4MiB", "gc_grace": "1s", "gc_interval": "1s"}})
    node.start()
    s3 = client(node)
    s3.create_bucket(Bucket=BUCKET)
    acked, _, error = fill_until_full(s3, "fill/")
    assert error.response["Error"]["Code"] == "InsufficientStorage"
    for key in acked:
        s3.delete_object(Bucket=BUCKET, Key=key)
    assert list_all(s3, BUCKET) == {}
    data = os.urandom(1024 * 1024)

    def put_succeeds() -> bool:
        try:
            s3.put_object(Bucket=BUCKET, Key="after-delete", Body=data)
            return True
        except ClientError:
            return False

    wait_for(put_succeeds, 30, "space freed by the deletes", interval=1.0)
    assert assert_store_consistent(s3, BUCKET) == {"after-delete": data}
    stop_and_check_nothing_left(node)


# -- 5. clients disconnecting mid-upload under write load ------------------------------------


def test_client_disconnect_mid_upload_leaves_nothing_and_the_server_keeps_serving(
        make_coordinator: Callable[..., Coordinator]) -> None:
    """While two boto3 clients keep writing, raw clients send correctly signed PUTs (new keys and
    an overwrite of an existing key) and hang up half way through the body (after several 64 KiB
    chunks reached the server), some with FIN, some with RST. Shows: no cut upload is visible and
    the overwritten key keeps its old bytes; no temporary file is left; every acknowledged write of
    the load reads back; the load saw no error and the server keeps serving."""
    node = make_coordinator("coordinator-a", settings=SMALL_CHUNKS)
    node.start()
    s3 = client(node)
    s3.create_bucket(Bucket=BUCKET)
    original = os.urandom(2 * CHUNK + 1)
    s3.put_object(Bucket=BUCKET, Key="victim", Body=original)

    stop = threading.Event()
    acked: dict[str, bytes] = {}
    errors: list[str] = []

    def load(name: str) -> None:
        loader = client(node)
        i = 0
        while not stop.is_set():
            key, data = f"load/{name}/{i % 6}", os.urandom(random.choice([100, CHUNK + 1, 3 * CHUNK]))
            try:
                loader.put_object(Bucket=BUCKET, Key=key, Body=data)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{key}: {exc!r}")
                return
            acked[key] = data
            i += 1

    threads = [threading.Thread(target=load, args=(name,), daemon=True) for name in ("l1", "l2")]
    for thread in threads:
        thread.start()
    try:
        cut_keys = []
        for i in range(6):
            key = "victim" if i % 3 == 0 else f"cut/{i}"
            body = os.urandom(6 * CHUNK)
            sock = open_partial_put(node, key, body, send_bytes=3 * CHUNK + 100)
            time.sleep(0.3)  # the server reads and stores the chunks it got
            if i % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()
            cut_keys.append(key)
    finally:
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    assert len(acked) >= 4

    for key in cut_keys:
        if key != "victim":
            with pytest.raises(ClientError) as missing:
                s3.head_object(Bucket=BUCKET, Key=key)
            assert missing.value.response["Error"]["Code"] in ("404", "NoSuchKey")
    contents = assert_store_consistent(s3, BUCKET)
    assert contents == {"victim": original, **acked}
    wait_for(lambda: tmp_files(node) == [], 10, "no temporary chunk file left")
    s3.put_object(Bucket=BUCKET, Key="after", Body=b"still serving")
    assert read_back(s3, BUCKET, "after")[0] == b"still serving"
    stop_and_check_nothing_left(node)


# -- 6. the Celery worker SIGKILLed ------------------------------------------------------------


def test_killed_worker_is_restarted_and_runs_tasks_sent_before_and_after(
        make_coordinator: Callable[..., Coordinator]) -> None:
    """SIGKILL of the Celery worker's main process. Shows: its pool process dies with it (no
    orphan), the supervisor restarts the worker, a task sent while it was down and one sent after
    the restart both run, and stored objects are untouched."""
    node = make_coordinator("coordinator-a", settings=deep_merge(SMALL_CHUNKS, {
        "supervisor": {"restart_backoff": "1s"}}))
    node.start()
    s3 = client(node)
    s3.create_bucket(Bucket=BUCKET)
    data = os.urandom(2 * CHUNK)
    s3.put_object(Bucket=BUCKET, Key="kept", Body=data)
    old = psutil.Process(node.pids()["worker"])
    pool = old.children(recursive=True)
    assert pool, "the worker has no pool process"

    node.kill_child("worker")
    while_down = node.send_ping()  # the worker is dead (restart backoff 1 s): the task waits in Redis
    wait_for(lambda: node.pids().get("worker") not in (None, old.pid), 20, "a new worker")
    psutil.wait_procs(pool, timeout=10)
    assert not [p for p in pool if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "orphaned pool process"
    assert node.wait_ping(while_down, timeout=40)["marker"] == while_down
    after = node.send_ping()
    assert node.wait_ping(after, timeout=30)["marker"] == after
    assert f"worker (pid {old.pid}) died unexpectedly" in node.output()
    assert read_back(s3, BUCKET, "kept")[0] == data
    stop_and_check_nothing_left(node)


# -- 7. the S3 gunicorn worker SIGKILLed mid-request -------------------------------------------


def wait_for_new_s3_worker(node: Coordinator, old: psutil.Process, s3: Any) -> psutil.Process:
    def replaced() -> psutil.Process | None:
        workers = [w for w in s3_gunicorn_workers(node) if w.pid != old.pid]
        return workers[0] if workers else None

    new = wait_for(replaced, 20, "gunicorn to replace its S3 worker")
    wait_for(lambda: _answers(s3), 20, "the S3 API to answer again")
    return new


def _answers(s3: Any) -> bool:
    try:
        s3.list_buckets()
        return True
    except (BotoCoreError, ClientError):
        return False


def test_s3_worker_killed_mid_request_client_sees_an_error_and_a_retry_succeeds(
        make_coordinator: Callable[..., Coordinator]) -> None:
    """SIGKILL of the S3 API's gunicorn worker while an upload is half sent, then again while a
    download is half read. Shows: each client gets an error (never a success for the cut upload,
    never wrong bytes for the download); gunicorn replaces the worker; a retried upload succeeds;
    the cut upload left no object; every object reads back with its ETag."""
    node = make_coordinator("coordinator-a", settings=SMALL_CHUNKS)
    node.start()
    s3 = client(node)
    s3.create_bucket(Bucket=BUCKET)
    big = os.urandom(40 * CHUNK)
    s3.put_object(Bucket=BUCKET, Key="big", Body=big)

    # Upload half sent when the worker dies.
    body = os.urandom(16 * CHUNK)
    sock = open_partial_put(node, "cut-upload", body, send_bytes=8 * CHUNK)
    time.sleep(0.3)
    [worker] = s3_gunicorn_workers(node)
    worker.kill()
    worker.wait(10)
    with sock, pytest.raises(OSError):
        sock.sendall(body[8 * CHUNK:])
        if not sock.recv(1024):
            raise ConnectionError("closed without an answer")
    worker = wait_for_new_s3_worker(node, worker, s3)
    with pytest.raises(ClientError) as missing:
        s3.head_object(Bucket=BUCKET, Key="cut-upload")
    assert missing.value.response["Error"]["Code"] in ("404", "NoSuchKey")
    retrying = client(node, attempts=5)
    retrying.put_object(Bucket=BUCKET, Key="cut-upload", Body=body)

    # Download half read when the worker dies.
    response = requests.get(s3.generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": "big"}, ExpiresIn=600), stream=True, timeout=15)
    assert response.status_code == 200
    got = bytearray(response.raw.read(CHUNK))
    worker.kill()
    worker.wait(10)
    # What was already in the socket buffers may still arrive; then the body is cut short.
    with contextlib.suppress(requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError):
        for piece in response.iter_content(65536):
            got += piece
    assert bytes(got) == big[:len(got)]  # whatever arrived is the object's own prefix, never other bytes
    wait_for_new_s3_worker(node, worker, s3)

    assert assert_store_consistent(s3, BUCKET) == {"big": big, "cut-upload": body}
    stop_and_check_nothing_left(node)
