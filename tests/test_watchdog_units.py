"""The health watchdog (``/healthz``) on a fake clock, over stand-ins for the scheduler and the journal: a
wedged writer and a run that stopped moving are unhealthy; waits that are legitimate (a cool-down after
429s, retries, calls in flight, a paced limiter) are not. Microseconds each; the real process is checked by
the slow tests of tests/test_metrics.py."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from asyncraft.metrics import HealthMonitor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Limits:
    clock: Clock
    rpm: float = 0.0
    cooldowns: int = 0
    waiting: int = 0
    cool_until: float = 0.0

    def cooling_down(self) -> bool:
        return self.cool_until > self.clock()


@dataclass
class Stats:
    calls: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    input_problems: int = 0


@dataclass
class Sched:
    limits: Limits
    stats: Stats = field(default_factory=Stats)
    active: int = 10
    inflight: dict[Any, Any] = field(default_factory=dict)
    children: list[Any] = field(default_factory=list)
    input_total: int | None = 10
    input_read: bool = True
    scans: int = 1
    stopping: str | None = None
    watch: bool = False
    backoff_max: float = 0.0
    retrying_now: int = 0

    def queued(self) -> int:
        return self.active - len(self.inflight)

    def retrying(self) -> int:
        return self.retrying_now

    def waiting_for(self) -> str | None:
        return "a cool-down after 429s" if self.limits.cooling_down() else None


@dataclass
class Journal:
    clock: Clock
    commits: int = 0
    error: BaseException | None = None
    waiting: int = 0
    waiting_since: float | None = None
    last_progress: float = 0.0

    def uncommitted(self) -> tuple[int, float | None]:
        return self.waiting, self.waiting_since

    def commit(self) -> None:
        self.commits += 1
        self.waiting, self.waiting_since = 0, None
        self.last_progress = self.clock()


def monitor(*, writer_timeout: float = 5.0, stall_timeout: float = 10.0) -> tuple[HealthMonitor, Sched, Journal, Clock]:
    clock = Clock()
    sched, journal = Sched(Limits(clock)), Journal(clock, last_progress=clock())
    mon = HealthMonitor(sched, journal, writer_timeout=writer_timeout,  # type: ignore[arg-type]
                        stall_timeout=stall_timeout, clock=clock)
    return mon, sched, journal, clock


def test_a_writer_holding_records_without_committing_is_unhealthy_after_its_timeout() -> None:
    mon, sched, journal, clock = monitor(writer_timeout=5.0)
    sched.inflight = {object(): object()}  # calls go on being answered: only the writer is stuck
    journal.waiting, journal.waiting_since = 3, clock()
    clock.now += 4.9
    assert mon.check()[0]
    clock.now += 0.2
    healthy, reason = mon.check()
    assert not healthy and "journal writer stuck: 3 record(s) waiting" in reason
    journal.commit()
    assert mon.check()[0]


def test_a_run_that_stops_moving_is_unhealthy_once_the_stall_limit_has_passed() -> None:
    mon, sched, journal, clock = monitor(stall_timeout=10.0)
    for _ in range(10):  # a second at a time, as the metrics server samples
        clock.now += 1.0
        mon.sample()
    clock.now += 0.5
    assert mon.check()[0]
    clock.now += 0.6
    healthy, reason = mon.check()
    assert not healthy and "no progress for 10s with 10 task(s) waiting" in reason
    sched.stats.calls["ok"] += 1  # any counter that moves is a sign of life
    assert mon.check()[0]


def test_legitimate_waits_never_count_as_a_stall() -> None:
    mon, sched, journal, clock = monitor(stall_timeout=1.0)
    limits = sched.limits
    limits.cool_until = clock() + 60  # a 429 said: come back in a minute
    for _ in range(50):
        clock.now += 1.0
        healthy, reason = mon.check()
        assert healthy and reason.startswith("waiting"), reason
    limits.cool_until = clock()
    clock.now += 0.5
    assert mon.check()[0]  # the cool-down ended half a second ago: not a stall of 50 s
    sched.inflight = {object(): object()}  # a slow call: its own timeouts end it if it hangs
    clock.now += 100.0
    assert mon.check() == (True, "running: 1 call(s) in flight, 9 queued")
    sched.inflight = {}
    clock.now += 0.5
    assert mon.check()[0]  # the wait just ended: the stall clock starts now
    clock.now += 1.1
    assert not mon.check()[0]


def test_the_stall_limit_covers_the_longest_back_off_and_a_paced_limiter() -> None:
    mon, sched, _journal, _clock = monitor(stall_timeout=1.0)
    sched.backoff_max = 30.0
    assert mon.effective_stall_timeout() == 31.0
    sched.limits.rpm = 1.0  # one request a minute: two intervals may pass between calls
    assert mon.effective_stall_timeout() == 120.0


def test_a_stopping_or_idle_run_is_healthy() -> None:
    mon, sched, _journal, clock = monitor(stall_timeout=1.0)
    sched.active = 0
    clock.now += 100.0
    assert mon.check() == (True, "finishing")
    sched.watch = True
    assert mon.check()[1].startswith("idle")
    sched.active, sched.stopping = 5, "SIGTERM"
    assert mon.check()[0] and mon.check()[1].startswith("stopping")
