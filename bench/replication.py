"""Replication between three real coordinators on this machine, measured in one run (issue 5).

Prints one JSON document:
- ``lag_small``: replication lag of 4 KiB objects written to A at a steady light rate: seconds from
  the acknowledgement on A until B and C both serve the object (its record is in their metadata:
  the metadata is pushed after the chunks, so that is when a GET there succeeds); p50, p99, max.
- ``lag_large``: the same for 64 MiB objects written one at a time (16 chunks of 4 MiB).
- ``throughput``: aggregate PUT throughput with clients spread over A, B and C (MiB/s and ops/s).
- ``disk``: bytes of chunk files per coordinator once replication and writer cleanup settled,
  against the logical bytes (distinct chunks of live objects) x ``replication.factor``.

    python bench/replication.py [--small-count 200] [--small-rate 10] [--large-count 4]
                                [--put-mib 8] [--put-count 36] [--clients-per-node 2]

The coordinators are ``tunnelmesh join`` stacks started through tests/support (each its own Redis,
gunicorns, Celery worker and beat, default 4 MiB chunks, fsync on, factor 2) in a temporary
directory; every process is stopped (and killed if need be) and the directory removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.metadata import MetadataStore  # noqa: E402
from tests.support import Coordinator, cluster, remove_tree, short_tmp_dir, wait_converged, wait_for  # noqa: E402
from tunnelmesh import rebalance  # noqa: E402

MiB = 1024 * 1024
FACTOR = 2
SETTINGS: dict[str, Any] = {
    "replication": {"factor": FACTOR, "drain_interval": "1s", "hint_interval": "2s", "peer_timeout": "30s"},
    "sync": {"interval": "1h"},  # measure replication itself, not the safety net
    "web": {"workers": 2, "threads": 8},
    "worker": {"concurrency": 3},
}


def s3_client(writer: Coordinator, endpoint: Coordinator) -> Any:
    import boto3
    from botocore.config import Config

    creds = writer.credentials()
    return boto3.client("s3", endpoint_url=endpoint.s3_url, region_name="us-east-1",
                        aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key,
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                                      max_pool_connections=32))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def summary(lags: list[float]) -> dict[str, float]:
    return {"count": len(lags), "p50_s": round(percentile(lags, 0.5), 4), "p99_s": round(percentile(lags, 0.99), 4),
            "max_s": round(max(lags), 4), "mean_s": round(statistics.fmean(lags), 4)}


class ArrivalWatcher:
    """Polls the metadata databases of some coordinators; records when each awaited key appears."""

    def __init__(self, nodes: list[Coordinator], bucket: str, interval: float = 0.01) -> None:
        self.nodes = nodes
        self.bucket = bucket
        self.interval = interval
        self.awaited: dict[str, str] = {}  # key -> etag
        self.seen: dict[tuple[str, str], float] = {}  # (node name, key) -> monotonic time
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(node,), daemon=True) for node in nodes]

    def expect(self, key: str, etag: str) -> None:
        with self._lock:
            self.awaited[key] = etag

    def __enter__(self) -> ArrivalWatcher:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)

    def arrived_everywhere(self, key: str) -> float | None:
        times = [self.seen.get((node.name, key)) for node in self.nodes]
        return None if any(t is None for t in times) else max(times)  # type: ignore[type-var]

    def _run(self, node: Coordinator) -> None:
        meta = MetadataStore(node.data_dir / "meta" / "metadata.db")
        try:
            while not self._stop.is_set():
                with self._lock:
                    waiting = [(k, e) for k, e in self.awaited.items() if (node.name, k) not in self.seen]
                for key, etag in waiting:
                    record = meta.get_object(self.bucket, key)
                    if record is not None and not record.deleted and record.etag == etag:
                        self.seen[(node.name, key)] = time.monotonic()
                self._stop.wait(self.interval)
        finally:
            meta.close()


def measure_lag(nodes: list[Coordinator], bucket: str, sizes: list[int], rate: float | None,
                timeout: float, prefix: str = "lag") -> list[float]:
    """PUT objects of ``sizes`` to nodes[0] (at ``rate`` per second, or one after another waiting for
    each to arrive); lag from each ack until every other node holds it."""
    a, others = nodes[0], nodes[1:]
    s3 = s3_client(a, a)
    acked: dict[str, float] = {}
    with ArrivalWatcher(others, bucket) as watcher:
        started = time.monotonic()
        for index, size in enumerate(sizes):
            if rate:
                time.sleep(max(0.0, started + index / rate - time.monotonic()))
            key = f"{prefix}-{size}-{index:05d}"
            body = os.urandom(size)
            etag = s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')
            acked[key] = time.monotonic()
            watcher.expect(key, etag)
            if not rate:
                wait_for(lambda key=key: watcher.arrived_everywhere(key), timeout, f"{key} everywhere", 0.01)
        wait_for(lambda: all(watcher.arrived_everywhere(k) for k in acked), timeout, "every object everywhere", 0.05)
        return [watcher.arrived_everywhere(k) - t for k, t in acked.items()]  # type: ignore[operator]


def measure_throughput(nodes: list[Coordinator], bucket: str, size: int, count: int,
                       clients_per_node: int) -> dict[str, Any]:
    """``count`` PUTs of ``size`` bytes by ``clients_per_node`` threads per coordinator."""
    body = os.urandom(size)
    clients = [s3_client(nodes[0], node) for node in nodes for _ in range(clients_per_node)]

    def put(index: int) -> float:
        s3 = clients[index % len(clients)]
        started = time.monotonic()
        # A distinct first byte per object: distinct chunks, so replication really moves data.
        s3.put_object(Bucket=bucket, Key=f"tp-{index:05d}", Body=index.to_bytes(4, "big") + body[4:])
        return time.monotonic() - started

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(clients)) as pool:
        latencies = list(pool.map(put, range(count)))
    elapsed = time.monotonic() - started
    return {"object_mib": size / MiB, "objects": count, "clients": len(clients), "seconds": round(elapsed, 3),
            "mib_per_s": round(count * size / MiB / elapsed, 2), "ops_per_s": round(count / elapsed, 2),
            "put_p50_s": round(percentile(latencies, 0.5), 4), "put_p99_s": round(percentile(latencies, 0.99), 4)}


def chunk_bytes(node: Coordinator) -> int:
    total = 0
    for directory, _, files in os.walk(node.data_dir / "chunks"):
        total += sum(os.path.getsize(os.path.join(directory, name)) for name in files)
    return total


def logical_bytes(node: Coordinator) -> int:
    """Bytes of the distinct chunks referenced by live objects (from one coordinator's metadata)."""
    meta = MetadataStore(node.data_dir / "meta" / "metadata.db")
    try:
        distinct: dict[str, int] = {}
        with meta.read() as tx:
            for record in tx.iter_objects(include_deleted=False):
                for ref in record.chunks:
                    distinct[ref.hash] = ref.size
        return sum(distinct.values())
    finally:
        meta.close()


def measure_disk(nodes: list[Coordinator], settle_timeout: float) -> dict[str, Any]:
    def settled() -> bool:
        # Recomputed each time: objects written through B and C reach A's metadata only when
        # replicated, and the writers drop extra copies once every holder confirmed.
        logicals = {logical_bytes(n) for n in nodes}
        return len(logicals) == 1 and sum(chunk_bytes(n) for n in nodes) <= logicals.pop() * FACTOR * 1.001

    try:
        wait_for(settled, settle_timeout, "replication and writer cleanup to settle", 0.5)
        is_settled = True
    except AssertionError:
        is_settled = False
    logical = logical_bytes(nodes[0])
    target = logical * FACTOR
    per_node = {n.name: chunk_bytes(n) for n in nodes}
    total = sum(per_node.values())
    return {"per_coordinator_bytes": per_node, "total_bytes": total, "logical_bytes": logical, "factor": FACTOR,
            "logical_x_factor": target, "ratio_total_to_logical_x_factor": round(total / target, 4) if target else None,
            "share_of_total": {k: round(v / total, 3) for k, v in per_node.items()} if total else {},
            "settled": is_settled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-count", type=int, default=200)
    parser.add_argument("--small-rate", type=float, default=10.0, help="4 KiB PUTs per second (light load)")
    parser.add_argument("--large-count", type=int, default=4)
    parser.add_argument("--put-mib", type=int, default=8, help="object size of the throughput run")
    parser.add_argument("--put-count", type=int, default=36)
    parser.add_argument("--clients-per-node", type=int, default=2)
    args = parser.parse_args()

    root = short_tmp_dir("tmb-")
    result: dict[str, Any] = {"benchmark": "replication", "coordinators": 3, "factor": FACTOR,
                              "chunk_size": 4 * MiB, "cpus": os.cpu_count()}
    try:
        started = time.monotonic()
        with cluster(root, 3, settings=SETTINGS) as nodes:
            wait_converged(nodes)
            result["cluster_start_s"] = round(time.monotonic() - started, 2)
            bucket = "bench"
            s3_client(nodes[0], nodes[0]).create_bucket(Bucket=bucket)
            wait_for(lambda: all(_has_bucket(n, bucket) for n in nodes), 30, "the bucket everywhere", 0.1)
            # Steady state first: each worker's start-up jobs (metadata catch-up, the debounced
            # start-up rebalance) would otherwise compete with the first objects' replication.
            wait_for(lambda: all(rebalance.local_progress(n.settings()).get("state") == "done" for n in nodes),
                     120, "the start-up rebalances to finish", 0.5)
            result["startup_settled_s"] = round(time.monotonic() - started, 2)
            # and warm: the first pushes of each worker process open its stores and connections.
            measure_lag(nodes, bucket, [4096] * 12, args.small_rate, timeout=60, prefix="warm-up")

            small = measure_lag(nodes, bucket, [4096] * args.small_count, args.small_rate, timeout=60)
            result["lag_small"] = {"object_bytes": 4096, "rate_per_s": args.small_rate, **summary(small)}
            large = measure_lag(nodes, bucket, [64 * MiB] * args.large_count, None, timeout=180)
            result["lag_large"] = {"object_bytes": 64 * MiB, **summary(large)}
            # The large objects' chunks striped elsewhere are read back through C (remote chunks).
            got = s3_client(nodes[0], nodes[2]).get_object(Bucket=bucket, Key=f"lag-{64 * MiB}-00000")["Body"].read()
            result["lag_large"]["read_back_through_c_ok"] = len(got) == 64 * MiB

            result["throughput"] = measure_throughput(nodes, bucket, args.put_mib * MiB, args.put_count,
                                                      args.clients_per_node)
            result["disk"] = measure_disk(nodes, settle_timeout=120)
    finally:
        remove_tree(root)
    result["total_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=2))


def _has_bucket(node: Coordinator, bucket: str) -> bool:
    meta = MetadataStore(node.data_dir / "meta" / "metadata.db")
    try:
        record = meta.get_bucket(bucket)
        return record is not None and not record.deleted
    finally:
        meta.close()


if __name__ == "__main__":
    main()
