"""A third coordinator joins two that hold data: one debounced rebalance, within budget, ideal moves.

Two scales of the same test. ``full`` is the issue's: about 1 GiB of objects (64 x 16 MiB) on two
coordinators, the default 4 MiB chunks, the seed's 50 MB budget per cycle and 10 s debounce.
``small`` (16 MiB, 64 KiB chunks, 1 MB budget, 2 s debounce) runs the same checks on 256 chunks in
a fraction of the time, so a regression shows up fast in ``-m "not slow"`` runs too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from storage.metadata import MetadataStore
from storage.placement import place
from tests.support import Coordinator, cluster, remove_tree, short_tmp_dir, wait_for
from tunnelmesh import rebalance

MiB = 1024 * 1024


@dataclass(frozen=True)
class Scale:
    objects: int
    object_size: int
    chunk_size: int
    budget: int  # rebalance.max_bytes_per_cycle
    debounce: str
    traffic_pause: float  # seconds between two read+write rounds of the traffic during the rebalance
    timeout: float  # for each wait on the cluster

    @property
    def settings(self) -> dict[str, dict[str, object]]:
        return {
            "storage": {"chunk_size": self.chunk_size, "gc_interval": "1h", "gc_grace": "1h"},
            "sync": {"interval": "1h"},
            "rebalance": {"debounce": self.debounce, "max_bytes_per_cycle": self.budget, "check_interval": "0.5s"},
        }

    def chunks(self, body: bytes) -> dict[str, int]:
        """chunk hash -> size, as the store splits ``body``."""
        step = self.chunk_size
        return {hashlib.sha256(body[i:i + step]).hexdigest(): len(body[i:i + step])
                for i in range(0, len(body), step)}


SCALES = {
    "small": Scale(objects=16, object_size=MiB, chunk_size=64 * 1024, budget=1_000_000, debounce="2s",
                   traffic_pause=0.1, timeout=120),
    "full": Scale(objects=64, object_size=16 * MiB, chunk_size=4 * MiB, budget=50_000_000, debounce="10s",
                  traffic_pause=0.2, timeout=600),
}
# Three copies of the data at most (A, B, and C's share) plus the writes made during the test.
FULL_DISK_NEEDED = 4 * 1024 * MiB


def chunk_files(coordinator: Coordinator) -> set[str]:
    root = Path(coordinator.data_dir) / "chunks"
    return {name for _, _, names in os.walk(root) for name in names if len(name) == 64}


@pytest.mark.slow
@pytest.mark.parametrize("scale_name", ["small", "full"])
def test_join_rebalances_once_within_budget_to_the_ideal(scale_name: str) -> None:
    scale = SCALES[scale_name]
    if scale_name == "full" and shutil.disk_usage("/tmp").free < FULL_DISK_NEEDED:
        pytest.skip(f"the 1 GiB join needs {FULL_DISK_NEEDED // MiB} MiB free under /tmp")
    root = short_tmp_dir()
    try:
        with cluster(root, 2, settings=scale.settings) as (a, b):
            s3 = a.s3_client()
            s3.create_bucket(Bucket="data")
            payloads = {f"obj/{i}": os.urandom(scale.object_size) for i in range(scale.objects)}
            original = {h: size for body in payloads.values() for h, size in scale.chunks(body).items()}
            for key, body in payloads.items():
                s3.put_object(Bucket="data", Key=key, Body=body)
            wait_for(lambda: chunk_files(b) >= set(original), scale.timeout, "B to hold every chunk", interval=0.5)
            # Each node's start-up rebalance (its first membership check) must be over before C joins.
            wait_for(lambda: all(rebalance.local_progress(n.settings()).get("state") == "done" for n in (a, b)),
                     30, "the start-up rebalances to finish")
            runs_before = {n.name: rebalance.local_progress(n.settings()).get("runs", 0) for n in (a, b)}

            failures: list[str] = []
            written_during: dict[str, int] = {}  # chunk hash -> size, of the writes made during the rebalance
            stop = threading.Event()

            def reads_and_writes() -> None:
                i = 0
                while not stop.is_set():
                    key = f"obj/{i % scale.objects}"
                    try:
                        got = s3.get_object(Bucket="data", Key=key)["Body"].read()
                        if got != payloads[key]:
                            failures.append(f"read {key}: wrong bytes")
                        body = os.urandom(70_000)
                        s3.put_object(Bucket="data", Key=f"during/{i}", Body=body)
                        written_during.update(scale.chunks(body))
                    except Exception as exc:  # noqa: BLE001 - every failure is a test failure
                        failures.append(f"{key}: {exc}")
                    i += 1
                    # Steady traffic, not a replication backlog the 2-core box cannot clear.
                    stop.wait(scale.traffic_pause)

            traffic = threading.Thread(target=reads_and_writes, daemon=True)
            traffic.start()
            _, token = a.printed_join_command()
            c = Coordinator(root, "coordinator-c", settings=scale.settings)
            joined_at = time.monotonic()
            try:
                c.start(join=a, token=token)
                nodes = (a, b, c)
                members = [n.peer_id for n in nodes]

                def done() -> bool:
                    # A and B keep their last run's "done" through the debounce: count their runs too.
                    states = {n.name: rebalance.local_progress(n.settings()) for n in nodes}
                    return (all(s.get("state") == "done" for s in states.values())
                            and all(states[n.name].get("runs", 0) > runs_before[n.name] for n in (a, b)))

                wait_for(done, scale.timeout, "the rebalance to finish on every coordinator", interval=0.5)
                took = time.monotonic() - joined_at
                stop.set()
                traffic.join(30)
                assert not failures, failures[:5]
                wait_for(lambda: all(rebalance.local_progress(n.settings()).get("runs", 0) >= 1 for n in nodes),
                         10, "runs")
                for n in (a, b):
                    assert rebalance.local_progress(n.settings())["runs"] - runs_before[n.name] == 1
                cycles = rebalance.cycles(c.settings())
                assert cycles and all(cy["moved_bytes"] <= scale.budget for cy in cycles), cycles
                moved = sum(cy["moved_bytes"] for cy in cycles)
                # The ideal: the chunks of the objects written before C joined that C now ranks for.
                # Writes made during the rebalance reach C by replication or, when C's catch-up saw
                # their metadata before A's push ran, by a cycle: those bytes are the only slack.
                ideal = sum(size for h, size in original.items() if c.peer_id in place(h, members, 2))
                during_for_c = sum(size for h, size in written_during.items() if c.peer_id in place(h, members, 2))
                print(f"\nrebalance ({scale_name}, {len(original)} chunks): {took:.1f}s from the join to done "
                      f"(debounce {scale.debounce}); C moved {moved} bytes in {len(cycles)} cycle(s), ideal {ideal} "
                      f"({moved / ideal:.3f} x), largest cycle {max(cy['moved_bytes'] for cy in cycles)}, "
                      f"budget {scale.budget}; {len(written_during)} chunks written during it, at most {during_for_c} "
                      "bytes of them for C")
                assert ideal <= moved <= 1.2 * ideal + during_for_c, (moved, ideal, during_for_c)
                # No manual sync or cycle: each run started with a metadata catch-up, and A and B
                # dropped their extra copies once C confirmed them.
                def metadata(n: Coordinator) -> set[str]:
                    return set(rebalance.referenced_chunk_sizes(MetadataStore(Path(n.data_dir) / "meta" / "metadata.db")))

                wait_for(lambda: metadata(a) == metadata(b) == metadata(c), 60, "every object known everywhere",
                         interval=1)
                referenced = metadata(a)

                def placed() -> bool:
                    # Writes made during the rebalance may still be replicating: wait for them.
                    files = {n.peer_id: chunk_files(n) for n in nodes}
                    return all({p for p in members if h in files[p]} == set(place(h, members, 2)) for h in referenced)

                wait_for(placed, 60, "every referenced chunk on exactly its placement holders", interval=1)
                for key, body in payloads.items():
                    assert c.s3_client().get_object(Bucket="data", Key=key)["Body"].read() == body
            finally:
                stop.set()
                c.cleanup()
    finally:
        remove_tree(root)
