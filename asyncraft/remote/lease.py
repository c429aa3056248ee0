"""One owner at a time: the head object (lease.json) taken and moved only by conditional writes.

Taking the lease bumps the generation with If-Match on the version we read (If-None-Match: * when there
is none), so of two machines racing for it exactly one wins. The owner renews it, and moves the newest
durable manifest into it, the same way; a write that finds another version means somebody took over, and
the owner must stop at once (``LeaseLost``). Expiry is judged on the wall clock of the machine that wants
to take over; a skewed clock can only make a takeover early or late, never unsafe, because every upload is
fenced by the generation (see layout.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from asyncraft.remote.client import Remote, Version
from asyncraft.remote.errors import AlreadyExists, LeaseHeld, LeaseLost, PreconditionFailed
from asyncraft.remote.layout import LEASE, Head


def default_holder() -> str:
    """host:pid:random - unique per process, so it never reclaims a lease without waiting for expiry."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    __slots__ = ("_remote", "holder", "ttl", "_clock", "_lock", "_head", "_version", "_attempted")

    def __init__(self, remote: Remote, *, holder: str, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self._remote = remote
        self.holder = holder
        self.ttl = ttl
        self._clock = clock
        self._lock = asyncio.Lock()
        self._head: Head | None = None
        self._version: Version | None = None
        self._attempted: set[str] = set()

    @property
    def head(self) -> Head:
        if self._head is None:
            raise RuntimeError("the lease has not been acquired")
        return self._head

    async def acquire(self) -> Head | None:
        """Take the lease: a new generation. Returns the head found (None in an empty store).

        ``LeaseHeld`` while another holder's lease is live. A lease of our own ``holder`` is taken at once:
        a caller passes a stable holder only where it knows the previous process of that name is dead.
        """
        blob = await self._remote.get(LEASE)
        now = self._clock()
        if blob is None:
            new = Head(1, self.holder, uuid.uuid4().hex, now, self.ttl)
            try:
                self._version = await self._remote.create(LEASE, new.encode())
            except AlreadyExists:
                raise LeaseHeld(f"{self._remote.url} was taken by another process just now") from None
            self._head = new
            return None
        prev = Head.decode(blob.data, self._remote.where(LEASE))
        if not prev.expired(now) and prev.holder != self.holder:
            raise LeaseHeld(f"{self._remote.url} is in use by {prev.holder} (lease renewed "
                            f"{max(0.0, now - prev.renewed_at):.0f} s ago, expires in "
                            f"{prev.renewed_at + prev.ttl - now:.0f} s); stop that run or wait for it to expire")
        new = dataclasses.replace(prev, generation=prev.generation + 1, holder=self.holder,
                                  write_id=uuid.uuid4().hex, renewed_at=now, ttl=self.ttl)
        try:
            self._version = await self._remote.update(LEASE, new.encode(), blob.version)
        except PreconditionFailed:
            raise LeaseHeld(f"{self._remote.url} was taken by another process just now") from None
        self._head = new
        return prev

    async def write(self, **changes: Any) -> Head:
        """Renew the lease and apply ``changes`` to the head (manifest, meta, renewed_at=0 to release)."""
        async with self._lock:
            for _ in range(3):
                fields = {"renewed_at": self._clock(), **changes, "write_id": uuid.uuid4().hex}
                new = dataclasses.replace(self.head, **fields)
                assert self._version is not None
                self._attempted.add(new.write_id)
                try:
                    self._version = await self._remote.update(LEASE, new.encode(), self._version)
                except PreconditionFailed:
                    await self._adopt_own_write()
                    continue
                self._attempted.clear()
                self._head = new
                return new
            raise LeaseLost(f"{self._remote.url}: the lease keeps changing under us")

    async def _adopt_own_write(self) -> None:
        """After a precondition failure: if the head is one of our own writes whose reply was lost, go on
        from it; if it is anybody else's, the lease is gone."""
        blob = await self._remote.get(LEASE)
        current = None if blob is None else Head.decode(blob.data, self._remote.where(LEASE))
        if blob is None or current is None or current.write_id not in self._attempted:
            who = "deleted" if current is None else f"taken over by {current.holder} (generation {current.generation})"
            raise LeaseLost(f"{self._remote.url}: the lease of generation {self.head.generation} was {who}")
        self._version = blob.version
        self._head = current

    async def check(self) -> None:
        """Raise ``LeaseLost`` unless the head still names our generation (the fence before a sync ack)."""
        blob = await self._remote.get(LEASE)
        current = None if blob is None else Head.decode(blob.data, self._remote.where(LEASE))
        if current is None or current.generation != self.head.generation or current.holder != self.holder:
            who = "deleted" if current is None else f"taken over by {current.holder} (generation {current.generation})"
            raise LeaseLost(f"{self._remote.url}: the lease of generation {self.head.generation} was {who}")

    async def release(self) -> None:
        """Let the next owner take over at once (a clean exit)."""
        await self.write(renewed_at=0.0)
