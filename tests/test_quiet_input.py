"""Input problems without noise: the first few in the log, a count per kind at the end, every one on disk; a
problem whose line is read again and handled is resolved; what servers and input say is escaped on every line."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest

from asyncraft import views
from asyncraft.failures import FailureTally
from asyncraft.jobs.base import Task
from asyncraft.jobs.prompts import PromptsJob, problem_id
from asyncraft.progress import format_line
from asyncraft.provider import Completion
from asyncraft.records import id_key
from asyncraft.scheduler import PROBLEMS_LOGGED
from asyncraft.storage.tasks import TaskStates
from tests.conftest import cli_env, run_cli
from tests.helpers import SimProcess
from tests.test_scheduler import ok
from tests.test_totals import CommitJournal, _lines, _scheduler

ESC = "\x1b[2J\nasyncraft: finished: all good\r"


async def call(task: Task) -> Completion:
    return ok(task, 0)


async def test_many_bad_lines_log_five_then_a_count_per_kind(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "in.jsonl"
    bad = b"".join(b'{"custom_id": "b%d", \n' % i for i in range(40)) + b"[1, 2]\n" * 10
    path.write_bytes(_lines(5) + bad)
    states = TaskStates([])
    journal = CommitJournal(states)
    tally = FailureTally()

    async def on_problem(rec: dict[str, Any]) -> None:
        tally.add(rec)

    sched = _scheduler(PromptsJob(path, model="m", extra_body={}), journal, call, states, on_problem=on_problem)
    with caplog.at_level(logging.WARNING, logger="asyncraft"):
        await asyncio.wait_for(sched.run(), 10)
    shown = [r.getMessage() for r in caplog.records if r.getMessage().startswith("input problem:")]
    assert len(shown) == PROBLEMS_LOGGED == 5
    assert sum("counted by kind at the end" in r.getMessage() for r in caplog.records) == 1
    assert sum(r["k"] == "ierr" for r in journal.records) == 50 and len(states.input_errors) == 50
    assert tally.lines() == ["50 input problem(s) recorded in this run, by kind (each one is in errors.jsonl and "
                             "`asyncraft tail --errors`):", "  40 x not valid JSON", "  10 x expected a JSON object"]


async def test_a_half_written_line_completed_later_resolves_its_problem(tmp_path: Path) -> None:
    """Watch mode on a growing file: the last line is cut off mid-object (a problem), then completed."""
    path = tmp_path / "in.jsonl"
    whole = _lines(1, start=3)
    path.write_bytes(_lines(3) + whole[:25])
    states = TaskStates([])
    journal = CommitJournal(states)
    sched = _scheduler(PromptsJob(path, model="m", extra_body={}), journal, call, states, watch=True,
                       watch_interval=0.01)
    running = asyncio.create_task(sched.run())
    problem = await journal.wait_for("ierr")
    assert problem["id"] == problem_id("line:4") and len(states.input_errors) == 1
    path.write_bytes(_lines(3) + whole)
    resolved = await journal.wait_for("resolved")
    assert resolved == {**resolved, "id": problem["id"], "key": "line:4", "line": 4, "custom_id": "r3"}
    async with asyncio.timeout(10):
        while len(sched.done) < 4:
            journal.acked.clear()
            await journal.acked.wait()
    sched.request_stop("test over")
    await running
    assert len(states.input_errors) == 0 and id_key(problem["id"]) not in states.input_errors
    assert sum(r["k"] == "resolved" for r in journal.records) == 1  # once, not at every rescan


def test_progress_and_status_lines_show_what_a_server_said_escaped() -> None:
    snap = {"total": 3, "done": 1, "failed": 0, "in_flight": 0, "rate_per_s": 0.0, "eta_s": None,
            "prompt_tokens": 1, "completion_tokens": 1, "tokens_per_s": 0.0, "cost": None, "stages": {},
            "calls": {"500": 1}, "last_error": f"HTTP 500: {ESC}", "waiting_for": None, "stopping": ESC}
    line = format_line(snap)
    assert "\x1b" not in line and "\n" not in line and "\r" not in line and "\\x1b[2J\\x0a" in line
    status = views.format_status({"state_dir": "s", "job": "prompts", "running": True, "total": 3, "done": 1,
                                  "failed": 0, "pending": 2, "stopping": ESC, "stages": {}})
    assert "\x1b" not in status and "\r" not in status and status.count("\n") == 6


@pytest.mark.slow
def test_errors_file_status_and_tail_stop_showing_a_resolved_problem(sim: SimProcess, tmp_path: Path) -> None:
    inp, state = tmp_path / "in.jsonl", tmp_path / "state"
    whole = _lines(1, start=3)
    inp.write_bytes(_lines(3) + whole[:25])  # the last line is being written
    env = cli_env(sim)
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), env=env)
    assert res.returncode == 0, res.stderr
    st = orjson.loads(run_cli("status", "--state-dir", str(state), "--json", env=env).stdout)
    assert st["input_problems"] == 1 and st["done"] == 3
    assert [orjson.loads(x)["line"] for x in (state / "errors.jsonl").read_bytes().splitlines()] == [4]
    assert "line 4: not valid JSON" in run_cli("tail", "--state-dir", str(state), "--errors", env=env).stdout

    with open(inp, "ab") as fh:
        fh.write(whole[25:])
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), env=env)
    assert res.returncode == 0, res.stderr
    st = orjson.loads(run_cli("status", "--state-dir", str(state), "--json", env=env).stdout)
    assert st["input_problems"] == 0 and st["done"] == 4 and st["pending"] == 0
    assert (state / "errors.jsonl").read_bytes() == b""
    assert run_cli("tail", "--state-dir", str(state), "--errors", env=env).stdout == ""
    # Rebuilt at the next start from the journal: still without it.
    assert run_cli("run", "--input", str(inp), "--state-dir", str(state), env=env).returncode == 0
    assert (state / "errors.jsonl").read_bytes() == b""
    assert run_cli("verify", "--state-dir", str(state), env=env).returncode == 0
