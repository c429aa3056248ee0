"""Several OpenAI-compatible endpoints (a fleet of vLLM replicas, several deployments) behind one client.

``EndpointPool`` has the interface of ``Provider`` (``chat(body)``, ``complete(body)``, ``embed(body)``,
``async with``)
so the scheduler does not know how many servers there are. Each call goes to the endpoint with the most free
capacity, which is the fewest calls in flight: a faster replica frees its slots sooner and so takes more of
the work, without any weights to configure.

An endpoint that fails with a transient error (5xx, refused or reset connection, timeout, malformed answer)
is backed off exponentially and the same call moves at once to another endpoint, so the scheduler's retry
budget is not spent on a dead replica. When its back-off ends, a single probe call tests it again (a circuit
breaker): one more failure doubles the back-off, a success puts it back in rotation. A 429 rests the endpoint
for its Retry-After without counting as a failure. 401/403/404/insufficient_quota take one endpoint out for a
long time and stop the run only when no endpoint is left. With a single URL the pool behaves exactly like a
``Provider``: a call is never refused, failures go to the scheduler's retry logic unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from asyncraft.errors import ProviderError, QuotaExhausted, RateLimited
from asyncraft.provider import Completion, Provider, RateInfo
from asyncraft.retry import Action, backoff_cap, classify

log = logging.getLogger("asyncraft.endpoints")

# An endpoint that answered 401/403/404/insufficient_quota is not asked again for this long (or the back-off cap).
DISABLE_SECONDS = 600.0


def endpoint_label(url: str) -> str:
    """A name for logs and metric labels: host, port and path only (user info and query could hold secrets)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if parts.port:
        host = f"{host}:{parts.port}"
    return host + parts.path.rstrip("/")


def outcome_name(exc: BaseException) -> str:
    """Short outcome label: the HTTP status when there is one, else the error class."""
    if isinstance(exc, ProviderError) and exc.status:
        return str(exc.status)
    return type(exc).__name__


@dataclass(slots=True, eq=False)
class Endpoint:
    url: str
    label: str
    provider: Provider
    in_flight: int = 0
    failures: int = 0  # consecutive failures; 0 = healthy
    down_until: float = 0.0  # monotonic time before which no call is sent (unless no endpoint is usable)
    probing: bool = False  # a probe call after a back-off is in flight
    last_error: str = ""
    calls: Counter[str] = field(default_factory=Counter)  # by outcome: ok, 429, 500, ConnectionFailed, ...

    def usable(self, now: float) -> bool:
        return now >= self.down_until and not (self.failures and self.probing)

    def up(self, now: float) -> bool:
        return self.failures == 0 and now >= self.down_until


class EndpointPool:
    """Spreads calls over endpoints by free capacity and fails over from a failing one. Constructors do no I/O."""

    def __init__(self, base_urls: Sequence[str], *, api_key: str | None, api_type: str = "openai",
                 api_version: str | None = None, concurrency: int = 64, request_timeout: float | None = 600.0,
                 connect_timeout: float = 10.0, stall_timeout: float = 120.0, stream: bool = True,
                 on_rate_info: Callable[[RateInfo], None] | None = None,
                 on_status: Callable[[int], None] | None = None, backoff_base: float = 1.0, backoff_max: float = 60.0,
                 on_call: Callable[[str, str, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not base_urls:
            raise ValueError("at least one base URL is needed")
        self._global_rate_info = on_rate_info
        self._backoff_base = max(backoff_base, 0.01)
        self._backoff_max = max(backoff_max, self._backoff_base)
        self._on_call = on_call
        self._clock = clock
        self._turn = 0
        self.endpoints: list[Endpoint] = []
        for i, url in enumerate(base_urls):
            provider = Provider(url, api_key=api_key, api_type=api_type, api_version=api_version,
                                concurrency=concurrency, request_timeout=request_timeout,
                                connect_timeout=connect_timeout, stall_timeout=stall_timeout, stream=stream,
                                on_rate_info=self._rate_info_for(i), on_status=on_status)
            self.endpoints.append(Endpoint(url, endpoint_label(url), provider))
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> EndpointPool:
        async with contextlib.AsyncExitStack() as stack:
            for ep in self.endpoints:
                await stack.enter_async_context(ep.provider)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    # -- the Provider interface ----------------------------------------------------------------------

    async def chat(self, body: dict[str, Any]) -> Completion:
        result: Completion = await self._call("chat", body)
        return result

    async def embed(self, body: dict[str, Any]) -> Completion:
        result: Completion = await self._call("embed", body)
        return result

    async def complete(self, body: dict[str, Any]) -> Completion:
        result: Completion = await self._call("complete", body)
        return result

    async def models(self) -> list[str] | None:
        """What the first endpoint lists (``GET /models``); None where it has no list."""
        return await self.endpoints[0].provider.models()

    # -- selection -----------------------------------------------------------------------------------

    def pick(self, exclude: Sequence[Endpoint] = ()) -> Endpoint | None:
        """The usable endpoint with the fewest calls in flight (ties in turn). If none is usable, the first try
        still goes to the one that comes back soonest, so a lone endpoint is never refused; a failover
        (``exclude`` not empty) gets None instead."""
        n = len(self.endpoints)
        if n == 1:  # the common case: one server, never refused, nothing to fail over to
            return None if exclude else self.endpoints[0]
        now = self._clock()
        start = self._turn % n
        self._turn += 1
        best: Endpoint | None = None
        for i in range(n):
            ep = self.endpoints[(start + i) % n]
            if ep in exclude or not ep.usable(now):
                continue
            if best is None or ep.in_flight < best.in_flight:
                best = ep
        if best is not None or exclude:
            return best
        return min(self.endpoints, key=lambda e: (e.down_until, e.in_flight))

    async def _call(self, kind: str, body: dict[str, Any]) -> Any:
        tried: list[Endpoint] = []
        while True:
            ep = self.pick(tried)
            if ep is None:
                raise AssertionError("unreachable: the first pick always returns an endpoint")
            tried.append(ep)
            now = self._clock()
            probe = ep.failures > 0 and now >= ep.down_until and not ep.probing
            if probe:
                ep.probing = True
            ep.in_flight += 1
            started = now
            outcome = "cancelled"
            try:
                call = {"embed": ep.provider.embed, "complete": ep.provider.complete}.get(kind, ep.provider.chat)
                result: Any = await call(body)
                outcome = "ok"
            except ProviderError as exc:
                outcome = outcome_name(exc)
                if not self._failed_over(ep, exc, tried):
                    raise
                continue
            finally:
                ep.in_flight -= 1
                if probe:
                    ep.probing = False
                ep.calls[outcome] += 1
                if self._on_call is not None:
                    self._on_call(ep.label, outcome, self._clock() - started)
            self._mark_success(ep)
            return result

    def _failed_over(self, ep: Endpoint, exc: ProviderError, tried: list[Endpoint]) -> bool:
        """Book the failure on ``ep``; True if the call should go on to another endpoint."""
        action = classify(exc)
        if action is Action.FAIL_TASK:
            self._mark_success(ep)  # the server works; this request is what it refuses
            return False
        if isinstance(exc, RateLimited):
            wait = exc.retry_after if exc.retry_after is not None else self._backoff_base
            ep.down_until = max(ep.down_until, self._clock() + wait)
        elif action is Action.FATAL:
            ep.failures += 1
            ep.down_until = self._clock() + max(DISABLE_SECONDS, self._backoff_max)
            ep.last_error = str(exc)
            if len(self.endpoints) > 1:
                log.warning("endpoint %s refuses calls (%s); other endpoints take its work%s", ep.label, exc,
                            "" if isinstance(exc, QuotaExhausted) else " - check its URL, model and key")
        else:
            self._mark_failure(ep, str(exc))
        return len(self.endpoints) > 1 and self.pick(tried) is not None

    def _mark_failure(self, ep: Endpoint, why: str) -> None:
        ep.failures += 1
        delay = backoff_cap(ep.failures, base=self._backoff_base, cap=self._backoff_max)
        ep.down_until = max(ep.down_until, self._clock() + delay)
        ep.last_error = why
        if ep.failures == 1 and len(self.endpoints) > 1:
            log.warning("endpoint %s failing (%s); backing off, other endpoints take its calls", ep.label, why)

    def _mark_success(self, ep: Endpoint) -> None:
        if ep.failures and len(self.endpoints) > 1:
            log.info("endpoint %s answers again after %d failure(s)", ep.label, ep.failures)
        ep.failures = 0
        ep.last_error = ""

    def _rate_info_for(self, index: int) -> Callable[[RateInfo], None]:
        def observe(info: RateInfo) -> None:
            ep = self.endpoints[index]
            if len(self.endpoints) == 1:
                if self._global_rate_info is not None:
                    self._global_rate_info(info)
                return
            # Each server's limits are its own: rest the one that is used up instead of slowing the fleet.
            now = self._clock()
            if info.remaining_requests is not None and info.remaining_requests <= 0 and info.reset_requests:
                ep.down_until = max(ep.down_until, now + info.reset_requests)
            if info.remaining_tokens is not None and info.remaining_tokens <= 0 and info.reset_tokens:
                ep.down_until = max(ep.down_until, now + info.reset_tokens)

        return observe

    # -- observation ---------------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """Per-endpoint state for status.json and the metrics."""
        now = self._clock()
        return [{"endpoint": ep.label, "up": ep.up(now), "in_flight": ep.in_flight, "failures": ep.failures,
                 "calls": dict(ep.calls), **({"last_error": ep.last_error} if ep.last_error else {})}
                for ep in self.endpoints]
