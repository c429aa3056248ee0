"""Crash safety, shown by killing the real CLI process (SIGKILL) and resuming it.

Each test checks the durability promise of the README: every input appears exactly once in the
export, the export equals that of an uninterrupted run, and the only paid calls made again are
ones whose results were not on disk when the process died (the calls in flight).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from asyncraft import storage
from asyncraft.jobs.base import Task
from asyncraft.jobs.prompts import PromptsJob
from asyncraft.records import id_key
from asyncraft.simulate import body_hash
from asyncraft.storage import FS, StateDir
from tests.conftest import cli_env, run_cli, write_prompts
from tests.helpers import ROOT, SimProcess, kill_after, start_simulator, task_states

SIM_ARGS = ("--latency-ms", "15", "--latency-dist", "lognormal", "--p-429", "0.03", "--p-500", "0.03",
            "--p-malformed", "0.01", "--p-reset", "0.01", "--fault-retry-after", "0.05", "--seed", "3")
CONCURRENCY = 8
KILLS = 20
# What a kill may cost again: per worker, one call waiting for the server and one answered call
# whose record is waiting for the disk (the worker starts its next call during the commit).
IN_FLIGHT = 2 * CONCURRENCY


def hash_of_task(input_path: Path) -> dict[int, str]:
    """task key -> the simulator's hash of the request body the client sends for it."""
    job = PromptsJob(input_path, model="sim-1", extra_body={})
    return {id_key(t.id): body_hash(t.body) for t in job.roots() if isinstance(t, Task)}


def durable_hashes(state: Path, task_hash: dict[int, str]) -> set[str]:
    if not (state / "asyncraft.json").exists():
        return set()
    return {task_hash[k] for k in task_states(state).settled}


def export_bytes(state: Path, env: dict[str, str], tmp: Path) -> bytes:
    out = tmp / f"export-{state.name}.jsonl"
    res = run_cli("export", "--state-dir", str(state), "--format", "prompts", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    return out.read_bytes()


class PaidLedger:
    """The simulator's paid calls, run by run, against what is on disk before and after each run.

    The contract, checked at every run: nothing already on disk is paid for again, nothing is paid
    twice within a run, and what a run paid for but did not get on disk (the calls in flight when
    it was killed) is at most ``limit``. Those are the only calls a later run pays for again."""

    def __init__(self, sim: SimProcess, task_hash: dict[int, str], state: Path) -> None:
        self.sim = sim
        self.task_hash = task_hash
        self.state = state
        sim.settled_stats()
        sim.reset()  # a new state dir pays for everything again; count this test's calls only
        self.paid: Counter[str] = Counter()
        self.repeats = 0
        self.lost = 0

    def check_run(self, durable_before: set[str], limit: int) -> None:
        now = Counter(self.sim.settled_stats()["paid_by_hash"])
        delta = now - self.paid
        for h in delta:
            assert h not in durable_before, f"paid again for a result that was already on disk: {h}"
        assert all(n == 1 for n in delta.values()), "a call was paid twice within one run"
        durable_after = durable_hashes(self.state, self.task_hash)
        lost = [h for h in delta if h not in durable_after]
        assert len(lost) <= limit, f"{len(lost)} paid calls not on disk after the kill, more than in flight ({limit})"
        self.repeats += sum(1 for h in delta if self.paid[h] > 0)
        self.lost += len(lost)
        self.paid = now


@pytest.fixture(scope="module")
def crash_sim() -> Any:
    sim = start_simulator(*SIM_ARGS)
    yield sim
    sim.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """An uninterrupted run of the same job (on its own simulator, so its calls are not counted)."""
    tmp = tmp_path_factory.mktemp("reference")
    inp = tmp / "requests.jsonl"
    write_prompts(inp, 400)
    sim = start_simulator(*SIM_ARGS)
    try:
        env = cli_env(sim, ASYNCRAFT_CONCURRENCY="64")
        res = run_cli("run", "--input", str(inp), "--state-dir", str(tmp / "state"), env=env)
        assert res.returncode == 0, res.stderr
        return inp, export_bytes(tmp / "state", env, tmp)
    finally:
        sim.close()


def start_run(inp: Path, state: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir", str(state)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_kill9_at_random_moments_then_resume(crash_sim: SimProcess, reference: tuple[Path, bytes],
                                             tmp_path: Path) -> None:
    inp, expected = reference
    state = tmp_path / "state"
    task_hash = hash_of_task(inp)
    env = cli_env(crash_sim, ASYNCRAFT_CONCURRENCY=str(CONCURRENCY), ASYNCRAFT_SNAPSHOT_EVERY="60",
                  ASYNCRAFT_SEGMENT_MB="0.02")
    ledger = PaidLedger(crash_sim, task_hash, state)
    rng = random.Random(20261124)
    kills = 0
    while True:
        durable = durable_hashes(state, task_hash)
        proc = start_run(inp, state, env)
        assert proc.stderr is not None
        if kills < KILLS and kill_after(proc, crash_sim, rng):
            proc.stderr.close()
            kills += 1
            ledger.check_run(durable, IN_FLIGHT)
            continue
        proc.wait(timeout=120)
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.returncode == 0, stderr
        ledger.check_run(durable, 0)  # a run that finishes keeps everything it paid for
        break
    assert kills >= KILLS, f"the job finished after {kills} kills; give it more work"
    assert ledger.lost > 0 and ledger.repeats > 0, "no kill landed while calls were in flight; it tested little"
    got = export_bytes(state, env, tmp_path)
    assert got == expected
    lines = [orjson.loads(x) for x in got.splitlines()]
    assert [r["custom_id"] for r in lines] == [f"req-{i}" for i in range(400)]
    assert all(r["status"] == "ok" for r in lines)
    assert run_cli("verify", "--state-dir", str(state), env=env).returncode == 0


FAILPOINTS = [
    "journal.before_write@25",
    "journal.after_write@25",
    "journal.after_fsync@25",
    "snapshot.mid_write@2",
    "snapshot.after_rename@2",
    "snapshot.before_release@2",
    "compact.mid_index@2",
]


# One failpoint runs by default; CI runs them all (python -m pytest -m slow).
@pytest.mark.parametrize("failpoint", [
    fp if fp == "journal.after_write@25" else pytest.param(fp, marks=pytest.mark.slow) for fp in FAILPOINTS])
def test_failpoint_then_resume(failpoint: str, crash_sim: SimProcess, reference: tuple[Path, bytes],
                               tmp_path: Path) -> None:
    inp, expected = reference
    state = tmp_path / "state"
    task_hash = hash_of_task(inp)
    env = cli_env(crash_sim, ASYNCRAFT_CONCURRENCY=str(CONCURRENCY), ASYNCRAFT_SNAPSHOT_EVERY="40")
    ledger = PaidLedger(crash_sim, task_hash, state)
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), env={**env, "ASYNCRAFT_FAILPOINTS": failpoint})
    assert res.returncode == -9, res.stderr
    assert f"failpoint {failpoint.split('@')[0]} fired" in res.stderr
    ledger.check_run(set(), IN_FLIGHT)
    durable = durable_hashes(state, task_hash)
    assert durable, "the crash came before anything was durable; move the failpoint later"
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), env=env)
    assert res.returncode == 0, res.stderr
    ledger.check_run(durable, 0)
    assert export_bytes(state, env, tmp_path) == expected
    assert run_cli("verify", "--state-dir", str(state), env=env).returncode == 0


def _killed_state(crash_sim: SimProcess, inp: Path, state: Path, hit: int = 30) -> None:
    """A state dir whose journal holds records (no compaction) and ends where a kill left it."""
    env = cli_env(crash_sim, ASYNCRAFT_CONCURRENCY=str(CONCURRENCY), ASYNCRAFT_SNAPSHOT_EVERY="1000000",
                  ASYNCRAFT_FAILPOINTS=f"journal.after_fsync@{hit}")
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), env=env)
    assert res.returncode == -9, res.stderr


@pytest.mark.slow
def test_torn_tail_at_every_byte(crash_sim: SimProcess, reference: tuple[Path, bytes], tmp_path: Path) -> None:
    inp, expected = reference
    state = tmp_path / "state"
    _killed_state(crash_sim, inp, state)
    (seg,) = [p for p in sorted((state / "journal").glob("*.jsonl")) if p.stat().st_size]
    data = seg.read_bytes()
    last_start = data.rindex(b"\n", 0, len(data) - 1) + 1
    full = task_states(state)
    last = orjson.loads(data[last_start:])
    lost_key = id_key(last["id"]) if last.get("k") == "done" else None
    trial = tmp_path / "trial"
    for cut in range(last_start, len(data)):
        shutil.rmtree(trial, ignore_errors=True)
        shutil.copytree(state, trial)
        tseg = trial / "journal" / seg.name
        tseg.write_bytes(data[:cut])
        rec = storage.open_for_run(StateDir(trial), FS())
        assert tseg.stat().st_size == last_start, f"cut at {cut}: torn record not truncated"
        assert rec.next_seq == full.last_seq
        got = task_states(trial)
        assert got.done == full.done - ({lost_key} if lost_key else set()), f"cut at {cut}"
        assert len(rec.done) == len(got.done)
    # And the real CLI resumes one such torn state to the same export as an uninterrupted run.
    shutil.rmtree(trial)
    shutil.copytree(state, trial)
    (trial / "journal" / seg.name).write_bytes(data[: last_start + (len(data) - last_start) // 2])
    env = cli_env(crash_sim, ASYNCRAFT_CONCURRENCY=str(CONCURRENCY))
    res = run_cli("run", "--input", str(inp), "--state-dir", str(trial), env=env)
    assert res.returncode == 0, res.stderr
    assert "truncated a torn write" in res.stderr
    assert export_bytes(trial, env, tmp_path) == expected


@pytest.mark.slow
def test_flipped_byte_mid_journal_is_reported_and_salvaged(crash_sim: SimProcess, reference: tuple[Path, bytes],
                                                           tmp_path: Path) -> None:
    inp, expected = reference
    state = tmp_path / "state"
    _killed_state(crash_sim, inp, state, hit=40)
    (seg,) = sorted((state / "journal").glob("*.jsonl"))
    data = bytearray(seg.read_bytes())
    starts = [0] + [i + 1 for i, b in enumerate(data[:-1]) if b == 0x0A]
    victim = starts[len(starts) // 2]
    data[victim + 12] ^= 0x01
    seg.write_bytes(bytes(data))
    env = cli_env(crash_sim, ASYNCRAFT_CONCURRENCY=str(CONCURRENCY))

    res = run_cli("verify", "--state-dir", str(state), env=env)
    assert res.returncode == 1
    assert f"{seg} at byte {victim}" in res.stdout

    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), env=env)
    assert res.returncode == 1
    assert f"{seg} at byte {victim}" in res.stderr and "--salvage" in res.stderr

    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), "--salvage", env=env)
    assert res.returncode == 0, res.stderr
    assert list((state / "damaged").iterdir()), "damaged bytes were not set aside"
    assert export_bytes(state, env, tmp_path) == expected
    assert run_cli("verify", "--state-dir", str(state), env=env).returncode == 0


@pytest.mark.slow
def test_damaged_manifest_and_stray_temp_files(crash_sim: SimProcess, reference: tuple[Path, bytes],
                                               tmp_path: Path) -> None:
    """A manifest only lists runs that describe themselves: a damaged one loses nothing, so it is reported as a
    note, set aside by the next run, and never stops anything."""
    inp, expected = reference
    state = tmp_path / "state"
    env = cli_env(crash_sim, ASYNCRAFT_CONCURRENCY=str(CONCURRENCY), ASYNCRAFT_SNAPSHOT_EVERY="50")
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), env=env)
    assert res.returncode == 0, res.stderr
    before = task_states(state)
    snaps = sorted((state / "snapshots").glob("manifest-*.json"))
    assert len(snaps) == 2
    newest = snaps[-1]
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0x20
    newest.write_bytes(bytes(raw))
    (state / "snapshots" / "manifest-000000999999.json.tmp").write_bytes(b'{"k":"manifest","seq":9')
    (state / "journal" / "000000999999.jsonl.tmp").write_bytes(b"garbage")
    res = run_cli("verify", "--state-dir", str(state), env=env)
    assert res.returncode == 0, res.stdout
    assert f"note: {newest} at byte 0: manifest is damaged" in res.stdout
    assert task_states(state) == before

    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), env=env)
    assert res.returncode == 0, res.stderr
    assert not list(state.rglob("*.tmp"))
    assert (state / "damaged" / newest.name).exists()
    assert task_states(state).done == before.done
    assert export_bytes(state, env, tmp_path) == expected
    res = run_cli("verify", "--state-dir", str(state), env=env)
    assert res.returncode == 0 and "note:" not in res.stdout, res.stdout
