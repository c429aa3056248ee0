"""The size of a job from the first progress line: the prompts job's count of its input, the exact total once
read, RAFT's totals per stage. In-process, with a scripted provider, an in-memory journal and a fake clock."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from asyncraft.config import Settings
from asyncraft.cost import Budget
from asyncraft.jobs.base import Task
from asyncraft.jobs.prompts import PromptsJob, count_lines
from asyncraft.jobs.raft import STAGE_ANSWERS, STAGE_QUESTIONS, RaftJob, RaftParams
from asyncraft.limits import RateController
from asyncraft.progress import RunView, format_line
from asyncraft.provider import Completion
from asyncraft.scheduler import Scheduler
from asyncraft.storage.recover import Recovery
from asyncraft.storage.tasks import TaskStates
from tests.conftest import cli_env, run_cli, write_prompts
from tests.helpers import ROOT, SimProcess, journal_records, wait_until
from tests.test_scheduler import MemoryJournal, ok


class CommitJournal(MemoryJournal):
    """Resolves records like the real writer: the commit hooks first, the record's future after."""

    def __init__(self, states: TaskStates | None = None, on_commit: Any = None) -> None:
        super().__init__()
        self.next_seq = 1
        self.states = states
        self.on_commit = on_commit
        self.hold: asyncio.Event | None = None  # while set to an unset event, futures wait (not yet "told")
        self.appended = asyncio.Event()
        self.acked = asyncio.Event()  # set once a record's worker has been told (after the scheduler's callback)

    def submit(self, record: dict[str, Any]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        record = {**record, "seq": self.next_seq}
        self.next_seq += 1
        self.records.append(record)
        if self.states is not None:
            self.states.apply(record)
        if self.on_commit is not None:
            self.on_commit([record])
        self.appended.set()
        loop = asyncio.get_running_loop()
        fut.add_done_callback(lambda _: loop.call_soon(self.acked.set))
        hold = self.hold
        if hold is None:
            asyncio.get_running_loop().call_soon(fut.set_result, None)
        else:
            asyncio.get_running_loop().create_task(_release_after(hold, fut))
        return fut

    def last(self, kind: str) -> dict[str, Any] | None:
        return next((r for r in reversed(self.records) if r["k"] == kind), None)

    async def wait_for(self, kind: str) -> dict[str, Any]:
        async with asyncio.timeout(10):
            while (rec := self.last(kind)) is None:
                self.appended.clear()
                await self.appended.wait()
        return rec


async def _release_after(hold: asyncio.Event, fut: asyncio.Future[None]) -> None:
    await hold.wait()
    fut.set_result(None)


def _scheduler(job: Any, journal: CommitJournal, call: Any, states: TaskStates, **kw: Any) -> Scheduler:
    return Scheduler(job, journal, call, RateController(concurrency=kw.pop("concurrency", 4)),  # type: ignore[arg-type]
                     Recovery(None, 1, states),  # type: ignore[arg-type]
                     concurrency=4, max_retries=1, backoff_base=0.001, backoff_max=0.01, output_estimate=16, **kw)


def _lines(n: int, start: int = 0) -> bytes:
    return b"".join(orjson.dumps({"custom_id": f"r{i}", "body": {"messages": [{"role": "user", "content": f"q{i}"}],
                                                                 "max_tokens": 5}}) + b"\n"
                    for i in range(start, start + n))


def test_lines_are_counted_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from asyncraft.jobs import prompts

    monkeypatch.setattr(prompts, "COUNT_BLOCK", 7)  # lines that straddle blocks
    path = tmp_path / "in.jsonl"
    for data, lines in ((b"", 0), (b"a\n", 1), (b"a\nb", 2), (b"a\n\n\nbbbbbbbbbbbbbbbbbbb\n", 4)):
        path.write_bytes(data)
        assert count_lines(path) == lines, data


def test_the_count_less_the_lines_without_a_task_for_every_sample(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(_lines(10) + b"\n{oops\n")
    job = PromptsJob(path, model="m", extra_body={}, samples=3)
    assert job.totals(None) is None
    job.count_input(threading.Event())
    assert job.totals(None) == {"prompts": {"total": 36}}  # 12 lines, 3 samples each, before any is read
    assert sum(isinstance(t, Task) for t in job.roots()) == 30
    assert job.totals(None) == {"prompts": {"total": 30}}  # the blank and the invalid line make no task
    assert job.totals(30) == {"prompts": {"total": 30}}


async def test_the_prompts_total_eta_and_projected_cost_are_known_before_the_input_is_read(tmp_path: Path) -> None:
    """2,000 lines, answers held back: the total is the count, before the feeder has read the input (its queue
    is full); once 20 answers are in, the ETA and the projected cost follow from them."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(_lines(2000))
    job = PromptsJob(path, model="m", extra_body={})
    states = TaskStates([])
    journal = CommitJournal(states)
    gate = asyncio.Semaphore(0)

    async def call(task: Task) -> Completion:
        await gate.acquire()
        return ok(task, 0)

    sched = _scheduler(job, journal, call, states, budget=Budget(1.0, 2.0))
    now = [100.0]
    view = RunView(Settings(job="prompts"), sched, journal, sched.tally, clock=lambda: now[0])  # type: ignore[arg-type]
    running = asyncio.create_task(sched.run())
    counted = await journal.wait_for("totals")
    snap = view.snapshot()
    assert not sched.input_read and counted["total"] == 2000
    assert (snap["total"], snap["pending"], snap["stages"]["prompts"]["total"]) == (2000, 2000, 2000)
    assert "0/2000 done (0.0%)" in format_line(snap)
    for _ in range(20):
        gate.release()
    while sched.stats.done < 20:
        journal.acked.clear()
        await journal.acked.wait()
    now[0] += 10.0
    snap = view.snapshot()
    assert not sched.input_read and snap["total"] == 2000 and snap["done"] == 20 and snap["pending"] == 1980
    assert snap["eta_s"] == pytest.approx(1980 / 2.0, rel=0.01)
    cost_per_task = (3 * 1.0 + 2 * 2.0) / 1e6
    assert snap["cost_projected"] == pytest.approx(2000 * cost_per_task, rel=1e-3)
    sched.request_stop("test over")
    sched.interrupt_inflight()
    await running
    recorded = journal.last("totals")
    assert recorded is not None and recorded["total"] == 2000 and not recorded["read"]


async def test_the_exact_total_counts_each_task_once(tmp_path: Path) -> None:
    """Repeated and blank lines are no extra tasks; and a task whose record is committed while its
    worker has not yet been told is counted once (it used to be counted as done and as still running)."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(_lines(10) + _lines(3) + b"\n")  # 10 tasks; 3 repeated lines and a blank one
    job = PromptsJob(path, model="m", extra_body={})
    states = TaskStates([])
    journal = CommitJournal(states)
    journal.hold = asyncio.Event()  # every record is committed, none acknowledged, until the input is read
    released = asyncio.get_running_loop().create_future()

    async def call(task: Task) -> Completion:
        return ok(task, 0)

    sched = _scheduler(job, journal, call, states)
    original = sched._input_finished

    async def finished(lines_ok: int) -> None:
        while len(states.done) < 4:  # a record committed per worker, none acknowledged: the case that doubled
            journal.appended.clear()
            await journal.appended.wait()
        assert journal.hold is not None
        journal.hold.set()  # the acknowledgements run at the next await: after the total is taken
        await original(lines_ok)
        released.set_result(None)

    sched._input_finished = finished  # type: ignore[method-assign]
    await asyncio.wait_for(sched.run(), 10)
    assert released.done()
    assert journal.last("input")["total"] == 10  # type: ignore[index]
    assert journal.last("totals")["total"] == 10  # type: ignore[index]
    assert sched.expected() == (10, {"prompts": {"total": 10}})


# -- RAFT ------------------------------------------------------------------------------------------------


def _raft(tmp_path: Path, docs: int = 3) -> RaftJob:
    for d in range(docs):
        (tmp_path / f"d{d}.txt").write_text(" ".join(f"Sentence {i} of document {d} is here." for i in range(120)),
                                             encoding="utf-8")
    return RaftJob(tmp_path, RaftParams(model="m", questions=3, chunk_size=128, structured="off"))


def test_raft_totals_per_stage_follow_what_the_calls_return(tmp_path: Path) -> None:
    job = _raft(tmp_path)
    assert job.totals(None) is None  # not counted yet
    job.count_input(threading.Event())
    chunks = sum(1 for t in job.roots() if isinstance(t, Task))
    assert chunks > 6
    first = job.totals(None)
    assert first == {STAGE_QUESTIONS: {"total": chunks, "done": 0, "failed": 0},
                     STAGE_ANSWERS: {"total": 3 * chunks, "done": 0, "failed": 0}}
    # One chunk got 2 questions instead of 3, one question call failed: 3 answers fewer to expect.
    job.on_commit([{"k": "done", "id": "a" * 32, "stage": STAGE_QUESTIONS, "questions": ["x?", "y?"]},
                   {"k": "fail", "id": "b" * 32, "stage": STAGE_QUESTIONS},
                   {"k": "done", "id": "a" * 32, "stage": STAGE_QUESTIONS, "questions": ["x?", "y?"]},  # once
                   {"k": "done", "id": "c" * 32, "stage": STAGE_ANSWERS}])
    now = job.totals(None)
    assert now is not None
    assert now[STAGE_QUESTIONS] == {"total": chunks, "done": 1, "failed": 1}
    assert now[STAGE_ANSWERS] == {"total": 2 + 3 * (chunks - 2), "done": 1, "failed": 0}


async def test_raft_never_shows_finished_before_its_last_stage_is(tmp_path: Path) -> None:
    """The whole job in-process: after every commit the total exceeds what is settled, until the last answer."""
    job = _raft(tmp_path, docs=2)
    job.count_input(threading.Event())  # as the scheduler does on its thread, but surely before this short run ends
    states = TaskStates([])
    seen: list[tuple[int, int | None]] = []

    async def call(task: Task) -> Completion:
        text = "1. What is here?\n2. Which one?\n3. Why so?" if task.stage == STAGE_QUESTIONS else \
            "It says so.\n<ANSWER>: here"
        return Completion({"content": text}, "stop", {"prompt_tokens": 2, "completion_tokens": 2}, "m")

    journal = CommitJournal(states, on_commit=job.on_commit)
    sched = _scheduler(job, journal, call, states)

    async def watch() -> None:
        while True:
            journal.acked.clear()
            await journal.acked.wait()
            seen.append((len(sched.done) + len(sched.failed), sched.expected()[0]))

    watching = asyncio.create_task(watch())
    await asyncio.wait_for(sched.run(), 20)
    watching.cancel()
    assert sched.complete and len(seen) > 5
    chunks = sum(1 for r in journal.records if r["k"] == "done" and r["stage"] == STAGE_QUESTIONS)
    tasks = 4 * chunks  # a question call and three answer calls per chunk
    assert seen[-1] == (tasks, tasks)
    # Unknown (None) while the count at start runs is honest; a total reached before the end is not.
    assert all(total is None or settled < total or settled == tasks for settled, total in seen), seen
    assert sched.expected()[1][STAGE_ANSWERS] == {"total": 3 * chunks, "done": 3 * chunks, "failed": 0}


# -- the real CLI: status of a stopped state dir ---------------------------------------------------------


def _status(state: Path, env: dict[str, str]) -> dict[str, Any]:
    res = run_cli("status", "--state-dir", str(state), "--json", env=env)
    assert res.returncode == 0, res.stderr
    return orjson.loads(res.stdout)  # type: ignore[no-any-return]


def _progress(stderr: str) -> list[dict[str, Any]]:
    events = (orjson.loads(x) for x in stderr.splitlines() if x.startswith("{"))
    return [e for e in events if e.get("event") == "progress"]


@pytest.mark.slow
def test_progress_and_status_agree_from_the_first_line_to_after_a_stop(sim_factory: Any, tmp_path: Path) -> None:
    sim: SimProcess = sim_factory("--latency-ms", "200")
    inp, state = tmp_path / "in.jsonl", tmp_path / "state"
    write_prompts(inp, 300)
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="8", ASYNCRAFT_LOG_FORMAT="json", ASYNCRAFT_PROGRESS="lines",
                  ASYNCRAFT_PROGRESS_INTERVAL="0.2")
    proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir",
                             str(state)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_until(lambda: sim.stats()["requests"] >= 24, what="three rounds of calls")
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    lines = _progress(err)
    assert lines and all(p["total"] == 300 for p in lines), lines  # the total from the first line on
    st = _status(state, env)
    final = orjson.loads((state / "status.json").read_bytes())  # the run's last snapshot, written as it stopped
    assert not st["running"] and st["total"] == final["total"] == 300
    assert (st["done"], st["failed"], st["pending"]) == (final["done"], final["failed"], final["pending"])
    assert 0 < st["pending"] == 300 - st["done"] - st["failed"] < 300
    assert st["stages"] == {}  # one stage: the totals are the job's


@pytest.mark.slow
@pytest.mark.parametrize("job", ["prompts", "raft"])
def test_status_after_a_kill_knows_the_total_and_what_is_pending(job: str, sim_factory: Any, tmp_path: Path) -> None:
    sim: SimProcess = sim_factory("--latency-ms", "300")
    state = tmp_path / "state"
    if job == "prompts":
        inp = tmp_path / "in.jsonl"
        write_prompts(inp, 200)
        args = ("--input", str(inp))
    else:
        args = ("--job", "raft", "--questions", "3", "--chunk-size", "64", "--input",
                str(ROOT / "asyncraft" / "data" / "docs"))
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="8")
    proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", *args, "--state-dir", str(state)], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: any(r["k"] == "totals" for r in journal_records(state)) and sim.stats()["requests"] >= 24,
                   what="the job's size on disk and some calls")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    st = _status(state, env)
    assert st["total"] is not None and st["pending"] == st["total"] - st["done"] - st["failed"] > 0, st
    if job == "prompts":
        assert st["total"] == 200
    else:
        stages = st["stages"]
        assert set(stages) == {"questions", "answers"} and stages["answers"]["pending"] > 0, stages
        assert sum(s["total"] for s in stages.values()) == st["total"]
        assert stages["answers"]["total"] >= 3 * (stages["questions"]["total"] - stages["questions"]["failed"]) - 3
