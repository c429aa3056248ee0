"""A resume reads only the part of the input that is not fully handled yet, and reads all of it when that part
cannot be trusted: the input was edited before the recorded position, the configuration changed, --retry-failed
was given, or --salvage lost records."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from asyncraft.jobs.prompts import InputPosition, InputTracker
from tests.conftest import cli_env, run_cli, write_prompts
from tests.helpers import ROOT, SimProcess, wait_until


def _run(inp: Path, state: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("run", "--input", str(inp), "--state-dir", str(state), *extra, env=env)


def test_the_tracker_stops_at_the_first_line_not_settled() -> None:
    settled = {1, 2, 4}
    tracker = InputTracker(InputPosition(0, 0, 0), lambda key, _problem: key in settled)
    for line, keys in ((1, (1,)), (2, (2,)), (3, ()), (4, (5,)), (5, (4,))):
        tracker.add(line, line * 10, line, keys, False)
    assert tracker.advance() == InputPosition(30, 3, 3)  # line 4's task (key 5) is not settled
    settled.add(5)
    assert tracker.advance() == InputPosition(50, 5, 5)


def test_the_tracker_follows_a_bounded_number_of_lines() -> None:
    tracker = InputTracker(InputPosition(0, 0, 0), lambda key, _problem: key != 1, cap=3)
    for line in range(1, 10):
        tracker.add(line, line, line, (line,), False)
    assert not tracker.feeding
    assert tracker.advance() == InputPosition(0, 0, 0)


def test_resume_reads_from_where_the_input_is_handled(sim: SimProcess, tmp_path: Path) -> None:
    inp, state = tmp_path / "in.jsonl", tmp_path / "state"
    write_prompts(inp, 60)
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="4")
    assert _run(inp, state, env).returncode == 0
    with open(inp, "ab") as fh:
        fh.write(orjson.dumps({"custom_id": "late", "body": {"messages": [{"role": "user", "content": "late"}]}})
                 + b"\n")
    res = _run(inp, state, env)
    assert res.returncode == 0, res.stderr
    assert "lines 1..60 are handled; reading from line 61" in res.stderr
    assert sim.stats()["paid"] == 61
    # An edit before the position: the whole input is read again, and only the edited line is paid.
    inp.write_bytes(inp.read_bytes().replace(b"fact number 7.", b"fact number 7, edited."))
    res = _run(inp, state, env)
    assert res.returncode == 0, res.stderr
    assert "reading from the start (the part already handled (lines 1..61) changed)" in res.stderr
    assert sim.stats()["paid"] == 62
    # The configuration changed: the old position says nothing about the new requests.
    res = _run(inp, state, env, "--extra-body", '{"temperature": 0.5}', "--allow-config-change")
    assert res.returncode == 0, res.stderr
    assert "reading from the start (the configuration changed)" in res.stderr
    assert sim.stats()["paid"] == 62 + 61


@pytest.mark.slow
def test_a_stopped_run_records_its_position_and_the_next_pays_each_line_once(sim_factory: object,
                                                                             tmp_path: Path) -> None:
    sim = sim_factory("--latency-ms", "20")  # type: ignore[operator]
    inp, state = tmp_path / "in.jsonl", tmp_path / "state"
    write_prompts(inp, 400)
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="4")
    proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir",
                             str(state)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_until(lambda: sim.stats()["paid"] >= 100, what="100 paid calls")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    res = _run(inp, state, env)
    assert res.returncode == 0, res.stderr
    assert "are handled; reading from line" in res.stderr
    st = sim.stats()
    assert st["paid"] == 400 and set(st["paid_by_hash"].values()) == {1}


def test_retry_failed_reads_the_whole_input(sim: SimProcess, tmp_path: Path) -> None:
    inp, state = tmp_path / "in.jsonl", tmp_path / "state"
    write_prompts(inp, 20)
    env = cli_env(sim)
    assert _run(inp, state, env).returncode == 0
    res = _run(inp, state, env, "--retry-failed")
    assert res.returncode == 0, res.stderr
    assert "reading from line" not in res.stderr
