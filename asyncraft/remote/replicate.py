"""Continuous replication of a state dir to the object store, driven by the journal writer.

The writer calls plain methods that only note what changed and never wait: ``on_commit`` after each group
commit, ``on_immutable`` for sealed runs and indexes, ``on_manifest`` and ``on_meta``. One shipping task
uploads, in this order each round: immutable files, the newest manifest (after every file it names) and then
the head that names it, asyncraft.json, and the journal's new tail bytes as create-only chunk objects. In
``async`` durability a round runs every ``interval``; in ``sync`` one runs as soon as there is something to
ship, and ``durable(seq)`` resolves once every record up to ``seq`` is in the store and the lease is still
ours (the writer acknowledges a group commit only then). Failures are retried with capped exponential
back-off; meanwhile ``status()`` says since when the store is unreachable and how far behind it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from asyncraft.remote.client import Remote
from asyncraft.remote.errors import AlreadyExists, LeaseLost, RemoteError, RemoteStateError, RemoteUnavailable
from asyncraft.remote.layout import (
    Head,
    ManifestRef,
    Start,
    View,
    chunk_key,
    file_key,
    garbage,
    manifest_seq,
    meta_key,
    parse_listing,
    segment_first,
)
from asyncraft.remote.lease import Lease
from asyncraft.retry import backoff

Durability = Literal["async", "sync"]
ManifestFiles = Callable[[bytes], Iterable[str]]
CHUNK_MAX = 8 << 20  # a chunk object holds at most this many bytes (more than one commit's worth)

FAILPOINTS = frozenset({
    "remote.after_lease",  # lease taken, start.json not yet written
    "remote.after_start",
    "remote.mid_restore",  # some files of a restore downloaded
    "remote.before_file",
    "remote.after_file",
    "remote.before_chunk",
    "remote.after_chunk",
    "remote.before_head",  # manifest uploaded, head not yet moved to it
    "remote.after_head",
    "remote.mid_retention",  # some superseded objects deleted
})


class FailpointHook(Protocol):
    def hit(self, name: str) -> None: ...


class _NoFailpoints:
    def hit(self, name: str) -> None:
        pass


@dataclass(frozen=True, slots=True)
class ReplicationStatus:
    state: str  # ok | unreachable | failed | fenced | stopped
    durability: Durability
    generation: int
    committed_seq: int  # newest record the writer committed locally
    durable_seq: int  # every record up to here is in the store
    lag_seconds: float  # age of the oldest commit not yet in the store
    unreachable_since: float | None  # wall clock of the first failure in the current outage
    last_error: str | None

    @property
    def lag_records(self) -> int:
        return max(0, self.committed_seq - self.durable_seq)

    @property
    def healthy(self) -> bool:
        return self.state == "ok"

    def describe(self) -> str:
        """One line for progress output."""
        lag = f"lag {self.lag_records} records, {self.lag_seconds:.1f} s"
        if self.state == "unreachable" and self.unreachable_since is not None:
            since = time.strftime("%H:%M:%S", time.localtime(self.unreachable_since))
            wait = " (acknowledgements wait)" if self.durability == "sync" else " (the run goes on locally)"
            return f"replication: store unreachable since {since}{wait}; {lag}; {self.last_error}"
        if self.state in ("failed", "fenced"):
            return f"replication {self.state}: {self.last_error}"
        return f"replication {self.state}: {lag}"


@dataclass(slots=True)
class _Point:
    end: int  # committed length of the segment
    last: int  # seq of the last record before ``end``
    since: float  # monotonic time of the oldest commit merged into this point


class Replicator:
    """Ships one state dir as the owner of generation ``start.generation``. Made by ``attach``."""

    def __init__(self, remote: Remote, lease: Lease, state_dir: Path, start: Start, view: View, *,
                 manifest_files: ManifestFiles, durability: Durability = "async", interval: float = 1.0,
                 failpoints: FailpointHook | None = None, backoff_base: float = 0.5, backoff_max: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._remote = remote
        self._lease = lease
        self._root = state_dir
        self._start = start
        self._gen = start.generation
        self._manifest_files = manifest_files
        self.durability: Durability = durability
        self._interval = interval
        self._fp: FailpointHook = failpoints or _NoFailpoints()
        self._backoff = (backoff_base, backoff_max)
        self._clock = clock
        self._wall = wall
        head = lease.head
        self._ends: dict[str, int] = view.ends()  # bytes of each journal segment in the store
        self._points: dict[str, list[_Point]] = {}
        self._files: list[Path] = []
        self._manifest: Path | None = None
        self._meta: Path | None = None
        self._meta_count = 0
        self._catalog: dict[str, str] = dict(head.manifest.files) if head.manifest else {}
        self._superseded: set[str] = set()  # keys an earlier head of ours named and the current one does not
        self._cleanup_due = True  # finish whatever clean-up an earlier owner left
        self.committed_seq = view.end_seq
        self.durable_seq = view.end_seq
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._tie = itertools.count()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._state = "ok"
        self._since: float | None = None
        self._error: BaseException | None = None
        self._last_error: str | None = None

    # --- the writer's side: plain calls, never blocking -----------------------------------------------

    def on_commit(self, segment: Path, committed_bytes: int, last_seq: int) -> None:
        """A group commit made ``segment`` ``committed_bytes`` long, its last record being ``last_seq``."""
        name = segment.name
        segment_first(name)  # a misnamed segment is a caller bug: say so now, not in a restore
        if self._segment_covered(last_seq):
            return
        points = self._points.setdefault(name, [])
        base = points[-1].end if points else self._ends.get(name, 0)
        if committed_bytes <= base:
            return
        self.committed_seq = max(self.committed_seq, last_seq)
        now = self._clock()
        # Coalesce commits into points about CHUNK_MAX apart: memory stays bounded however long the outage.
        if points and points[-1].end - (points[-2].end if len(points) > 1 else self._ends.get(name, 0)) < CHUNK_MAX:
            points[-1] = _Point(committed_bytes, last_seq, points[-1].since)
        else:
            points.append(_Point(committed_bytes, last_seq, now))
        self._wake.set()

    def on_immutable(self, paths: Sequence[Path]) -> None:
        """Sealed runs and their indexes: uploaded before any manifest that names them."""
        self._files.extend(paths)
        self._wake.set()

    def on_manifest(self, path: Path) -> None:
        """A new manifest (durable on local disk); an older one still waiting is superseded by it."""
        if self._manifest is None or manifest_seq(path.name) >= manifest_seq(self._manifest.name):
            self._manifest = path
        self._wake.set()

    def on_meta(self, path: Path) -> None:
        self._meta = path
        self._wake.set()

    async def durable(self, seq: int) -> None:
        """Resolve once every record up to ``seq`` is in the store; raise if replication has failed."""
        if self._error is not None:
            raise self._error
        if seq <= self.durable_seq:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (seq, next(self._tie), fut))
        self._wake.set()
        await fut

    def status(self) -> ReplicationStatus:
        oldest = min((p[0].since for p in self._points.values() if p), default=None)
        lag = 0.0 if oldest is None else max(0.0, self._clock() - oldest)
        return ReplicationStatus(self._state, self.durability, self._gen, self.committed_seq, self.durable_seq,
                                 lag, self._since, self._last_error)

    # --- the shipping task -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Ship until ``stop``, then release the lease. Raises ``LeaseLost``, ``RemoteConfigError`` or
        ``RemoteStateError`` when replication cannot go on (the run must stop), after failing every waiter."""
        try:
            async with asyncio.TaskGroup() as tg:
                renewal = tg.create_task(self._keep_lease())
                await self._ship_loop()
                renewal.cancel()
        except asyncio.CancelledError:
            self._fail(asyncio.CancelledError())
            raise
        except BaseExceptionGroup as group:
            exc = group.exceptions[0]
            self._fail(exc)
            raise exc from None
        with contextlib.suppress(RemoteUnavailable):
            await self._lease.release()

    def stop(self) -> None:
        """Ship what is pending (while the store answers), release the lease, and let ``run`` return."""
        self._stopping.set()
        self._wake.set()

    async def _ship_loop(self) -> None:
        attempt = 0
        while True:
            if self.durability == "sync" or attempt:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._stopping.wait()
            self._wake.clear()
            try:
                await self._round()
            except RemoteUnavailable as exc:
                attempt += 1
                self._unreachable(exc)
                if self._stopping.is_set() and attempt > 3:
                    return  # the store is down at exit: the next run ships the rest from the local dir
                await asyncio.sleep(backoff(attempt, base=self._backoff[0], cap=self._backoff[1]))
                self._wake.set()
                continue
            attempt = 0
            self._reachable()
            if self._stopping.is_set() and not self._pending():
                self._state = "stopped"
                return

    async def _keep_lease(self) -> None:
        attempt = 0
        while True:
            delay = self._lease.ttl / 3 if attempt == 0 else min(
                self._lease.ttl / 6, backoff(attempt, base=self._backoff[0], cap=self._backoff[1]))
            await asyncio.sleep(delay)
            try:
                await self._lease.write()
                attempt = 0
            except RemoteUnavailable as exc:
                attempt += 1
                self._unreachable(exc)

    def _pending(self) -> bool:
        return bool(self._files or self._manifest or self._meta or any(self._points.values()))

    def _unreachable(self, exc: RemoteError) -> None:
        if self._since is None:
            self._since = self._wall()
        self._state = "unreachable"
        self._last_error = str(exc)

    def _reachable(self) -> None:
        self._since = None
        self._state = "ok"
        self._last_error = None

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        if not isinstance(exc, asyncio.CancelledError):
            self._state = "fenced" if isinstance(exc, LeaseLost) else "failed"
            self._last_error = str(exc)
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(exc)
        self._waiters.clear()

    async def _round(self) -> None:
        await self._ship_files()
        if self._manifest is not None:
            await self._ship_manifest(self._manifest)
        if self._meta is not None:
            await self._ship_meta(self._meta)
        await self._ship_journal()
        if self._cleanup_due:
            await self._cleanup()
        if self._waiters and self._waiters[0][0] <= self.durable_seq:
            if self.durability == "sync":
                await self._lease.check()  # acknowledged means: in the store while we still owned it
            while self._waiters and self._waiters[0][0] <= self.durable_seq:
                heapq.heappop(self._waiters)[2].set_result(None)

    def _name(self, path: Path) -> str:
        return path.relative_to(self._root).as_posix()

    async def _upload(self, name: str, source: Path | bytes) -> str:
        key = file_key(self._gen, name)
        self._fp.hit("remote.before_file")
        try:
            await self._remote.create(key, source)
        except AlreadyExists:
            pass  # our own earlier attempt whose reply was lost: create-only keys of our generation
        self._fp.hit("remote.after_file")
        self._catalog[name] = key
        return key

    async def _ship_files(self) -> None:
        while self._files:
            path = self._files[0]
            name = self._name(path)
            if name not in self._catalog:
                try:
                    await self._upload(name, path)
                except FileNotFoundError:
                    pass  # already merged away locally; a manifest naming it would have kept it
            self._files.pop(0)

    async def _ship_manifest(self, path: Path) -> None:
        name = self._name(path)
        seq = manifest_seq(name)
        head = self._lease.head
        if head.manifest is not None and head.manifest.seq >= seq:
            self._manifest = None if self._manifest == path else self._manifest
            return
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            if self._manifest == path:
                self._manifest = None
            return
        named = sorted(set(self._manifest_files(data)))
        for file in named:
            if file not in self._catalog:
                local = self._root / file
                try:
                    await self._upload(file, local)
                except FileNotFoundError:
                    raise RemoteStateError(f"manifest {name} names {file}, which is not in {self._root}") from None
        key = await self._upload(name, data)
        files = {f: self._catalog[f] for f in named}
        self._fp.hit("remote.before_head")
        old = head.manifest
        await self._lease.write(manifest=ManifestRef(name, seq, key, files))
        self._fp.hit("remote.after_head")
        if self._manifest == path:
            self._manifest = None
        self.durable_seq = max(self.durable_seq, seq)
        self.committed_seq = max(self.committed_seq, seq)
        if old is not None:
            dropped = {old.key, *old.files.values()} - {key, *files.values()}
            self._catalog = {f: k for f, k in self._catalog.items() if k not in dropped}
            self._superseded |= dropped
        self._cleanup_due = True

    async def _ship_meta(self, path: Path) -> None:
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            self._meta = None
            return
        self._meta_count += 1
        key = meta_key(self._gen, self._meta_count)
        self._fp.hit("remote.before_file")
        try:
            await self._remote.create(key, data)
        except AlreadyExists:
            pass
        self._fp.hit("remote.after_file")
        old = self._lease.head.meta
        await self._lease.write(meta=key)
        if self._meta == path:
            self._meta = None
        if old is not None:
            self._superseded.add(old)
            self._cleanup_due = True

    async def _cleanup(self) -> None:
        """Delete what the head no longer needs; a crash part-way leaves the rest to the next round/owner."""
        gens = parse_listing(await self._remote.list("g/"))
        doomed = garbage(self._lease.head, self._start, gens, self._superseded)
        for i, key in enumerate(doomed):
            await self._remote.delete(key)
            self._superseded.discard(key)
            if i == 0:
                self._fp.hit("remote.mid_retention")
        self._cleanup_due = False

    async def _ship_journal(self) -> None:
        for name in sorted(self._points, key=segment_first):
            points = self._points[name]
            while points:
                offset = self._ends.get(name, 0)
                k = 0
                while k + 1 < len(points) and points[k + 1].end - offset <= CHUNK_MAX:
                    k += 1
                point = points[k]
                # Out of the list while it is read and uploaded: a commit arriving meanwhile must start a new point,
                # not be merged into one already being shipped (its bytes would be dropped with it).
                shipping = points[: k + 1]
                del points[: k + 1]
                try:
                    data = await asyncio.to_thread(_read_range, self._root / "journal" / name, offset, point.end)
                except FileNotFoundError:
                    if self._segment_covered(point.last):
                        del points[:]
                        break
                    points[:0] = shipping
                    if self._manifest is not None:
                        self._wake.set()
                        return  # compacted away locally: its manifest ships first, next round
                    raise RemoteStateError(f"journal segment {name} disappeared before it was replicated, "
                                           "and no manifest covers it") from None
                except BaseException:
                    points[:0] = shipping
                    raise
                self._fp.hit("remote.before_chunk")
                try:
                    await self._remote.create(chunk_key(self._gen, name, offset, point.end, point.last), data)
                except AlreadyExists:
                    pass  # our own earlier attempt: the key fixes the bytes
                except BaseException:
                    points[:0] = shipping
                    raise
                self._fp.hit("remote.after_chunk")
                self._ends[name] = point.end
                if offset == 0 and self._lease.head.manifest is not None:
                    self._cleanup_due = True  # a segment the manifest covers may have been waiting for a later one
                self.durable_seq = max(self.durable_seq, point.last)

    def _segment_covered(self, last: int) -> bool:
        head: Head = self._lease.head
        return head.manifest is not None and head.manifest.seq >= last


def _read_range(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(end - start)
    if len(data) != end - start:
        raise RemoteStateError(f"{path} is shorter than its committed length {end}")
    return data


__all__ = ["FAILPOINTS", "Durability", "FailpointHook", "ManifestFiles", "ReplicationStatus",
           "Replicator"]
