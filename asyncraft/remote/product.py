"""The object store as the commands use it: ``run --state-url`` attaches its state dir as the one owner and
keeps the replicator informed; ``status``, ``export``, ``verify`` and ``tail`` read a restored copy.

What the storage layer's files mean to the replicator lives here too: a manifest names its runs, and each
run has an index beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from asyncraft import records
from asyncraft.remote.client import Remote
from asyncraft.remote.errors import RemoteStateError
from asyncraft.remote.layout import LEASE, Head
from asyncraft.remote.replicate import Durability, FailpointHook, Replicator
from asyncraft.remote.restore import Attached, attach, restore
from asyncraft.storage.layout import StateDir


def manifest_files(data: bytes) -> list[str]:
    """The files a manifest (one checksummed line) names, relative to the state dir: each run and its index."""
    rec = records.decode(data)
    runs = rec.get("runs") if rec is not None else None
    if not isinstance(runs, list):
        raise RemoteStateError("a local manifest is damaged (its checksum or runs do not match)")
    out = []
    for run in runs:
        name = run.get("name") if isinstance(run, dict) else None
        if not isinstance(name, str) or not name.endswith(".zst"):
            raise RemoteStateError(f"a local manifest names a run as {name!r}")
        out += [f"runs/{name}", f"runs/{name[: -len('.zst')]}.idx"]
    return out


def holder(state_dir: Path) -> str:
    """Stable per machine and dir: a run holding the dir's flock knows the previous holder of this name is dead,
    so it takes the lease over at once instead of waiting for it to expire."""
    return f"{socket.gethostname()}:{os.path.realpath(state_dir)}"


async def attach_dir(url: str, state_dir: Path, *, durability: Durability, interval: float, ttl: float,
                     failpoints: FailpointHook | None, backoff_base: float, backoff_max: float) -> Attached:
    return await attach(Remote.open(url), state_dir, manifest_files=manifest_files, durability=durability,
                        interval=interval, ttl=ttl, holder=holder(state_dir), failpoints=failpoints,
                        backoff_base=backoff_base, backoff_max=backoff_max)


def announce(replicator: Replicator, sd: StateDir, segments: list[tuple[int, int, Path]]) -> None:
    """After recovery: what the dir holds (the replicator skips what the store already has)."""
    for _first, last, path in segments:
        replicator.on_commit(path, path.stat().st_size, last)
    manifests = sd.manifests()
    if manifests:
        replicator.on_manifest(manifests[0][1])
    if sd.meta_path.exists():
        replicator.on_meta(sd.meta_path)


@contextlib.contextmanager
def restored_copy(url: str) -> Iterator[tuple[StateDir, str]]:
    """A read-only copy of the state at ``url`` in a temp dir (removed afterwards), and who owns the URL."""
    remote = Remote.open(url)

    async def fetch(root: Path) -> Head | None:
        await restore(remote, root)
        blob = await remote.get(LEASE)
        return None if blob is None else Head.decode(blob.data, remote.where(LEASE))

    with tempfile.TemporaryDirectory(prefix="asyncraft-restore-") as tmp:
        root = Path(tmp) / "state"
        head = asyncio.run(fetch(root))
        yield StateDir(root), owner(head, time.time())


def owner(head: Head | None, now: float) -> str:
    """Who holds the state URL, for ``status``."""
    if head is None:
        return "nobody yet"
    if head.renewed_at == 0:
        return f"nobody (released by {head.holder}, generation {head.generation})"
    age = max(0.0, now - head.renewed_at)
    if head.expired(now):
        return f"nobody (the lease of {head.holder}, generation {head.generation}, expired {age - head.ttl:.0f} s ago)"
    return f"{head.holder}, generation {head.generation} (lease renewed {age:.0f} s ago: a run is going on)"


__all__ = ["announce", "attach_dir", "holder", "manifest_files", "owner", "restored_copy"]
