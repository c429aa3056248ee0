"""Client-side limits: requests/minute, tokens/minute (aiolimiter) and one shared 429 cool-down.

aiolimiter's ``AsyncLimiter(rate, period)`` lets ``rate`` acquisitions through at once; a server
that enforces per-second slices of its per-minute limit would answer that burst with 429s, so
each limiter here holds one second's worth and refills continuously.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from typing import Any

from aiolimiter import AsyncLimiter

from asyncraft.provider import RateInfo

log = logging.getLogger("asyncraft.limits")


def paced_limiter(per_minute: float) -> AsyncLimiter:
    burst = max(1.0, per_minute / 60.0)
    return AsyncLimiter(burst, burst * 60.0 / per_minute)


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / 4) if text else 0


def estimate_request_tokens(body: dict[str, Any], output_estimate: int) -> int:
    """Prompt estimate plus max_tokens (what OpenAI counts against TPM before answering)."""
    total = 0
    for msg in body.get("messages") or ():
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            total += estimate_tokens(content) + 4
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += estimate_tokens(part["text"])
            total += 4
    if isinstance(body.get("input"), str):
        total += estimate_tokens(body["input"])
    elif isinstance(body.get("input"), list):
        total += sum(estimate_tokens(x) for x in body["input"] if isinstance(x, str))
    out = body.get("max_completion_tokens") or body.get("max_tokens")
    return total + (int(out) if isinstance(out, int) and out > 0 else output_estimate)


class Limits:
    def __init__(self, rpm: float = 0.0, tpm: float = 0.0, *, rng: random.Random | None = None) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self._requests = paced_limiter(rpm) if rpm > 0 else None
        self._tokens = paced_limiter(tpm) if tpm > 0 else None
        self._cool_until = 0.0
        self._rng = rng or random.Random()
        self.cooldowns = 0
        self.waiting = 0

    # -- acquisition -------------------------------------------------------------------------------

    def free(self) -> bool:
        """True when a call may start now without waiting: no limit configured and no cool-down.
        The common case of a local server; it lets the scheduler skip the limiter entirely."""
        return (self._requests is None and self._tokens is None
                and self._cool_until <= asyncio.get_running_loop().time())

    @property
    def counts_tokens(self) -> bool:
        return self._tokens is not None

    async def acquire(self, tokens: int) -> None:
        await self.wait_cooldown()
        if self._requests is not None:
            await self._requests.acquire(1)
        await self.take_tokens(tokens)

    async def take_tokens(self, tokens: int) -> None:
        limiter = self._tokens
        if limiter is None or tokens <= 0:
            return
        # A request may cost more than the bucket holds (one second's worth): take it in slices.
        remaining = float(tokens)
        while remaining > 0:
            part = min(remaining, limiter.max_rate)
            await limiter.acquire(part)
            remaining -= part

    async def wait_cooldown(self) -> None:
        loop = asyncio.get_running_loop()
        while (delay := self._cool_until - loop.time()) > 0:
            # Spread the wake-ups so the waiting workers do not hit the server in one burst.
            spread = min(1.0, delay * 0.25)
            self.waiting += 1
            try:
                await asyncio.sleep(delay + self._rng.random() * spread)
            finally:
                self.waiting -= 1

    def cooling_down(self) -> bool:
        return self._cool_until > asyncio.get_running_loop().time()

    def cooldown(self, seconds: float) -> None:
        """Everyone pauses until ``seconds`` from now (a 429, or the server's quota ran out)."""
        until = asyncio.get_running_loop().time() + seconds
        if until > self._cool_until:
            self._cool_until = until
            self.cooldowns += 1

    # -- adaptation --------------------------------------------------------------------------------

    def observe(self, info: RateInfo) -> None:
        """Follow the server's x-ratelimit-* headers: adopt a lower limit, pause when it is used up."""
        if info.limit_requests and (self.rpm <= 0 or info.limit_requests < self.rpm):
            log.info("server allows %g requests/min; pacing to that", info.limit_requests)
            self.rpm = info.limit_requests
            self._requests = paced_limiter(self.rpm)
        if info.limit_tokens and (self.tpm <= 0 or info.limit_tokens < self.tpm):
            log.info("server allows %g tokens/min; pacing to that", info.limit_tokens)
            self.tpm = info.limit_tokens
            self._tokens = paced_limiter(self.tpm)
        if info.remaining_requests is not None and info.remaining_requests <= 0 and info.reset_requests:
            self.cooldown(info.reset_requests)
        if info.remaining_tokens is not None and info.remaining_tokens <= 0 and info.reset_tokens:
            self.cooldown(info.reset_tokens)

    async def correct(self, estimated: int, actual: int) -> None:
        """Charge tokens the estimate missed; an overestimate is not refunded (OpenAI counts it too)."""
        if actual > estimated:
            await self.take_tokens(actual - estimated)
