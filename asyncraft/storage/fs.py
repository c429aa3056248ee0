"""The storage seam: every write, fsync, rename, unlink and directory fsync of the state dir goes through ``FS``.

One place translates the operating system's errors into the exit statuses users rely on: a full disk becomes
``DiskFull`` (wait, then stop resumable), any other write failure ``StorageIOError`` and a failed fsync
``FsyncFailed`` (stop with 74: the kernel may have dropped the data). ``RecordingFS`` keeps a log of the
operations so the power-loss tests can rebuild every disk state a power cut could leave at each sync point.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from asyncraft.errors import DiskFull, FsyncFailed, StorageIOError
from asyncraft.failpoints import Failpoints

log = logging.getLogger("asyncraft")
T = TypeVar("T")


async def retry_on_full_disk(attempt: Callable[[], Awaitable[T]], wait: float) -> T:
    """Await ``attempt()`` again while it raises DiskFull, backing off, for ``wait`` seconds; then let DiskFull
    through (the run stops with 75)."""
    deadline = time.monotonic() + wait
    delay = 0.5
    while True:
        try:
            return await attempt()
        except DiskFull as exc:
            if time.monotonic() >= deadline:
                raise
            pause = min(delay, max(0.0, deadline - time.monotonic()))
            log.error("%s; retrying in %.1fs (giving up after ASYNCRAFT_DISK_FULL_WAIT)", exc, pause)
            await asyncio.sleep(pause)
            delay = min(delay * 2, 10.0)

_FULL = (errno.ENOSPC, errno.EDQUOT)


def _mapped(exc: OSError, what: str, path: Path | str) -> Exception:
    if exc.errno in _FULL:
        return DiskFull(f"disk full: cannot {what} {path} ({exc.strerror})")
    return StorageIOError(f"cannot {what} {path}: {exc.strerror}")


@contextlib.contextmanager
def mapped(what: str, path: Path | str) -> Iterator[None]:
    """Translate an OSError of ``what`` on ``path`` (``"write"``, ``"create"``, ...) at the boundary."""
    try:
        yield
    except OSError as exc:
        raise _mapped(exc, what, path) from None


class FS:
    """The real file system. Methods raise ``DiskFull``, ``FsyncFailed`` or ``StorageIOError``, never OSError."""

    def __init__(self, failpoints: Failpoints | None = None) -> None:
        self.fp = failpoints or Failpoints()
        self._paths: dict[int, Path] = {}

    # -- appending (journal segments) ----------------------------------------------------------------

    def open_append(self, path: Path) -> int:
        """Open an existing file (made with ``create_empty``) for appending."""
        with mapped("open", path):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._paths[fd] = path
        return fd

    def append(self, fd: int, data: bytes, *, size_before: int) -> None:
        """Append all of ``data``; on failure take back a partial write so the file ends where it did."""
        path = self._paths[fd]
        try:
            try:
                self.fp.hit("journal.write")
            except OSError:
                os.write(fd, data[: len(data) // 2])  # a partial write, as a real ENOSPC can leave
                raise
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size_before)
            raise _mapped(exc, "write", path) from None
        self._log("write", path, size_before, data)

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, data_only=True)

    def fsync(self, fd: int) -> None:
        self._sync(fd, data_only=False)

    def _sync(self, fd: int, *, data_only: bool) -> None:
        path = self._paths[fd]
        try:
            self.fp.hit("journal.fsync")
            (os.fdatasync if data_only else os.fsync)(fd)
        except OSError as exc:
            raise FsyncFailed(f"fsync of {path} failed ({exc.strerror}); the kernel may have dropped the data, so "
                              "asyncraft stops here and the next start decides what is on disk") from None
        self._log("sync", path)

    def close(self, fd: int) -> None:
        self._paths.pop(fd, None)
        with contextlib.suppress(OSError):
            os.close(fd)

    # -- whole files ---------------------------------------------------------------------------------

    def write_atomic(self, path: Path, data: bytes, *, durable: bool = True, mid: str | None = None,
                     after_rename: str | None = None) -> None:
        """temp file, fsync, rename, fsync the directory: the file is either old or new, never half."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                if mid:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    self.fp.hit(mid)
                    fh.write(data[len(data) // 2 :])
                else:
                    fh.write(data)
                fh.flush()
                self._log("create", tmp)
                self._log("write", tmp, 0, data)
                if durable:
                    try:
                        os.fsync(fh.fileno())
                    except OSError as exc:
                        raise FsyncFailed(f"fsync of {tmp} failed ({exc.strerror})") from None
                    self._log("sync", tmp)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _mapped(exc, "write", path) from None
        except FsyncFailed:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._log("rename", tmp, path)
        if after_rename:
            self.fp.hit(after_rename)
        if durable:
            self.fsync_dir(path.parent)

    def create_empty(self, path: Path) -> None:
        """Create an empty file (if missing) and make its name durable."""
        with mapped("create", path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.close(fd)
        self._log("create", path)
        self.fsync_dir(path.parent)

    def truncate(self, path: Path, size: int) -> None:
        with mapped("truncate", path):
            with open(path, "r+b") as fh:
                fh.truncate(size)
                os.fsync(fh.fileno())
        self._log("truncate", path, size)
        self._log("sync", path)

    def rename(self, src: Path, dst: Path) -> None:
        with mapped("rename", src):
            os.replace(src, dst)
        self._log("rename", src, dst)

    def unlink(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _mapped(exc, "remove", path) from None
        self._log("unlink", path)

    def fsync_dir(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise FsyncFailed(f"fsync of directory {path} failed ({exc.strerror})") from None
        self._log("sync_dir", path)

    def mkdir(self, path: Path) -> None:
        if path.is_dir():
            return
        with mapped("create", path):
            path.mkdir(parents=True, exist_ok=True)
        self._log("mkdir", path)
        self.fsync_dir(path.parent)

    # -- what the power-loss tests see -----------------------------------------------------------------

    def note(self, event: str, value: Any) -> None:
        """An application event in the log (for example: records through seq N acknowledged)."""
        self._log("note", event, value)

    def _log(self, *op: Any) -> None:
        return None


class RecordingFS(FS):
    """An ``FS`` that also keeps the list of operations, in order, for the power-loss tests."""

    def __init__(self, failpoints: Failpoints | None = None) -> None:
        super().__init__(failpoints)
        self.ops: list[tuple[Any, ...]] = []

    def _log(self, *op: Any) -> None:
        self.ops.append(op)
