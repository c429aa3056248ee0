"""A stand-in journal writer for the object-store tests and benchmark: ``python -m tests.remote_driver``.

It writes the files the real storage layer writes - journal segments of JSON lines appended in group
commits, sealed runs with an index, manifests naming them, asyncraft.json - and drives the replicator the
way the writer will: ``on_commit`` after each fsync, ``await durable(seq)`` in sync mode before it prints
``ACK <seq>`` (the acknowledgement tests hold it to), ``on_immutable``/``on_manifest`` at compaction.
Record ``n`` is ``{"seq": n, "v": "<tag>-<n>"}``; ``read_state`` reads a dir of this format back.
Failpoints come from ASYNCRAFT_FAILPOINTS (the remote names added to the known ones).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from asyncraft import failpoints as fp_module
from asyncraft.remote import (
    FAILPOINTS,
    LeaseHeld,
    LeaseLost,
    Remote,
    RemoteError,
    Replicator,
    attach,
)


def seg_name(first: int) -> str:
    return f"{first:012d}.jsonl"


def record(seq: int, tag: str) -> bytes:
    return orjson.dumps({"seq": seq, "v": f"{tag}-{seq}"}) + b"\n"


def manifest_files(data: bytes) -> list[str]:
    return list(orjson.loads(data)["runs"])


def _lines(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.split(b"\n") if line]


def read_state(root: Path) -> dict[int, str]:
    """seq -> value of every record the dir holds: the newest manifest's runs, then the journal after it."""
    out: dict[int, str] = {}
    covered = 0
    manifests = sorted((root / "snapshots").glob("manifest-*.json"))
    if manifests:
        m = orjson.loads(manifests[-1].read_bytes())
        covered = m["seq"]
        for name in m["runs"]:
            if name.endswith(".zst"):
                for rec in _lines((root / name).read_bytes()):
                    out[rec["seq"]] = rec["v"]
    for seg in sorted((root / "journal").glob("*.jsonl")):
        for rec in _lines(seg.read_bytes()):
            if rec["seq"] > covered:
                out[rec["seq"]] = rec["v"]
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _append(path: Path, data: bytes) -> int:
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()


class Writer:
    def __init__(self, root: Path, rep: Replicator, args: argparse.Namespace) -> None:
        self.root = root
        self.rep = rep
        self.args = args
        for d in ("journal", "runs", "snapshots"):
            (root / d).mkdir(parents=True, exist_ok=True)
        self.covered = 0
        self.runs: list[str] = []
        self.last = 0
        self.seg_first = 1

    def recover_and_announce(self) -> None:
        meta = self.root / "asyncraft.json"
        if not meta.exists():
            _write_atomic(meta, orjson.dumps({"job": "remote-test", "format": 1}))
        self.rep.on_meta(meta)
        manifests = sorted((self.root / "snapshots").glob("manifest-*.json"))
        if manifests:
            m = orjson.loads(manifests[-1].read_bytes())
            self.covered = self.last = m["seq"]
            self.runs = list(m["runs"])
            self.rep.on_manifest(manifests[-1])
        self.seg_first = self.covered + 1
        for seg in sorted((self.root / "journal").glob("*.jsonl"), key=lambda p: int(p.stem)):
            data = seg.read_bytes()
            good = data[: data.rfind(b"\n") + 1]  # a torn last line was never committed
            if len(good) != len(data):
                with open(seg, "r+b") as fh:
                    fh.truncate(len(good))
            recs = _lines(good)
            if not recs:
                continue
            self.seg_first = int(seg.stem)
            self.last = max(self.last, recs[-1]["seq"])
            self.rep.on_commit(seg, len(good), recs[-1]["seq"])

    async def write(self) -> None:
        args = self.args
        since_snapshot = self.last - self.covered
        while self.last < args.records:
            n = min(args.commit, args.records - self.last)
            seg = self.root / "journal" / seg_name(self.seg_first)
            data = b"".join(record(s, args.tag) for s in range(self.last + 1, self.last + n + 1))
            size = await asyncio.to_thread(_append, seg, data)
            self.last += n
            since_snapshot += n
            self.rep.on_commit(seg, size, self.last)
            if args.durability == "sync":
                await self.rep.durable(self.last)
            print(f"ACK {self.last}", flush=True)
            if since_snapshot >= args.snapshot_every:
                await asyncio.to_thread(self.compact)
                since_snapshot = 0
            if args.pace:
                await asyncio.sleep(args.pace)

    def compact(self) -> None:
        """Seal the journal so far into a run, write a manifest naming all runs, drop what it covers."""
        segs = sorted((self.root / "journal").glob("*.jsonl"), key=lambda p: int(p.stem))
        data = b"".join(p.read_bytes() for p in segs)
        first, last = self.covered + 1, self.last
        if len(self.runs) >= 4:  # merge everything: the older runs become superseded objects
            data = b"".join((self.root / r).read_bytes() for r in self.runs if r.endswith(".zst")) + data
            old, self.runs, first = self.runs, [], 1
        else:
            old = []
        stem = f"runs/{first:012d}-{last:012d}"
        _write_atomic(self.root / f"{stem}.zst", data)
        _write_atomic(self.root / f"{stem}.idx", orjson.dumps({"count": len(_lines(data))}))
        self.rep.on_immutable([self.root / f"{stem}.zst", self.root / f"{stem}.idx"])
        self.runs += [f"{stem}.zst", f"{stem}.idx"]
        manifest = self.root / "snapshots" / f"manifest-{last:012d}.json"
        _write_atomic(manifest, orjson.dumps({"seq": last, "runs": self.runs}))
        self.rep.on_manifest(manifest)
        self.covered = last
        self.seg_first = last + 1
        for p in segs:
            p.unlink()
        for r in old:
            (self.root / r).unlink()
        for p in sorted((self.root / "snapshots").glob("manifest-*.json"))[:-2]:
            p.unlink()


async def main(args: argparse.Namespace) -> int:
    if spec := os.environ.get("ASYNCRAFT_FAILPOINTS", ""):
        fp_module.NAMES = fp_module.NAMES | FAILPOINTS
    failpoints = fp_module.Failpoints(spec)
    remote = Remote.open(args.url)
    deadline = time.monotonic() + args.wait_lease
    while True:
        try:
            attached = await attach(remote, Path(args.state), manifest_files=manifest_files,
                                    durability=args.durability, interval=args.interval, ttl=args.ttl,
                                    holder=args.holder, failpoints=failpoints, backoff_base=0.05, backoff_max=0.5)
            break
        except LeaseHeld as exc:
            if time.monotonic() > deadline:
                print(f"LEASE HELD: {exc}", flush=True)
                return 1
            await asyncio.sleep(0.1)  # waiting out another owner's lease: real time is the point here
    print(f"ATTACHED {attached.action} generation {attached.generation}", flush=True)
    writer = Writer(Path(args.state), attached.replicator, args)
    writer.recover_and_announce()
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(attached.replicator.run())
            await writer.write()
            attached.replicator.stop()
    except BaseExceptionGroup as group:
        exc = group.exceptions[0]
        if not isinstance(exc, RemoteError):
            raise
        print(f"{'LEASE LOST' if isinstance(exc, LeaseLost) else 'REMOTE ERROR'}: {exc}", flush=True)
        return 1
    st = attached.replicator.status()
    print(f"DONE {st.durable_seq} {st.state}", flush=True)
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--commit", type=int, default=5)
    p.add_argument("--snapshot-every", type=int, default=40)
    p.add_argument("--durability", choices=("async", "sync"), default="sync")
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--ttl", type=float, default=2.0)
    p.add_argument("--holder", default=None)
    p.add_argument("--tag", default="a")
    p.add_argument("--pace", type=float, default=0.0)
    p.add_argument("--wait-lease", type=float, default=0.0)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
