"""The single writer: the only code that writes state while a job runs.

Workers hand records to ``Journal.submit`` (which returns a future) or ``Journal.append`` (and wait); the writer
coroutine gathers what is pending into one commit (one ``write`` and one ``fdatasync`` on a dedicated thread,
so the event loop never blocks on the disk), and only then resolves each record's future. "Done" therefore
always means "on disk". The writer runs no code of its callers: a future's callbacks run later, in the event
loop, outside the writer task.

Every record carries its seq and ``b``, the first seq of its commit, which lets recovery tell a write torn by a
crash (inside the last commit) from damage. When a segment is full the writer creates the next one, then seals
the full one with a record naming it. Every ``snapshot_every`` records it seals the active segment and compacts
the sealed ones into a run on a second thread while appends go on (see ``storage.compact``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Protocol

from asyncraft import records
from asyncraft.errors import DiskFull, JournalError
from asyncraft.storage import runfile
from asyncraft.storage.compact import Compacted, compact, manifest_entry
from asyncraft.storage.fs import FS, retry_on_full_disk
from asyncraft.storage.layout import StateDir, seg_name
from asyncraft.storage.recover import Recovery

log = logging.getLogger("asyncraft.journal")

MAX_BATCH = 4096

# Resolved once a submitted record is on disk; fails with the writer's error when it never will be.
Durable = asyncio.Future[None]
HANDOFF_POLL = 1.0  # how often the compactor, waiting for the loop to take note of a snapshot, checks the loop runs


class Replica(Protocol):
    """An off-machine copy the writer keeps informed (asyncraft.remote.Replicator): plain calls that never block,
    and, with sync durability, ``durable(seq)`` awaited before records up to ``seq`` are acknowledged."""

    @property
    def durability(self) -> str: ...

    def on_commit(self, segment: Path, committed_bytes: int, last_seq: int) -> None: ...
    def on_immutable(self, paths: Sequence[Path]) -> None: ...
    def on_manifest(self, path: Path) -> None: ...
    async def durable(self, seq: int) -> None: ...


class Journal:
    def __init__(
        self,
        sd: StateDir,
        recovery: Recovery,
        *,
        fs: FS | None = None,
        fsync: str = "batch",
        fsync_interval: float = 0.005,
        segment_bytes: int = 64 << 20,
        snapshot_every: int = 100_000,
        disk_full_wait: float = 60.0,
        on_error: Callable[[BaseException], None] | None = None,
        on_commit: Callable[[list[dict[str, Any]]], None] | None = None,
        replica: Replica | None = None,
    ) -> None:
        self._sd = sd
        self._fs = fs or FS()
        self._fp = self._fs.fp
        self._policy = fsync
        self._interval = fsync_interval
        self._segment_bytes = segment_bytes
        self._snapshot_every = snapshot_every
        self._disk_full_wait = disk_full_wait
        self._on_error = on_error
        self.on_commit = on_commit  # sees each batch of records once acknowledged (counters, metrics)
        self._replica = replica
        self._acks: set[asyncio.Task[None]] = set()  # sync durability: commits waiting for the object store
        self.tasks = recovery.tasks
        # For the health check: a wedged writer shows as records waiting while nothing commits. Kept
        # per commit, not per record: when the queue last became non-empty, when this commit began.
        self._waiting_since: float | None = None
        self._commit_started: float | None = None
        self._in_commit = 0
        # Records handed in and not yet taken into a commit. Callers bound it: a worker leaves at most
        # one record unacknowledged, ``append`` callers wait for theirs.
        self._pending: list[tuple[dict[str, Any], Durable]] = []
        self._wakeup: asyncio.Future[None] | None = None  # the idle writer waits on it
        self._closing = False
        self._io = ThreadPoolExecutor(1, thread_name_prefix="asyncraft-journal")
        self._compactor = ThreadPoolExecutor(1, thread_name_prefix="asyncraft-compact")
        self._compaction: asyncio.Future[Compacted] | None = None
        self._compacting: list[tuple[int, int, Path]] = []
        self._compaction_failing_since: float | None = None
        self._compaction_retry_at = 0.0
        self.next_seq = recovery.next_seq
        self._chain = [manifest_entry(ref.header) for ref in recovery.view.runs]
        # Sealed segments waiting for compaction, and the active one (appended to).
        segs = list(recovery.segments)
        self._sealed: list[tuple[int, int, Path]] = segs[:-1]
        if segs:
            self._seg_first, _last, self._seg_path = segs[-1]
            self._seg_size = self._seg_path.stat().st_size
        else:
            self._seg_first = self.next_seq
            self._seg_path = sd.journal / seg_name(self.next_seq)
            self._seg_size = 0
        self._since_snapshot = sum(last - first + 1 for first, last, _ in segs)
        self._fd: int | None = None
        self.error: BaseException | None = None
        self.closed = False
        # observability
        self.bytes_written = 0
        self.commits = 0
        self.last_fsync_seconds = 0.0
        self.last_progress = time.monotonic()
        # Age of the newest snapshot on disk, not of this process: a restart is not a snapshot.
        manifests = sd.manifests()
        self.last_snapshot = manifests[0][1].stat().st_mtime if manifests else time.time()

    # -- API for workers -------------------------------------------------------------------------

    async def append(self, record: dict[str, Any]) -> None:
        """Hand in a record and wait until it is on disk."""
        await self.submit(record)

    def submit(self, record: dict[str, Any]) -> Durable:
        """Hand in a record without waiting; the future resolves once it is on disk, or fails with
        the writer's error when it never will be."""
        if self.error is not None:
            raise self.error
        if self.closed or self._closing:
            raise JournalError("journal is closed")
        if not self._pending:
            self._waiting_since = time.monotonic()
        fut: Durable = asyncio.get_running_loop().create_future()
        self._pending.append((record, fut))
        self._wake_writer()
        return fut

    def _wake_writer(self) -> None:
        waiter, self._wakeup = self._wakeup, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def uncommitted(self) -> tuple[int, float | None]:
        """(records handed over and not yet on disk, monotonic time the oldest of them may date from)."""
        n = len(self._pending) + self._in_commit
        if not n:
            return 0, None
        since = [t for t in (self._commit_started, self._waiting_since) if t is not None]
        return n, min(since) if since else None

    def queue_depth(self) -> int:
        return len(self._pending)

    # -- the writer coroutine --------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._pending and not self._closing:
                    self._wakeup = loop.create_future()
                    await self._wakeup
                if len(self._pending) == 1 and not self._closing and self._policy == "batch" and self._interval > 0:
                    await asyncio.sleep(self._interval)  # linger: gather more records into this commit
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                self._waiting_since = time.monotonic() if self._pending else None
                if batch:
                    await self._commit(loop, batch)
                if self._seg_size >= self._segment_bytes:
                    await self._seal(loop)
                self._reap_compaction()
                if self._closing and not self._pending:
                    break
                if (self._since_snapshot >= self._snapshot_every and self._compaction is None
                        and time.monotonic() >= self._compaction_retry_at):
                    await self._start_compaction(loop)
            await self._finish(loop)
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            self.closed = True
            if self._fd is not None:
                self._fs.close(self._fd)
                self._fd = None

    async def close(self) -> None:
        """Ask the writer to commit what is pending, compact, and stop (then await run())."""
        if not self.closed and self.error is None:
            self._closing = True
            self._wake_writer()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc if isinstance(exc, JournalError) else JournalError(f"journal writer failed: {exc!r}")
        pending, self._pending = self._pending, []
        _report(pending, self.error)
        if self._on_error is not None and not isinstance(exc, asyncio.CancelledError):
            self._on_error(self.error)

    async def _disk_retry(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the journal thread; on a full disk, retry for ASYNCRAFT_DISK_FULL_WAIT, then give up."""
        return await retry_on_full_disk(lambda: loop.run_in_executor(self._io, fn, *args), self._disk_full_wait)

    async def _commit(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[dict[str, Any], Durable]]) -> None:
        seq = first = self.next_seq
        lines = []
        encode = records.encode
        for rec, _fut in batch:
            rec["seq"] = seq
            rec["b"] = first
            lines.append(encode(rec))
            seq += 1
        data = b"".join(lines)
        sync = self._policy != "off"
        self._commit_started, self._in_commit = time.monotonic(), len(batch)
        offset = self._seg_size
        try:
            elapsed = await self._disk_retry(loop, self._write, data, sync)
        except BaseException as exc:
            _report(batch, exc if isinstance(exc, JournalError) else JournalError(f"journal write failed: {exc!r}"))
            raise
        finally:
            self._commit_started, self._in_commit = None, 0
        self.last_fsync_seconds = elapsed
        self.next_seq = seq
        self._since_snapshot += len(batch)
        self.commits += 1
        self.last_progress = time.monotonic()
        path = self._seg_path
        apply = self.tasks.apply
        for (rec, _fut), line in zip(batch, lines, strict=True):
            apply(rec, (path, offset))
            offset += len(line)
        if self._replica is not None:
            self._replica.on_commit(path, self._seg_size, seq - 1)
            if self._replica.durability == "sync":
                # The writer goes on with the next commit; these records are acknowledged once the store has them.
                ack = asyncio.create_task(self._ack_replicated(batch, seq - 1))
                self._acks.add(ack)
                ack.add_done_callback(self._acks.discard)
                return
        self._acknowledge(batch, seq - 1)

    def _acknowledge(self, batch: list[tuple[dict[str, Any], Durable]], last: int) -> None:
        self._fs.note("ack", last)
        _report(batch, None)
        if self.on_commit is not None:
            # Queued behind the futures' callbacks, so both run in one turn of the loop: counters kept by the
            # hook and those kept by the records' owners move together, and a progress snapshot (another turn)
            # never sees a stage's results without the run's, or the other way round.
            asyncio.get_running_loop().call_soon(self.on_commit, [rec for rec, _fut in batch])

    async def _ack_replicated(self, batch: list[tuple[dict[str, Any], Durable]], last: int) -> None:
        assert self._replica is not None
        try:
            await self._replica.durable(last)
        except asyncio.CancelledError:
            _report(batch, JournalError("replication stopped before these records reached the object store"))
            raise
        except Exception as exc:  # every waiter learns why its record will not be acknowledged
            _report(batch, exc if isinstance(exc, JournalError) else JournalError(f"replication failed: {exc!r}"))
            return
        self._acknowledge(batch, last)

    # -- runs on the journal thread --------------------------------------------------------------

    def _write(self, data: bytes, sync: bool) -> float:
        if self._fd is None:
            self._fd = self._fs.open_append(self._seg_path)
        fd = self._fd
        self._fp.hit("journal.before_write")
        self._fs.append(fd, data, size_before=self._seg_size)
        self._seg_size += len(data)
        self.bytes_written += len(data)
        self._fp.hit("journal.after_write")
        elapsed = 0.0
        if sync:
            t0 = time.perf_counter()
            self._fs.fdatasync(fd)
            elapsed = time.perf_counter() - t0
            self._fp.hit("journal.after_fsync")
        return elapsed

    async def _seal(self, loop: asyncio.AbstractEventLoop) -> None:
        sealed = await self._disk_retry(loop, self._rotate)
        if sealed is not None and self._replica is not None:
            self._replica.on_commit(*sealed)  # the seal is a commit of the old segment; the new one is empty

    def _rotate(self) -> tuple[Path, int, int] | None:
        """Seal the active segment: create the next one first, then write the seal naming it.
        Returns the sealed segment, its length and the seal's seq."""
        if self._seg_size == 0:
            return None  # nothing to seal
        if self._fd is None:
            self._fd = self._fs.open_append(self._seg_path)
        seal_seq = self.next_seq
        nxt = seal_seq + 1
        new_path = self._sd.journal / seg_name(nxt)
        self._fs.create_empty(new_path)
        line = records.encode({"k": "seal", "next": nxt, "seq": seal_seq, "b": seal_seq})
        self._fs.append(self._fd, line, size_before=self._seg_size)
        if self._policy != "off":
            self._fs.fsync(self._fd)
        self._fp.hit("journal.after_seal")
        self._fs.close(self._fd)
        self._fd = None
        self._sealed.append((self._seg_first, seal_seq, self._seg_path))
        sealed = (self._seg_path, self._seg_size + len(line), seal_seq)
        self._since_snapshot += 1
        self._seg_first, self._seg_path, self._seg_size = nxt, new_path, 0
        self.next_seq = nxt
        return sealed

    # -- compaction --------------------------------------------------------------------------------

    async def _start_compaction(self, loop: asyncio.AbstractEventLoop) -> None:
        await self._seal(loop)
        todo = list(self._sealed)
        if not todo:
            return
        self._since_snapshot = 0
        made = None if self._replica is None else functools.partial(self._snapshot_made, loop)
        # Every record up to the seal is committed and applied: these are the counts the manifest records.
        self._compaction = loop.run_in_executor(self._compactor, compact, self._fs, self._sd, todo, list(self._chain),
                                                self.tasks.counts(), made)
        self._compacting = todo

    def _snapshot_made(self, loop: asyncio.AbstractEventLoop, run: Path, index: Path, manifest: Path) -> None:
        """On the compactor thread, before the covered segments are deleted: the replica must know of the manifest
        first, or it would find a segment gone that nothing it knows covers. Waits for the loop to take note."""
        assert self._replica is not None
        replica = self._replica

        async def note() -> None:
            replica.on_immutable([run, index])
            replica.on_manifest(manifest)

        try:
            done = asyncio.run_coroutine_threadsafe(note(), loop)
        except RuntimeError:
            return  # the loop is closed: the run is over, and the next one announces this manifest
        while True:
            try:
                done.result(HANDOFF_POLL)
                return
            except FutureTimeout:
                if not loop.is_running():
                    return  # the loop stopped (the writer failed): nobody is left to replicate

    def _reap_compaction(self) -> None:
        fut = self._compaction
        if fut is None or not fut.done():
            return
        self._compaction = None
        try:
            done = fut.result()
        except DiskFull as exc:
            # Compaction is not needed for safety (the journal holds every record): try again later, and stop
            # only if the disk stays full for ASYNCRAFT_DISK_FULL_WAIT.
            now = time.monotonic()
            if self._compaction_failing_since is None:
                self._compaction_failing_since = now
            if now - self._compaction_failing_since >= self._disk_full_wait:
                raise
            log.error("%s; compaction postponed", exc)
            self._compaction_retry_at = now + min(10.0, max(0.5, self._disk_full_wait / 10))
            self._since_snapshot = self._snapshot_every  # due again
            return
        self._compaction_failing_since = None
        self._chain = done.chain
        compacted = {p for _, _, p in self._compacting}
        self._sealed = [s for s in self._sealed if s[2] not in compacted]
        self.tasks.add_run(runfile.open_tasks(runfile.index_path_for(self._sd.runs / done.header.name)))
        self.last_snapshot = time.time()
        log.debug("snapshot through seq %d (%d runs)", done.header.last, len(done.chain))

    async def _finish(self, loop: asyncio.AbstractEventLoop) -> None:
        """Compact everything left (the final snapshot), riding out a full disk for ASYNCRAFT_DISK_FULL_WAIT."""
        while True:
            if self._compaction is not None:
                await asyncio.wait([self._compaction])
                self._reap_compaction()  # raises once the disk has been full for too long
                continue
            if not self._sealed and self._seg_size == 0:
                break
            if (wait := self._compaction_retry_at - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            await self._start_compaction(loop)
            if self._compaction is None:
                break
        self._io.shutdown(wait=True)
        self._compactor.shutdown(wait=True)

    def abandon(self) -> None:
        """Stop without compacting (after a fatal I/O error): nothing more is started; a compaction under way
        finishes (or fails) before this returns, so nothing writes behind the caller's back."""
        self.closed = True
        self._io.shutdown(wait=True, cancel_futures=True)
        self._compactor.shutdown(wait=True, cancel_futures=True)


def _report(batch: list[tuple[dict[str, Any], Durable]], error: BaseException | None) -> None:
    """Resolve each record's future; its callbacks run later in the event loop, not in the writer."""
    for _rec, fut in batch:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)
