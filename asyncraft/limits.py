"""Client-side rate control: one controller decides when the next call may start.

The limit comes from wherever it is known: the client's ``--rpm``/``--tpm``, the server's
``x-ratelimit-*`` headers (OpenAI, Azure, LiteLLM's ``x-ratelimit-<scope>-*``) or, when nobody says,
it is learned from 429s as TCP learns a link's capacity: a pattern of 429s cuts the sending rate to
a fraction of what the server has been accepting (multiplicative decrease), and each success raises
it a little (additive increase), so the rate saws just below the limit. A stray 429 is not a pattern:
that call alone waits for its Retry-After.

Starts are paced evenly (virtual scheduling): no burst above the pace, at start-up or after a pause.
Callers wait their turn on one ``asyncio.Lock`` (first come, first served), and the one at the front
looks at the clock again after each sleep, so a cool-down that begins while workers already wait in
line holds all of them. The first calls go out a quarter of the concurrency at a time, one more per
call accepted, until the first answers' statuses show whether the server limits us (a slow start), so
an unknown limit is not met with a full wave. A streamed answer's status arrives with its headers, so
against a slow model this costs a round trip, not a generation.

The decisions are plain methods (``delay``, ``book``, ``started``, ``succeeded``, ``on_rate_limited``)
of an injected clock; only ``acquire`` sleeps. Tests drive them with a fake clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from asyncraft.errors import RateLimited
from asyncraft.provider import RateInfo

log = logging.getLogger("asyncraft.limits")

BETA = 0.7  # multiplicative decrease, as TCP CUBIC
PATTERN_MIN = 3  # 429s among the calls sent recently that make a pattern ...
PATTERN_SHARE = 0.1  # ... when they are at least this share of them
RECENT = 2.0  # seconds of calls the share is taken over ...
MIN_OUTCOMES = 20  # ... but never fewer calls than this (at low rates that reaches further back)
MAX_OUTCOMES = 1000
CLIMB_SECONDS = 30.0  # after a decrease the rate is back where it was after this long ...
CLIMB_CALLS = 100  # ... and this many successful calls, whichever is later
MIN_RATE = 1 / 120  # requests/s: never to a standstill
PROBE_EVIDENCE = 20  # a decrease based on fewer successes than this is a guess: ...
PROBE_SECONDS = 2.0  # ... so the rate then doubles every this many seconds (at most with each success)
                     # until the next pattern of 429s
IDLE_FORGET = 60.0  # a learned rate that has not held anyone back for this long is dropped
MAX_SLACK = 0.05  # seconds a late start may catch up on (timers wake a little late)
SUCCESS_MEMORY = 5000  # accepted calls remembered for the accepted rate ...
ACCEPTED_HORIZON = 120.0  # ... at most this many seconds back
TRUSTED_RETRY_AFTER = 2.0  # seconds: a Retry-After this long tells the server's pace


class RateController:
    """When may the next call start. Constructors do no I/O."""

    def __init__(self, rpm: float = 0.0, tpm: float = 0.0, *, concurrency: int = 64,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.client_rpm = rpm
        self.client_tpm = tpm
        self.server_rpm: float | None = None
        self.server_tpm: float | None = None
        self.learned: float | None = None  # requests/s learned from 429s; None while no 429 pattern was seen
        self._clock = clock
        self._sleep = sleep
        self._rps: float | None = None  # the pace in force: the lowest of the known request rates
        self._tps: float | None = None
        self._next_request = 0.0  # earliest start of the next call under the request pace
        self._next_tokens = 0.0  # ... under the token pace
        self._cool_until = 0.0
        self._cool_why = ""
        self._lock = asyncio.Lock()
        self._concurrency = concurrency
        # Slow start: at most this many calls in flight, one more for each call accepted, until the
        # concurrency is reached or half a window was accepted without a 429 (the server takes what we send).
        self.window: int | None = max(4, concurrency // 4) if concurrency > 4 else None
        self._clean_needed = (self.window or 0) // 2
        self._refused_early = False
        self._window_open = asyncio.Event()
        self._window_open.set()
        self.in_flight = 0
        # Start times of the recent calls, and of those among them answered 429 (calls started after the
        # last decrease only). A 429 is set against the calls sent, not the answers received: a limiter
        # refuses at once while an answer takes the model's time, so early 429s would look like all there is.
        self._sent: deque[float] = deque()
        self._refused: deque[float] = deque()
        # When the server accepted calls: at their status (headers) when the provider reports it, which for a
        # streamed answer is long before it ends, else at their end. A limiter refuses at once, so the
        # accepted rate must be counted as early too.
        self._accepted_at: deque[float] = deque(maxlen=SUCCESS_MEMORY)
        self._hears_statuses = False
        self._decreased_at = -math.inf
        self._step = 0.0  # additive increase per success
        self._probing = False  # the last decrease was a guess: grow fast until 429s show the limit again
        self._longest_retry_after = 0.0  # of every 429 so far
        self._held_back_at = -math.inf  # last time the pace made a caller wait
        self.waiting = 0  # callers in acquire()
        self.cooldowns = 0
        self.rate_limited = 0  # 429s seen
        self.decreases = 0
        self._update_pace()

    # -- what the scheduler asks -------------------------------------------------------------------

    @property
    def counts_tokens(self) -> bool:
        return self._tps is not None

    @property
    def rpm(self) -> float:
        """The request pace in force, per minute (0 = none)."""
        return self._rps * 60.0 if self._rps is not None else 0.0

    def free(self) -> bool:
        """True when a call may start now without waiting in line: the common case of a server that
        limits nothing, which lets the scheduler skip ``acquire``."""
        return (self._rps is None and self._tps is None and self.window is None
                and self._cool_until <= self._clock())

    def cooling_down(self) -> bool:
        return self._cool_until > self._clock()

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until a call that will cost about ``tokens`` may start, then book it."""
        self.waiting += 1
        try:
            async with self._lock:
                while True:
                    if self.window is not None and self.in_flight >= self.window:
                        self._window_open.clear()
                        await self._window_open.wait()
                        continue
                    now = self._clock()
                    wait = self.delay(now, tokens)
                    if wait <= 0:
                        self.book(now, tokens)
                        return
                    self.held_back(now)
                    await self._sleep(wait)
                    self.held_back(self._clock())
        finally:
            self.waiting -= 1

    def delay(self, now: float, tokens: int = 0) -> float:
        """Seconds until a call costing ``tokens`` may start (0 or less: now)."""
        start = self._cool_until
        if self._rps is not None and self._next_request > start:
            start = self._next_request
        if self._tps is not None and tokens and self._next_tokens > start:
            start = self._next_tokens
        return start - now

    def book(self, now: float, tokens: int = 0) -> None:
        """A call starts now: the next one waits one interval of the pace."""
        if self._rps is not None:
            interval = 1.0 / self._rps
            self._next_request = max(now - min(interval, MAX_SLACK), self._next_request) + interval
        if self._tps is not None and tokens:
            interval = tokens / self._tps
            self._next_tokens = max(now - min(interval, MAX_SLACK), self._next_tokens) + interval

    def held_back(self, now: float) -> None:
        """The pace made a caller wait at ``now``: a learned rate grows only while it holds calls back."""
        self._held_back_at = now

    def started(self) -> float:
        """A call goes out; returns its start time for ``succeeded``/``rate_limited``/``failed``."""
        self.in_flight += 1
        now = self._clock()
        self._sent.append(now)
        if len(self._sent) > MAX_OUTCOMES:
            self._sent.popleft()
        return now

    def correct(self, estimated: int, actual: int) -> None:
        """Charge tokens the estimate missed; an overestimate is not refunded (OpenAI counts it too)."""
        if self._tps is not None and actual > estimated:
            self._next_tokens += (actual - estimated) / self._tps

    # -- what the calls tell it ----------------------------------------------------------------------

    def succeeded(self, started: float) -> None:
        now = self._clock()
        self._ended()
        if not self._hears_statuses:
            self._accepted_at.append(now)
        if started < self._decreased_at:
            return
        learned = self.learned
        if learned is not None:
            idle = now - self._held_back_at
            if idle > max(IDLE_FORGET, 4.0 / learned):
                log.debug("the learned pace of %.1f requests/min has held nothing back for %.0fs; dropped",
                          learned * 60, idle)
                self.learned = None
                self._update_pace()
            elif idle <= max(1.0, 2.0 / learned):
                # Only while the pace is what holds calls back: a rate nobody uses proves nothing.
                if self._probing:
                    self.learned = learned * 2.0 ** min(1.0, 1.0 / (learned * PROBE_SECONDS))
                else:
                    self.learned = learned + self._step
                self._update_pace()

    def answered(self, status: int) -> None:
        """An answer's status, as soon as its headers arrive (for a streamed call, long before it ends):
        the slow start widens by one per call accepted, and ends once half a window was accepted
        without a 429."""
        if status == 200:
            self._hears_statuses = True
            self._accepted_at.append(self._clock())
        if self.window is None:
            return
        if status == 429:
            self._refused_early = True
        elif status == 200:
            self.window += 1
            self._clean_needed -= 1
            if self.window >= self._concurrency or (self._clean_needed <= 0 and not self._refused_early):
                self.window = None
            self._window_open.set()

    def failed(self, started: float) -> None:
        """A call ended with an error that says nothing about rate limits."""
        self._ended()

    def on_rate_limited(self, exc: RateLimited, started: float) -> float | None:
        """A 429. Returns how long this call should wait before it is tried again (None: the server
        did not say; the caller backs off)."""
        now = self._clock()
        self._ended()
        self.rate_limited += 1
        used_up = exc.rate_info.used_up() if exc.rate_info is not None else None
        if used_up is not None:
            self.cooldown(used_up, "the server says its limit is used up")
        if exc.retry_after is not None:
            self._longest_retry_after = max(self._longest_retry_after, exc.retry_after)
        # A call sent before the last decrease falls outside the window (cleared then): its 429 says
        # nothing about the pace since.
        self._refused.append(started)
        refused, sent = self._recent(now)
        if refused >= PATTERN_MIN and refused >= PATTERN_SHARE * sent:
            self._decrease(now, exc.retry_after)
        waits = [w for w in (exc.retry_after, used_up) if w is not None]
        return max(waits) if waits else None

    def observe(self, info: RateInfo) -> None:
        """The x-ratelimit-* headers of an answer: adopt the server's limits, pause when one is used up."""
        changed = False
        if info.limit_requests and info.limit_requests != self.server_rpm:
            self.server_rpm = info.limit_requests
            log.info("server allows %g requests/min; pacing to that", info.limit_requests)
            changed = True
        if info.limit_tokens and info.limit_tokens != self.server_tpm:
            self.server_tpm = info.limit_tokens
            log.info("server allows %g tokens/min; pacing to that", info.limit_tokens)
            changed = True
        if changed:
            self._update_pace()
        used_up = info.used_up()
        if used_up is not None:
            self.cooldown(used_up, "the server says its limit is used up")

    def cooldown(self, seconds: float, why: str = "") -> None:
        """Every call waits until ``seconds`` from now, including those already waiting in line."""
        until = self._clock() + seconds
        if until > self._cool_until:
            self._cool_until = until
            self._cool_why = why
            self.cooldowns += 1

    def describe(self) -> str | None:
        """What calls wait for, in words for the progress line; None when nothing holds them back."""
        now = self._clock()
        if self._cool_until > now:
            return f"{self._cool_why or 'cooling down'}: calls wait {self._cool_until - now:.0f}s"
        if not self.waiting:
            return None
        if self.window is not None and self.in_flight >= self.window:
            return f"starting slowly: {self.window} calls at once until answers show the server's limits"
        parts = []
        if self._rps is not None:
            parts.append(f"{self._rps * 60:.0f} requests/min ({self._request_source()})")
        if self._tps is not None:
            parts.append(f"{self._tps * 60:.0f} tokens/min")
        return f"pacing to {' and '.join(parts)}" if parts else None

    # -- inside --------------------------------------------------------------------------------------

    def _ended(self) -> None:
        self.in_flight -= 1
        if self.window is not None and self.in_flight < self.window:
            self._window_open.set()

    def _recent(self, now: float) -> tuple[int, int]:
        """429s among the calls sent in the last ``RECENT`` seconds (at least ``MIN_OUTCOMES`` calls), and
        how many calls that was."""
        sent, refused = self._sent, self._refused
        while len(sent) > MIN_OUTCOMES and sent[0] < now - RECENT:
            sent.popleft()
        oldest = sent[0] if sent else now
        while refused and refused[0] < oldest:
            refused.popleft()
        return len(refused), max(len(sent), len(refused))

    def _accepted(self, now: float, span: float) -> tuple[float, int]:
        """Successful calls per second over at least the last ``span`` seconds and the last
        ``PROBE_EVIDENCE`` successes (at most ``ACCEPTED_HORIZON`` back), and how many that was."""
        count = 0
        oldest = now
        for t in reversed(self._accepted_at):
            if (count >= PROBE_EVIDENCE and t < now - span) or t < now - ACCEPTED_HORIZON:
                break
            count += 1
            oldest = t
        return count / max(span, now - oldest), count

    def _decrease(self, now: float, retry_after: float | None) -> None:
        # What the server has been letting through estimates its limit. A long Retry-After says it
        # directly: a server that says "come back in 12 s" allows about one call per 12 s. A short one is
        # rounded to whole seconds by most servers, so it says little.
        since = now - self._accepted_at[0] if self._accepted_at else 0.0
        accepted, count = self._accepted(now, max(0.1, min(RECENT, since)))
        paced_by_server = 1.0 / retry_after if retry_after else 0.0
        if retry_after is not None and retry_after >= TRUSTED_RETRY_AFTER:
            estimate, self._probing = (min(accepted, paced_by_server) if count else paced_by_server), False
        else:
            # Too few answers to tell: guess high (more 429s soon correct it) and grow fast until the next
            # pattern, whose estimate then rests on the overshoot.
            estimate = max(accepted, paced_by_server)
            self._probing = count < PROBE_EVIDENCE and not self._probing
        peak = min(self._rps if self._rps is not None else math.inf, max(estimate, MIN_RATE / BETA))
        # A server that refuses a share of all calls whatever our rate would bring the run to a halt, one
        # decrease after another. Its Retry-After bounds how slow the pace need be: a limit used up to the
        # last call asks for its longest wait, one call's worth, so about one call per longest Retry-After
        # is never too fast.
        floor = BETA / self._longest_retry_after if self._longest_retry_after > 0 else MIN_RATE
        self.learned = max(MIN_RATE, floor, BETA * peak)
        self._step = (peak - self.learned) / max(CLIMB_CALLS, peak * CLIMB_SECONDS)
        self._decreased_at = now
        self._sent.clear()
        self._refused.clear()
        self.decreases += 1
        self.window = None  # the pace takes over from the slow start
        self._window_open.set()
        self._update_pace()
        self._next_request = max(self._next_request, now)
        (log.warning if self.decreases == 1 else log.debug)(
            "429s show a limit%s: pacing to %.1f requests/min", "" if self.server_rpm or self.client_rpm
            else " the server does not announce", self.learned * 60)

    def _update_pace(self) -> None:
        rates = [r / 60.0 for r in (self.client_rpm, self.server_rpm) if r]
        if self.learned is not None:
            rates.append(self.learned)
        self._rps = min(rates) if rates else None
        tokens = [t / 60.0 for t in (self.client_tpm, self.server_tpm) if t]
        self._tps = min(tokens) if tokens else None

    def _request_source(self) -> str:
        rps = self._rps
        if self.learned is not None and rps == self.learned:
            return "learned from 429s"
        if self.client_rpm and rps == self.client_rpm / 60.0:
            return "--rpm"
        return "the server's x-ratelimit headers"


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
    for key in ("input", "prompt"):  # an embeddings request's input, a legacy completion's prompt
        value = body.get(key)
        if isinstance(value, str):
            total += estimate_tokens(value)
        elif isinstance(value, list):
            total += sum(estimate_tokens(x) for x in value if isinstance(x, str))
    if "input" in body and "messages" not in body:
        return total  # embeddings: nothing is generated
    out = body.get("max_completion_tokens") or body.get("max_tokens")
    return total + (int(out) if isinstance(out, int) and out > 0 else output_estimate)
