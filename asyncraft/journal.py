"""The single writer: the only code that writes state after recovery.

Workers hand records to ``Journal.submit`` (which returns a future) or ``Journal.append`` (and wait);
the writer coroutine gathers what is pending into one commit (one ``write`` and one ``fdatasync`` on a
dedicated thread, so the event loop never blocks on the disk), and only then resolves each record's
future. "Done" therefore always means "on disk". The writer runs no code of its callers: a future's
callbacks run later, in the event loop, outside the writer task.
Every ``snapshot_every`` records it seals the segment and compacts it on a second thread while
appends go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from asyncraft import records, store
from asyncraft.errors import DiskFull, FsyncFailed, JournalError
from asyncraft.failpoints import Failpoints

log = logging.getLogger("asyncraft.journal")

MAX_BATCH = 4096

# Resolved once a submitted record is on disk; fails with the writer's error when it never will be.
Durable = asyncio.Future[None]


class Journal:
    def __init__(
        self,
        sd: store.StateDir,
        recovered: store.Recovered,
        *,
        fsync: str = "batch",
        fsync_interval: float = 0.005,
        segment_bytes: int = 64 << 20,
        snapshot_every: int = 100_000,
        disk_full_wait: float = 60.0,
        failpoints: Failpoints | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_commit: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self._sd = sd
        self._policy = fsync
        self._interval = fsync_interval
        self._segment_bytes = segment_bytes
        self._snapshot_every = snapshot_every
        self._disk_full_wait = disk_full_wait
        self._fp = failpoints or Failpoints()
        self._on_error = on_error
        self.on_commit = on_commit  # sees each batch of records once it is on disk (counters, metrics)
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
        self._compaction: asyncio.Future[tuple[int, list[str]]] | None = None
        self._compacting: list[tuple[int, int, Path]] = []
        self.next_seq = recovered.next_seq
        self._runs = list(recovered.runs)
        # Sealed segments waiting for compaction: (first seq, last seq, path).
        self._sealed: list[tuple[int, int, Path]] = []
        segs = recovered.segments
        for i, (first, path) in enumerate(segs):
            last = segs[i + 1][0] - 1 if i + 1 < len(segs) else recovered.next_seq - 1
            if last >= first:
                self._sealed.append((first, last, path))
        self._since_snapshot = sum(last - first + 1 for first, last, _ in self._sealed)
        self._fd: int | None = None
        self._seg_first = 0
        self._seg_path: Path | None = None
        self._seg_size = 0
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
                self._reap_compaction()
                if self._closing and not self._pending:
                    break
                if self._since_snapshot >= self._snapshot_every and self._compaction is None:
                    await self._start_compaction(loop)
            await self._finish(loop)
        except BaseException as exc:
            self._fail(exc)
            raise
        finally:
            self.closed = True

    async def close(self) -> None:
        """Ask the writer to commit what is pending, compact, and stop (then await run())."""
        if not self.closed and self.error is None:
            self._closing = True
            self._wake_writer()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc if isinstance(exc, JournalError) else JournalError(f"journal writer failed: {exc}")
        pending, self._pending = self._pending, []
        _report(pending, self.error)
        if self._on_error is not None and not isinstance(exc, asyncio.CancelledError):
            self._on_error(self.error)

    async def _commit(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[dict[str, Any], Durable]]) -> None:
        seq = self.next_seq
        lines = []
        encode = records.encode
        for rec, _cb in batch:
            rec["seq"] = seq
            lines.append(encode(rec))
            seq += 1
        data = b"".join(lines)
        sync = self._policy != "off"
        self._commit_started, self._in_commit = time.monotonic(), len(batch)
        deadline = time.monotonic() + self._disk_full_wait
        delay = 0.5
        try:
            while True:
                try:
                    elapsed = await loop.run_in_executor(self._io, self._write, data, sync)
                    break
                except DiskFull as exc:
                    if time.monotonic() >= deadline:
                        raise
                    log.error("%s; retrying in %.1fs (giving up after ASYNCRAFT_DISK_FULL_WAIT)", exc, delay)
                    await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                    delay = min(delay * 2, 10.0)
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
        if self.on_commit is not None:
            self.on_commit([rec for rec, _cb in batch])
        _report(batch, None)

    # -- runs on the journal thread --------------------------------------------------------------

    def _open_segment(self) -> None:
        self._seg_first = self.next_seq
        self._seg_path = self._sd.journal / store.seg_name(self._seg_first)
        self._fd = os.open(self._seg_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._seg_size = os.fstat(self._fd).st_size
        store.fsync_dir(self._sd.journal)

    def _write(self, data: bytes, sync: bool) -> float:
        if self._fd is None:
            self._open_segment()
        fd = self._fd
        assert fd is not None
        start = self._seg_size
        self._fp.hit("journal.before_write")
        try:
            try:
                self._fp.hit("journal.write")
            except OSError:
                os.write(fd, data[: len(data) // 2])  # a partial write, as a real ENOSPC can leave
                raise
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError as exc:
            # Take back the partial write so the file ends on a record boundary.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"disk full writing {self._seg_path}: {exc.strerror}") from None
            raise JournalError(f"cannot write {self._seg_path}: {exc.strerror}") from None
        self._seg_size = start + len(data)
        self.bytes_written += len(data)
        self._fp.hit("journal.after_write")
        elapsed = 0.0
        if sync:
            t0 = time.perf_counter()
            try:
                self._fp.hit("journal.fsync")
                os.fdatasync(fd)
            except OSError as exc:
                raise FsyncFailed(
                    f"fsync of {self._seg_path} failed ({exc.strerror}); the kernel may have dropped the "
                    "data, so asyncraft stops here and recovery will decide what is on disk") from None
            elapsed = time.perf_counter() - t0
            self._fp.hit("journal.after_fsync")
        if self._seg_size >= self._segment_bytes:
            self._seal(self.next_seq + self._pending_count(data) - 1)
        return elapsed

    def _pending_count(self, data: bytes) -> int:
        return data.count(b"\n")

    def _seal(self, last_seq: int) -> None:
        """Close the active segment (durably) and queue it for compaction."""
        if self._fd is None or self._seg_path is None:
            return
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        if last_seq >= self._seg_first:
            self._sealed.append((self._seg_first, last_seq, self._seg_path))
        self._seg_path = None

    # -- compaction --------------------------------------------------------------------------------

    async def _start_compaction(self, loop: asyncio.AbstractEventLoop) -> None:
        await loop.run_in_executor(self._io, self._seal, self.next_seq - 1)
        todo = list(self._sealed)
        if not todo:
            return
        self._since_snapshot = 0
        self._compaction = loop.run_in_executor(
            self._compactor, store.compact, self._sd, todo, list(self._runs), self._fp)
        self._compacting = todo

    def _reap_compaction(self) -> None:
        fut = self._compaction
        if fut is None or not fut.done():
            return
        self._compaction = None
        _seq, runs = fut.result()  # a failed compaction is fatal: the disk is not behaving
        self._runs = runs
        done = {p for _, _, p in self._compacting}
        self._sealed = [s for s in self._sealed if s[2] not in done]
        self.last_snapshot = time.time()
        log.debug("snapshot through seq %d (%d runs)", _seq, len(runs))

    async def _finish(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._compaction is not None:
            await self._compaction
            self._reap_compaction()
        await self._start_compaction(loop)
        if self._compaction is not None:
            await self._compaction
            self._reap_compaction()
        self._io.shutdown(wait=True)
        self._compactor.shutdown(wait=True)

    def abandon(self) -> None:
        """Stop without compacting (after a fatal I/O error): nothing more is written."""
        self.closed = True
        self._io.shutdown(wait=False, cancel_futures=True)
        self._compactor.shutdown(wait=False, cancel_futures=True)


def _report(batch: list[tuple[dict[str, Any], Durable]], error: BaseException | None) -> None:
    """Resolve each record's future; its callbacks run later in the event loop, not in the writer."""
    for _rec, fut in batch:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)
