"""Object-store benchmarks against moto's S3 server on 127.0.0.1 (a separate process).

    python bench/bench_remote.py restore   # restore a state of 1,000,000 records' worth of files to local disk
    python bench/bench_remote.py lag       # replication lag under a steady stream of commits, async mode
    python bench/bench_remote.py sync      # `asyncraft run` throughput, sync durability vs local-only, 200 ms calls
    python bench/bench_remote.py first     # `asyncraft run` on an empty dir: restore 1,000,000 records, first request
    python bench/bench_remote.py lag-run   # replication lag of a real `asyncraft run` at 0 ms latency, async mode
    python bench/bench_remote.py all

Each figure is printed with a baseline measured in the same run: for restore, fetching the same objects
with obstore alone (8 in flight, into memory); for lag, the replication interval itself; for sync, the same
job run local-only, alternating with the replicated runs; for first, resuming the same state from a local dir.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

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


def _prompts(path: Path, n: int) -> None:
    with open(path, "wb") as fh:
        for i in range(n):
            fh.write(orjson.dumps({"custom_id": f"r{i}", "body": {"messages": [
                {"role": "user", "content": f"Tell me fact number {i}."}], "max_tokens": 32}}) + b"\n")


def _run_cli(work: Path, name: str, base_url: str, args: argparse.Namespace, *extra: str) -> float:
    """Seconds from start to exit of ``asyncraft run`` over the prompts (the done records per second follow)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCRAFT_")}
    env.update(ASYNCRAFT_BASE_URL=base_url, ASYNCRAFT_MODEL="sim-1", ASYNCRAFT_API_KEY="bench",
               ASYNCRAFT_PROGRESS="off", ASYNCRAFT_CONCURRENCY=str(args.concurrency))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "asyncraft", "run", "--input", str(work / "in.jsonl"), "--state-dir",
                    str(work / name), *extra], env=env, cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def bench_sync(args: argparse.Namespace) -> None:
    moto = Moto()
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    sim = subprocess.Popen([sys.executable, "-m", "asyncraft", "simulate", "--port", "0", "--latency-ms",
                            str(args.latency_ms)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        base_url = sim.stdout.readline().rsplit(" ", 1)[-1].strip()
        _prompts(work / "in.jsonl", args.prompts)
        local, synced = [], []
        for r in range(args.rounds):
            local.append(args.prompts / _run_cli(work, f"local-{r}", base_url, args))
            synced.append(args.prompts / _run_cli(work, f"sync-{r}", base_url, args, "--state-url",
                                                  f"s3://bench/sync-{r}", "--remote-durability", "sync"))
        best_local, best_sync = max(local), max(synced)
        ratio = best_sync / best_local
        print(f"run of {args.prompts:,} prompts, {args.latency_ms:.0f} ms calls, concurrency {args.concurrency}, "
              f"best of {args.rounds} (whole process: start-up, attach and final shipment included)")
        print(f"baseline local-only: {best_local:,.0f} records/s; sync durability to S3 (moto): {best_sync:,.0f} "
              f"records/s; ratio {ratio:.3f}; target >= 0.95: {'yes' if ratio >= 0.95 else 'no'}")
    finally:
        sim.terminate()
        sim.wait(10)
        shutil.rmtree(work, ignore_errors=True)
        moto.close()


def _first_request(cmd: list[str], env: dict[str, str], sim: Any) -> float:
    """Seconds from the start of ``cmd`` to the simulator's first request; the process is then killed (kill -9:
    its lease stays, but the next round runs as the same holder, which takes it back at once)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", *cmd], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        while not sim.stats()["requests"]:
            if proc.poll() is not None:
                raise SystemExit(f"{' '.join(cmd)} ended before any request:\n{proc.communicate()[1][-3000:]}")
            time.sleep(0.005)
        return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.communicate()


def bench_first(args: argparse.Namespace) -> None:
    from bench_engine import Sim, input_line
    from bench_storage import child_env, clone_state, generate

    moto = Moto()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-remote-"))
    sim = Sim("--latency-ms", "0")
    try:
        gen = generate(work / "gen", args.records)
        # Input: the generated one (answered lines, then 1,000 new ones) and 1,000 more, so a run after the upload
        # still has calls to make.
        inp = work / "in2.jsonl"
        shutil.copyfile(gen.input, inp)
        with open(inp, "ab") as fh:
            for i in range(args.records + 1000, args.records + 2000):
                fh.write(input_line(i))
        env = {**child_env(sim.base_url), "ASYNCRAFT_PROGRESS": "off"}
        url = "s3://bench/first"
        clone_state(gen.state, work / "upload")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "asyncraft", "run", "--input", str(gen.input), "--state-dir",
                        str(work / "upload"), "--state-url", url], cwd=ROOT, env=env, check=True,
                       stderr=subprocess.DEVNULL)
        print(f"state of {args.records:,} done records (+1,000 answered by the uploading run) replicated to "
              f"{url} by `asyncraft run` in {time.perf_counter() - t0:.1f} s")
        local, remote = [], []
        for _ in range(args.rounds):
            clone_state(work / "upload", work / "local")
            (work / "local" / "remote.json").unlink(missing_ok=True)
            sim.reset()
            local.append(_first_request(["asyncraft", "run", "--input", str(inp), "--state-dir", str(work / "local")],
                                        env, sim))
            shutil.rmtree(work / "fresh", ignore_errors=True)
            sim.reset()
            remote.append(_first_request(["asyncraft", "run", "--input", str(inp), "--state-dir",
                                          str(work / "fresh"), "--state-url", url], env, sim))
        best_local, best_remote = min(local), min(remote)
        print(f"baseline: resume of the same state from a local dir, first request {best_local:.2f} s (rounds "
              f"{', '.join(f'{v:.2f}' for v in local)})")
        print(f"restore from the store into an empty dir, first request {best_remote:.2f} s (rounds "
              f"{', '.join(f'{v:.2f}' for v in remote)}); ratio {best_remote / best_local:.2f}; target <= 10 s: "
              f"{'yes' if best_remote <= 10 else 'no'}")
    finally:
        sim.close()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        moto.close()


def bench_lag_run(args: argparse.Namespace) -> None:
    """The age of the oldest commit not yet in the store, as the run itself reports it in status.json, sampled
    every 20 ms while `asyncraft run` goes flat out against a 0 ms simulator."""
    import json

    moto = Moto()
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    sim = subprocess.Popen([sys.executable, "-m", "asyncraft", "simulate", "--port", "0", "--latency-ms", "0"],
                           cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        base_url = sim.stdout.readline().rsplit(" ", 1)[-1].strip()
        _prompts(work / "in.jsonl", args.prompts)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCRAFT_")}
        env.update(ASYNCRAFT_BASE_URL=base_url, ASYNCRAFT_MODEL="sim-1", ASYNCRAFT_API_KEY="bench",
                   ASYNCRAFT_PROGRESS="off", ASYNCRAFT_PROGRESS_INTERVAL="0.1",
                   ASYNCRAFT_CONCURRENCY=str(args.concurrency), ASYNCRAFT_REMOTE_INTERVAL=str(args.interval))
        status = work / "state" / "status.json"
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(work / "in.jsonl"),
                                 "--state-dir", str(work / "state"), "--state-url", "s3://bench/lag-run"],
                                cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
        ages: list[float] = []
        while proc.poll() is None:
            try:
                snap = json.loads(status.read_bytes())
            except (FileNotFoundError, ValueError):
                snap = {}
            rep = snap.get("replication")
            if snap.get("running") and rep is not None and snap.get("done_this_run", 0) > 0:
                ages.append(rep["lag_s"])
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0 or not ages:
            raise SystemExit(f"asyncraft run exited {proc.returncode} with {len(ages)} samples")
        ages.sort()
        p99 = ages[max(0, int(len(ages) * 0.99) - 1)]
        print(f"`asyncraft run` of {args.prompts:,} prompts at 0 ms, concurrency {args.concurrency}, "
              f"{args.prompts / elapsed:,.0f} records/s over {elapsed:.1f} s (whole process); baseline: the interval, "
              f"{args.interval:.2f} s")
        print(f"oldest unshipped commit's age, {len(ages)} samples of status.json: "
              f"p50 {statistics.median(ages):.3f} s, "
              f"p99 {p99:.3f} s, max {ages[-1]:.3f} s; p99 = {p99 / args.interval:.2f} intervals; target <= 2 "
              f"intervals: {'yes' if p99 <= 2 * args.interval else 'no'}")
    finally:
        sim.terminate()
        sim.wait(10)
        shutil.rmtree(work, ignore_errors=True)
        moto.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("restore", "lag", "sync", "first", "lag-run", "all"))
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--tail-records", type=int, default=20_000)
    p.add_argument("--run-bytes-per-record", type=int, default=250)
    p.add_argument("--line-bytes", type=int, default=600)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--commit", type=int, default=20)
    p.add_argument("--commit-every", type=float, default=0.005)
    p.add_argument("--prompts", type=int, default=3000, help="sync: prompts per run")
    p.add_argument("--latency-ms", type=float, default=200.0, help="sync: the simulator's latency")
    p.add_argument("--concurrency", type=int, default=64, help="sync: calls in flight")
    p.add_argument("--workdir", default=None, help="first: keep the generated state here (reused next time)")
    args = p.parse_args()
    if args.what in ("restore", "all"):
        bench_restore(args)
    if args.what in ("lag", "all"):
        bench_lag(args)
    if args.what in ("sync", "all"):
        bench_sync(args)
    if args.what in ("first", "all"):
        bench_first(args)
    if args.what in ("lag-run", "all"):
        bench_lag_run(args)


if __name__ == "__main__":
    main()
