"""Object-store benchmarks against moto's S3 server on 127.0.0.1 (a separate process).

    python bench/bench_remote.py restore   # restore a state of 1,000,000 records' worth of files to local disk
    python bench/bench_remote.py lag       # replication lag under a steady stream of commits, async mode
    python bench/bench_remote.py all

Each figure is printed with a baseline measured in the same run: for restore, fetching the same objects
with obstore alone (8 in flight, into memory); for lag, the replication interval itself.
The state's files are opaque bytes of the sizes the storage layer writes (``--run-bytes-per-record``
for compressed runs, 26-byte index entries, uncompressed journal lines for the tail).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402

from asyncraft.remote import Remote, attach, restore  # noqa: E402

RUN_RECORDS = 100_000
INDEX_ENTRY = 26


def manifest_files(data: bytes) -> list[str]:
    return list(orjson.loads(data)["files"])


class Moto:
    """``python -m moto.server`` on a free 127.0.0.1 port, with a bucket."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        os.environ.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_REGION="us-east-1")
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket="bench")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def make_state(root: Path, records: int, run_bytes: int, tail_records: int) -> int:
    """Files of a state holding ``records``: runs of 100k records + indexes, a manifest, a journal tail."""
    for d in ("journal", "runs", "snapshots"):
        (root / d).mkdir(parents=True)
    covered = records - tail_records
    files: list[str] = []
    size = 0
    first = 1
    while first <= covered:
        last = min(covered, first + RUN_RECORDS - 1)
        stem = f"runs/{first:012d}-{last:012d}"
        n = last - first + 1
        (root / f"{stem}.zst").write_bytes(os.urandom(n * run_bytes))
        (root / f"{stem}.idx").write_bytes(os.urandom(n * INDEX_ENTRY))
        size += n * (run_bytes + INDEX_ENTRY)
        files += [f"{stem}.zst", f"{stem}.idx"]
        first = last + 1
    (root / "snapshots" / f"snap-{covered:012d}.json").write_bytes(orjson.dumps({"seq": covered, "files": files}))
    (root / "asyncraft.json").write_bytes(b'{"job": "bench"}\n')
    return size


def _append(path: Path, data: bytes) -> int:
    """One group commit, as the journal writer's thread does it: append, fdatasync, new length."""
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fdatasync(fh.fileno())
        return fh.tell()


async def upload_state(url: str, root: Path, records: int, tail_records: int, line_bytes: int) -> float:
    """Replicate the state through the replicator (as a run would); the tail as 1 s chunks of commits."""
    t0 = time.perf_counter()
    attached = await attach(Remote.open(url), root, manifest_files=manifest_files, durability="sync", interval=0.05)
    rep = attached.replicator
    covered = records - tail_records
    rep.on_meta(root / "asyncraft.json")
    rep.on_manifest(root / "snapshots" / f"snap-{covered:012d}.json")
    seg = root / "journal" / f"{covered + 1:012d}.jsonl"
    line = b"x" * (line_bytes - 1) + b"\n"
    per_chunk = max(1, tail_records // 40)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(rep.run())
        seq = covered
        while seq < records:
            n = min(per_chunk, records - seq)
            size = await asyncio.to_thread(_append, seg, line * n)
            seq += n
            rep.on_commit(seg, size, seq)
            await rep.durable(seq)
        rep.stop()
    return time.perf_counter() - t0


async def raw_fetch(url: str) -> tuple[float, int]:
    """Baseline: GET every object of the state with obstore alone, 8 in flight, into memory."""
    import obstore
    from obstore.store import from_url

    store = from_url(url, client_options={"allow_http": True})
    keys = [e.key for e in await Remote.open(url).list()]
    limit = asyncio.Semaphore(8)
    total = 0

    async def get(key: str) -> None:
        nonlocal total
        async with limit:
            resp = await obstore.get_async(store, key)
            data = await resp.bytes_async()
            total += len(data)

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for k in keys:
            tg.create_task(get(k))
    return time.perf_counter() - t0, total


def bench_restore(args: argparse.Namespace) -> None:
    moto = Moto()
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    try:
        url = "s3://bench/restore"
        size = make_state(work / "src", args.records, args.run_bytes_per_record, args.tail_records)
        up = asyncio.run(upload_state(url, work / "src", args.records, args.tail_records, args.line_bytes))
        print(f"state: {args.records:,} records; runs+indexes {size / 1e6:.0f} MB, journal tail "
              f"{args.tail_records:,} records x {args.line_bytes} B; uploaded through the replicator in {up:.1f} s")
        raws, restores = [], []
        for i in range(args.rounds):
            raw, total = asyncio.run(raw_fetch(url))
            raws.append(raw)
            dest = work / f"dst{i}"
            t0 = time.perf_counter()
            done = asyncio.run(restore(Remote.open(url), dest))
            restores.append(time.perf_counter() - t0)
            assert done.end_seq == args.records, done
            shutil.rmtree(dest)
        raw, best = min(raws), min(restores)
        print(f"baseline: obstore GET of all {total / 1e6:.0f} MB, 8 in flight, into memory: {raw:.2f} s "
              f"({total / 1e6 / raw:.0f} MB/s)")
        print(f"restore to local disk (best of {args.rounds}): {best:.2f} s ({total / 1e6 / best:.0f} MB/s); "
              f"ratio to baseline {best / raw:.2f}; target <= 10 s: {'yes' if best <= 10 else 'no'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        moto.close()


async def _lag(url: str, root: Path, args: argparse.Namespace) -> list[float]:
    for d in ("journal", "runs", "snapshots"):
        (root / d).mkdir(parents=True, exist_ok=True)
    attached = await attach(Remote.open(url), root, manifest_files=manifest_files, durability="async",
                            interval=args.interval)
    rep = attached.replicator
    seg = root / "journal" / f"{1:012d}.jsonl"
    line = b"y" * (args.line_bytes - 1) + b"\n"
    lags: list[float] = []

    async def watch(seq: int, t0: float) -> None:
        await rep.durable(seq)
        lags.append(time.perf_counter() - t0)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(rep.run())
        seq = 0
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            size = await asyncio.to_thread(_append, seg, line * args.commit)
            seq += args.commit
            rep.on_commit(seg, size, seq)
            tg.create_task(watch(seq, time.perf_counter()))
            await asyncio.sleep(args.commit_every)
        await rep.durable(seq)
        rep.stop()
    return lags


def bench_lag(args: argparse.Namespace) -> None:
    moto = Moto()
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    try:
        lags = sorted(asyncio.run(_lag("s3://bench/lag", work / "state", args)))
        p50 = statistics.median(lags)
        p99 = lags[int(len(lags) * 0.99) - 1]
        rate = len(lags) * args.commit / args.seconds
        print(f"stream: {len(lags):,} commits of {args.commit} records x {args.line_bytes} B over {args.seconds:.0f} s "
              f"({rate:,.0f} records/s); baseline: the interval, {args.interval:.2f} s")
        met = "yes" if p99 <= 2 * args.interval else "no"
        print(f"replication lag: p50 {p50:.3f} s, p99 {p99:.3f} s, max {lags[-1]:.3f} s; p99 = "
              f"{p99 / args.interval:.2f} intervals; target <= 2 intervals: {met}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        moto.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("restore", "lag", "all"))
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--tail-records", type=int, default=20_000)
    p.add_argument("--run-bytes-per-record", type=int, default=250)
    p.add_argument("--line-bytes", type=int, default=600)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--commit", type=int, default=20)
    p.add_argument("--commit-every", type=float, default=0.005)
    args = p.parse_args()
    if args.what in ("restore", "all"):
        bench_restore(args)
    if args.what in ("lag", "all"):
        bench_lag(args)


if __name__ == "__main__":
    main()
