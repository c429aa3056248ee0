"""The RAFT job under kill -9: killed at random moments in every stage, resumed to the end.

The export must equal that of an uninterrupted run byte for byte, hold every record once, and the
simulator must have been paid again only for calls that were in flight at a kill (never for a
request whose outcome was already on disk). The corpus includes answers that are always rejected
(paid retries journaled as attempts) and a chunk the server refuses (400).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from asyncraft import simcontent
from asyncraft.errors import JournalError
from asyncraft.records import id_key
from tests.conftest import cli_env, run_cli
from tests.helpers import ROOT, start_simulator, task_states
from tests.test_raft_e2e import DOCS, RAFT_FLAGS, Graph, task_graph

pytestmark = pytest.mark.slow

SIM_ARGS = ("--latency-ms", "15", "--latency-dist", "lognormal", "--p-429", "0.03", "--p-500", "0.03",
            "--p-malformed", "0.01", "--p-reset", "0.01", "--fault-retry-after", "0.05", "--seed", "5")
CONCURRENCY = 8
# Per worker: the call waiting for the server and the result waiting for the disk (the engine
# starts the next call while the previous record is being committed).
IN_FLIGHT = 2 * CONCURRENCY
KILLS = 10
# Kills go on past KILLS until some landed in the middle of each chat stage. Every kill but those at
# start-up moves the job on by at least one task, so this bound is only reached if that stops holding.
MAX_KILLS = 40
MID_STAGES = {"questions", "answers"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("crash") / "docs"
    shutil.copytree(DOCS, d)
    (d / "untagged.txt").write_text("Swarms hang on a branch while scouts search for a home. "
                                    f"{simcontent.NO_ANSWER_TAG_MARKER}", encoding="utf-8")
    (d / "refused.txt").write_text(f"The server refuses this chunk on purpose. {simcontent.BAD_REQUEST_MARKER}",
                                   encoding="utf-8")
    return d


def export_raft(state: Path, env: dict[str, str], out: Path) -> bytes:
    res = run_cli("export", "--state-dir", str(state), "--format", "raft", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    return out.read_bytes()


def stages_in_progress(state: Path, graph: Graph) -> set[str]:
    """Stages with some but not all of their tasks settled on disk."""
    if not (state / "asyncraft.json").exists():
        return set()
    settled = task_states(state).settled
    total, done = Counter(graph.stage.values()), Counter(graph.stage[k] for k in settled if k in graph.stage)
    return {s for s in total if 0 < done[s] < total[s]}


def settled_now(state: Path) -> int | None:
    """Tasks settled on disk while a run writes; None when the writer moved or extended a file under the reader
    (a compaction, a rotation, a line half-written)."""
    try:
        return len(task_states(state).settled)
    except (OSError, JournalError):
        return None


def kill_after_progress(proc: subprocess.Popen[bytes], state: Path, rng: random.Random, *, max_new: int = 20) -> bool:
    """Kill ``proc`` at a random moment: mostly once 1 to ``max_new`` more tasks have settled on disk in this
    run, sometimes during start-up and recovery. Returns False if the process ended on its own first.

    The moment is counted in work on disk, not in calls paid: on a loaded machine most calls paid before a
    kill are still waiting for the writer, so kills counted in paid calls moved the job on by nothing and
    all landed in the first stages."""
    if rng.random() < 0.2:
        try:
            proc.wait(timeout=rng.uniform(0.0, 0.4))
            return False
        except subprocess.TimeoutExpired:
            pass
    else:
        start = None
        while start is None:
            start = settled_now(state) if (state / "asyncraft.json").exists() else 0
        target = start + rng.randint(1, max_new)
        while (settled_now(state) or 0) < target:
            if proc.poll() is not None:
                return False
            time.sleep(0.005)
    proc.kill()
    proc.wait()
    return True


@pytest.mark.parametrize("chunker", ["simple", "semantic"])
def test_kill9_in_every_stage_then_resume(chunker: str, corpus: Path, tmp_path: Path) -> None:
    flags = (*RAFT_FLAGS, "--chunker", chunker, "--input", str(corpus))
    graph = task_graph(corpus, chunker=chunker)
    assert graph.failed and graph.refused and len(graph.records) > 100

    ref_sim = start_simulator(*SIM_ARGS)
    try:
        env = cli_env(ref_sim, ASYNCRAFT_CONCURRENCY="64")
        res = run_cli("run", *flags, "--state-dir", str(tmp_path / "ref"), env=env)
        assert res.returncode == 0, res.stderr
        expected = export_raft(tmp_path / "ref", env, tmp_path / "ref.jsonl")
    finally:
        ref_sim.close()

    sim = start_simulator(*SIM_ARGS)
    try:
        state = tmp_path / "state"
        env = cli_env(sim, ASYNCRAFT_CONCURRENCY=str(CONCURRENCY), ASYNCRAFT_SNAPSHOT_EVERY="60",
                      ASYNCRAFT_SEGMENT_MB="0.05")
        rng = random.Random(f"raft-{chunker}")
        paid: Counter[str] = Counter()
        kills = repeats = 0
        mid_stage: set[str] = set()
        while True:
            durable = graph.durable(state)
            proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", *flags, "--state-dir", str(state)],
                                    env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            assert proc.stderr is not None
            more = kills < KILLS or (not MID_STAGES <= mid_stage and kills < MAX_KILLS)
            killed = more and kill_after_progress(proc, state, rng)
            if not killed:
                proc.wait(timeout=120)
            stderr = proc.stderr.read().decode()
            proc.stderr.close()
            now = Counter(sim.settled_stats()["paid_by_hash"])
            delta = now - paid
            again = [h for h in delta if paid[h] > 0]
            # A request is paid again only if its outcome was not on disk, and each run pays a request once.
            assert not set(again) & durable, "paid again for a request whose outcome was on disk"
            assert all(n == 1 for n in delta.values()), "a request was paid twice within one run"
            repeats += len(again)
            paid = now
            if killed:
                # What this run paid for and did not get on disk was in flight at the kill. (A run may
                # repay more than that: the leftovers of several earlier kills.)
                lost = set(delta) - graph.durable(state)
                assert len(lost) <= IN_FLIGHT, f"{len(lost)} paid calls lost at a kill, more than could be in flight"
                kills += 1
                mid_stage |= stages_in_progress(state, graph)
                continue
            assert proc.returncode == 0, stderr
            break
        assert kills >= KILLS, f"the job finished after {kills} kills; give it more work"
        assert MID_STAGES <= mid_stage, f"kills landed only in {mid_stage}"
        assert sum(paid.values()) == sum(graph.all_hashes().values()) + repeats
        assert set(paid) == set(graph.all_hashes()), "a request was never made, or one no run should make"

        got = export_raft(state, env, tmp_path / "got.jsonl")
        assert got == expected
        rows = [orjson.loads(x) for x in got.splitlines()]
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)) and set(ids) == graph.records
        assert sorted(got.splitlines(), key=lambda x: orjson.loads(x)["id"]) == sorted(
            expected.splitlines(), key=lambda x: orjson.loads(x)["id"])
        rec = task_states(state)
        assert graph.failed <= rec.failed and {id_key(i) for i in graph.records} <= rec.done
        assert run_cli("verify", "--state-dir", str(state), env=env).returncode == 0
    finally:
        sim.close()
