"""The scheduler: a lazy feeder, a bounded queue, N worker coroutines and a watchdog.

The feeder reads the job's input on a thread in small batches (a million-line file is never held
in memory), skips tasks that are done, and fills a bounded queue; children of finished tasks go
first. Each worker takes a task, waits for the rate limits, makes the call under a heartbeat that
the watchdog checks, hands the result to the journal and waits for it to be on disk.
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
from asyncraft.provider import Completion
from asyncraft.records import content_id, id_key, scrub
from asyncraft.retry import Action, backoff, classify
from asyncraft.store import Recovered

log = logging.getLogger("asyncraft")

FEED_BATCH = 512


class _Interrupted(Exception):
    """A call was cancelled because the grace period after a stop signal ran out."""


@dataclass(slots=True, eq=False)
class _Call:
    """One API call in flight. The watchdog ends it by expiring its timeout, which makes asyncio
    cancel the call inside the worker and raise TimeoutError there: no extra task per call."""

    task_id: str
    started: float
    last_beat: float
    timeout: asyncio.Timeout | None = None
    stalled: bool = False
    interrupted: bool = False

    def end_now(self) -> None:
        if self.timeout is not None and not self.timeout.expired():
            self.timeout.reschedule(asyncio.get_running_loop().time())


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
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=2048))


class Scheduler:
    def __init__(self, job: Job, journal: Journal, call: Callable[[Task, Callable[[], None]], Any],
                 limits: Limits, recovered: Recovered, *, concurrency: int, stall_timeout: float,
                 max_retries: int, backoff_base: float, backoff_max: float, output_estimate: int,
                 retry_failed: bool = False, api_key: str | None = None,
                 on_problem: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
                 budget: Budget | None = None, watch: bool = False, watch_interval: float = 10.0) -> None:
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
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.output_estimate = output_estimate
        self._key = api_key
        self._on_problem = on_problem
        self.queue: asyncio.Queue[Task | None] = asyncio.Queue(maxsize=max(concurrency, 256))
        # The feeder refills the queue in bursts: it waits for room until the queue is half empty,
        # instead of being woken to put one task each time a worker takes one.
        self._room = asyncio.Event()
        self._room.set()
        self._low_water = self.queue.maxsize // 2
        self.children: deque[Task] = deque(job.recovered_children(self.done, self.failed))
        self._queued: set[int] = set()
        self.active = 0
        self.inflight: dict[int, _Call] = {}
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
        while not self.queue.empty():
            task = self.queue.get_nowait()
            if task is not None:
                self._release(task)
        for _ in range(self.concurrency):
            try:
                self.queue.put_nowait(None)
            except asyncio.QueueFull:
                break

    def interrupt_inflight(self) -> None:
        """Grace is over: cancel calls still in flight (they were not journaled; they will be redone)."""
        for call in list(self.inflight.values()):
            call.interrupted = True
            call.end_now()

    def fatal_error(self, exc: BaseException) -> None:
        if self.fatal is None:
            self.fatal = exc
        self.request_stop(str(exc))

    @property
    def complete(self) -> bool:
        return self.input_read and self.active == 0 and not self.children and self.stopping is None

    # -- main --------------------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            watchdog = tg.create_task(self._watchdog(), name="watchdog")
            workers = [tg.create_task(self._worker(), name=f"worker-{i}") for i in range(self.concurrency)]
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
        self.request_stop_workers()

    def request_stop_workers(self) -> None:
        for _ in range(self.concurrency):
            try:
                self.queue.put_nowait(None)
            except asyncio.QueueFull:
                break

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
        if self.queue.full():
            self._room.clear()
            await self._room.wait()
            if self.stopping is not None:
                return  # not started: it runs on the next start
        if task.attempt == 0 and self._attempts.get(key):
            task = self._resume_attempts(task, self._attempts[key])
        self._queued.add(key)
        self.active += 1
        self.queue.put_nowait(task)

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

    async def _worker(self) -> None:
        """Take tasks and make their calls. A finished task's record goes to the writer without
        waiting: the worker starts its next call while the record is being committed, and the
        task counts as done only in the acknowledgement (``_settle``). Before handing in another
        record it waits for its previous one, so each worker has at most one record not yet on
        disk and a crash repeats at most two calls per worker: the one waiting for the server and
        the one waiting for the disk."""
        unacked: asyncio.Future[int] | None = None
        try:
            while True:
                task = await self.queue.get()
                if not self._room.is_set() and self.queue.qsize() <= self._low_water:
                    self._room.set()
                if task is None:
                    return
                ack: asyncio.Future[int] | None = None
                try:
                    if self.stopping is None:
                        ack = await self._process(task, unacked)
                        if ack is not None:
                            unacked = ack
                except _Interrupted:
                    pass
                except JournalError as exc:
                    self.fatal_error(exc)
                finally:
                    if ack is None:
                        self._release(task)
        finally:
            if unacked is not None and not unacked.done():
                # Shutting down: our last record must be settled before the writer closes.
                await asyncio.wait([unacked])

    def _settle(self, task: Task, outcome: Outcome, ack: asyncio.Future[int]) -> None:
        """The record of ``task`` is on disk (or the writer failed): only now is the task done."""
        try:
            if not ack.cancelled() and ack.exception() is None:
                self.done.add(id_key(task.id))
                self.stats.done += 1
                if outcome.children:
                    self.children.extend(outcome.children)
                    self._wake.set()
                self._check_limits()
        finally:
            self._release(task)

    async def _process(self, task: Task, unacked: asyncio.Future[int] | None) -> asyncio.Future[int] | None:
        """Make the calls of one task. Returns the acknowledgement of its record while that is on
        its way to disk, or None when the task is settled already."""
        attempt = 0
        while self.stopping is None:
            if self._check_limits():
                return None
            estimate = estimate_request_tokens(task.body, self.output_estimate) if self.limits.counts_tokens else 0
            if not self.limits.free():
                me = asyncio.current_task()
                assert me is not None
                self._limit_waiters.add(me)
                try:
                    await self.limits.acquire(estimate)
                finally:
                    self._limit_waiters.discard(me)
                if self.stopping is not None:
                    return None
            try:
                completion = await self._call(task)
            except ProviderError as exc:
                self.stats.calls[_outcome_name(exc)] += 1
                action = classify(exc)
                if action is Action.FATAL:
                    self.fatal_error(exc)
                    return None
                if action is Action.FAIL_TASK:
                    await self._record_fail(task, exc)
                    return None
                attempt += 1
                if isinstance(exc, RateLimited):
                    self.limits.cooldown(exc.retry_after if exc.retry_after is not None else
                                         backoff(attempt, base=self.backoff_base, cap=self.backoff_max,
                                                 rng=self._rng))
                if attempt > self.max_retries:
                    self.stats.gave_up += 1
                    log.warning("giving up on %s for this run after %d tries: %s", task.id[:12], attempt, exc)
                    return None
                self.stats.retries += 1
                delay = backoff(attempt, base=self.backoff_base, cap=self.backoff_max,
                                retry_after=exc.retry_after, rng=self._rng)
                await self._pause(delay)
                continue
            self.stats.calls["ok"] += 1
            usage = completion.usage or {}
            actual = int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
            self.stats.prompt_tokens += int(usage.get("prompt_tokens", 0))
            self.stats.completion_tokens += int(usage.get("completion_tokens", 0))
            outcome = self.job.handle(task, completion)
            if self.limits.counts_tokens and actual > estimate:
                await self.limits.correct(estimate, actual)
            if outcome.retry is None and outcome.fail is None:
                if unacked is not None and not unacked.done():
                    await asyncio.shield(unacked)  # at most one record per worker on its way to disk
                ack = self.journal.submit({"k": "done", "id": task.id, "stage": task.stage, **task.meta,
                                           **(outcome.result or {}), "usage": completion.usage})
                ack.add_done_callback(functools.partial(self._settle, task, outcome))
                return ack
            nxt = await self._record(task, completion, outcome)
            self._check_limits()
            if nxt is None:
                return None
            task = nxt
            attempt = 0
        return None

    async def _pause(self, delay: float) -> None:
        """Sleep for a retry, but wake at once if the run is stopping."""
        try:
            await asyncio.wait_for(self._stop_event.wait(), delay)
        except TimeoutError:
            pass

    async def _call(self, task: Task) -> Completion:
        loop = asyncio.get_running_loop()
        now = loop.time()
        call = _Call(task.id, now, now)

        def beat() -> None:
            call.last_beat = loop.time()

        key = id(call)
        self.inflight[key] = call
        try:
            async with asyncio.timeout(None) as timeout:
                call.timeout = timeout
                result: Completion = await self._call_api(task, beat)
        except TimeoutError:
            # The provider turns its own timeouts into ProviderTimeout, so this one is ours.
            if call.interrupted:
                raise _Interrupted() from None
            raise ProviderTimeout(f"call stalled: no progress for {self.stall_timeout:g}s (watchdog)") from None
        finally:
            del self.inflight[key]
        self.stats.latencies.append(loop.time() - now)
        return result

    async def _watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        interval = max(0.02, min(1.0, self.stall_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            deadline = loop.time() - self.stall_timeout
            for call in list(self.inflight.values()):
                if call.last_beat < deadline and not call.stalled:
                    call.stalled = True
                    call.end_now()

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
