"""S3 API speed on one coordinator, against the raw limits of this machine, measured in one run.

Prints one JSON document:
- ``raw``: sequential write + fsync on the data directory's disk (the ceiling for durable PUTs),
  and a bare HTTP upload/download over loopback between two Python processes (a minimal socket
  server, no S3, no storage: the ceiling for any Python HTTP service here).
- ``s3``: PUT and GET of 64 MiB objects with boto3's default config (1 stream, then 4 concurrent),
  and 4 KiB PUT/GET at 8 concurrent clients (ops/s, p50/p99 latency in ms).
- ``ratios``: each S3 figure over its raw limit; ``targets``: the issue's targets and whether met.
- CPU per MiB (big objects) and per operation (4 KiB), server and client apart, with the rate that
  CPU alone allows on this machine's cores: client and server share them here.

    python bench/s3_speed.py [--big-mib 64] [--small-ops 2000] [--rounds 3]

The server is the same standalone S3 gunicorn the integration tests use (bench/_server.py), with
the default settings (fsync on, 4 MiB chunks, web.workers/threads defaults); it is stopped by PID.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._server import S3Server, free_port  # noqa: E402

MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Raw limits
# ---------------------------------------------------------------------------------------------


def raw_fsync_write(directory: Path, size: int, rounds: int) -> float:
    """MiB/s of writing ``size`` bytes sequentially (4 MiB writes) and fsyncing, best of ``rounds``."""
    block = os.urandom(4 * MiB)
    best = 0.0
    for _ in range(rounds):
        path = directory / f"raw-write-{os.getpid()}"
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            written = 0
            while written < size:
                written += os.write(fd, block[: min(len(block), size - written)])
            os.fsync(fd)
        finally:
            os.close(fd)
        best = max(best, size / MiB / (time.perf_counter() - start))
        path.unlink()
    return best


def raw_hash_speed(name: str, rounds: int, seconds: float = 0.3) -> float:
    """MiB/s of one core hashing 4 MiB buffers with hashlib ``name``, best of ``rounds``.

    MD5 is the ceiling of any single PUT: the S3 ETag of a (non-multipart) object is the MD5 of
    its body, and MD5 cannot be split across cores. SHA-256 names and verifies every chunk.
    """
    import hashlib

    block = os.urandom(4 * MiB)
    best = 0.0
    for _ in range(rounds):
        digest = hashlib.new(name)
        count = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            digest.update(block)
            count += 1
        best = max(best, count * 4 / elapsed)
    return best


def bare_server(port: int) -> None:
    """A minimal HTTP/1.1 server: PUT reads and discards the body, GET /<n> sends n bytes."""
    payload = memoryview(os.urandom(4 * MiB))
    listener = socket.create_server(("127.0.0.1", port))

    def serve(conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        buffer = bytearray(1 * MiB)
        with conn, reader:
            while True:
                line = reader.readline()
                if not line:
                    return
                method, target = line.split()[:2]
                length = 0
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while length > 0:
                    got = reader.readinto(memoryview(buffer)[: min(len(buffer), length)])
                    if not got:
                        return
                    length -= got
                size = int(target[1:]) if method == b"GET" else 0
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                while size > 0:
                    piece = payload[: min(len(payload), size)]
                    conn.sendall(piece)
                    size -= len(piece)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def bare_http(size: int, rounds: int) -> dict[str, float]:
    """MiB/s of one upload and one download of ``size`` bytes against ``bare_server`` in another process."""
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--bare-server", str(port)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        body = os.urandom(size)
        upload, download = 0.0, 0.0
        for _ in range(rounds):
            conn = http.client.HTTPConnection("127.0.0.1", port)
            start = time.perf_counter()
            conn.request("PUT", "/", body=body)
            conn.getresponse().read()
            upload = max(upload, size / MiB / (time.perf_counter() - start))
            start = time.perf_counter()
            conn.request("GET", f"/{size}")
            response = conn.getresponse()
            while response.read(MiB):
                pass
            download = max(download, size / MiB / (time.perf_counter() - start))
            conn.close()
        return {"upload_MiB_per_s": round(upload, 1), "download_MiB_per_s": round(download, 1)}
    finally:
        process.kill()
        process.wait(5)


# ---------------------------------------------------------------------------------------------
# S3 figures
# ---------------------------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds used by the S3 server (master and workers) and by this client process.

    On a 2-core machine the client (boto3) and the server share the cores, so CPU per operation
    bounds the rate: at ``c`` ms of CPU per operation in all, no more than ``cores x 1000 / c``
    operations per second are possible, whatever the code waits on.
    """

    def __init__(self, server: S3Server) -> None:
        self.processes = [psutil.Process(pid) for pid in server.pids()]

    def _now(self) -> tuple[float, float]:
        server = 0.0
        for process in self.processes:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            server += times.user + times.system
        own = resource.getrusage(resource.RUSAGE_SELF)
        return server, own.ru_utime + own.ru_stime

    def start(self) -> None:
        self._start = self._now()

    def per(self, count: float, unit: str) -> dict[str, float]:
        """CPU ms per ``unit`` since :meth:`start`, for the server, the client and both."""
        server, client = (end - begin for end, begin in zip(self._now(), self._start, strict=True))
        return {f"server_cpu_ms_per_{unit}": round(1000 * server / count, 2),
                f"client_cpu_ms_per_{unit}": round(1000 * client / count, 2),
                f"cpu_bound_{unit}s_per_s": round((os.cpu_count() or 1) * count / (server + client), 1)}


def big_objects(server: S3Server, bucket: str, size: int, streams: int, rounds: int) -> dict[str, Any]:
    """Aggregate MiB/s of PUT and GET of ``size``-byte objects with ``streams`` concurrent clients."""
    clients = [server.client() for _ in range(streams)]
    bodies = [os.urandom(size) for _ in range(streams)]
    put_rates, get_rates = [], []
    meter = CpuMeter(server)
    cpu: dict[str, dict[str, float]] = {}  # of the last round
    for round_number in range(rounds):
        keys = [f"big-{streams}-{round_number}-{i}" for i in range(streams)]

        def put(i: int, keys: list[str] = keys) -> None:
            clients[i].put_object(Bucket=bucket, Key=keys[i], Body=bodies[i])

        def get(i: int, keys: list[str] = keys) -> None:
            body = clients[i].get_object(Bucket=bucket, Key=keys[i])["Body"]
            received = 0
            for block in body.iter_chunks(MiB):
                received += len(block)
            assert received == size

        with ThreadPoolExecutor(streams) as pool:
            meter.start()
            start = time.perf_counter()
            list(pool.map(put, range(streams)))
            put_rates.append(streams * size / MiB / (time.perf_counter() - start))
            cpu["put"] = meter.per(streams * size / MiB, "MiB")
            meter.start()
            start = time.perf_counter()
            list(pool.map(get, range(streams)))
            get_rates.append(streams * size / MiB / (time.perf_counter() - start))
            cpu["get"] = meter.per(streams * size / MiB, "MiB")
    return {"put_MiB_per_s": round(statistics.median(put_rates), 1),
            "get_MiB_per_s": round(statistics.median(get_rates), 1),
            "cpu": cpu}


def small_objects(server: S3Server, bucket: str, operations: int, clients_count: int) -> dict[str, Any]:
    """ops/s and latency percentiles of 4 KiB PUTs then GETs from ``clients_count`` concurrent clients."""
    clients = [server.client() for _ in range(clients_count)]
    meter = CpuMeter(server)
    body = os.urandom(4096)
    for client in clients:  # open connections and warm up outside the measurement
        client.put_object(Bucket=bucket, Key="warm", Body=body)

    def run(operation: str) -> dict[str, float]:
        latencies: list[float] = []
        lock = threading.Lock()

        def worker(index: int) -> None:
            client, own = clients[index], []
            for n in range(index, operations, clients_count):
                start = time.perf_counter()
                if operation == "put":
                    client.put_object(Bucket=bucket, Key=f"small/{n}", Body=body)
                else:
                    assert len(client.get_object(Bucket=bucket, Key=f"small/{n}")["Body"].read()) == 4096
                own.append(time.perf_counter() - start)
            with lock:
                latencies.extend(own)

        meter.start()
        start = time.perf_counter()
        with ThreadPoolExecutor(clients_count) as pool:
            list(pool.map(worker, range(clients_count)))
        elapsed = time.perf_counter() - start
        latencies.sort()
        return {"ops_per_s": round(operations / elapsed, 1),
                "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
                "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2),
                **meter.per(operations, "op")}

    return {"put": run("put"), "get": run("get")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big-mib", type=int, default=64)
    parser.add_argument("--small-ops", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the data directory goes (default: tmp)")
    parser.add_argument("--bare-server", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server is not None:
        bare_server(args.bare_server)
        return

    size = args.big_mib * MiB
    with tempfile.TemporaryDirectory(prefix="s3-speed-", dir=args.dir) as tmp:
        root = Path(tmp)
        raw = {"fsync_write_MiB_per_s": round(raw_fsync_write(root, size, args.rounds), 1),
               **{f"bare_http_{k}": v for k, v in bare_http(size, args.rounds).items()},
               "md5_mib_s": round(raw_hash_speed("md5", args.rounds), 1),
               "sha256_mib_s": round(raw_hash_speed("sha256", args.rounds), 1)}
        with S3Server(root / "server") as server:
            client = server.client()
            client.create_bucket(Bucket="speed")
            one = big_objects(server, "speed", size, 1, args.rounds)
            four = big_objects(server, "speed", size, 4, max(1, args.rounds - 1))
            small = small_objects(server, "speed", args.small_ops, args.clients)
            settings = {"workers": server.workers, "threads": server.threads, "fsync": True,
                        "chunk_size_MiB": 4}

    result = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "server": settings,
        "raw": raw,
        "s3": {f"{args.big_mib}MiB_1_stream": one, f"{args.big_mib}MiB_4_streams": four,
               f"4KiB_{args.clients}_clients": small},
        "ratios": {
            "put_1_stream_vs_fsync_write": round(one["put_MiB_per_s"] / raw["fsync_write_MiB_per_s"], 2),
            "put_4_streams_vs_fsync_write": round(four["put_MiB_per_s"] / raw["fsync_write_MiB_per_s"], 2),
            "put_1_stream_vs_bare_http_upload": round(one["put_MiB_per_s"] / raw["bare_http_upload_MiB_per_s"], 2),
            "get_1_stream_vs_bare_http_download":
                round(one["get_MiB_per_s"] / raw["bare_http_download_MiB_per_s"], 2),
            "get_4_streams_vs_bare_http_download":
                round(four["get_MiB_per_s"] / raw["bare_http_download_MiB_per_s"], 2),
        },
    }
    result["targets"] = {
        "put_64MiB_at_least_0.5x_fsync_write": result["ratios"]["put_1_stream_vs_fsync_write"] >= 0.5,
        "get_64MiB_at_least_0.5x_bare_http_download": result["ratios"]["get_1_stream_vs_bare_http_download"] >= 0.5,
        "put_4KiB_at_least_400_ops_per_s": small["put"]["ops_per_s"] >= 400,
    }
    result["ceilings"], result["notes"] = ceilings(raw, one)
    print(json.dumps(result, indent=2))


def ceilings(raw: dict[str, float], one: dict[str, float]) -> tuple[dict[str, Any], list[str]]:
    """What bounds a single-stream PUT on this machine, and whether the PUT target can be met at all."""
    put_target = 0.5 * raw["fsync_write_MiB_per_s"]
    md5 = raw["md5_mib_s"]
    reachable = md5 >= put_target
    figures = {"put_target_MiB_per_s": round(put_target, 1),
               "put_1_stream_md5_bound_MiB_per_s": md5,
               "put_target_reachable_given_md5": reachable,
               "put_1_stream_vs_md5_bound": round(one["put_MiB_per_s"] / md5, 2) if md5 else None}
    notes = []
    if not reachable:
        notes.append(
            f"PUT target not reachable on this machine: a single PUT must compute the MD5 of its body "
            f"(the S3 ETag), which is serial, and one core hashes MD5 at {md5} MiB/s, below 0.5 x the "
            f"raw fsync write ({put_target:.1f} MiB/s). On top of it the server verifies the client's "
            f"SHA-256 (x-amz-content-sha256) and checksum and hashes every chunk with SHA-256 "
            f"({raw['sha256_mib_s']} MiB/s per core), and boto3 hashes the body on the same cores.")
    return figures, notes


if __name__ == "__main__":
    main()
