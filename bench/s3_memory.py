"""Memory of the S3 serving processes while a 1 GiB object streams in and out through boto3.

Starts a standalone S3 server (bench/_server.py: gunicorn master + workers, default settings),
warms it up, then PUTs one 1 GiB object (generated on the fly, never held whole by the client
either) with boto3's default client (aws-chunked with a trailing checksum) and GETs it back
streaming. RSS of the master and every worker is sampled every 20 ms; the growth over the
warmed-up baseline is reported (target: under 100 MiB). Prints one JSON document.

    python bench/s3_memory.py [--gib 1] [--dir /path/on/the/disk/to/test]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._server import S3Server  # noqa: E402

MiB = 1024 * 1024
BLOCK = MiB


class GeneratedBody(io.RawIOBase):
    """A seekable, read-only stream of ``size`` pseudo-random bytes, computed per 1 MiB block
    (distinct blocks, so the chunk store cannot deduplicate them)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.position = 0
        self._block_index = -1
        self._block = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, min(self.size, base + offset))
        return self.position

    def _block_at(self, index: int) -> bytes:
        if index != self._block_index:
            self._block = random.Random(index).randbytes(BLOCK)
            self._block_index = index
        return self._block

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.position
        n = min(n, self.size - self.position)
        pieces = []
        while n > 0:
            index, offset = divmod(self.position, BLOCK)
            piece = self._block_at(index)[offset:offset + n]
            pieces.append(piece)
            self.position += len(piece)
            n -= len(piece)
        return b"".join(pieces)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def __len__(self) -> int:
        return self.size


class RssSampler:
    """Samples the summed RSS of a set of processes (and each one's peak) in a thread."""

    def __init__(self, pids: list[int], interval: float = 0.02) -> None:
        self.processes = [psutil.Process(pid) for pid in pids]
        self.interval = interval
        self.peak_total = 0
        self.peak_each: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        total = 0
        for process in self.processes:
            try:
                rss = process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            total += rss
            self.peak_each[process.pid] = max(self.peak_each.get(process.pid, 0), rss)
        self.peak_total = max(self.peak_total, total)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=None, help="where the data directory goes (default: tmp)")
    args = parser.parse_args()
    size = int(args.gib * 1024 * MiB)

    with tempfile.TemporaryDirectory(prefix="s3-memory-", dir=args.dir) as tmp, \
            S3Server(Path(tmp) / "server") as server:
        client = server.client()
        client.create_bucket(Bucket="memory")
        # Warm up every worker (imports, first store use, connection pools) before the baseline.
        for n in range(4 * server.workers):
            client.put_object(Bucket="memory", Key=f"warm/{n}", Body=GeneratedBody(8 * MiB))
            client.get_object(Bucket="memory", Key=f"warm/{n}")["Body"].read()
        pids = server.pids()
        baseline_each = {pid: psutil.Process(pid).memory_info().rss for pid in pids}
        baseline = sum(baseline_each.values())

        with RssSampler(pids) as sampler:
            start = time.perf_counter()
            etag = client.put_object(Bucket="memory", Key="big", Body=GeneratedBody(size))["ETag"]
            put_seconds = time.perf_counter() - start
            put_peak = sampler.peak_total
            start = time.perf_counter()
            body = client.get_object(Bucket="memory", Key="big")["Body"]
            md5, received = hashlib.md5(), 0
            for block in body.iter_chunks(MiB):
                md5.update(block)
                received += len(block)
            get_seconds = time.perf_counter() - start
        expected = hashlib.md5()
        source = GeneratedBody(size)
        while block := source.read(8 * MiB):
            expected.update(block)

    growth = sampler.peak_total - baseline
    result = {
        "object_bytes": size,
        "server_processes": len(pids),
        "baseline_rss_MiB": round(baseline / MiB, 1),
        "peak_rss_MiB": round(sampler.peak_total / MiB, 1),
        "growth_MiB": round(growth / MiB, 1),
        "growth_during_put_MiB": round((put_peak - baseline) / MiB, 1),
        "growth_per_process_MiB": {str(pid): round((sampler.peak_each.get(pid, 0) - baseline_each[pid]) / MiB, 1)
                                   for pid in pids},
        "put_MiB_per_s": round(size / MiB / put_seconds, 1),
        "get_MiB_per_s": round(size / MiB / get_seconds, 1),
        "round_trip_intact": received == size and md5.hexdigest() == expected.hexdigest()
        and etag.strip('"') == expected.hexdigest(),
        "target_growth_under_100MiB": growth < 100 * MiB,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
