"""Restore anywhere, and attach a state dir to its state URL as the one owner.

``restore`` reads a state URL without taking the lease: the head's manifest, the runs and indexes it
names, the journal chunks after it (rebuilding each segment file byte for byte) and asyncraft.json last,
so a dir cut short by a crash never looks like a state. ``attach`` takes the lease, decides what the local
dir is to the store, restores it when it is empty, behind or from another lineage, and returns the
replicator that ships everything from then on.

The local dir is a continuation of the store only when its own record (``remote.json``, local-only)
names a generation of the store's chain and no later generation has written anything; anything else in
the way of a restore is moved aside to ``damaged/remote-superseded-<time>/``, never deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import orjson

from asyncraft import records
from asyncraft.remote.client import Remote
from asyncraft.remote.errors import ObjectMissing, RemoteStateError, RemoteUnavailable
from asyncraft.remote.layout import (
    LEASE,
    META_NAME,
    Generation,
    Head,
    Start,
    View,
    manifest_seq,
    next_start,
    parse_listing,
    resolve,
    segment_first,
    start_key,
)
from asyncraft.remote.lease import Lease, default_holder
from asyncraft.remote.replicate import Durability, FailpointHook, ManifestFiles, Replicator

LOCAL_RECORD = "remote.json"  # local-only: which state URL and generation this dir last wrote as
REPLICATED_DIRS = ("journal", "runs", "snapshots")
DOWNLOADS_IN_FLIGHT = 8
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Restored:
    files: int
    bytes: int
    segments: int
    end_seq: int  # every record up to here is in the restored dir


@dataclass(frozen=True, slots=True)
class Attached:
    replicator: Replicator
    generation: int
    action: Literal["fresh", "continued", "restored"]
    set_aside: Path | None  # where local state in the way of a restore went


# ---------------------------------------------------------------------------------------------------
# reading the store


async def _read_state(remote: Remote) -> tuple[Head | None, Start | None, dict[int, Generation]]:
    """The head, the newest start object (whose chain defines the journal) and the listing."""
    blob = await remote.get(LEASE)
    head = None if blob is None else Head.decode(blob.data, remote.where(LEASE))
    gens = parse_listing(await remote.list("g/"))
    start: Start | None = None
    for gen in sorted((g for g, v in gens.items() if v.start), reverse=True):
        if head is not None and gen > head.generation:
            continue  # cannot be: a start is written only by the lease's holder
        sblob = await remote.get(start_key(gen))
        if sblob is not None:
            start = Start.decode(sblob.data, remote.where(start_key(gen)))
            break
    return head, start, gens


def _store_has_state(head: Head | None, view: View) -> bool:
    return head is not None and (head.manifest is not None or head.meta is not None or bool(view.segments))


async def restore(remote: Remote, dest: Path, *, attempts: int = 5) -> Restored:
    """Download the state at ``remote`` into ``dest`` (which must be empty or absent), without the lease.

    The owner may move the head and delete what it superseded while we read; then an object is missing
    or the head has moved, and we read again from the start (up to ``attempts`` times).
    """
    if _nonempty(dest):
        raise RemoteStateError(f"{dest} is not empty; restore into an empty directory")
    for attempt in range(1, attempts + 1):
        head, start, gens = await _read_state(remote)
        view = resolve(head, start, gens)
        if not _store_has_state(head, view):
            raise RemoteStateError(f"{remote.url} holds no asyncraft state")
        assert head is not None
        try:
            done = await _download(remote, head, view, dest)
        except ObjectMissing:
            if attempt == attempts:
                raise
            _clear(dest)
            continue
        blob = await remote.get(LEASE)
        now = None if blob is None else Head.decode(blob.data, remote.where(LEASE))
        if now is not None and now.manifest == head.manifest and now.meta == head.meta:
            return done
        _clear(dest)
    raise RemoteStateError(f"{remote.url} kept changing while it was read; try again")


def _nonempty(dest: Path) -> bool:
    return dest.exists() and any(dest.iterdir())


def _clear(dest: Path) -> None:
    for d in (*REPLICATED_DIRS,):
        for p in (dest / d).glob("*"):
            p.unlink()
    (dest / META_NAME).unlink(missing_ok=True)


async def _download(remote: Remote, head: Head, view: View, dest: Path,
                    failpoints: FailpointHook | None = None) -> Restored:
    for d in REPLICATED_DIRS:
        (dest / d).mkdir(parents=True, exist_ok=True)
    limit = asyncio.Semaphore(DOWNLOADS_IN_FLIGHT)
    sizes: list[int] = []

    async def fetch(key: str, name: str) -> None:
        async with limit:
            target = dest / name
            tmp = target.with_name(target.name + ".tmp")
            sizes.append(await remote.download(key, tmp))
            os.replace(tmp, target)
            if failpoints is not None and len(sizes) == 1:
                failpoints.hit("remote.mid_restore")

    async def fetch_segment(name: str) -> None:
        chunks = view.segments[name]
        target = dest / "journal" / name
        tmp = target.with_name(target.name + ".tmp")
        # Named *.tmp, so a restore cut short leaves only what recovery already sweeps as leftovers.
        parts = [target.with_name(f"{target.name}.{i}.tmp") for i in range(len(chunks))]
        try:
            async with asyncio.TaskGroup() as tg:
                for c, part in zip(chunks, parts, strict=True):
                    tg.create_task(fetch_part(c.key, part, c.end - c.offset))
            await asyncio.to_thread(_concat, parts, tmp)
        finally:
            for part in parts:
                part.unlink(missing_ok=True)
        os.replace(tmp, target)
        sizes.append(chunks[-1].end)

    async def fetch_part(key: str, part: Path, expected: int) -> None:
        async with limit:
            got = await remote.download(key, part)
        if got != expected:
            raise RemoteStateError(f"{remote.where(key)} holds {got} bytes; its name says {expected}")

    try:
        async with asyncio.TaskGroup() as tg:
            if head.manifest is not None:
                for name, key in head.manifest.files.items():
                    tg.create_task(fetch(key, name))
            for name in view.segments:
                tg.create_task(fetch_segment(name))
        if head.manifest is not None:
            await fetch(head.manifest.key, head.manifest.name)  # after the files it names
        await asyncio.to_thread(_open_segment, dest, head, view)
        if head.meta is not None:
            await fetch(head.meta, META_NAME)  # last: a dir without it is not a state yet
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    await asyncio.to_thread(_fsync_tree, dest)
    files = len(head.manifest.files) + 1 if head.manifest else 0
    return Restored(files + (head.meta is not None), sum(sizes), len(view.segments), view.end_seq)


def _open_segment(dest: Path, head: Head, view: View) -> None:
    """Create the empty segment the writer had created before anything named it (a seal, or the manifest that
    covers every record): the store holds no object for a segment with no bytes, and without it the state
    would look cut short."""
    if view.segments:
        nxt = _sealed_next(dest / "journal" / max(view.segments, key=segment_first))
    elif head.manifest is not None:
        nxt = head.manifest.seq + 1
    else:
        nxt = 1 if head.meta is not None else None
    if nxt is not None:
        path = dest / "journal" / f"{nxt:012d}.jsonl"
        if not path.exists():
            path.touch()


def _sealed_next(segment: Path) -> int | None:
    data = segment.read_bytes().rstrip(b"\n")
    rec = records.decode(data[data.rfind(b"\n") + 1 :] + b"\n") if data else None
    nxt = rec.get("next") if rec is not None and rec.get("k") == "seal" else None
    return nxt if isinstance(nxt, int) else None


def _concat(parts: list[Path], out: Path) -> None:
    with open(out, "wb") as fh:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(8 << 20):
                    fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_tree(root: Path) -> None:
    for d in (root, *(root / n for n in REPLICATED_DIRS)):
        if d.exists():
            _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# attaching a state dir as the owner


@dataclass(frozen=True, slots=True)
class _Local:
    meta: bool
    segments: dict[str, int]  # journal segment -> size
    manifest_seq: int  # newest local manifest (0: none)
    files: int

    @property
    def empty(self) -> bool:
        return not self.meta and self.files == 0


def _scan_local(root: Path) -> _Local:
    root.mkdir(parents=True, exist_ok=True)
    segments = {p.name: p.stat().st_size for p in (root / "journal").glob("*") if not p.name.endswith(".tmp")}
    seqs = [0]
    for p in (root / "snapshots").glob("manifest-*.json"):
        with contextlib.suppress(ValueError):
            seqs.append(manifest_seq(p.name))
    files = sum(1 for d in REPLICATED_DIRS for _ in (root / d).glob("*"))
    return _Local((root / META_NAME).exists(), segments, max(seqs), files)


def _read_record(root: Path) -> dict[str, object] | None:
    try:
        rec = orjson.loads((root / LOCAL_RECORD).read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _write_record(root: Path, url: str, generation: int) -> None:
    path = root / LOCAL_RECORD
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(orjson.dumps({"url": url, "generation": generation}) + b"\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(root)


def _continues(local: _Local, record: dict[str, object] | None, url: str, head: Head, view: View,
               gens: dict[int, Generation], mine: int) -> bool:
    """Is the local dir the store's state plus, perhaps, what it had not shipped yet?"""
    if record is None or record.get("url") != url or not isinstance(record.get("generation"), int):
        return False
    wrote = record["generation"]
    assert isinstance(wrote, int)
    if wrote != view.open_generation and wrote not in {g for g, _ in view.chain}:
        return False
    if any(g.keys() or g.other for gen, g in gens.items() if wrote < gen < mine):
        return False  # a later owner wrote: whatever we hold past its start is another history
    if head.manifest is not None and head.manifest.seq > local.manifest_seq:
        return False
    if head.meta is not None and not local.meta:
        return False
    for name, chunks in view.segments.items():
        size = local.segments.get(name)
        if size is None and local.manifest_seq < chunks[-1].last:
            return False
        if size is not None and size < chunks[-1].end:
            return False  # lost locally what the store has (fsync off and a power cut): restore
    return True


def _set_aside(root: Path, wall: float) -> Path:
    dest = root / "damaged" / (time.strftime("remote-superseded-%Y%m%dT%H%M%S", time.gmtime(wall)) + f"-{os.getpid()}")
    dest.mkdir(parents=True, exist_ok=False)
    for name in (*REPLICATED_DIRS, META_NAME, LOCAL_RECORD):
        if (root / name).exists():
            os.replace(root / name, dest / name)
    _fsync_tree(root)
    return dest


async def _renewing(lease: Lease, work: Awaitable[T]) -> T:
    """Await ``work`` while keeping the lease alive (a restore can outlast a short lease)."""
    async def renew() -> None:
        while True:
            await asyncio.sleep(lease.ttl / 3)
            with contextlib.suppress(RemoteUnavailable):
                await lease.write()

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(renew())
        try:
            return await work
        finally:
            task.cancel()


async def attach(remote: Remote, state_dir: Path, *, manifest_files: ManifestFiles, durability: Durability = "async",
                 interval: float = 1.0, ttl: float = 30.0, holder: str | None = None,
                 failpoints: FailpointHook | None = None, backoff_base: float = 0.5,
                 backoff_max: float = 30.0, wall: Callable[[], float] = time.time) -> Attached:
    """Take the lease on ``remote`` for ``state_dir`` and bring the dir up to the store.

    Afterwards the caller recovers the dir as usual, tells the replicator about what it holds (``on_commit``
    for each journal segment with its length and last seq, ``on_manifest`` for the newest manifest,
    ``on_meta``; what the store already has is not sent again), and runs ``replicator.run()``.
    """
    lease = Lease(remote, holder=holder or default_holder(), ttl=ttl, clock=wall)
    await lease.acquire()
    try:
        if failpoints is not None:
            failpoints.hit("remote.after_lease")
        mine = lease.head.generation
        _, previous, gens = await _read_state(remote)
        view = resolve(lease.head, previous, gens)
        start = next_start(mine, previous, view)
        await remote.create(start_key(mine), start.encode())
        if failpoints is not None:
            failpoints.hit("remote.after_start")
        local = _scan_local(state_dir)
        set_aside: Path | None = None
        action: Literal["fresh", "continued", "restored"]
        if not _store_has_state(lease.head, view):
            action = "fresh" if local.empty else "continued"
        elif _continues(local, _read_record(state_dir), remote.url, lease.head, view, gens, mine):
            action = "continued"
        else:
            if not local.empty:
                set_aside = _set_aside(state_dir, wall())
            await _renewing(lease, _download(remote, lease.head, view, state_dir, failpoints))
            action = "restored"
        _write_record(state_dir, remote.url, mine)
    except BaseException:
        with contextlib.suppress(Exception):
            await lease.release()
        raise
    replicator = Replicator(remote, lease, state_dir, start, view, manifest_files=manifest_files,
                            durability=durability, interval=interval, failpoints=failpoints,
                            backoff_base=backoff_base, backoff_max=backoff_max, wall=wall)
    return Attached(replicator, mine, action, set_aside)
