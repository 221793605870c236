"""Randomized, seeded interleaving of writes, overwrites, deletes, manifest syncs, GC runs and
membership changes (a coordinator joins midway, another drains and leaves), checked after every
batch against a model of what was acknowledged.

Reproduce a run with ``TM_RANDOM_SEED=<seed printed by the test>``. Within a batch a key is touched
at most once (so the model is exact: the latest acknowledged version of a key, or absent once
deleted), and every operation is acknowledged before the next starts. Syncs and GC run once on
demand (``run_sync_once``, ``run_gc_once``) with short grace periods (``storage.gc_grace`` 4 s,
``storage.tombstone_grace`` 1 s); their beat intervals are an hour so only the test runs them.
Bodies sometimes repeat earlier ones, so chunks are shared between keys (deduplicated) and GC
must keep a chunk that another object still references.

After every batch: every acknowledged object reads back identical through every running
coordinator and deleted keys are absent. At the end: every referenced chunk sits on its placement
holders (the full factor) and everything is still readable.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import botocore.exceptions
import pytest

from storage.metadata import MetadataStore
from storage.placement import place
from tasks.gc import run_gc_once
from tests.support import Coordinator, cluster, remove_tree, short_tmp_dir, wait_for
from tunnelmesh import rebalance
from tunnelmesh.cluster import broadcast_removal
from tunnelmesh.identity import load_or_create_identity
from tunnelmesh.sync import run_sync_once

pytestmark = pytest.mark.slow

SETTINGS = {
    "storage": {"chunk_size": "64KiB", "gc_interval": "1h", "gc_grace": "4s", "tombstone_grace": "1s"},
    "sync": {"interval": "1h"},
    "rebalance": {"debounce": "1s", "check_interval": "0.5s"},
}
BATCHES = 8
OPS_PER_BATCH = 10
JOIN_AFTER = 2  # batch after which coordinator-c joins
LEAVE_AFTER = 5  # batch after which coordinator-b drains and leaves


def read_back(node: Coordinator, key: str) -> bytes | None:
    try:
        return node.s3_client().get_object(Bucket="data", Key=key)["Body"].read()  # type: ignore[no-any-return]
    except botocore.exceptions.ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return None
        raise


def mismatches(nodes: list[Coordinator], model: dict[str, bytes | None]) -> list[str]:
    wrong = []
    for node in nodes:
        for key, body in model.items():
            try:
                got = read_back(node, key)
            except Exception as exc:  # noqa: BLE001 - reported as a mismatch (retried until the timeout)
                wrong.append(f"{node.name} {key}: {exc}")
                continue
            if got != body:
                wrong.append(f"{node.name} {key}: {'absent' if got is None else len(got)} bytes, "
                             f"expected {'absent' if body is None else len(body)}")
    return wrong


def chunk_files(node: Coordinator) -> set[str]:
    root = Path(node.data_dir) / "chunks"
    return {n for _, _, names in os.walk(root) for n in names if len(n) == 64}


def has_bucket(node: Coordinator) -> bool:
    try:
        return node.s3_client().head_bucket(Bucket="data") is not None
    except botocore.exceptions.ClientError:
        return False


def test_randomized_operations_keep_every_acknowledged_object() -> None:
    seed = int(os.environ.get("TM_RANDOM_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nrandomized ops: seed {seed} (TM_RANDOM_SEED={seed} reproduces it)")
    rng = random.Random(seed)
    started = time.monotonic()
    root = short_tmp_dir()
    counts = {"put": 0, "overwrite": 0, "delete": 0, "sync": 0, "gc": 0}
    try:
        with cluster(root, 2, settings=SETTINGS) as initial:
            a, b = initial
            running: list[Coordinator] = [a, b]
            extra: Coordinator | None = None
            a.s3_client().create_bucket(Bucket="data")
            wait_for(lambda: has_bucket(b), 30, "the bucket on B", 0.2)
            model: dict[str, bytes | None] = {}
            bodies: list[bytes] = []
            try:
                for batch in range(BATCHES):
                    touched: set[str] = set()
                    for _ in range(OPS_PER_BATCH):
                        node = rng.choice(running)
                        op = rng.choices(["put", "delete", "sync", "gc"], weights=[6, 2, 1, 1])[0]
                        live = [k for k, v in model.items() if v is not None and k not in touched]
                        if op == "delete" and live:
                            key = rng.choice(live)
                            node.s3_client().delete_object(Bucket="data", Key=key)
                            model[key] = None
                            touched.add(key)
                            counts["delete"] += 1
                        elif op == "sync":
                            run_sync_once(node.settings(), lock_timeout=30)
                            counts["sync"] += 1
                        elif op == "gc":
                            run_gc_once(node.settings())
                            counts["gc"] += 1
                        else:
                            known = [k for k in model if k not in touched]
                            overwrite = bool(known) and rng.random() < 0.4
                            key = rng.choice(known) if overwrite else f"k/{len(model)}"
                            if bodies and rng.random() < 0.25:
                                body = rng.choice(bodies)  # shared chunks between keys
                            else:
                                body = rng.randbytes(rng.randrange(0, 200_000))
                                bodies.append(body)
                            node.s3_client().put_object(Bucket="data", Key=key, Body=body)
                            model[key] = body
                            touched.add(key)
                            counts["overwrite" if overwrite else "put"] += 1
                    wait_for(lambda: not mismatches(running, model), 45,
                             f"batch {batch} (seed {seed}) to read back through every coordinator", interval=1)
                    if batch == JOIN_AFTER:
                        _, token = a.printed_join_command()
                        extra = Coordinator(root, "coordinator-c", settings=SETTINGS)
                        extra.start(join=a, token=token)
                        # A coordinator that just joined learns existing buckets and objects from
                        # the others (catch-up at worker start, then the rebalance's): eventual
                        # consistency, so clients are sent to it once it has the bucket.
                        wait_for(lambda node=extra: has_bucket(node), 60, "the bucket on the new coordinator C", 0.2)
                        running.append(extra)
                    if batch == LEAVE_AFTER:
                        rebalance.drain(b.settings(), timeout=60)
                        accepted = broadcast_removal(b.settings(), load_or_create_identity(b.data_dir), b.peer_id)
                        assert len(accepted) == 2, accepted
                        b.stop()
                        running.remove(b)
                        wait_for(lambda: not mismatches(running, model), 45,
                                 f"everything readable after B left (seed {seed})", interval=1)

                # The end: rebalances settled, extra copies dropped, every chunk on its holders.
                members = [n.peer_id for n in running]
                wait_for(lambda: all(rebalance.local_progress(n.settings()).get("state") == "done" for n in running),
                         60, f"the rebalances to finish (seed {seed})", interval=0.5)
                for node in running:
                    run_sync_once(node.settings(), lock_timeout=30)
                for node in running:
                    run_gc_once(node.settings())
                refs = set(rebalance.referenced_chunk_sizes(MetadataStore(Path(a.data_dir) / "meta" / "metadata.db")))

                def placed() -> list[str]:
                    files = {n.peer_id: chunk_files(n) for n in running}
                    return [h for h in refs for p in place(h, members, 2) if h not in files[p]]

                wait_for(lambda: not placed(), 60, f"every referenced chunk on its holders (seed {seed})", 1)
                assert not mismatches(running, model)
            finally:
                if extra is not None:
                    extra.cleanup()
    finally:
        remove_tree(root)
        print(f"randomized ops: seed {seed}, {counts}, {time.monotonic() - started:.1f}s")
