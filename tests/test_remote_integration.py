"""How the product drives the object-store layer, in-process and in milliseconds: a commit arriving while a chunk is
uploaded, the manifest's files as the storage layer names them, and the empty segment a restore must recreate."""

from __future__ import annotations

import asyncio
from pathlib import Path

from asyncraft import records
from asyncraft.remote import Remote, attach, restore
from asyncraft.remote.product import manifest_files
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
