"""Damage anywhere is refused by every command alike, never papered over; --salvage sets it aside and redoes
exactly the lost tasks, after which verify is clean and the export equals a clean run's.

Each case damages a copy of a real state dir (a finished run with several compacted runs, or a run killed with
several journal segments) the way a disk or a person would: a file deleted or cut short, a byte flipped.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from asyncraft import storage
from asyncraft.jobs.base import Task
from asyncraft.jobs.prompts import PromptsJob
from asyncraft.records import id_key
from asyncraft.simulate import body_hash
from asyncraft.storage import FS, StateDir
from asyncraft.storage.resolve import resolve
from tests.conftest import cli_env, run_cli, write_prompts
from tests.helpers import SimProcess, journal_records, start_simulator, task_states

pytestmark = pytest.mark.slow

N = 120


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished state (several runs), a killed one (several segments, no compaction), the input and the
    export of an uninterrupted run."""
    root = tmp_path_factory.mktemp("damage")
    inp = root / "in.jsonl"
    write_prompts(inp, N)
    with open(inp, "ab") as fh:
        fh.write(b'{"custom_id": "broken", \n')  # a bad line: a problem record among the results
    sim = start_simulator()
    try:
        env = cli_env(sim, ASYNCRAFT_SNAPSHOT_EVERY="25", ASYNCRAFT_CONCURRENCY="4")
        finished = root / "finished"
        assert run_cli("run", "--input", str(inp), "--state-dir", str(finished), env=env).returncode == 0
        env = cli_env(sim, ASYNCRAFT_SNAPSHOT_EVERY="100000", ASYNCRAFT_SEGMENT_MB="0.003",
                      ASYNCRAFT_CONCURRENCY="1", ASYNCRAFT_FAILPOINTS="journal.after_fsync@90")
        killed = root / "killed"
        assert run_cli("run", "--input", str(inp), "--state-dir", str(killed), env=env).returncode == -9
        out = root / "reference.jsonl"
        res = run_cli("export", "--state-dir", str(finished), "--format", "prompts", "--out", str(out), env=env)
        assert res.returncode == 0, res.stderr
    finally:
        sim.close()
    assert len(list((finished / "runs").glob("*.zst"))) >= 4
    assert len([p for p in (killed / "journal").glob("*.jsonl") if p.stat().st_size]) >= 4
    return {"finished": finished, "killed": killed, "input": inp, "reference": out}


def _runs(state: Path) -> list[Path]:
    return sorted((state / "runs").glob("*.zst"))


def _segments(state: Path) -> list[Path]:
    return sorted(p for p in (state / "journal").glob("*.jsonl") if p.stat().st_size)


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def missing_run(state: Path) -> Path:
    victim = _runs(state)[1]
    victim.unlink()
    return victim


def truncated_run(state: Path) -> Path:
    victim = _runs(state)[1]
    data = victim.read_bytes()
    victim.write_bytes(data[:-100])
    return victim


def damaged_index(state: Path) -> Path:
    victim = _runs(state)[1].with_suffix(".idx")
    _flip(victim, 30)  # inside the checksummed header
    return victim


def run_and_index_damaged(state: Path) -> Path:
    run = _runs(state)[2]
    run.write_bytes(run.read_bytes()[: len(run.read_bytes()) // 2])
    _flip(run.with_suffix(".idx"), 40)
    return run


def missing_segment(state: Path) -> Path:
    victim = _segments(state)[1]
    victim.unlink()
    return victim


def missing_last_segment(state: Path) -> Path:
    victim = _segments(state)[-1]
    victim.unlink()
    return victim


def flipped_letter_mid_journal(state: Path) -> Path:
    victim = _segments(state)[1]
    data = victim.read_bytes()
    _flip(victim, data.index(b"Tell me fact", len(data) // 2) + 2)  # still JSON: only the checksum tells
    return victim


def flipped_letter_in_the_last_record(state: Path) -> Path:
    victim = _segments(state)[-1]
    data = victim.read_bytes()
    last = data.rfind(b"\n", 0, len(data) - 1) + 1  # the segment may hold that one record only
    _flip(victim, data.index(b'"k":"', last) + 6)  # a whole line with a wrong checksum is not a torn write
    return victim


CASES: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "missing run": ("finished", missing_run),
    "truncated run": ("finished", truncated_run),
    "damaged index": ("finished", damaged_index),
    "run and index damaged": ("finished", run_and_index_damaged),
    "missing segment": ("killed", missing_segment),
    "missing last segment": ("killed", missing_last_segment),
    "flipped letter mid-journal": ("killed", flipped_letter_mid_journal),
    "complete last record with a bad checksum": ("killed", flipped_letter_in_the_last_record),
}


def _task_hashes(inp: Path) -> dict[int, str]:
    job = PromptsJob(inp, model="sim-1", extra_body={})
    return {id_key(t.id): body_hash(t.body) for t in job.roots() if isinstance(t, Task)}


@pytest.mark.parametrize("case", list(CASES))
def test_damage_is_refused_alike_and_salvage_redoes_exactly_the_lost_tasks(case: str, base: dict[str, Path],
                                                                          tmp_path: Path, sim: SimProcess) -> None:
    which, damage = CASES[case]
    state = tmp_path / "state"
    shutil.copytree(base[which], state)
    done_before = task_states(state).done
    victim = damage(state)
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="4")
    inp = str(base["input"])

    res = run_cli("run", "--input", inp, "--state-dir", str(state), env=env)
    assert res.returncode == 1, res.stderr
    assert str(victim.parent) in res.stderr and "at byte" in res.stderr and "--salvage" in res.stderr, res.stderr
    assert sim.stats()["requests"] == 0, "a call was made on a damaged state dir"
    res = run_cli("status", "--state-dir", str(state), env=env)
    assert res.returncode == 1 and "DAMAGED" in res.stdout, res.stdout
    res = run_cli("verify", "--state-dir", str(state), env=env)
    assert res.returncode == 1 and "DAMAGED" in res.stdout, res.stdout
    out = tmp_path / "out.jsonl"
    res = run_cli("export", "--state-dir", str(state), "--format", "prompts", "--out", str(out), env=env)
    assert res.returncode == 1 and "damaged" in res.stderr and not out.exists(), res.stderr
    res = run_cli("export", "--state-dir", str(state), "--format", "prompts", "--out", str(out), "--partial", env=env)
    assert res.returncode == 0 and "missing" in res.stderr, res.stderr

    # Salvage, then see what is still done: only tasks whose records were in the damaged place are lost.
    storage.open_for_run(StateDir(state), FS(), salvage=True)
    assert not resolve(StateDir(state)).damage
    assert list((state / "damaged").iterdir()) or case.startswith("missing"), "damaged bytes were not kept"
    done_after = task_states(state).done
    assert done_after <= done_before
    lost = done_before - done_after
    if case.startswith(("flipped", "complete")):
        assert len(lost) == 1
    hashes = _task_hashes(base["input"])
    res = run_cli("run", "--input", inp, "--state-dir", str(state), "--salvage", env=env)
    assert res.returncode == 0, res.stderr
    st = sim.stats()
    paid = {h for h, n in st["paid_by_hash"].items() if n}
    assert set(st["paid_by_hash"].values()) <= {1}, "a task was paid twice"
    assert paid == {hashes[k] for k in set(hashes) - done_after}, "salvage did not redo exactly the lost tasks"
    res = run_cli("verify", "--state-dir", str(state), env=env)
    assert res.returncode == 0 and "DAMAGED" not in res.stdout, res.stdout
    res = run_cli("export", "--state-dir", str(state), "--format", "prompts", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == base["reference"].read_bytes()
    # Sequence numbers are never used twice: lost records keep theirs as placeholders.
    seqs = [r["seq"] for r in journal_records(state)]
    assert seqs == list(range(1, len(seqs) + 1))


def test_a_damaged_index_body_is_found_when_it_is_read(base: dict[str, Path], tmp_path: Path,
                                                       sim: SimProcess) -> None:
    """A run's data and index are checked when they are read (and all of them by verify), not at every start."""
    from asyncraft.storage import runfile

    state = tmp_path / "state"
    shutil.copytree(base["finished"], state)
    idx = _runs(state)[1].with_suffix(".idx")
    header = runfile.read_header(idx)
    body = len(idx.read_bytes().split(b"\n", 1)[0]) + 1
    offset, length, _crc = header.sections["entries"]
    _flip(idx, body + offset + length // 2)  # the record entries, which readers use and a start does not
    env = cli_env(sim)
    res = run_cli("verify", "--state-dir", str(state), env=env)
    assert res.returncode == 1 and str(idx) in res.stdout, res.stdout
    out = tmp_path / "out.jsonl"
    res = run_cli("export", "--state-dir", str(state), "--format", "prompts", "--out", str(out), env=env)
    assert res.returncode == 1 and str(idx) in res.stderr, res.stderr
    res = run_cli("run", "--input", str(base["input"]), "--state-dir", str(state), "--salvage", env=env)
    assert res.returncode == 0, res.stderr
    assert sim.stats()["paid"] == 0, "the index is rebuilt from the intact run: nothing is lost"
    assert run_cli("verify", "--state-dir", str(state), env=env).returncode == 0
