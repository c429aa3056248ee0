"""``asyncraft tail``: filters, raw records, and following a live run across rotation and compaction."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from asyncraft.simcontent import BAD_REQUEST_MARKER
from asyncraft.storage import FS, StateDir
from asyncraft.storage.compact import compact
from asyncraft.views import Follower
from tests.conftest import cli_env, run_cli, write_prompts
from tests.helpers import ROOT, journal_records


def wait_for(cond: Any, timeout: float, why: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {why}")
        time.sleep(0.02)
    return value


def last_seq(state: Path) -> int:
    return max(int(rec["seq"]) for rec in journal_records(state))


def printed_seqs(path: Path) -> list[int]:
    """Sequence numbers of the complete lines tail has written so far."""
    data = path.read_bytes()
    return [orjson.loads(line)["seq"] for line in data[: data.rfind(b"\n") + 1].splitlines()]


@pytest.mark.slow
def test_follow_across_rotation_and_compaction_misses_and_repeats_nothing(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--latency-ms", "15", "--latency-dist", "uniform", "--seed", "5")
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, 400)
    state = tmp_path / "state"
    # Tiny segments (a rotation every ~10 records) and a snapshot every 25 records.
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="4", ASYNCRAFT_SEGMENT_MB="0.004", ASYNCRAFT_SNAPSHOT_EVERY="25")
    run = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir", str(state)],
                           env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out_path = tmp_path / "tail.jsonl"
    with open(out_path, "wb") as out:
        wait_for(lambda: (state / "asyncraft.json").exists(), 30, "the state dir")
        tail = subprocess.Popen([sys.executable, "-m", "asyncraft", "tail", "-f", "--json", "-n", "1000000",
                                 "--state-dir", str(state)], env=env, cwd=ROOT, stdout=out, stderr=subprocess.PIPE)
        try:
            assert run.poll() is None, "the run ended before tail started; give it more work"
            runs_at_start = set((state / "runs").glob("*.zst"))
            _, err = run.communicate(timeout=120)
            assert run.returncode == 0, err.decode()
            final = last_seq(state)
            wait_for(lambda: final in printed_seqs(out_path), 30, f"tail to print seq {final}")
            assert tail.poll() is None, "tail -f stopped by itself"
        finally:
            tail.terminate()
            _, tail_err = tail.communicate(timeout=30)
    assert b"Traceback" not in tail_err, tail_err.decode()
    compacted_later = set((state / "runs").glob("*.zst")) - runs_at_start
    assert len(compacted_later) >= 3, "no compaction happened while tail was following"
    assert printed_seqs(out_path) == list(range(1, final + 1))


@pytest.mark.slow
def test_follower_survives_its_file_being_compacted_away(sim_factory: Any, tmp_path: Path) -> None:
    """Deterministic version of the race: the follower stands in the middle of a segment when compaction moves
    that segment into a run and deletes it."""
    sim = sim_factory()
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, 120)
    state = tmp_path / "state"
    # A clean exit compacts everything; a kill leaves the journal segments as they were.
    env = cli_env(sim, ASYNCRAFT_SEGMENT_MB="0.004", ASYNCRAFT_SNAPSHOT_EVERY="1000000", ASYNCRAFT_CONCURRENCY="1",
                  ASYNCRAFT_FAILPOINTS="journal.after_fsync@100")
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), env=env)
    assert res.returncode == -9, res.stderr
    sd = StateDir(state)
    segments = sd.segments()
    assert len(segments) >= 4
    final = last_seq(state)

    follower = Follower(sd)
    first = [rec["seq"] for _, rec in zip(range(30), follower.read_all(), strict=False)]
    assert first == list(range(1, 31))
    sealed = [(f, segments[i + 1][0] - 1, p) for i, (f, p) in enumerate(segments[:-1])]
    assert any(f <= 30 <= last for f, last, _ in sealed), "the follower is not inside a sealed segment"
    compact(FS(), sd, sealed, [], None)
    assert len(sd.segments()) == 1

    got: list[int] = []
    for _ in range(10):
        got += [rec["seq"] for rec in follower.poll()]
    assert got == list(range(31, final + 1))
    assert follower.poll() == []


def test_filters_and_raw_records(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory()
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, 30)
    with open(inp, "ab") as fh:
        fh.write(b"this is not json\n")
        for i in range(2):
            fh.write(orjson.dumps({"custom_id": f"bad-{i}", "body": {
                "messages": [{"role": "user", "content": f"{BAD_REQUEST_MARKER} {i}"}]}}) + b"\n")
        fh.write(b'{"custom_id": "no-messages", "body": {}}\n')
    state = tmp_path / "state"
    env = cli_env(sim)
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), env=env)
    assert res.returncode == 0, res.stderr

    def tail(*args: str) -> list[str]:
        out = run_cli("tail", "--state-dir", str(state), *args, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    errors = [orjson.loads(x) for x in tail("-n", "1000", "--errors", "--json")]
    assert sorted(r["k"] for r in errors) == ["fail", "fail", "ierr", "ierr"]
    assert {r["custom_id"] for r in errors if r["k"] == "fail"} == {"bad-0", "bad-1"}

    staged = [orjson.loads(x) for x in tail("-n", "1000", "--stage", "prompts", "--json")]
    assert len(staged) == 32 and all(r["stage"] == "prompts" for r in staged)
    assert [r["k"] for r in staged].count("done") == 30
    assert tail("-n", "1000", "--stage", "no-such-stage") == []
    assert len(tail("-n", "1000", "--stage", "prompts", "--errors", "--json")) == 2

    # Raw records are the journal's own objects (sequence numbers and all); the text form is one line each.
    raw = [orjson.loads(x) for x in tail("-n", "5", "--json")]
    final = last_seq(state)
    assert [r["seq"] for r in raw] == list(range(final - 4, final + 1))
    text = tail("-n", "3", "--stage", "prompts")
    assert len(text) == 3 and all(" prompts " in line and line.startswith("#") for line in text)
