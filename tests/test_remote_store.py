"""The object-store layer in one process, against moto's S3 server on 127.0.0.1 and file:// stores:
conditional writes, replicate then restore, sync acknowledgement, outages, the lease and fencing."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from asyncraft.remote import (
    LeaseHeld,
    LeaseLost,
    Remote,
    RemoteConfigError,
    RemoteUnavailable,
    Replicator,
    attach,
    restore,
)
from asyncraft.remote.client import Backend, Blob, Entry, Version
from asyncraft.remote.errors import AlreadyExists, PreconditionFailed
from asyncraft.remote.layout import LEASE, Head, parse_listing
from tests.remote_driver import Writer, manifest_files, read_state

if TYPE_CHECKING:
    from tests.remote_helpers import S3Server

pytest_plugins = ("tests.remote_helpers",)


class Gate:
    """A backend wrapper: ``hold(pred)`` makes matching writes wait, ``down`` makes every call fail."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.down = False
        self.opened = asyncio.Event()
        self.opened.set()
        self.held: Callable[[str], bool] = lambda key: False
        self.waiting = asyncio.Event()
        self.refused = asyncio.Event()

    def hold(self, pred: Callable[[str], bool]) -> None:
        self.held = pred
        self.opened.clear()

    def release(self) -> None:
        self.opened.set()

    async def _enter(self, key: str) -> None:
        if self.down:
            self.refused.set()
            raise RemoteUnavailable(f"store down (test) at {key}")
        if self.held(key):
            self.waiting.set()
            await self.opened.wait()

    async def get(self, key: str) -> Blob | None:
        await self._enter("")
        return await self.inner.get(key)

    async def download(self, key: str, dest: Path) -> int:
        await self._enter("")
        return await self.inner.download(key, dest)

    async def create(self, key: str, data: bytes | Path) -> Version:
        await self._enter(key)
        return await self.inner.create(key, data)

    async def update(self, key: str, data: bytes, expected: Version) -> Version:
        await self._enter(key)
        return await self.inner.update(key, data, expected)

    async def list(self, prefix: str) -> list[Entry]:
        await self._enter("")
        return await self.inner.list(prefix)

    async def delete(self, key: str) -> None:
        await self._enter("")
        await self.inner.delete(key)


def gated(url: str) -> tuple[Remote, Gate]:
    plain = Remote.open(url)
    gate = Gate(plain.backend)
    return Remote(plain.url, gate, frozenset()), gate


def writer_args(**kw: Any) -> argparse.Namespace:
    base = {"records": 100, "commit": 5, "snapshot_every": 40, "durability": "sync", "tag": "a", "pace": 0.0}
    base.update(kw)
    return argparse.Namespace(**base)


async def replicate(remote: Remote, state: Path, *, fast: bool = True, **kw: Any) -> Replicator:
    """Attach ``state`` and write records through the stand-in writer until done; returns the stopped replicator."""
    args = writer_args(**kw)
    attached = await attach(remote, state, manifest_files=manifest_files, durability=args.durability,
                            interval=0.01 if fast else 1.0, ttl=5.0, backoff_base=0.01, backoff_max=0.05)
    writer = Writer(state, attached.replicator, args)
    writer.recover_and_announce()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(attached.replicator.run())
        await writer.write()
        attached.replicator.stop()
    return attached.replicator


async def test_conditional_writes(store_url: str) -> None:
    remote = Remote.open(store_url)
    assert await remote.get("x/a") is None
    v1 = await remote.create("x/a", b"one")
    with pytest.raises(AlreadyExists):
        await remote.create("x/a", b"two")
    v2 = await remote.update("x/a", b"three", v1)
    with pytest.raises(PreconditionFailed):
        await remote.update("x/a", b"four", v1)  # stale version: somebody else wrote in between
    blob = await remote.get("x/a")
    assert blob is not None and blob.data == b"three" and blob.version == v2
    await remote.create("x/b/c", b"deep")
    assert sorted((e.key, e.size) for e in await remote.list("x/")) == [("x/a", 5), ("x/b/c", 4)]
    await remote.delete("x/a")
    await remote.delete("x/a")  # a repeated clean-up is not an error
    assert [e.key for e in await remote.list("x/")] == ["x/b/c"]


async def test_replicate_then_restore_anywhere(store_url: str, tmp_path: Path) -> None:
    remote = Remote.open(store_url)
    rep = await replicate(remote, tmp_path / "machine-1", records=230)
    assert rep.status().durable_seq == 230 and rep.status().state == "stopped"
    dest = tmp_path / "machine-2"
    done = await restore(remote, dest)
    assert done.end_seq == 230
    state = read_state(dest)
    assert state == {n: f"a-{n}" for n in range(1, 231)}
    # The journal tail is rebuilt byte for byte, and the files the manifest names are the same files.
    for sub in ("journal", "runs", "snapshots"):
        for p in (dest / sub).iterdir():
            assert p.read_bytes() == (tmp_path / "machine-1" / sub / p.name).read_bytes(), p
    assert (dest / "asyncraft.json").read_bytes() == (tmp_path / "machine-1" / "asyncraft.json").read_bytes()


async def test_restore_continues_on_another_machine_and_superseded_objects_go(store_url: str, tmp_path: Path) -> None:
    remote = Remote.open(store_url)
    await replicate(remote, tmp_path / "m1", records=130)
    await replicate(remote, tmp_path / "m2", records=135)  # empty dir: restores, then goes on
    # The head still names the first generation's manifest and runs: the new owner's clean-up kept them.
    await restore(remote, tmp_path / "between")
    assert read_state(tmp_path / "between") == {n: f"a-{n}" for n in range(1, 136)}
    await replicate(remote, tmp_path / "m2", records=330)
    dest = tmp_path / "check"
    await restore(remote, dest)
    assert read_state(dest) == {n: "a-" + str(n) for n in range(1, 331)}
    gens = parse_listing(await remote.list("g/"))
    blob = await remote.get(LEASE)
    assert blob is not None
    head = Head.decode(blob.data, "lease")
    assert head.manifest is not None and head.manifest.seq == 320
    # Nothing of the first generation is left (its manifest and runs are superseded, its chunks covered),
    # and no journal chunk of a segment the manifest covers survives once a later segment exists.
    assert list(gens) == [3]
    assert all(c.first > 280 for c in gens[3].chunks)


async def test_sync_acknowledges_only_what_the_store_holds(store_url: str, tmp_path: Path) -> None:
    remote, gate = gated(store_url)
    attached = await attach(remote, tmp_path / "s", manifest_files=manifest_files, durability="sync", ttl=5.0)
    rep = attached.replicator
    writer = Writer(tmp_path / "s", rep, writer_args(records=5, commit=5))
    writer.recover_and_announce()
    gate.hold(lambda key: "/j/" in key)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(rep.run())
        acked = tg.create_task(writer.write())
        await gate.waiting.wait()  # the chunk upload has started and is held
        assert not acked.done() and rep.status().durable_seq == 0 and rep.status().lag_records == 5
        chunks_before = [e.key for e in await remote.backend.list("g/") if "/j/" in e.key]
        assert chunks_before == []
        gate.release()
        await acked
        assert [e.key for e in await remote.list("g/") if "/j/" in e.key]
        rep.stop()


async def test_async_run_goes_on_while_the_store_is_down_and_catches_up(store_url: str, tmp_path: Path) -> None:
    remote, gate = gated(store_url)
    attached = await attach(remote, tmp_path / "s", manifest_files=manifest_files, durability="async",
                            interval=0.01, ttl=5.0, backoff_base=0.01, backoff_max=0.02)
    rep = attached.replicator
    writer = Writer(tmp_path / "s", rep, writer_args(records=60, durability="async", snapshot_every=1000))
    writer.recover_and_announce()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(rep.run())
        gate.down = True
        await writer.write()  # every commit is acknowledged locally while nothing reaches the store
        await gate.refused.wait()
        st = rep.status()
        assert st.lag_records == 60 and st.unreachable_since is not None and st.lag_seconds > 0
        assert "store unreachable since" in st.describe() and "the run goes on locally" in st.describe()
        gate.down = False
        await rep.durable(60)
        assert rep.status().state == "ok" and rep.status().lag_records == 0
        rep.stop()
    dest = tmp_path / "r"
    await restore(remote, dest)
    assert read_state(dest) == {n: f"a-{n}" for n in range(1, 61)}


async def test_second_owner_refused_then_takes_over_and_fences_the_first(store_url: str, tmp_path: Path) -> None:
    now = [1000.0]
    remote = Remote.open(store_url)
    first = await attach(remote, tmp_path / "a", manifest_files=manifest_files, durability="sync", ttl=10.0,
                         holder="machine-a", wall=lambda: now[0])
    wa = Writer(tmp_path / "a", first.replicator, writer_args(records=20, tag="a"))
    wa.recover_and_announce()
    old = asyncio.create_task(first.replicator.run())
    await wa.write()
    with pytest.raises(LeaseHeld, match="in use by machine-a"):
        await attach(remote, tmp_path / "b", manifest_files=manifest_files, ttl=10.0, holder="machine-b",
                     wall=lambda: now[0])
    # machine-a stalls (as under SIGSTOP) past its lease; machine-b takes over and writes on.
    now[0] += 11.0
    second = await attach(remote, tmp_path / "b", manifest_files=manifest_files, durability="sync", ttl=10.0,
                          holder="machine-b", wall=lambda: now[0])
    assert second.action == "restored" and second.generation == first.generation + 1
    wb = Writer(tmp_path / "b", second.replicator, writer_args(records=50, tag="b"))
    wb.recover_and_announce()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(second.replicator.run())
        await wb.write()
        # machine-a wakes up and commits more: its upload lands under its own generation, its
        # acknowledgement is refused, and the run stops.
        wa.args.records = 40
        with pytest.raises(LeaseLost):
            await wa.write()
        with pytest.raises(LeaseLost):
            await old
        assert first.replicator.status().state == "fenced"
        second.replicator.stop()
    dest = tmp_path / "r"
    await restore(remote, dest)
    assert read_state(dest) == {n: f"{'a' if n <= 20 else 'b'}-{n}" for n in range(1, 51)}


async def test_a_takeover_while_the_old_owner_uploads_adopts_only_what_was_there(store_url: str,
                                                                              tmp_path: Path) -> None:
    now = [0.0]
    remote = Remote.open(store_url)
    # A lease far longer than the test: the old owner must not find out by renewing before it uploads.
    first = await attach(remote, tmp_path / "a", manifest_files=manifest_files, durability="async",
                         interval=0.01, ttl=1000.0, holder="a", wall=lambda: now[0])
    wa = Writer(tmp_path / "a", first.replicator, writer_args(records=10, tag="a", durability="async"))
    wa.recover_and_announce()
    task = asyncio.create_task(first.replicator.run())
    await wa.write()
    await first.replicator.durable(10)
    now[0] += 1001.0
    second = await attach(remote, tmp_path / "b", manifest_files=manifest_files, ttl=10.0, holder="b",
                          wall=lambda: now[0])
    # The old owner, not yet due to renew, ships records 11..20 (async mode does not check the lease per
    # chunk): the chunk is in the store but outside its generation's window. Its next lease write fails.
    wa.args.records = 20
    await wa.write()
    await first.replicator.durable(20)
    first.replicator.stop()
    with pytest.raises(LeaseLost):
        await task
    keys = [e.key for e in await remote.list("g/")]
    assert any(k.endswith("-000000000020") for k in keys), keys
    dest = tmp_path / "r"
    await restore(remote, dest)
    assert read_state(dest) == {n: f"a-{n}" for n in range(1, 11)}
    second.replicator.stop()
    await second.replicator.run()


async def test_same_holder_reclaims_at_once(store_url: str, tmp_path: Path) -> None:
    remote = Remote.open(store_url)
    first = await attach(remote, tmp_path / "a", manifest_files=manifest_files, ttl=60.0, holder="host:/state")
    again = await attach(remote, tmp_path / "a", manifest_files=manifest_files, ttl=60.0, holder="host:/state")
    assert again.generation == first.generation + 1 and again.action == "fresh"


async def test_s3_errors_never_show_credentials(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    bucket = s3_env.bucket()
    secret = s3_env.env()["AWS_SECRET_ACCESS_KEY"]
    with pytest.raises(RemoteConfigError) as missing:
        await Remote.open(f"s3://no-such-{bucket}/x").create("k", b"v")
    assert "bucket does not exist" in str(missing.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    remote = Remote.open(f"s3://{bucket}/x", timeout=2.0)
    with pytest.raises(RemoteUnavailable) as down:
        await remote.get("lease.json")
    for exc in (missing.value, down.value):
        assert secret not in str(exc) and "test-access-key" not in str(exc)
    assert "cannot connect" in str(down.value)
    with pytest.raises(RemoteConfigError) as in_url:
        Remote.open(f"s3://user:{secret}@{bucket}/x")
    assert secret not in str(in_url.value)
    with pytest.raises(RemoteConfigError) as sas:
        Remote.open(f"az://container/x?sig={secret}")
    assert secret not in str(sas.value)
