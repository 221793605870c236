"""Cost of one manifest-sync round between two coordinators: bytes exchanged and CPU time.

Two ObjectStores in temp dirs with N identical objects (default 100,000), linked in process by
``tunnelmesh.sync.LocalLink`` (every request and answer goes through JSON, so the byte counts are
what HTTP bodies would carry). CPU time is the process time of the whole round, i.e. BOTH sides
(owner and peer run in this one process). Rounds measured:

- ``no_difference``: both stores identical;
- ``one_lost_delete``: one object deleted on the owner only (the delete message to the peer lost).

Each side runs the round for the ranges it owns (two owner rounds = one full sync between them);
the figures are per pair of owner rounds. Prints JSON.

    python bench/sync_cost.py [--objects 100000]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from storage.objects import ObjectStore  # noqa: E402
from tunnelmesh.sync import LocalLink, SyncService, mark_caught_up  # noqa: E402

IDS = ["a" * 16, "b" * 16]


def measure(services: list[SyncService]) -> dict[str, float | int]:
    total_bytes = 0
    cpu = time.process_time()
    wall = time.perf_counter()
    outcomes = []
    for mine, other in ((services[0], services[1]), (services[1], services[0])):
        report = mine.compare(LocalLink(mine, other), mode="owner")
        total_bytes += report.bytes_sent + report.bytes_received
        outcomes.append(report.to_dict())
    return {"bytes_exchanged": total_bytes, "cpu_seconds": round(time.process_time() - cpu, 3),
            "wall_seconds": round(time.perf_counter() - wall, 3),
            "names_differing": sum(o["names_differing"] for o in outcomes),
            "deleted_on_peer": sum(o["deleted_on_peer"] for o in outcomes),
            "pulled": sum(o["pulled"] for o in outcomes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stores = [ObjectStore(Path(tmp) / peer, peer, fsync=False) for peer in IDS]
        stores[0].create_bucket("bench", "owner")
        stores[1].apply_remote_bucket(stores[0].meta.get_bucket("bench"))
        template = stores[0].put_object("bench", "k", io.BytesIO(b"x" * 100), content_length=100)
        records = [dataclasses.replace(template, key=f"objects/{i:08d}") for i in range(args.objects)]
        for store in stores:
            with store.meta.write() as tx:
                tx.purge_object("bench", "k")
                for record in records:
                    tx.put_object(record)
        services = [SyncService(store, peer, lambda: list(IDS)) for store, peer in zip(stores, IDS, strict=True)]
        for service in services:
            mark_caught_up(service.store.data_dir, service.incarnation)
        result: dict[str, object] = {"objects": args.objects}
        result["no_difference"] = measure(services)
        stores[0].delete_object("bench", f"objects/{args.objects // 2:08d}")
        result["one_lost_delete"] = measure(services)
        result["after_repair"] = measure(services)
        result["repaired"] = stores[1].meta.get_object("bench", f"objects/{args.objects // 2:08d}").deleted
        for store in stores:
            store.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
