"""Task lookups in the runs' indexes: what they find, what they hold open, and damage in what they read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from asyncraft import records
from asyncraft.storage import FS, runfile
from asyncraft.storage.taskindex import DONE, RunDamage, RunTasks
from asyncraft.storage.tasks import TaskStates

RUNS = 6
TASKS = 300  # three blocks of the sorted table per run


def _write_runs(runs_dir: Path) -> tuple[list[Path], list[list[str]]]:
    fs, seq = FS(), 1
    paths, ids = [], []
    for r in range(RUNS):
        first = seq
        run_ids = [records.content_id("task", r, i) for i in range(TASKS)]
        lines = []
        for tid in run_ids:
            lines.append(records.encode({"k": "done", "id": tid, "stage": "s", "seq": seq, "b": first}))
            seq += 1
        lines.append(records.encode({"k": "seal", "next": seq + 1, "seq": seq, "b": first}))
        seq += 1
        header = runfile.write_run(fs, runs_dir, lines, first)
        paths.append(runfile.index_path_for(runs_dir / header.name))
        ids.append(run_ids)
    return paths, ids


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd (Linux)")
def test_lookups_find_every_task_and_hold_no_file_open(tmp_path: Path) -> None:
    # The descriptors a run needs must not grow with its history: the start raises RLIMIT_NOFILE for the calls
    # only. A memory-mapped index held one per run (and grew the resident size with every lookup).
    paths, ids = _write_runs(tmp_path)
    before = _open_fds()
    states = TaskStates([runfile.open_tasks(p) for p in paths])
    try:
        for run_ids in ids:
            assert all(states.state(records.id_key(tid))[0] == DONE for tid in run_ids)
        assert states.state(records.id_key(records.content_id("never run")))[0] != DONE
        assert _open_fds() == before
    finally:
        states.close()


def test_a_damaged_task_block_is_reported_where_it_is(tmp_path: Path) -> None:
    paths, ids = _write_runs(tmp_path)
    path = paths[2]
    header = runfile.read_header(path)
    body_start = len(path.read_bytes().split(b"\n", 1)[0]) + 1
    offset, length, _crc = header.sections["tasks"]
    blob = bytearray(path.read_bytes())
    at = body_start + offset + length // 2
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))
    run = RunTasks(path, body_start, header.as_dict())  # the table is read lazily: opening succeeds
    with pytest.raises(RunDamage) as err:
        for tid in ids[2]:
            run.get(bytes.fromhex(tid))
    assert err.value.path == path and body_start + offset <= err.value.offset <= at
