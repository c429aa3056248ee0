"""A fake-clock model of a rate-limited server and of the scheduler's use of the rate controller.

The server is a token bucket as real APIs enforce their per-minute limits, optionally announcing it
(x-ratelimit headers) and optionally refusing a share of all calls at random. The client side drives
``RateController`` through the same plain methods the scheduler calls (``free``, ``delay``, ``book``,
``started``, ``succeeded``, ``on_rate_limited``, ``observe``) in an event-driven loop on a fake clock,
so hours of traffic take milliseconds and every run is reproducible.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from dataclasses import dataclass, field

from asyncraft.errors import RateLimited
from asyncraft.limits import RateController
from asyncraft.provider import RateInfo


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class BucketServer:
    rpm: float  # the limit, per minute
    window: float = 1.0  # the bucket holds this many seconds' worth (at least one call)
    announce: bool = False  # x-ratelimit-* headers on every answer
    precise: bool = False  # Retry-After in milliseconds instead of whole seconds
    refuse_share: float = 0.0  # 429s (Retry-After: refuse_after) for this share of all calls, at random
    refuse_after: float = 1.0
    seed: int = 1
    ok: int = 0
    refused: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rate = self.rpm / 60.0
        self.capacity = max(1.0, self.rate * self.window)
        self.level = self.capacity
        self.stamp = 0.0
        self.rng = random.Random(self.seed)

    def call(self, now: float) -> RateInfo | RateLimited | None:
        """A 429 (as the provider raises it), or the headers of a successful answer."""
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.refuse_share and self.rng.random() < self.refuse_share:
            self.refused += 1
            return RateLimited("refused at random", status=429, retry_after=self.refuse_after)
        if self.level >= 1.0:
            self.level -= 1.0
            self.ok += 1
            if self.announce:
                return RateInfo(limit_requests=self.rpm, remaining_requests=math.floor(self.level),
                                reset_requests=(self.capacity - self.level) / self.rate)
            return None
        self.refused += 1
        wait = (1.0 - self.level) / self.rate
        info = RateInfo(limit_requests=self.rpm, remaining_requests=0, reset_requests=wait) if self.announce else None
        return RateLimited("limit reached", status=429, retry_after=wait if self.precise else math.ceil(wait),
                           rate_info=info)

    @property
    def share_429(self) -> float:
        return self.refused / max(1, self.ok + self.refused)


@dataclass
class Result:
    elapsed: float
    done: int
    used: float  # accepted calls per second over the server's limit
    share_429: float
    controller: RateController


def run(server: BucketServer, tasks: int, *, concurrency: int, latency: float, rpm: float = 0.0,
        seed: int = 0) -> Result:
    """``tasks`` calls through ``concurrency`` workers; a 429'd call is tried again after the delay the
    controller gives (as the scheduler does, without holding a worker)."""
    clock = FakeClock()
    rng = random.Random(seed)
    ctl = RateController(rpm, concurrency=concurrency, clock=clock)
    ready = list(range(tasks))
    events: list[tuple[float, int, str, object]] = []
    seq = 0
    busy = 0
    done = 0
    wake_at: float | None = None

    def push(at: float, kind: str, data: object = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, data))

    def dispatch() -> None:
        # What the worker at the front of the controller's line does: wait for the window, then the pace.
        nonlocal busy, wake_at
        while ready and busy < concurrency:
            if ctl.window is not None and ctl.in_flight >= ctl.window:
                return
            if not ctl.free():
                wait = ctl.delay(clock.now)
                if wait > 0:
                    ctl.held_back(clock.now)
                    if wake_at is None or wake_at > clock.now + wait:
                        wake_at = clock.now + wait
                        push(wake_at, "wake")
                    return
                ctl.book(clock.now)
            ready.pop(0)
            busy += 1
            started = ctl.started()
            answer = server.call(clock.now)
            # Streamed: the status and the x-ratelimit headers come at once, long before the answer ends.
            if isinstance(answer, RateInfo):
                ctl.observe(answer)
            ctl.answered(429 if isinstance(answer, RateLimited) else 200)
            # A limiter refuses at once; an answer takes the model's time.
            took = 0.001 if isinstance(answer, RateLimited) else latency * (0.5 + rng.random())
            push(clock.now + took, "end", (started, answer))

    dispatch()
    while events:
        clock.now, _, kind, data = heapq.heappop(events)
        if kind == "wake":
            wake_at = None
            ctl.held_back(clock.now)
        elif kind == "end":
            assert isinstance(data, tuple)
            started, answer = data
            busy -= 1
            if isinstance(answer, RateLimited):
                if answer.rate_info is not None:
                    ctl.observe(answer.rate_info)
                delay = ctl.on_rate_limited(answer, started)
                push(clock.now + (delay if delay is not None else 1.0), "retry")
            else:
                ctl.succeeded(started)
                done += 1
        else:
            ready.append(0)
        dispatch()
    return Result(clock.now, done, server.ok / clock.now / server.rate if clock.now else 0.0, server.share_429, ctl)


class ManualTime:
    """A clock and a sleep for ``RateController``: sleepers wake only when the test moves time on."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (self.now + seconds, self._seq, fut))
        await fut

    async def advance(self, to: float) -> None:
        """Move time to ``to``, waking each sleeper at its deadline and letting it run."""
        while self._sleepers and self._sleepers[0][0] <= to:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self.now = max(self.now, deadline)
            fut.set_result(None)
            await _settle()
        self.now = max(self.now, to)
        await _settle()


async def _settle() -> None:
    """Let every task that can run at this instant run (none of them sleeps on the real clock)."""
    for _ in range(200):
        await asyncio.sleep(0)
