"""The scheduler: a lazy feeder, a bounded queue and N workers.

The feeder reads the job's input on a thread in small batches (a million-line file is never held
in memory), skips tasks that are done, and puts the rest on a bounded ``asyncio.Queue``; tasks due
for another try and children of finished tasks go first. Each worker takes a task, waits its turn
at the rate controller, makes the call (the provider bounds it by the request and stall timeouts)
and hands the result to the journal without waiting: the task counts as done when the record's
future reports it on disk. A call that failed but may work later goes back to the feeder after its
delay instead of holding a worker.

A run that cannot succeed stops early, resumable, with nothing recorded as failed: at once on a
refused key, an unknown model or an exhausted quota; when the first requests are all refused the
same way before anything succeeded (those refusals are held back, and recorded as ordinary
failures once something succeeds); when no connection can be made for ``UNREACHABLE_STOP`` seconds
before anything succeeded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from asyncraft.cost import Budget
from asyncraft.errors import JournalError, ProviderError, RateLimited, Unreachable
from asyncraft.jobs.base import InputProblem, Job, Outcome, Task
from asyncraft.journal import Journal
from asyncraft.limits import RateController, estimate_request_tokens
from asyncraft.progress import StageTally
from asyncraft.provider import Completion
from asyncraft.records import content_id, id_key, scrub
from asyncraft.retry import Action, backoff, classify, failure_kind
from asyncraft.storage.recover import Recovery

log = logging.getLogger("asyncraft")

FEED_BATCH = 512
UNREACHABLE_STOP = 25.0  # seconds without any connection, before anything succeeded, until the run stops
HOLD_LIMIT = 10  # identical refusals before any success that stop the run (fewer at a concurrency below 9)
PROBLEMS_LOGGED = 5  # input problems shown one by one; the rest are counted by kind at the end (all in errors.jsonl)


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    done: int = 0  # this run
    failed: int = 0
    attempts: int = 0  # paid answers the job rejected and retried
    calls: Counter[str] = field(default_factory=Counter)  # by outcome: ok, 429, 500, ProviderTimeout, ...
    retries: int = 0
    gave_up: int = 0  # still failing after max_retries (or rate-limited past rate_limit_wait): left for the next run
    input_problems: int = 0
    problems_new: int = 0  # input problems recorded by this run (the others were recorded before)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_error: str = ""


@dataclass(slots=True)
class _Tries:
    """A task's failed calls in this run."""

    errors: int = 0  # transient failures other than 429: bounded by max_retries
    first_429: float | None = None  # 429s are the server pacing us: bounded by time, not by count


class Scheduler:
    def __init__(self, job: Job, journal: Journal, call: Callable[[Task], Awaitable[Completion]],
                 limits: RateController, recovered: Recovery, *, concurrency: int, max_retries: int,
                 backoff_base: float, backoff_max: float, output_estimate: int, rate_limit_wait: float = 600.0,
                 retry_failed: bool = False, api_key: str | None = None,
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
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.rate_limit_wait = rate_limit_wait
        self.output_estimate = output_estimate
        self._key = api_key
        self._on_problem = on_problem
        self.tally = tally if tally is not None else StageTally()
        # Children wait in a deque (unbounded: a finished task's children must not be dropped) and the
        # feeder moves them to the bounded queue ahead of the input.
        self._queue: asyncio.Queue[Task | None] = asyncio.Queue(max(concurrency, 256))
        self.children: deque[Task] = deque(job.recovered_children(self.done, self.failed))
        self._due: deque[Task] = deque()  # retries whose delay is over
        self._later: dict[int, tuple[asyncio.TimerHandle, Task]] = {}  # retries waiting for their delay
        self._tries: dict[int, _Tries] = {}
        self._queued: set[int] = set()
        self.active = 0  # tasks queued, in flight, waiting to be retried, or whose record is not yet on disk
        self.inflight: dict[asyncio.Task[None], Task] = {}  # worker -> its call in flight
        self._pacing: set[asyncio.Task[None]] = set()  # workers waiting at the rate controller
        self._wake = asyncio.Event()
        self._stop_event = asyncio.Event()
        self.stopping: str | None = None  # why we stop early, if we do
        self.fatal: BaseException | None = None
        self.input_total: int | None = None  # the input's tasks, exactly, once it has been read to the end
        self.input_read = False
        # Optional job hooks for the size of the job before it has been read: a count of the input made on a
        # thread at start, and the tasks expected per stage from it.
        self._job_count: Callable[[threading.Event], object] | None = getattr(job, "count_input", None)
        self._job_totals: Callable[[int | None], dict[str, dict[str, int]] | None] | None = getattr(
            job, "totals", None)
        self._totals_recorded: dict[str, Any] | None = None
        # An input problem whose item is read again and makes a task (a half-written line, completed) is resolved.
        self._problem_key: Callable[[Task], str | None] | None = getattr(job, "problem_key", None)
        self._resolved: set[int] = set()
        self.stats = Stats()
        self._rng = random.Random()
        # Fail fast: until something succeeds, refusals of one kind are held back, not recorded. Results
        # already in the state dir show that the configuration works.
        self._proven = len(self.done) > 0  # or something succeeded, or the refusals differ
        self._held: list[tuple[Task, ProviderError]] = []
        self._held_kind: tuple[object, ...] | None = None
        self._hold_limit = min(concurrency + 1, HOLD_LIMIT)
        self._unreachable: asyncio.TimerHandle | None = None
        self._last_unreachable = False
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

    def request_stop(self, reason: str, *, quiet: bool = False) -> None:
        if self.stopping is None:
            self.stopping = reason
            if not quiet:
                log.warning("stopping: %s", reason)
        self._stop_event.set()
        self._wake.set()
        # Workers still waiting for the rate controller have not called anyone yet: end them now.
        for worker in list(self._pacing):
            worker.cancel()
        self._drain()  # tasks still queued are not started; they run on the next start

    def interrupt_inflight(self) -> None:
        """Grace is over: cancel calls still in flight (they were not journaled; they will be redone)."""
        for worker in list(self.inflight):
            worker.cancel()

    def fatal_error(self, exc: BaseException) -> None:
        if self.fatal is None:
            self.fatal = exc
        # The app prints the fatal error once, as the reason the run stopped.
        self.request_stop(str(exc), quiet=True)

    @property
    def complete(self) -> bool:
        return self.input_read and self.active == 0 and not self.children and self.stopping is None

    def queued(self) -> int:
        """Tasks waiting for a worker."""
        return self._queue.qsize()

    def retrying(self) -> int:
        """Tasks waiting for their retry delay (a Retry-After, a back-off)."""
        return len(self._later)

    def waiting_for(self) -> str | None:
        """What holds calls back right now, in words for the progress line; None when nothing does."""
        parts = []
        limits = self.limits.describe()
        if limits:
            parts.append(limits)
        after_429 = sum(1 for key in self._later if (t := self._tries.get(key)) and t.first_429 is not None)
        if after_429:
            parts.append(f"{after_429} task(s) wait to retry after a 429")
        return "; ".join(parts) or None

    # -- main --------------------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i in range(self.concurrency):
                tg.create_task(self._worker(), name=f"worker-{i}")
            feeder = tg.create_task(self._feed(), name="feeder")
            if self._job_count is not None:
                stop = threading.Event()
                counting = tg.create_task(self._count(stop), name="input-count")
                # The count only informs the progress display: a run that ends sooner does not wait for it (its
                # thread stops at the next block or document).
                feeder.add_done_callback(lambda _: stop.set())
                feeder.add_done_callback(lambda _: counting.cancel())

    # -- the size of the job -----------------------------------------------------------------------------

    async def _count(self, stop: threading.Event) -> None:
        assert self._job_count is not None
        try:
            await asyncio.to_thread(self._job_count, stop)
        except OSError as exc:
            log.warning("could not count the input ahead (%s); its size is known once it has been read", exc)
            return
        await self.record_totals()

    def expected(self) -> tuple[int | None, dict[str, dict[str, int]]]:
        """The job's tasks in all (done, failed and pending; None while unknown) and per stage. Before the
        input has been read, the job's count of it stands in; the figure never falls below what is settled."""
        total = self.input_total
        stages: dict[str, dict[str, int]] = {}
        if self._job_totals is not None:
            # A job that knows its size is the only judge of it: the tasks found in its input are not all
            # its tasks when finished tasks make more (RAFT's questions and answers).
            stages = self._job_totals(self.input_total) or {}
            total = sum(v["total"] for v in stages.values()) if stages else None
        if self.complete:
            # Finished: what settled is the job, whatever the count at start expected (a document that
            # changed, fewer questions than asked for).
            stages = {name: {**v, "total": v["done"] + v["failed"]} if "done" in v else v
                      for name, v in stages.items()}
            return len(self.done) + len(self.failed), stages
        if total is not None:
            total = max(total, len(self.done) + len(self.failed))
        return total, stages

    async def record_totals(self) -> None:
        """Journal the job's size when it changed, so that ``status`` of a stopped state dir knows what is left."""
        total, stages = self.expected()
        if total is None or self.journal.error is not None or self.journal.closed:
            return
        rec = {"k": "totals", "total": total, "stages": stages, "read": self.input_read,
               "capped": bool(getattr(self.job, "at_record_limit", False))}
        if rec != self._totals_recorded:
            self._totals_recorded = rec
            await self.journal.append({**rec, "t": time.time()})

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

    # -- the feeder ----------------------------------------------------------------------------------

    async def _feed(self) -> None:
        roots = self.job.roots()
        lines_ok = 0
        exhausted = False
        while self.stopping is None:
            if self._due:
                await self._queue.put(self._due.popleft())
                continue
            if self.children:
                await self._enqueue(self.children.popleft())
                continue
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
                        await self._resolve_problem(item)
                        await self._enqueue(item)
                continue
            if self.active == 0:
                if not self.watch:
                    break
                # Watch mode: everything known is finished; look at the input again after a while.
                await self._pause(self.watch_interval)
                if self.stopping is None:
                    roots, lines_ok, exhausted = self.job.roots(), 0, False
                continue
            if self._held and self.active == len(self._held):
                self._stop_held()  # everything else is settled: the refusals are all there is
                break
            self._wake.clear()
            await self._wake.wait()
        self._shutdown()

    def _shutdown(self) -> None:
        """Nothing more will start: settle what waits, and let each worker exit."""
        if self._unreachable is not None:
            self._unreachable.cancel()
        for handle, task in self._later.values():
            handle.cancel()
            self._release(task)
        self._later.clear()
        while self._due:
            self._release(self._due.popleft())
        self._drain()
        for _ in range(self.concurrency):
            self._queue.put_nowait(None)

    def _drain(self) -> None:
        """Take the queued tasks back (released: they run on the next start); the workers' end marks stay."""
        ends = 0
        while not self._queue.empty():
            task = self._queue.get_nowait()
            if task is None:
                ends += 1
            else:
                self._release(task)
        for _ in range(ends):
            self._queue.put_nowait(None)

    async def _input_finished(self, lines_ok: int) -> None:
        self.input_read = True
        self.scans += 1
        # Every unique task of the input is now done, failed, or queued/in flight. A task whose record is
        # committed but whose worker has not yet been told is both done and active: counted once.
        unsettled = sum(1 for key in self._queued if key not in self.done and key not in self.failed)
        total = len(self.done) + len(self.failed) + unsettled
        if total == self.input_total and self.scans > 1:
            return  # a watch-mode rescan that found nothing new: nothing to journal
        self.input_total = total
        summary = getattr(self.job, "input_summary", None)
        await self.journal.append({"k": "input", "total": self.input_total, "task_lines": lines_ok,
                                   "problems": self.stats.input_problems, "t": time.time(),
                                   **(summary() if summary is not None else {})})
        await self.record_totals()

    async def _enqueue(self, task: Task) -> None:
        key = id_key(task.id)
        if key in self.done or key in self.failed or key in self._queued:
            return
        if task.attempt == 0 and self._attempts.get(key):
            task = self._resume_attempts(task, self._attempts[key])
        self._queued.add(key)
        self.active += 1
        await self._queue.put(task)

    def _resume_attempts(self, task: Task, paid: int) -> Task:
        # The job may vary the request per attempt; ask it for the next one after those already paid.
        retry = getattr(self.job, "retry_task", None)
        return retry(task, paid) if retry is not None else task

    def _release(self, task: Task) -> None:
        key = id_key(task.id)
        self._queued.discard(key)
        self._tries.pop(key, None)
        self.active -= 1
        if self.active == 0 or self.children or self._held:
            self._wake.set()

    async def _record_problem(self, problem: InputProblem) -> None:
        self.stats.input_problems += 1
        pid = content_id("ierr", problem.key)
        key = id_key(pid)
        if key in self._input_errors:
            return
        self._input_errors.add(key)
        self._resolved.discard(key)
        self.stats.problems_new += 1
        if self.stats.problems_new <= PROBLEMS_LOGGED:
            log.warning("input problem: %s", problem.message)
            if self.stats.problems_new == PROBLEMS_LOGGED:
                log.warning("further input problems are counted by kind at the end, not shown one by one (every "
                            "one is in errors.jsonl and `asyncraft tail --errors`)")
        await self._append_problem({"k": "ierr", "id": pid, "key": problem.key, "msg": problem.message,
                                    **problem.detail})

    async def _resolve_problem(self, task: Task) -> None:
        """Journal that an item recorded as a problem before now makes a task: errors.jsonl, ``status`` and
        ``tail --errors`` stop showing the problem. Looked up only while the state dir holds problems."""
        if self._problem_key is None or not len(self._input_errors):
            return
        pkey = self._problem_key(task)
        if pkey is None:
            return
        pid = content_id("ierr", pkey)
        key = id_key(pid)
        if key in self._resolved or key not in self._input_errors:
            return
        self._resolved.add(key)
        where: dict[str, Any] = {k: task.meta[k] for k in ("line", "custom_id", "source") if k in task.meta}
        await self._append_problem({"k": "resolved", "id": pid, "key": pkey, **where})

    async def _pause(self, delay: float) -> None:
        """Sleep, but wake at once if the run is stopping."""
        try:
            async with asyncio.timeout(delay):
                await self._stop_event.wait()
        except TimeoutError:
            pass

    # -- workers -----------------------------------------------------------------------------------

    async def _worker(self) -> None:
        """Take tasks and make their calls. A finished task's record goes to the writer without
        waiting: the worker starts its next call while the record is being committed. Before handing
        in another record it waits for its previous one, so each worker has at most one record not yet
        on disk, and a crash repeats at most two calls per worker: the one waiting for the server and
        the one waiting for the disk."""
        me = asyncio.current_task()
        assert me is not None
        last: asyncio.Future[None] | None = None
        while (task := await self._queue.get()) is not None:
            if self.stopping is not None:
                self._release(task)
                continue
            try:
                last = await self._run(me, task, last)
            except JournalError as exc:
                self.fatal_error(exc)
        if last is not None and not last.done():
            await asyncio.wait([last])  # its task is settled before the writer closes

    async def _run(self, me: asyncio.Task[None], task: Task,
                   last: asyncio.Future[None] | None) -> asyncio.Future[None] | None:
        """Make the calls of one task; returns the worker's record still on its way to disk."""
        limits = self.limits
        settle = True  # release the task on the way out, unless it was handed on
        try:
            while not self._check_limits():
                if self._job_refresh is not None:
                    task = self._job_refresh(task)  # what the job learned since it made the task (e.g. a form)
                estimate = estimate_request_tokens(task.body, self.output_estimate) if limits.counts_tokens else 0
                if not limits.free():
                    self._pacing.add(me)
                    try:
                        await limits.acquire(estimate)
                    finally:
                        self._pacing.discard(me)
                    if self.stopping is not None:
                        break
                started = limits.started()
                try:
                    completion = await self._call(me, task)
                except ProviderError as exc:
                    settle = await self._failed(task, exc, started)
                    break
                except BaseException:
                    limits.failed(started)
                    raise
                limits.succeeded(started)
                if not self._proven:
                    await self._proved()
                outcome = self._judge(task, completion, estimate)
                if outcome.retry is None and outcome.fail is None:
                    if last is not None and not last.done():
                        await last  # at most one record per worker on its way to disk
                    last = self.journal.submit({"k": "done", "id": task.id, "stage": task.stage, **task.meta,
                                                **(outcome.result or {}), "usage": completion.usage})
                    last.add_done_callback(functools.partial(self._durable, task, outcome))
                    settle = False
                    break
                nxt = await self._record(task, completion, outcome)
                if nxt is None:
                    break
                task = nxt
        finally:
            if settle:
                self._release(task)
        return last

    async def _call(self, me: asyncio.Task[None], task: Task) -> Completion:
        """One API call, counted per stage."""
        counts = self.tally.stage(task.stage)
        counts.in_flight += 1
        self.inflight[me] = task
        try:
            result = await self._call_api(task)
        finally:
            del self.inflight[me]
            counts.in_flight -= 1
        counts.calls += 1
        usage = result.usage
        if usage is not None:
            counts.prompt_tokens += usage.get("prompt_tokens", 0)
            counts.completion_tokens += usage.get("completion_tokens", 0)
        return result

    def _judge(self, task: Task, completion: Completion, estimate: int) -> Outcome:
        stats = self.stats
        stats.calls["ok"] += 1
        usage = completion.usage
        if usage is not None:
            prompt, completed = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            stats.prompt_tokens += prompt
            stats.completion_tokens += completed
            if self.limits.counts_tokens:
                self.limits.correct(estimate, prompt + completed)
        return self.job.handle(task, completion)

    def _durable(self, task: Task, outcome: Outcome, fut: asyncio.Future[None]) -> None:
        """The journal's report on a task's record: on disk, or lost with the writer. Only now is the
        task done. Runs as a callback of the record's future, in the event loop."""
        if not fut.cancelled() and fut.exception() is None:
            self.done.add(id_key(task.id))
            self.stats.done += 1
            if outcome.children:
                self.children.extend(outcome.children)
                self._wake.set()
            self._check_limits()
        self._release(task)

    # -- failures ------------------------------------------------------------------------------------

    async def _failed(self, task: Task, exc: ProviderError, started: float) -> bool:
        """Decide what a failed call means. True when the task is settled now, False when it was
        handed on (to a retry or to the refusals held back)."""
        self.stats.calls[_outcome_name(exc)] += 1
        self.stats.last_error = str(exc)
        if isinstance(exc, RateLimited):
            return self._rate_limited(task, exc, self.limits.on_rate_limited(exc, started))
        self.limits.failed(started)
        instead = self._job_call_failed(task, exc) if self._job_call_failed is not None else None
        if instead is not None:
            # The job asks again in a form this server takes; the refused request is not recorded.
            self.children.append(instead)
            self._wake.set()
            return True
        action = classify(exc)
        if action is Action.FATAL:
            self.fatal_error(exc)
            return True
        if action is Action.FAIL_TASK:
            return await self._refused(task, exc)
        self._last_unreachable = isinstance(exc, Unreachable)
        if self._last_unreachable and not self._proven and self._unreachable is None:
            log.error("%s; retrying, and stopping in %gs unless it answers", exc, UNREACHABLE_STOP)
            self._unreachable = asyncio.get_running_loop().call_later(UNREACHABLE_STOP, self._unreachable_over, exc)
        tries = self._tries_of(task)
        tries.errors += 1
        if tries.errors > self.max_retries:
            self._give_up(task, f"after {tries.errors} tries: {exc}")
            return True
        return self._retry_later(task, backoff(tries.errors, base=self.backoff_base, cap=self.backoff_max,
                                               retry_after=exc.retry_after, rng=self._rng))

    def _rate_limited(self, task: Task, exc: RateLimited, delay: float | None) -> bool:
        tries = self._tries_of(task)
        now = asyncio.get_running_loop().time()
        if tries.first_429 is None:
            tries.first_429 = now
        elif now - tries.first_429 > self.rate_limit_wait:
            self._give_up(task, f"still rate-limited after {now - tries.first_429:.0f}s "
                                f"(ASYNCRAFT_RATE_LIMIT_WAIT): {exc}")
            return True
        if delay is None:
            delay = backoff(1, base=self.backoff_base, cap=self.backoff_max, rng=self._rng)
        return self._retry_later(task, delay)

    def _tries_of(self, task: Task) -> _Tries:
        key = id_key(task.id)
        tries = self._tries.get(key)
        if tries is None:
            tries = self._tries[key] = _Tries()
        return tries

    def _retry_later(self, task: Task, delay: float) -> bool:
        if self.stopping is not None:
            return True  # not tried again in this run; it runs on the next start
        self.stats.retries += 1
        key = id_key(task.id)
        handle = asyncio.get_running_loop().call_later(delay, self._retry_due, key)
        self._later[key] = (handle, task)
        return False

    def _retry_due(self, key: int) -> None:
        _, task = self._later.pop(key)
        self._due.append(task)
        self._wake.set()

    def _give_up(self, task: Task, why: str) -> None:
        self.stats.gave_up += 1
        # One line, not one per task: a server failing for everyone would flood the log.
        (log.warning if self.stats.gave_up == 1 else log.debug)(
            "leaving %s for the next run %s", task.id[:12], why)

    async def _refused(self, task: Task, exc: ProviderError) -> bool:
        """A request the server refuses (400). Before anything succeeded, refusals of one kind are held
        back: they may say the configuration is wrong (an unknown model), not the requests."""
        if self.stopping is not None:
            return True  # not recorded: it is asked again on the next start
        if self._proven:
            await self._record_fail(task, exc)
            return True
        kind = failure_kind(exc)
        if self._held and kind != self._held_kind:
            # Refusals that differ are the requests' own, each for its reason.
            await self._proved()
            await self._record_fail(task, exc)
            return True
        self._held_kind = kind
        self._held.append((task, exc))
        if len(self._held) >= self._hold_limit:
            self._stop_held()
        self._wake.set()  # the feeder stops the run if these refusals are all that is left
        return False

    def _stop_held(self) -> None:
        held, self._held = self._held, []
        for task, _ in held:
            self._release(task)
        exc = held[0][1]
        self.fatal_error(ProviderError(
            f"the first {len(held)} request(s) were all refused the same way and none succeeded, so no task "
            f"was recorded as failed: {exc}", status=exc.status, code=exc.code))

    async def _proved(self) -> None:
        """Something succeeded (or the refusals differ): the refusals held back are ordinary failures."""
        self._proven = True
        if self._unreachable is not None:
            self._unreachable.cancel()
        held, self._held = self._held, []
        for i, (task, exc) in enumerate(held):
            try:
                await self._record_fail(task, exc)
            except BaseException:
                for later, _ in held[i:]:
                    self._release(later)
                raise
            self._release(task)

    def _unreachable_over(self, exc: ProviderError) -> None:
        if not self._proven and self._last_unreachable:
            self.fatal_error(ProviderError(f"nothing answers after {UNREACHABLE_STOP:g}s: {exc}"))

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
        rec: dict[str, Any] = {"k": "fail", "id": task.id, "stage": task.stage, **task.meta, "error": error}
        if exc.body is not None:
            # What the server answered, as it answered it (export --format batch shows it).
            rec["response"] = {"status_code": exc.status, "request_id": exc.request_id, "body": exc.body}
        await self._append_problem(rec)
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
