"""Health and Prometheus metrics of a running job, served by aiohttp on ``ASYNCRAFT_METRICS_PORT``.

``/healthz`` answers 200 while the run makes progress or waits for a good reason (a rate-limit cool-down or
pace, calls in flight, tasks waiting for their retry delay, an idle ``--watch``), and 503 with the reason when
it is stuck: the journal writer holds records but commits nothing, or tasks wait and nothing at all happens.
A slow API is not stuck: the request and stall timeouts end calls that stop making progress, so a call in
flight counts as progress. An orchestrator that restarts a stuck container therefore never restarts one
that is merely slow or rate-limited.

``/metrics`` is computed at scrape time from the live scheduler, journal and endpoint pool (a collector on its
own registry, so nothing else in the process leaks in); only the call latency histogram is fed as calls end.
``python -m asyncraft.metrics check`` is the container's HEALTHCHECK: it asks ``/healthz`` and exits 0 or 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from asyncraft import __version__
from asyncraft.errors import ConfigError
from asyncraft.journal import Journal

if TYPE_CHECKING:
    from asyncraft.progress import RunView
    from asyncraft.remote import ReplicationStatus
    from asyncraft.scheduler import Scheduler

log = logging.getLogger("asyncraft.metrics")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
SAMPLE_EVERY = 1.0  # seconds between health samples


class HealthMonitor:
    """Decides whether the run is stuck, from how long its counters have stood still.

    ``sample()`` runs every second; a change of any progress counter (commits, calls ended, retries, cool-downs,
    tasks taken or queued, input read) is a sign of life. ``check()`` gives (healthy, reason)."""

    def __init__(self, sched: Scheduler, journal: Journal, *, writer_timeout: float, stall_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sched = sched
        self.journal = journal
        self.writer_timeout = writer_timeout
        self.stall_timeout = stall_timeout
        self._clock = clock
        self._signature: tuple[Any, ...] | None = None
        self._last_change = clock()
        self.replication: Callable[[], ReplicationStatus] | None = None  # --state-url

    def _progress_signature(self) -> tuple[Any, ...]:
        sched, st = self.sched, self.sched.stats
        return (self.journal.commits, sum(st.calls.values()), st.retries, sched.limits.cooldowns, sched.active,
                sched.queued(), st.input_problems, sched.input_total, sched.scans)

    def _fresh_calls(self) -> int:
        """Calls in flight: waiting for them is legitimate, since the request and stall timeouts end any
        call that is not making progress."""
        return len(self.sched.inflight)

    def _waiting_legitimately(self) -> bool:
        limits = self.sched.limits
        return limits.cooling_down() or limits.waiting > 0 or self.sched.retrying() > 0 or self._fresh_calls() > 0

    def sample(self) -> None:
        now = self._clock()
        sig = self._progress_signature()
        if sig != self._signature or self._waiting_legitimately():
            self._signature = sig
            self._last_change = now

    def effective_stall_timeout(self) -> float:
        """The configured limit, raised to cover waits that are legitimate by construction."""
        sched = self.sched
        # A worker pausing for a retry sleeps at most --backoff-max (a longer Retry-After on a 429 shows as a
        # cool-down); a paced limiter lets one request through every 60/rpm seconds.
        limit = max(self.stall_timeout, sched.backoff_max + 1.0)
        rpm = sched.limits.rpm
        if rpm > 0:
            limit = max(limit, 2 * 60.0 / rpm)
        return limit

    def check(self) -> tuple[bool, str]:
        self.sample()
        now = self._clock()
        sched, journal = self.sched, self.journal
        if journal.error is not None:
            return False, f"journal failed: {journal.error}"
        if self.replication is not None:
            rs = self.replication()
            # Failed or fenced: the run is stopping. Unreachable: in sync mode nothing is acknowledged meanwhile,
            # so it counts as a stall once it lasts as long as one.
            if rs.state in ("failed", "fenced") or (
                    rs.state == "unreachable" and rs.durability == "sync" and rs.lag_seconds > self.stall_timeout):
                return False, rs.describe()
        waiting, since = journal.uncommitted()
        if waiting and since is not None:
            stuck = now - max(journal.last_progress, since)
            if stuck > self.writer_timeout:
                return False, (f"journal writer stuck: {waiting} record(s) waiting, nothing committed for "
                               f"{stuck:.0f}s (limit {self.writer_timeout:g}s)")
        in_flight = len(sched.inflight)
        if sched.stopping is not None:
            return True, f"stopping ({sched.stopping}); {in_flight} call(s) finishing"
        if sched.active == 0 and not sched.children:
            if sched.watch and sched.input_read:
                return True, "idle: everything known is finished; watching the input for new work"
            return True, "starting: reading the input" if not sched.input_read else "finishing"
        if sched.limits.cooling_down() or sched.limits.waiting or sched.retrying():
            return True, f"waiting: {sched.waiting_for() or 'retries after errors'} ({sched.active} task(s) waiting)"
        if self._fresh_calls():
            return True, f"running: {in_flight} call(s) in flight, {sched.queued()} queued"
        idle = now - max(self._last_change, journal.last_progress)
        limit = self.effective_stall_timeout()
        if idle > limit:
            return False, (f"no progress for {idle:.0f}s with {sched.active} task(s) waiting: no call, retry or "
                           f"commit (limit {limit:g}s)")
        return True, f"running: {sched.active} task(s) waiting on rate limits or retries"


class _Collector:
    """Reads the live objects at scrape time and yields metric families."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        view, health = self._m.view, self._m.health
        if view is None:
            return
        sched, journal, st = view.sched, view.journal, view.sched.stats
        snap = view.snapshot()

        def gauge(name: str, doc: str, value: float | None, labels: dict[str, str] | None = None) -> Metric:
            fam = GaugeMetricFamily(name, doc, labels=list(labels or {}))
            if value is not None:
                fam.add_metric(list((labels or {}).values()), value)
            return fam

        info = GaugeMetricFamily("asyncraft_info", "version and job of this process", labels=["version", "job"])
        info.add_metric([__version__, view.settings.job], 1)
        yield info
        if health is not None:
            ok, _why = health.check()
            yield gauge("asyncraft_healthy", "1 while /healthz answers 200", 1 if ok else 0)
        yield gauge("asyncraft_start_time_seconds", "unix time this process started", st.started)
        if "replication" in snap:
            rep = snap["replication"]
            yield gauge("asyncraft_replication_lag_records", "records committed locally, not yet in the object store",
                        rep["lag_records"])
            yield gauge("asyncraft_replication_lag_seconds", "age of the oldest commit not yet in the object store",
                        rep["lag_s"])
            yield gauge("asyncraft_replication_healthy", "1 while the object store takes what is shipped",
                        1 if rep["healthy"] else 0)
            yield gauge("asyncraft_replication_unreachable_since_seconds", "unix time the current store outage began",
                        rep["unreachable_since"])

        tasks = GaugeMetricFamily("asyncraft_tasks", "tasks of the state dir by state (pending once the input has "
                                  "been read to the end)", labels=["state"])
        for state in ("done", "failed", "pending", "queued", "in_flight"):
            value = snap["pending"] if state == "pending" else snap[state]
            if value is not None:
                tasks.add_metric([state], value)
        yield tasks
        yield gauge("asyncraft_input_tasks", "tasks the input holds, once read to the end", snap["total"])
        yield gauge("asyncraft_input_problems", "bad input items set aside", st.input_problems)

        stage_tasks = CounterMetricFamily("asyncraft_stage_tasks", "results committed by this process, by stage",
                                          labels=["stage", "result"])
        stage_flight = GaugeMetricFamily("asyncraft_stage_in_flight", "calls in flight by stage", labels=["stage"])
        stage_tokens = CounterMetricFamily("asyncraft_stage_tokens", "tokens used by this process, by stage",
                                           labels=["stage", "kind"])
        for name, c in view.tally.stages.items():
            for result, n in (("done", c.done), ("failed", c.failed), ("retried", c.retried)):
                stage_tasks.add_metric([name, result], n)
            stage_flight.add_metric([name], c.in_flight)
            stage_tokens.add_metric([name, "prompt"], c.prompt_tokens)
            stage_tokens.add_metric([name, "completion"], c.completion_tokens)
        yield stage_tasks
        yield stage_flight
        yield stage_tokens

        calls = CounterMetricFamily("asyncraft_calls", "call outcomes the scheduler saw, by status (ok, HTTP "
                                    "status, or error class)", labels=["status"])
        for status, n in sorted(st.calls.items()):
            calls.add_metric([status], n)
        yield calls
        yield CounterMetricFamily("asyncraft_retries", "calls retried after a transient error", value=st.retries)
        yield CounterMetricFamily("asyncraft_gave_up", "tasks left for the next run after too many retries",
                                  value=st.gave_up)
        yield CounterMetricFamily("asyncraft_cooldowns", "shared pauses after a 429 or an exhausted server limit",
                                  value=sched.limits.cooldowns)
        yield gauge("asyncraft_cooling_down", "1 while every call waits for a used-up limit to reset",
                    1 if snap["cooling_down"] else 0)
        yield gauge("asyncraft_pace_requests_per_minute", "the request rate calls are paced to: --rpm, the server's "
                    "x-ratelimit headers or learned from 429s, whichever is lowest (0 = none)", sched.limits.rpm)
        yield gauge("asyncraft_retrying", "tasks waiting for their retry delay (a Retry-After, a back-off)",
                    sched.retrying())

        pool = view.pool
        rate_limited = 0
        if pool is not None:
            ep_calls = CounterMetricFamily("asyncraft_endpoint_calls", "HTTP calls by endpoint and status, "
                                           "including the ones failed over to another endpoint",
                                           labels=["endpoint", "status"])
            ep_up = GaugeMetricFamily("asyncraft_endpoint_up", "1 unless the endpoint is backed off",
                                      labels=["endpoint"])
            ep_flight = GaugeMetricFamily("asyncraft_endpoint_in_flight", "calls in flight by endpoint",
                                          labels=["endpoint"])
            for ep in pool.describe():
                for status, n in sorted(ep["calls"].items()):
                    ep_calls.add_metric([ep["endpoint"], status], n)
                    if status == "429":
                        rate_limited += n
                ep_up.add_metric([ep["endpoint"]], 1 if ep["up"] else 0)
                ep_flight.add_metric([ep["endpoint"]], ep["in_flight"])
            yield ep_calls
            yield ep_up
            yield ep_flight
        else:
            rate_limited = st.calls.get("429", 0)
        yield CounterMetricFamily("asyncraft_rate_limited", "429 answers received (all endpoints)",
                                  value=rate_limited)

        tokens = CounterMetricFamily("asyncraft_tokens", "tokens used by the state dir (all runs)", labels=["kind"])
        tokens.add_metric(["prompt"], snap["prompt_tokens"])
        tokens.add_metric(["completion"], snap["completion_tokens"])
        yield tokens
        if snap["cost"] is not None:
            yield CounterMetricFamily("asyncraft_cost", "estimated cost of the state dir (all runs), in the "
                                      "currency of ASYNCRAFT_PRICE_*_PER_M", value=snap["cost"])
            yield gauge("asyncraft_cost_projected", "estimated cost when every known task is finished",
                        snap["cost_projected"])
        if sched.budget.max_cost:
            yield gauge("asyncraft_cost_cap", "ASYNCRAFT_MAX_COST", sched.budget.max_cost)
        if sched.budget.max_tokens:
            yield gauge("asyncraft_tokens_cap", "ASYNCRAFT_MAX_TOKENS_TOTAL", sched.budget.max_tokens)

        yield gauge("asyncraft_queue_depth", "tasks queued for a worker", sched.queued())
        yield gauge("asyncraft_in_flight", "API calls in flight", len(sched.inflight))
        yield gauge("asyncraft_journal_queue_depth", "records waiting for the journal writer", journal.queue_depth())
        yield gauge("asyncraft_journal_uncommitted", "records handed to the writer and not yet on disk "
                    "(queued or in the commit under way)", journal.uncommitted()[0])
        yield CounterMetricFamily("asyncraft_journal_bytes", "bytes appended to the journal by this process",
                                  value=journal.bytes_written)
        yield CounterMetricFamily("asyncraft_journal_commits", "group commits (one write + one fsync each)",
                                  value=journal.commits)
        yield gauge("asyncraft_journal_seq", "sequence number of the last committed record", journal.next_seq - 1)
        yield gauge("asyncraft_journal_fsync_seconds", "duration of the last journal fsync",
                    journal.last_fsync_seconds)
        yield gauge("asyncraft_journal_last_commit_age_seconds", "seconds since the writer last committed",
                    max(0.0, time.monotonic() - journal.last_progress))
        yield gauge("asyncraft_last_snapshot_age_seconds", "seconds since the last snapshot (or since start)",
                    max(0.0, time.time() - journal.last_snapshot))


class Metrics:
    """The registry, the latency histogram, and the HTTP server. Constructors do no I/O."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = Histogram("asyncraft_call_latency_seconds", "duration of answered API calls",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(self))
        self.view: RunView | None = None
        self.health: HealthMonitor | None = None
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None
        self.url = ""

    def observe_call(self, endpoint: str, outcome: str, seconds: float) -> None:
        if outcome == "ok":
            self.latency.labels(endpoint).observe(seconds)

    def watch(self, view: RunView, health: HealthMonitor) -> None:
        self.view = view
        self.health = health

    async def start(self, host: str, port: int) -> str:
        """Listen on host:port (0 = any free port); returns the base URL."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._index)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"ASYNCRAFT_METRICS_PORT: cannot listen on {host}:{port}: {exc.strerror}") from None
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or ()
        bound = sockets[0].getsockname()[1] if sockets else port
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.url = f"http://{shown}:{bound}"
        if self.health is not None:
            self._sampler = asyncio.create_task(self._sample(self.health), name="health-sampler")
        return self.url

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @staticmethod
    async def _sample(health: HealthMonitor) -> None:
        while True:
            health.sample()
            await asyncio.sleep(SAMPLE_EVERY)

    async def _healthz(self, request: web.Request) -> web.Response:
        if self.health is None:
            return web.json_response({"status": "ok", "reason": "no run attached"})
        ok, reason = self.health.check()
        body = orjson.dumps({"status": "ok" if ok else "unhealthy", "reason": reason})
        return web.Response(status=200 if ok else 503, body=body, content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(text="asyncraft: /metrics (Prometheus), /healthz\n")


# -- the container's health check -------------------------------------------------------------------


def check(argv: list[str] | None = None) -> int:
    """Ask /healthz of the run in this container (ASYNCRAFT_METRICS_HOST/PORT); 0 if healthy."""
    from asyncraft import config

    try:
        settings = config.load("healthcheck", {})
    except ConfigError as exc:
        print(f"asyncraft: error: {exc}", file=sys.stderr)
        return 1
    if settings.metrics_port is None or settings.metrics_port == 0:
        print("asyncraft: ASYNCRAFT_METRICS_PORT is not set to a fixed port; nothing to check", file=sys.stderr)
        return 1
    host = settings.metrics_host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    url = f"http://{host}:{settings.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            print(resp.read().decode("utf-8", "replace"))
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode("utf-8", "replace"))
        return 1
    except OSError as exc:
        print(f"asyncraft: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    args = sys.argv[1:]
    if args != ["check"]:
        print("usage: python -m asyncraft.metrics check", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(check(args))
