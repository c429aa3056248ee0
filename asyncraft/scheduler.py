"""The scheduler: a lazy feeder, a bounded queue, N worker coroutines and a watchdog.

The feeder reads the job's input on a thread in small batches (a million-line file is never held
in memory), skips tasks that are done, and fills a bounded queue; children of finished tasks go
first. Each worker takes a task, waits for the rate limits, makes the call under a heartbeat that
the watchdog checks, and hands the result to the journal; the task counts as done when the journal
reports the record on disk.

This is the hot path of a run against a fast server, so it avoids per-call allocations that asyncio
would otherwise make: each worker owns one reusable call slot, the watchdog ends a call by
cancelling the worker instead of arming a timer per call, and the journal reports durability
through a callback instead of a future per record.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from asyncraft.cost import Budget
from asyncraft.errors import JournalError, ProviderError, ProviderTimeout, RateLimited
from asyncraft.jobs.base import InputProblem, Job, Outcome, Task
from asyncraft.journal import Journal
from asyncraft.limits import Limits, estimate_request_tokens
from asyncraft.progress import StageTally
from asyncraft.provider import Completion
from asyncraft.records import content_id, id_key, scrub
from asyncraft.retry import Action, backoff, classify
from asyncraft.storage.recover import Recovery

log = logging.getLogger("asyncraft")

FEED_BATCH = 512


class _Interrupted(Exception):
    """A call was cancelled because the grace period after a stop signal ran out."""


class _Slot:
    """One worker's call in flight and its record on the way to disk, reused for every task.

    The watchdog ends a call by setting ``ending`` and cancelling the worker's task; the worker turns
    that cancellation into a timeout (or an interruption) of this call. That is what
    ``asyncio.timeout`` does, without a timer and a context manager per call."""

    __slots__ = ("index", "worker", "started", "last_beat", "ending", "beat", "pending", "ack_waiter",
                 "on_durable", "clock")

    def __init__(self, index: int, loop: asyncio.AbstractEventLoop) -> None:
        self.index = index
        self.worker: asyncio.Task[None] | None = None
        self.started = 0.0
        self.last_beat = 0.0
        self.ending: str | None = None  # set by the watchdog: "stalled", "timeout" or "interrupted"
        self.clock = loop.time
        self.beat: Callable[[], None] = self._beat  # bound once: the provider calls it twice per call
        # The record this worker handed to the journal and that is not on disk yet (at most one).
        self.pending: tuple[Task, Outcome] | None = None
        self.ack_waiter: asyncio.Future[None] | None = None
        self.on_durable: Callable[[asyncio.Future[None]], None] = _nothing

    def _beat(self) -> None:
        self.last_beat = self.clock()

    def end(self, why: str) -> None:
        """End the call in flight (from the watchdog or a stop): the worker sees ``why``."""
        if self.ending is None and self.worker is not None:
            self.ending = why
            self.worker.cancel()


def _nothing(_fut: asyncio.Future[None]) -> None:
    return None


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    done: int = 0  # this run
    failed: int = 0
    attempts: int = 0  # paid answers the job rejected and retried
    calls: Counter[str] = field(default_factory=Counter)  # by outcome: ok, 429, 5xx, timeout, ...
    retries: int = 0
    gave_up: int = 0  # transient failures past max_retries: left for the next run
    input_problems: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Scheduler:
    def __init__(self, job: Job, journal: Journal, call: Callable[[Task, Callable[[], None]], Awaitable[Completion]],
                 limits: Limits, recovered: Recovery, *, concurrency: int, stall_timeout: float,
                 max_retries: int, backoff_base: float, backoff_max: float, output_estimate: int,
                 request_timeout: float | None = None, retry_failed: bool = False, api_key: str | None = None,
                 on_problem: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
                 budget: Budget | None = None, watch: bool = False, watch_interval: float = 10.0,
                 tally: StageTally | None = None) -> None:
        self.job = job
        self.journal = journal
        self._call_api = call
        self.limits = limits
        self.done = recovered.done
        self.failed = recovered.failed if not retry_failed else set()
        self._input_errors = recovered.input_errors
        self._attempts = recovered.attempts
        self.concurrency = concurrency
        self.stall_timeout = stall_timeout
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.output_estimate = output_estimate
        self._key = api_key
        self._on_problem = on_problem
        self.tally = tally if tally is not None else StageTally()
        # The task queue: a deque the feeder fills and idle workers wait on. The feeder refills it in
        # bursts: when it is full, it waits until it is half empty instead of being woken for each task.
        self._ready: deque[Task] = deque()
        self._max_ready = max(concurrency, 256)
        self._low_water = self._max_ready // 2
        self._idle: deque[asyncio.Future[None]] = deque()  # workers waiting for a task
        self._no_more = False  # set when workers should exit once the queue is empty
        self._room = asyncio.Event()
        self._room.set()
        self.children: deque[Task] = deque(job.recovered_children(self.done, self.failed))
        self._queued: set[int] = set()
        self.active = 0
        self.inflight: dict[int, _Slot] = {}  # worker index -> its call in flight
        self._wake = asyncio.Event()
        self.stopping: str | None = None  # why we stop early, if we do
        self.fatal: BaseException | None = None
        self.input_total: int | None = None
        self.input_read = False
        self.stats = Stats()
        self._rng = random.Random()
        self._finished = asyncio.Event()
        self._stop_event = asyncio.Event()
        self._limit_waiters: set[asyncio.Task[Any]] = set()
        self.budget = budget or Budget()
        self._job_limit: Callable[[], str | None] | None = getattr(job, "limit_reached", None)
        self._job_call_failed: Callable[[Task, ProviderError], Task | None] | None = getattr(job, "call_failed", None)
        self._job_refresh: Callable[[Task], Task] | None = getattr(job, "refresh", None)
        self._has_limits = self.budget.capped or self._job_limit is not None
        # Tokens of earlier runs of this state dir: the caps count the whole state dir.
        self.tokens_before = (int(recovered.counters.get("prompt_tokens", 0)),
                              int(recovered.counters.get("completion_tokens", 0)))
        self.watch = watch
        self.watch_interval = watch_interval
        self.scans = 0  # completed passes over the input (more than one only in watch mode)

    # -- control -----------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        if self.stopping is None:
            self.stopping = reason
            log.warning("stopping: %s", reason)
        self._stop_event.set()
        self._wake.set()
        self._room.set()
        # Workers still waiting for the rate limiter have not called anyone yet: end them now.
        for waiter in list(self._limit_waiters):
            waiter.cancel()
        # Tasks still queued are not started; they run on the next start.
        while self._ready:
            self._release(self._ready.popleft())
        self._stop_workers()

    def interrupt_inflight(self) -> None:
        """Grace is over: cancel calls still in flight (they were not journaled; they will be redone)."""
        for slot in list(self.inflight.values()):
            slot.end("interrupted")

    def fatal_error(self, exc: BaseException) -> None:
        if self.fatal is None:
            self.fatal = exc
        self.request_stop(str(exc))

    @property
    def complete(self) -> bool:
        return self.input_read and self.active == 0 and not self.children and self.stopping is None

    def queued(self) -> int:
        """Tasks waiting for a worker."""
        return len(self._ready)

    # -- main --------------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            watchdog = tg.create_task(self._watchdog(), name="watchdog")
            workers = []
            for i in range(self.concurrency):
                slot = _Slot(i, loop)
                slot.on_durable = functools.partial(self._durable, slot)
                slot.worker = tg.create_task(self._worker(slot), name=f"worker-{i}")
                workers.append(slot.worker)
            feeder = tg.create_task(self._feed(), name="feeder")
            await asyncio.wait([feeder, *workers])
            self._finished.set()
            watchdog.cancel()

    def tokens_used(self) -> tuple[int, int]:
        """(prompt, completion) tokens of the whole state dir so far."""
        return (self.tokens_before[0] + self.stats.prompt_tokens,
                self.tokens_before[1] + self.stats.completion_tokens)

    def _check_limits(self) -> bool:
        """Stop the run (resumable) when a spending cap or a job limit is reached; True if stopping."""
        if not self._has_limits:
            return self.stopping is not None
        reason = self.budget.exceeded(*self.tokens_used())
        if reason is None and self._job_limit is not None:
            reason = self._job_limit()
        if reason is not None:
            self.request_stop(reason)
            return True
        return self.stopping is not None

    async def _feed(self) -> None:
        roots = self.job.roots()
        lines_ok = 0
        exhausted = False
        while self.stopping is None:
            while self.children and self.stopping is None:
                await self._enqueue(self.children.popleft())
            if not exhausted:
                batch = await asyncio.to_thread(_take, roots, FEED_BATCH)
                if not batch:
                    exhausted = True
                    await self._input_finished(lines_ok)
                    continue
                for item in batch:
                    if self.stopping is not None:
                        break
                    if isinstance(item, InputProblem):
                        await self._record_problem(item)
                    else:
                        lines_ok += 1
                        await self._enqueue(item)
                continue
            if self.active == 0 and not self.children:
                if not self.watch:
                    break
                # Watch mode: everything known is finished; look at the input again after a while.
                await self._pause(self.watch_interval)
                if self.stopping is None:
                    roots, lines_ok, exhausted = self.job.roots(), 0, False
                continue
            self._wake.clear()
            if self.active == 0 and not self.children:
                continue
            await self._wake.wait()
        self._stop_workers()

    def _stop_workers(self) -> None:
        """Workers exit once the queue is empty."""
        self._no_more = True
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def _input_finished(self, lines_ok: int) -> None:
        self.input_read = True
        self.scans += 1
        # Every unique task of the input is now done, failed, or queued/in flight.
        total = len(self.done) + len(self.failed) + self.active
        if total == self.input_total and self.scans > 1:
            return  # a watch-mode rescan that found nothing new: nothing to journal
        self.input_total = total
        await self.journal.append({"k": "input", "total": self.input_total, "task_lines": lines_ok,
                                   "problems": self.stats.input_problems, "t": time.time()})

    async def _enqueue(self, task: Task) -> None:
        key = id_key(task.id)
        if key in self.done or key in self.failed or key in self._queued:
            return
        if len(self._ready) >= self._max_ready:
            self._room.clear()
            await self._room.wait()
            if self.stopping is not None:
                return  # not started: it runs on the next start
        if task.attempt == 0 and self._attempts.get(key):
            task = self._resume_attempts(task, self._attempts[key])
        self._queued.add(key)
        self.active += 1
        self._ready.append(task)
        while self._idle:  # wake one idle worker
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def _next_task(self) -> Task | None:
        """The next queued task, or None when the worker should exit."""
        ready = self._ready
        while not ready:
            if self._no_more:
                return None
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            await waiter
        if not self._room.is_set() and len(ready) <= self._low_water:
            self._room.set()
        return ready.popleft()

    def _resume_attempts(self, task: Task, paid: int) -> Task:
        # The job may vary the request per attempt; ask it for the next one after those already paid.
        retry = getattr(self.job, "retry_task", None)
        return retry(task, paid) if retry is not None else task

    def _release(self, task: Task) -> None:
        self._queued.discard(id_key(task.id))
        self.active -= 1
        if self.active == 0 or self.children:
            self._wake.set()

    async def _record_problem(self, problem: InputProblem) -> None:
        self.stats.input_problems += 1
        pid = content_id("ierr", problem.key)
        key = id_key(pid)
        if key in self._input_errors:
            return
        self._input_errors.add(key)
        log.warning("input problem: %s", problem.message)
        await self._append_problem({"k": "ierr", "id": pid, "key": problem.key, "msg": problem.message,
                                    **problem.detail})

    # -- workers -----------------------------------------------------------------------------------

    async def _worker(self, slot: _Slot) -> None:
        """Take tasks and make their calls. A finished task's record goes to the writer without
        waiting: the worker starts its next call while the record is being committed, and the
        task counts as done only once the journal reports it on disk (``_durable``). Before handing
        in another record it waits for its previous one, so each worker has at most one record not
        yet on disk and a crash repeats at most two calls per worker: the one waiting for the server
        and the one waiting for the disk."""
        try:
            while True:
                task = await self._next_task()
                if task is None:
                    return
                handed_over = False
                try:
                    if self.stopping is None:
                        handed_over = await self._process(slot, task)
                except _Interrupted:
                    pass
                except JournalError as exc:
                    self.fatal_error(exc)
                finally:
                    if not handed_over:
                        self._release(task)
        finally:
            if slot.pending is not None:
                # Shutting down: our last record must be settled before the writer closes.
                await self._wait_durable(slot)

    async def _wait_durable(self, slot: _Slot) -> None:
        while slot.pending is not None:
            waiter = slot.ack_waiter = asyncio.get_running_loop().create_future()
            await waiter

    def _durable(self, slot: _Slot, fut: asyncio.Future[None]) -> None:
        """The journal's report on the record ``slot`` handed in: on disk, or lost with the writer.
        Only now is the task done. Runs as a callback of the record's future, in the event loop."""
        assert slot.pending is not None
        error = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
        task, outcome = slot.pending
        slot.pending = None
        try:
            if error is None:
                self.done.add(id_key(task.id))
                self.stats.done += 1
                if outcome.children:
                    self.children.extend(outcome.children)
                    self._wake.set()
                self._check_limits()
        finally:
            self._release(task)
            waiter, slot.ack_waiter = slot.ack_waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def _process(self, slot: _Slot, task: Task) -> bool:
        """Make the calls of one task. True when its record is handed to the journal (the task is
        settled in ``_durable``), False when the task is settled already."""
        attempt = 0
        limits = self.limits
        while self.stopping is None:
            if self._check_limits():
                return False
            if self._job_refresh is not None:
                task = self._job_refresh(task)  # what the job learned since it made the task (e.g. a form)
            estimate = estimate_request_tokens(task.body, self.output_estimate) if limits.counts_tokens else 0
            if not limits.free():
                me = asyncio.current_task()
                assert me is not None
                self._limit_waiters.add(me)
                try:
                    await limits.acquire(estimate)
                finally:
                    self._limit_waiters.discard(me)
                if self.stopping is not None:
                    return False
            try:
                completion = await self._call(slot, task)
            except ProviderError as exc:
                self.stats.calls[_outcome_name(exc)] += 1
                instead = self._job_call_failed(task, exc) if self._job_call_failed is not None else None
                if instead is not None:
                    # The job asks again in a form this server takes; the refused request is not recorded.
                    self.children.append(instead)
                    self._wake.set()
                    return False
                action = classify(exc)
                if action is Action.FATAL:
                    self.fatal_error(exc)
                    return False
                if action is Action.FAIL_TASK:
                    await self._record_fail(task, exc)
                    return False
                attempt += 1
                if isinstance(exc, RateLimited):
                    limits.cooldown(exc.retry_after if exc.retry_after is not None else
                                    backoff(attempt, base=self.backoff_base, cap=self.backoff_max, rng=self._rng))
                if attempt > self.max_retries:
                    self.stats.gave_up += 1
                    log.warning("giving up on %s for this run after %d tries: %s", task.id[:12], attempt, exc)
                    return False
                self.stats.retries += 1
                delay = backoff(attempt, base=self.backoff_base, cap=self.backoff_max,
                                retry_after=exc.retry_after, rng=self._rng)
                await self._pause(delay)
                continue
            stats = self.stats
            stats.calls["ok"] += 1
            usage = completion.usage
            actual = 0
            if usage is not None:
                prompt, completed = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
                stats.prompt_tokens += prompt
                stats.completion_tokens += completed
                actual = prompt + completed
            outcome = self.job.handle(task, completion)
            if limits.counts_tokens and actual > estimate:
                await limits.correct(estimate, actual)
            if outcome.retry is None and outcome.fail is None:
                if slot.pending is not None:
                    await self._wait_durable(slot)  # at most one record per worker on its way to disk
                slot.pending = (task, outcome)
                try:
                    durable = self.journal.submit({"k": "done", "id": task.id, "stage": task.stage, **task.meta,
                                                   **(outcome.result or {}), "usage": usage})
                except BaseException:
                    slot.pending = None
                    raise
                durable.add_done_callback(slot.on_durable)
                return True
            nxt = await self._record(task, completion, outcome)
            self._check_limits()
            if nxt is None:
                return False
            task = nxt
            attempt = 0
        return False

    async def _pause(self, delay: float) -> None:
        """Sleep for a retry, but wake at once if the run is stopping."""
        try:
            await asyncio.wait_for(self._stop_event.wait(), delay)
        except TimeoutError:
            pass

    async def _call(self, slot: _Slot, task: Task) -> Completion:
        """One API call under the watchdog, counted per stage."""
        worker = slot.worker
        assert worker is not None
        slot.started = slot.last_beat = slot.clock()
        counts = self.tally.stage(task.stage)
        counts.in_flight += 1
        cancelling = worker.cancelling()
        self.inflight[slot.index] = slot
        try:
            result = await self._call_api(task, slot.beat)
        except asyncio.CancelledError:
            why, slot.ending = slot.ending, None
            # Ours only if the watchdog ended it and nobody else cancelled the worker meanwhile.
            if why is None or worker.uncancel() > cancelling:
                raise
            if why == "interrupted":
                raise _Interrupted() from None
            if why == "timeout":
                raise ProviderTimeout(f"no complete answer within ASYNCRAFT_REQUEST_TIMEOUT="
                                      f"{self.request_timeout:g}s (watchdog)") from None
            raise ProviderTimeout(f"call stalled: no progress for {self.stall_timeout:g}s (watchdog)") from None
        finally:
            del self.inflight[slot.index]
            counts.in_flight -= 1
            if slot.ending is not None:
                # Ended, but the call swallowed the cancellation and finished: take the request back.
                slot.ending = None
                worker.uncancel()
        counts.calls += 1
        usage = result.usage
        if usage is not None:
            counts.prompt_tokens += usage.get("prompt_tokens", 0)
            counts.completion_tokens += usage.get("completion_tokens", 0)
        return result

    async def _watchdog(self) -> None:
        """Ends calls whose heartbeat stopped for ``stall_timeout``, and calls older than ``request_timeout``."""
        loop = asyncio.get_running_loop()
        limit = min(self.stall_timeout, self.request_timeout or self.stall_timeout)
        interval = max(0.02, min(1.0, limit / 4))
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            stalled = now - self.stall_timeout
            too_old = now - self.request_timeout if self.request_timeout else None
            for slot in list(self.inflight.values()):
                if slot.last_beat < stalled:
                    slot.end("stalled")
                elif too_old is not None and slot.started < too_old:
                    slot.end("timeout")

    # -- recording ---------------------------------------------------------------------------------

    async def _record(self, task: Task, completion: Completion, outcome: Outcome) -> Task | None:
        """Record a paid answer the job rejected: a retry (returns the next attempt) or a failure."""
        usage = completion.usage
        base = {"id": task.id, "stage": task.stage, **task.meta}
        if outcome.retry is not None:
            self.stats.attempts += 1
            await self.journal.append({"k": "attempt", **base, "n": task.attempt + 1, "why": outcome.retry_reason,
                                       "message": completion.message, "usage": usage})
            return outcome.retry
        if outcome.fail is not None:
            await self._append_problem({"k": "fail", **base, "error": {"type": "job", "message": outcome.fail},
                                        "message": completion.message, "usage": usage})
            self.failed.add(id_key(task.id))
            self.stats.failed += 1
        return None

    async def _append_problem(self, rec: dict[str, Any]) -> None:
        await self.journal.append(rec)
        if self._on_problem is not None:
            await self._on_problem(rec)

    async def _record_fail(self, task: Task, exc: ProviderError) -> None:
        error = {"type": type(exc).__name__, "status": exc.status, "code": exc.code,
                 "message": scrub(str(exc), self._key)}
        await self._append_problem({"k": "fail", "id": task.id, "stage": task.stage, **task.meta, "error": error})
        self.failed.add(id_key(task.id))
        self.stats.failed += 1


def _take(it: Iterator[Any], n: int) -> list[Any]:
    out = []
    for item in it:
        out.append(item)
        if len(out) >= n:
            break
    return out


def _outcome_name(exc: ProviderError) -> str:
    if exc.status:
        return str(exc.status)
    return type(exc).__name__
