"""The scheduler in-process, with a scripted provider and an in-memory journal: retries, 429s, the
fail-fast rules and shutdown. Milliseconds each; no server, no disk."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from asyncraft import scheduler as scheduler_module
from asyncraft.cost import Budget
from asyncraft.errors import (
    AuthError,
    BadRequest,
    ProviderError,
    QuotaExhausted,
    RateLimited,
    ServerError,
    Unreachable,
)
from asyncraft.jobs.base import InputProblem, Outcome, Task
from asyncraft.limits import RateController
from asyncraft.provider import Completion
from asyncraft.records import content_id
from asyncraft.scheduler import Scheduler
from asyncraft.storage.recover import Recovery
from asyncraft.storage.tasks import TaskStates

Script = Callable[[Task, int], Completion | ProviderError]  # (task, how many times it was called before)


class MemoryJournal:
    """The journal's interface: a future per record, resolved in the loop once "on disk"."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.closed = False

    def submit(self, record: dict[str, Any]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.records.append(record)
        asyncio.get_running_loop().call_soon(fut.set_result, None)
        return fut

    async def append(self, record: dict[str, Any]) -> None:
        await self.submit(record)

    def kinds(self) -> Counter[str]:
        return Counter(r["k"] for r in self.tasks())

    def tasks(self) -> list[dict[str, Any]]:
        """Records about tasks (not the input's own)."""
        return [r for r in self.records if r["k"] not in ("input", "totals")]


class ListJob:
    name = "prompts"

    def __init__(self, n: int) -> None:
        self.tasks = [Task(content_id("t", i), "prompts", {"messages": [{"role": "user", "content": f"q{i}"}]},
                           {"line": i + 1}) for i in range(n)]

    def fingerprint(self) -> dict[str, Any]:
        return {}

    def roots(self) -> Iterator[Task | InputProblem]:
        return iter(self.tasks)

    def wants(self, kind: str, stage: str) -> bool:
        return False

    def replay(self, record: dict[str, Any]) -> None:
        return None

    def recovered_children(self, done: set[int], failed: set[int]) -> Iterable[Task]:
        return ()

    def handle(self, task: Task, completion: Completion) -> Outcome:
        return Outcome(result={"message": completion.message})


def ok(task: Task, n: int) -> Completion:
    return Completion({"content": "fine"}, "stop", {"prompt_tokens": 3, "completion_tokens": 2}, "m")


class Harness:
    def __init__(self, script: Script, n: int = 20, *, concurrency: int = 4,
                 latency: float | Callable[[Task], float] = 0.001, **kw: Any) -> None:
        self.job = ListJob(n)
        self.journal = MemoryJournal()
        self.calls: Counter[str] = Counter()
        self.script = script
        self.latency = latency
        self.sched = Scheduler(self.job, self.journal, self.call, RateController(concurrency=concurrency),  # type: ignore[arg-type]
                               Recovery(None, 1, TaskStates([])),  # type: ignore[arg-type]
                               concurrency=concurrency, max_retries=kw.pop("max_retries", 3),
                               backoff_base=0.001, backoff_max=0.01, output_estimate=16, **kw)

    async def call(self, task: Task) -> Completion:
        n = self.calls[task.id]
        self.calls[task.id] += 1
        await asyncio.sleep(self.latency(task) if callable(self.latency) else self.latency)
        out = self.script(task, n)
        if isinstance(out, ProviderError):
            raise out
        return out

    async def run(self, within: float = 10.0) -> Scheduler:
        async with asyncio.timeout(within):
            await self.sched.run()
        assert self.sched.active == 0 and self.sched.inflight == {}
        return self.sched


async def test_every_task_is_called_once_and_done() -> None:
    h = Harness(ok, 50)
    sched = await h.run()
    assert len(sched.done) == 50 and set(h.calls.values()) == {1} and h.journal.kinds()["done"] == 50
    assert sched.fatal is None and sched.stopping is None


async def test_a_429_delays_only_its_call_and_spends_no_retry() -> None:
    """max_retries=0, yet a task answered 429 three times is done: 429s are the server pacing us."""
    first = ListJob(1).tasks[0].id

    def script(task: Task, n: int) -> Completion | ProviderError:
        if task.id == first and n < 3:
            return RateLimited("HTTP 429", status=429, retry_after=0.05)
        return ok(task, n)

    h = Harness(script, 30, max_retries=0)
    sched = await h.run()
    assert len(sched.done) == 30 and h.calls[first] == 4 and sched.stats.gave_up == 0
    assert sched.limits.learned is None  # three 429s among 30 successes: no pattern, nobody slowed down


async def test_a_task_429d_for_longer_than_the_wait_is_left_for_the_next_run() -> None:
    first = ListJob(1).tasks[0].id

    def script(task: Task, n: int) -> Completion | ProviderError:
        return RateLimited("HTTP 429", status=429, retry_after=0.02) if task.id == first else ok(task, n)

    h = Harness(script, 10, rate_limit_wait=0.1)
    sched = await h.run()
    assert len(sched.done) == 9 and sched.stats.gave_up == 1 and first not in {r["id"] for r in h.journal.tasks()}
    assert 4 <= h.calls[first] <= 12


async def test_server_errors_are_retried_up_to_max_retries_then_left_for_the_next_run() -> None:
    first = ListJob(1).tasks[0].id

    def script(task: Task, n: int) -> Completion | ProviderError:
        return ServerError("HTTP 500", status=500) if task.id == first else ok(task, n)

    h = Harness(script, 10, max_retries=3)
    sched = await h.run()
    assert h.calls[first] == 4 and sched.stats.gave_up == 1 and len(sched.done) == 9 and not sched.failed


@pytest.mark.parametrize("error", [AuthError("HTTP 401", status=401),
                                   QuotaExhausted("HTTP 429 insufficient_quota", status=429)],
                         ids=["401", "quota"])
async def test_a_fatal_error_stops_at_once_even_when_more_arrive_after_the_queue_closed(error: ProviderError) -> None:
    """Every call in flight fails the same fatal way, one after another: the run still ends (the
    later errors arrive after the workers were told to finish)."""
    delays = {t.id: 0.01 * (i + 1) for i, t in enumerate(ListJob(8).tasks)}
    h = Harness(lambda task, n: error, 200, concurrency=8, latency=lambda task: delays.get(task.id, 0.01))
    sched = await h.run()
    assert sched.fatal is error and sum(h.calls.values()) <= 8 and not h.journal.tasks()


async def test_identical_refusals_before_any_success_stop_the_run_and_record_nothing() -> None:
    """An unknown model answered with 400 (as LiteLLM does): stopped within 2 x concurrency calls."""
    h = Harness(lambda task, n: BadRequest("HTTP 400: Invalid model name passed in model=x", status=400),
                500, concurrency=16)
    sched = await h.run()
    assert sched.fatal is not None and "none succeeded" in str(sched.fatal) and "Invalid model name" in str(sched.fatal)
    assert sum(h.calls.values()) <= 2 * 16 and not sched.failed and not h.journal.tasks()


async def test_fewer_tasks_than_the_threshold_all_refused_alike_also_stop_without_records() -> None:
    h = Harness(lambda task, n: BadRequest("HTTP 400: bad request for every line", status=400), 3, concurrency=16)
    sched = await h.run()
    assert sched.fatal is not None and sum(h.calls.values()) == 3 and not h.journal.tasks()


async def test_refusals_held_back_become_failures_once_something_succeeds() -> None:
    bad = {t.id for t in ListJob(5).tasks[:5]}
    order: list[str] = []

    def script(task: Task, n: int) -> Completion | ProviderError:
        order.append(task.id)
        return BadRequest("HTTP 400: this line is bad", status=400) if task.id in bad else ok(task, n)

    h = Harness(script, 30, concurrency=8)  # the first 5 refused alike: fewer than would stop the run
    sched = await h.run()
    assert sched.fatal is None and len(sched.failed) == 5 and len(sched.done) == 25
    assert h.journal.kinds() == Counter({"done": 25, "fail": 5}) and set(h.calls.values()) == {1}


async def test_refusals_that_differ_are_the_requests_own_and_are_recorded() -> None:
    def script(task: Task, n: int) -> Completion | ProviderError:
        return BadRequest(f"HTTP 400: {task.id[:6]} is malformed in its own way", status=400, code=task.id[:4])

    h = Harness(script, 12, concurrency=2)
    sched = await h.run()
    assert sched.fatal is None and len(sched.failed) == 12 and h.journal.kinds()["fail"] == 12


async def test_nothing_reachable_stops_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "UNREACHABLE_STOP", 0.2)
    h = Harness(lambda task, n: Unreachable("cannot connect to http://127.0.0.1:9/v1: Connection refused"), 20,
                max_retries=1000)
    sched = await h.run()
    assert sched.fatal is not None and "nothing answers" in str(sched.fatal)
    assert "Connection refused" in str(sched.fatal)
    assert not h.journal.tasks()


async def test_a_stop_request_cancels_workers_waiting_for_the_rate_controller() -> None:
    called = asyncio.Event()

    def first(task: Task, n: int) -> Completion:
        called.set()
        return ok(task, n)

    h = Harness(first, 100, concurrency=4)
    # One call a second on a clock that never moves: the workers in line at the controller wait until cancelled.
    h.sched.limits = RateController(rpm=60, concurrency=4, clock=lambda: 0.0,
                                    sleep=lambda _s: asyncio.Event().wait())

    async def stop_once_a_call_was_made() -> None:
        await called.wait()
        h.sched.request_stop("test")

    stopper = asyncio.create_task(stop_once_a_call_was_made())
    sched = await h.run(within=2)
    await stopper
    assert sched.stopping == "test" and 1 <= len(sched.done) <= 2


async def test_a_token_budget_stops_new_calls_once_reached() -> None:
    """Each answer uses 5 tokens; with 22 allowed, the fifth answer crosses the cap. Calls already in flight
    finish and count, no new one starts, and the rest is left for a run with a higher cap."""
    h = Harness(ok, 40, concurrency=2, budget=Budget(max_tokens=22))
    sched = await h.run()
    assert sched.stopping is not None and "token budget reached" in sched.stopping
    assert 5 <= len(sched.done) <= 5 + 2 and sum(h.calls.values()) == len(sched.done)
    assert sum(sched.tokens_used()) >= 22
