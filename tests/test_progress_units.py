"""Progress numbers on a fake clock: the real scheduler runs scripted calls that the test lets through a few at a
time, and ``RunView`` reads it at moments the test chooses. Rates, ETA, cost and projected cost are checked as
arithmetic, with no real time involved. Milliseconds; tests/test_progress.py shows the real process's output."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from asyncraft.config import Settings
from asyncraft.cost import Budget
from asyncraft.jobs.base import Task
from asyncraft.progress import RATE_WINDOW, RunView, format_line
from asyncraft.provider import Completion
from asyncraft.scheduler import Scheduler
from tests.test_scheduler import Harness, MemoryJournal

N = 10
PRICE_IN, PRICE_OUT = 3.0, 15.0
TASK_COST = (3 * PRICE_IN + 2 * PRICE_OUT) / 1e6  # every scripted answer uses 3 prompt + 2 completion tokens


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


class CommittingJournal(MemoryJournal):
    """Like the real writer: the commit hook (the per-stage tally) runs after the records' futures resolve."""

    def __init__(self) -> None:
        super().__init__()
        self.next_seq = 1
        self.on_commit: Any = None
        self.committed = asyncio.Event()  # set after each commit hook: the test waits on it

    def submit(self, record: dict[str, Any]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.records.append(record)
        self.next_seq += 1
        asyncio.get_running_loop().call_soon(self._commit, record, fut)
        return fut

    def _commit(self, record: dict[str, Any], fut: asyncio.Future[None]) -> None:
        fut.set_result(None)
        asyncio.get_running_loop().call_soon(self._hook, [record])

    def _hook(self, batch: list[dict[str, Any]]) -> None:
        if self.on_commit is not None:
            self.on_commit(batch)
        self.committed.set()

    async def wait_until(self, cond: Any) -> None:
        while not cond():
            self.committed.clear()
            await self.committed.wait()


class Gated:
    """A scheduler whose calls are answered only when the test lets them through."""

    def __init__(self) -> None:
        self.gate = asyncio.Semaphore(0)

        def answer(task: Task, n: int) -> Completion:
            return Completion({"content": "fine"}, "stop", {"prompt_tokens": 3, "completion_tokens": 2}, "m")

        self.h = Harness(answer, N, concurrency=2, latency=0.0, budget=Budget(PRICE_IN, PRICE_OUT))
        self.journal = CommittingJournal()
        self.h.journal = self.journal
        self.sched: Scheduler = self.h.sched
        self.sched.journal = self.journal  # type: ignore[assignment]
        self.journal.on_commit = self.sched.tally.on_commit
        call = self.h.call

        async def gated_call(task: Task) -> Completion:
            await self.gate.acquire()
            return await call(task)

        self.sched._call_api = gated_call
        self.clock = Clock()
        self.view = RunView(Settings(job="prompts"), self.sched, self.journal, self.sched.tally,  # type: ignore[arg-type]
                            clock=self.clock)

    async def let_through(self, n: int) -> None:
        """Answer n more calls and wait until their records are committed and counted."""
        target = len(self.sched.done) + n
        for _ in range(n):
            self.gate.release()
        await self.journal.wait_until(lambda: len(self.sched.done) >= target)
        assert self.sched.tally.stage("prompts").done == len(self.sched.done)


@pytest.fixture
async def gated() -> Any:
    g = Gated()
    runner = asyncio.create_task(g.sched.run())
    async with asyncio.timeout(5):
        await g.journal.wait_until(lambda: g.sched.input_total is not None)  # the input's record is journaled
    yield g
    for _ in range(N):
        g.gate.release()
    async with asyncio.timeout(5):
        await runner


async def test_rate_eta_and_cost_follow_the_clock(gated: Gated) -> None:
    first = gated.view.snapshot()
    assert (first["total"], first["done"], first["pending"]) == (N, 0, N)
    assert first["rate_per_s"] == 0 and first["eta_s"] is None and first["cost_projected"] is None

    await gated.let_through(4)
    gated.clock.now += 2.0
    snap = gated.view.snapshot()
    assert (snap["done"], snap["pending"], snap["done_this_run"]) == (4, 6, 4)
    assert snap["rate_per_s"] == 2.0 and snap["eta_s"] == 3.0  # 6 left at 2 a second
    assert snap["cost"] == round(4 * TASK_COST, 6)
    assert snap["cost_projected"] == pytest.approx(N * TASK_COST)
    assert snap["stages"]["prompts"]["done"] == 4 and snap["stages"]["prompts"]["rate_per_s"] == 2.0
    assert format_line(snap).startswith("asyncraft: progress 4/10 done (40.0%), 0 failed")
    assert "ETA 3s" in format_line(snap)


async def test_the_rate_forgets_what_is_older_than_its_window(gated: Gated) -> None:
    await gated.let_through(4)
    gated.clock.now += 1.0
    assert gated.view.snapshot()["rate_per_s"] == 4.0
    gated.clock.now += RATE_WINDOW + 5  # a long stall: the early burst no longer counts
    stalled = gated.view.snapshot()
    assert stalled["rate_per_s"] == 0 and stalled["eta_s"] is None
    await gated.let_through(3)
    gated.clock.now += 10.0
    snap = gated.view.snapshot()
    # From the oldest sample still inside the window (the one before the stall, 45 s ago): 3 in 45 s.
    assert snap["rate_per_s"] == round(3 / 45, 2) and snap["eta_s"] == 45.0


async def test_every_task_done_means_no_time_left(gated: Gated) -> None:
    await gated.let_through(N)
    gated.clock.now += 5.0
    snap = gated.view.snapshot()
    assert (snap["done"], snap["pending"], snap["eta_s"]) == (N, 0, 0.0)
    assert snap["cost_projected"] == snap["cost"]
