"""Named crash points and I/O fault seams for the crash tests; inert unless configured.

``ASYNCRAFT_FAILPOINTS="journal.after_write@3,journal.write=enospc"`` kills the process with
SIGKILL at the third ``journal.after_write`` and makes journal writes fail with ENOSPC.
Actions: ``kill`` (default), ``enospc``, ``eio``, ``hang`` (block the calling thread for an hour, as a
wedged disk or NFS mount would, so tests can watch the health check notice). ``@N`` fires on the N-th
hit (default 1); ``@N+`` fires on every hit from the N-th on.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from dataclasses import dataclass

from asyncraft.errors import ConfigError

NAMES = frozenset({
    "journal.before_write",
    "journal.after_write",
    "journal.after_fsync",
    "journal.write",
    "journal.fsync",
    "journal.after_seal",
    "snapshot.mid_write",
    "snapshot.after_rename",
    "snapshot.before_release",
    "compact.mid_index",
    "migrate.before_commit",
    "migrate.after_commit",
})
ACTIONS = frozenset({"kill", "enospc", "eio", "hang"})
HANG_SECONDS = 3600.0


def _remote_point(name: str) -> bool:
    """The object-store failpoints (asyncraft.remote.FAILPOINTS), imported only when one is named."""
    if not name.startswith("remote."):
        return False
    from asyncraft.remote import FAILPOINTS

    return name in FAILPOINTS


@dataclass
class _Point:
    action: str
    hit: int
    repeat: bool
    seen: int = 0


class Failpoints:
    __slots__ = ("_points",)

    def __init__(self, spec: str = "") -> None:
        self._points: dict[str, _Point] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, _, hit_spec = item.partition("@")
            name, _, action = name.partition("=")
            action = action or "kill"
            if name not in NAMES and not _remote_point(name):
                raise ConfigError(f"ASYNCRAFT_FAILPOINTS: unknown failpoint {name!r}")
            if action not in ACTIONS:
                raise ConfigError(f"ASYNCRAFT_FAILPOINTS: unknown action {action!r} for {name}")
            repeat = hit_spec.endswith("+")
            try:
                hit = int(hit_spec.rstrip("+") or "1")
            except ValueError:
                raise ConfigError(f"ASYNCRAFT_FAILPOINTS: bad hit count in {item!r}") from None
            self._points[name] = _Point(action, hit, repeat)

    def __bool__(self) -> bool:
        return bool(self._points)

    def hit(self, name: str) -> None:
        """Fire ``name`` if configured: SIGKILL this process, or raise the configured OSError."""
        point = self._points.get(name)
        if point is None:
            return
        point.seen += 1
        if point.seen < point.hit or (point.seen > point.hit and not point.repeat):
            return
        if point.action == "kill":
            sys.stderr.write(f"asyncraft: failpoint {name} fired: killing the process\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if point.action == "hang":
            sys.stderr.write(f"asyncraft: failpoint {name} fired: blocking this thread\n")
            sys.stderr.flush()
            time.sleep(HANG_SECONDS)
            return
        code = errno.ENOSPC if point.action == "enospc" else errno.EIO
        raise OSError(code, os.strerror(code) + f" (failpoint {name})")
