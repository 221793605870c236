"""kill -9 during a stream of writes leaves the store consistent.

A child process runs put/overwrite/delete/copy calls on one data directory and prints, flushed,
``TRY <seq> ...`` before each call and ``ACK <seq> <counter>`` after it returns. The parent kills
it with SIGKILL after a random delay, several rounds in a row on the same directory, and after
each kill opens the store and checks:

* every key is in the state of its last acknowledged write, or of the one write that was in
  flight when the child died (committed but not acknowledged) - nothing older, nothing else;
* every listed object reads back completely and its bytes match its ETag (MD5): no partial or
  mixed object is ever visible;
* the SQLite database passes ``PRAGMA integrity_check``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage.objects import ObjectStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 64 * 1024
KEYS = [f"key-{i}" for i in range(12)] + ["dir/../odd//key", "ünï/код"]

CHILD = r"""
import io, random, sys
from pathlib import Path
from storage.errors import BucketAlreadyOwnedByYou, NoSuchKey
from storage.objects import ObjectStore
sys.path.insert(0, sys.argv[3])
from tests.integration.test_storage_crash import KEYS, body, plan

data_dir, round_no = Path(sys.argv[1]), int(sys.argv[2])
store = ObjectStore(data_dir, "crash", chunk_size=64 * 1024)
try:
    store.create_bucket("b", "owner")
except BucketAlreadyOwnedByYou:
    pass
for seq, (op, key, size, source) in enumerate(plan(round_no)):
    print(f"TRY {seq}", flush=True)
    if op == "put":
        record = store.put_object("b", key, io.BytesIO(body(round_no, seq, size)), content_length=size)
    elif op == "copy":
        try:
            record = store.copy_object("b", source, "b", key)
        except NoSuchKey:
            print(f"ACK {seq} skip", flush=True)
            continue
    else:
        store.delete_object("b", key)
        record = store.meta.get_object("b", key)
    print(f"ACK {seq} {record.vv.counter(store.actor)}", flush=True)
"""


def body(round_no: int, seq: int, size: int) -> bytes:
    return random.Random(f"{round_no}:{seq}").randbytes(size)


@functools.cache
def plan(round_no: int) -> list[tuple[str, str, int, str]]:
    """The child's operations for one round: (op, key, size, copy source)."""
    rng = random.Random(round_no)
    ops = []
    for _ in range(2000):
        op = rng.choices(["put", "delete", "copy"], weights=[75, 15, 10])[0]
        size = rng.choice([0, 1, 100, CHUNK, CHUNK + 1, 3 * CHUNK + 7, rng.randrange(5 * CHUNK)])
        ops.append((op, rng.choice(KEYS), size, rng.choice(KEYS)))
    return ops


@dataclass
class KeyState:
    """What a key must hold: its MD5 (None = deleted) and its version counter."""

    md5: str | None
    counter: int


def expected_after(round_no: int, seq: int, state: dict[str, KeyState], counter: int) -> tuple[str, KeyState]:
    op, key, size, source = plan(round_no)[seq]
    if op == "put":
        return key, KeyState(hashlib.md5(body(round_no, seq, size)).hexdigest(), counter)
    if op == "copy":
        return key, KeyState(state[source].md5, counter)
    return key, KeyState(None, counter)


def observed(store: ObjectStore, key: str) -> KeyState | None:
    record = store.meta.get_object("b", key)
    if record is None:
        return None
    if record.deleted:
        return KeyState(None, record.vv.counter(store.actor))
    data = b"".join(store.read_object(record))
    assert len(data) == record.size
    md5 = hashlib.md5(data).hexdigest()
    assert md5 == record.etag, f"{key}: bytes do not match the ETag (partial or mixed object)"
    return KeyState(md5, record.vv.counter(store.actor))


def run_round(data_dir: Path, round_no: int, delay: float) -> list[str]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(data_dir), str(round_no), str(ROOT)],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    out, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, f"the child ended on its own: {err.decode()[-2000:]}"
    text = out.decode()
    # Only complete lines count: a line cut by the kill was never acknowledged.
    return text.split("\n")[:-1]


def test_sigkill_during_writes_loses_no_acknowledged_write(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    rng = random.Random(20240607)
    state: dict[str, KeyState] = {}  # the verified state of every key written so far
    acknowledged = 0
    deadline = time.monotonic() + 15
    round_no = 0
    while round_no < 8 and time.monotonic() < deadline:
        lines = run_round(data_dir, round_no, rng.uniform(0.3, 1.2))
        in_flight: int | None = None
        for line in lines:
            kind, seq_text, *rest = line.split()
            seq = int(seq_text)
            if kind == "TRY":
                in_flight = seq
                continue
            assert seq == in_flight
            in_flight = None
            if rest[0] == "skip":
                continue
            key, expected = expected_after(round_no, seq, state, int(rest[0]))
            state[key] = expected
            acknowledged += 1

        store = ObjectStore(data_dir, "crash", chunk_size=CHUNK)
        with store.meta.read() as tx:
            assert tx.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        if in_flight is not None:
            # The write in flight may or may not have committed; if it did, it is the new state.
            op, key, _, source = plan(round_no)[in_flight]
            seen = observed(store, key)
            before = state.get(key)
            if seen is not None and (before is None or seen.counter > before.counter):
                if op != "copy" or source in state:
                    _, candidate = expected_after(round_no, in_flight, state, seen.counter)
                    assert seen == candidate, f"{key}: unexpected content after the in-flight {op}"
                assert seen.counter == (before.counter if before else 0) + 1
                state[key] = seen
        for key in KEYS:
            seen = observed(store, key)
            if key in state:
                assert seen == state[key], f"{key}: acknowledged {state[key]}, found {seen}"
            else:
                assert seen is None or seen.md5 is None, f"{key}: never acknowledged but visible"
        listed = {o.key: o for o in store.list_objects("b").objects} if store.meta.get_bucket("b") else {}
        assert set(listed) == {k for k, s in state.items() if s.md5 is not None}
        for record in listed.values():
            assert hashlib.md5(b"".join(store.read_object(record))).hexdigest() == record.etag
        store.close()
        round_no += 1

    assert round_no >= 4 and acknowledged > 50, (round_no, acknowledged)
