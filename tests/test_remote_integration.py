"""How the product drives the object-store layer, in-process and in milliseconds: a commit arriving while a chunk is
uploaded, the manifest's files as the storage layer names them, the empty segment a restore must recreate, the
options, and what ``status`` says about the owner."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest

from asyncraft import config, records, storage
from asyncraft.errors import ConfigError
from asyncraft.journal import Journal
from asyncraft.progress import format_line, replication_snapshot
from asyncraft.remote import LeaseLost, Remote, ReplicationStatus, attach, restore
from asyncraft.remote.layout import Head
from asyncraft.remote.product import manifest_files, owner
from asyncraft.storage.compact import write_manifest
from asyncraft.storage.fs import FS
from asyncraft.storage.layout import StateDir
from tests.test_remote_store import gated

SEG1 = "000000000001.jsonl"


async def test_a_commit_made_while_its_segment_uploads_is_shipped_too(tmp_path: Path) -> None:
    remote, gate = gated((tmp_path / "bucket").as_uri())
    attached = await attach(remote, tmp_path / "s", manifest_files=manifest_files, durability="sync", ttl=5.0)
    rep = attached.replicator
    seg = tmp_path / "s" / "journal" / SEG1
    seg.parent.mkdir()
    seg.write_bytes(b"a" * 100)
    gate.hold(lambda key: "/j/" in key)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(rep.run())
        rep.on_commit(seg, 100, 1)
        await gate.waiting.wait()  # the first chunk is on its way
        seg.write_bytes(b"a" * 100 + b"b" * 50)
        rep.on_commit(seg, 150, 2)  # the segment's last commit (its seal, say): nothing later would ship it
        gate.release()
        async with asyncio.timeout(5):
            await rep.durable(2)
        rep.stop()
    await restore(remote, tmp_path / "copy")
    assert (tmp_path / "copy" / "journal" / SEG1).read_bytes() == b"a" * 100 + b"b" * 50


def test_manifest_files_are_each_run_and_its_index(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    sd.create_dirs(FS())
    chain = [{"name": "000000000001-000000000009-0000abcd.zst", "first": 1, "last": 9, "bytes": 1, "count": 9}]
    write_manifest(FS(), sd, chain, 9, {})
    data = sd.manifests()[0][1].read_bytes()
    assert manifest_files(data) == ["runs/000000000001-000000000009-0000abcd.zst",
                                    "runs/000000000001-000000000009-0000abcd.idx"]


async def test_restore_recreates_the_empty_segment_a_seal_names(tmp_path: Path) -> None:
    url = (tmp_path / "bucket").as_uri()
    attached = await attach(Remote.open(url), tmp_path / "s", manifest_files=manifest_files, ttl=5.0)
    rep = attached.replicator
    seg = tmp_path / "s" / "journal" / SEG1
    seg.parent.mkdir()
    data = records.encode({"k": "x", "seq": 1, "b": 1}) + records.encode({"k": "seal", "next": 3, "seq": 2, "b": 2})
    seg.write_bytes(data)
    (tmp_path / "s" / "journal" / "000000000003.jsonl").touch()  # created before the seal, as the writer does
    rep.on_commit(seg, len(data), 2)
    rep.stop()
    await rep.run()
    await restore(Remote.open(url), tmp_path / "copy")
    assert (tmp_path / "copy" / "journal" / "000000000003.jsonl").read_bytes() == b""


def test_state_url_options_are_checked() -> None:
    s = config.load("run", {"input": "x", "state_url": "s3://b/p", "remote_durability": "sync"}, env={})
    assert (s.state_url, s.remote_durability, s.remote_interval, s.remote_lease) == ("s3://b/p", "sync", 1.0, 30.0)
    assert config.load("status", {"state_url": "file:///x"}, env={}).state_url == "file:///x"
    with pytest.raises(ConfigError, match="ASYNCRAFT_REMOTE_DURABILITY"):
        config.load("run", {"input": "x"}, env={"ASYNCRAFT_REMOTE_DURABILITY": "maybe"})
    with pytest.raises(ConfigError, match="--salvage repairs a local state dir"):
        config.load("run", {"input": "x", "state_url": "s3://b/p", "salvage": "1"}, env={})


def test_owner_says_whether_a_run_holds_the_url() -> None:
    live = Head(3, "vm:/data/state", "w", 1000.0, 30.0)
    assert owner(live, 1010.0) == "vm:/data/state, generation 3 (lease renewed 10 s ago: a run is going on)"
    assert owner(live, 1100.0) == "nobody (the lease of vm:/data/state, generation 3, expired 70 s ago)"
    assert owner(dataclasses.replace(live, renewed_at=0.0), 1010.0).startswith("nobody (released by vm:/data/state")
    assert owner(None, 0.0) == "nobody yet"


def test_progress_line_shows_an_outage() -> None:
    down = ReplicationStatus("unreachable", "sync", 2, committed_seq=120, durable_seq=100, lag_seconds=4.0,
                             unreachable_since=1_000_000.0, last_error="put s3://b/p/x: connection refused")
    snap = {"total": 10, "done": 5, "failed": 0, "in_flight": 2, "rate_per_s": 1.0, "eta_s": 5.0, "prompt_tokens": 1,
            "completion_tokens": 2, "tokens_per_s": 3.0, "cost": None, "stages": {}, "cooling_down": False,
            "stopping": None, "replication": replication_snapshot(down)}
    line = format_line(snap)
    assert "replication: store unreachable since" in line and "(acknowledgements wait)" in line
    assert "lag 20 records, 4.0 s" in line and "connection refused" in line
    assert snap["replication"]["healthy"] is False and snap["replication"]["lag_records"] == 20


class Watcher:
    """A stand-in replica that checks what the writer tells it against the disk at the moment it is told."""

    durability = "async"

    def __init__(self) -> None:
        self.ends: dict[str, int] = {}
        self.last_of: dict[str, int] = {}  # segments told of and not yet covered by an announced manifest
        self.lasts: list[int] = []
        self.manifests: list[str] = []
        self.immutable: list[str] = []
        self.problems: list[str] = []

    def on_commit(self, segment: Path, committed_bytes: int, last_seq: int) -> None:
        size = segment.stat().st_size
        if size < committed_bytes:
            self.problems.append(f"{segment.name}: told {committed_bytes} bytes, the file has {size}")
        self.ends[segment.name] = committed_bytes
        self.last_of[segment.name] = last_seq
        self.lasts.append(last_seq)

    def on_immutable(self, paths: Sequence[Path]) -> None:
        self.immutable += [p.name for p in paths if p.exists()]

    def on_manifest(self, path: Path) -> None:
        # Told before the segments this manifest covers go: each must still be on disk.
        seq = int(path.name[len("manifest-"):-len(".json")])
        covered = [name for name, last in self.last_of.items() if last <= seq]
        gone = [name for name in covered if not (path.parent.parent / "journal" / name).exists()]
        if gone:
            self.problems.append(f"{path.name} announced after {gone} were deleted")
        for name in covered:
            del self.last_of[name]
        self.manifests.append(path.name)

    async def durable(self, seq: int) -> None:
        raise AssertionError("async durability never waits")


async def test_the_writer_tells_the_replica_of_every_commit_seal_and_snapshot(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    fs = FS()
    rec = storage.open_for_run(sd, fs)
    sd.write_meta(fs, {"format": 2, "job": "prompts", "created": 0})
    watcher = Watcher()
    journal = Journal(sd, rec, fs=fs, fsync_interval=0, segment_bytes=600, snapshot_every=15, replica=watcher)
    writer = asyncio.create_task(journal.run())
    for i in range(40):
        await journal.append({"k": "attempt", "id": f"t{i}", "n": 1})
    await journal.close()
    await writer
    assert watcher.problems == []
    # Every segment was told of, in seq order, up to the last record.
    assert len(watcher.ends) >= 3 and watcher.lasts == sorted(watcher.lasts)
    assert watcher.lasts[-1] == journal.next_seq - 1
    assert len(watcher.manifests) >= 2 and watcher.manifests[-1] == sd.manifests()[0][1].name
    assert {n for n in watcher.immutable if n.endswith(".zst")} == {r.name for r in sd.run_files()}


class Gated(Watcher):
    """Sync durability whose store answers only when the test opens the gate (or fails with ``error``)."""

    durability = "sync"

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.asked: list[int] = []
        self.new_ask = asyncio.Event()
        self.error: BaseException | None = None

    async def durable(self, seq: int) -> None:
        self.asked.append(seq)
        self.new_ask.set()
        await self.gate.wait()
        if self.error is not None:
            raise self.error


async def test_sync_acknowledges_after_the_store_and_the_writer_goes_on_meanwhile(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    rec = storage.open_for_run(sd, FS())
    replica = Gated()
    journal = Journal(sd, rec, fsync_interval=0, replica=replica)
    async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
        tg.create_task(journal.run())
        first = journal.submit({"k": "attempt", "id": "a", "n": 1})
        await replica.new_ask.wait()
        replica.new_ask.clear()
        second = journal.submit({"k": "attempt", "id": "b", "n": 1})
        await replica.new_ask.wait()  # the second commit was made while the first waits for the store
        assert replica.asked == [1, 2] and not first.done() and not second.done()
        replica.gate.set()
        await asyncio.gather(first, second)
        replica.gate.clear()
        replica.error = LeaseLost("taken over (test)")
        third = journal.submit({"k": "attempt", "id": "c", "n": 1})
        await replica.new_ask.wait()
        replica.gate.set()
        with pytest.raises(LeaseLost):
            await third
        await journal.close()
