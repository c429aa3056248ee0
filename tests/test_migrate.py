"""State dirs written by 0.1.0 (state format 1, committed under tests/data/state-v1) are read and migrated on
open, atomically: a kill -9 in the middle of a migration leaves a state dir that the next start migrates
again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from asyncraft.storage import migrate
from asyncraft.storage.layout import StateDir
from tests.conftest import cli_env, run_cli
from tests.helpers import SimProcess, task_states

FIXTURES = Path(__file__).parent / "data" / "state-v1"


@pytest.fixture
def fixtures(tmp_path: Path) -> Path:
    dest = tmp_path / "v1"
    shutil.copytree(FIXTURES, dest)
    return dest


def test_export_of_a_format_1_state_dir_equals_what_0_1_0_exported(fixtures: Path, tmp_path: Path) -> None:
    env = cli_env()
    out = tmp_path / "p.jsonl"
    res = run_cli("export", "--state-dir", str(fixtures / "prompts-v1"), "--input", str(fixtures / "requests.jsonl"),
                  "--format", "prompts", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == (FIXTURES / "prompts-v1.export.jsonl").read_bytes()
    assert not migrate.needs_migration(StateDir(fixtures / "prompts-v1"))
    assert not list((fixtures / "prompts-v1").rglob("snap-*"))  # the format 1 files are gone
    assert not list((fixtures / "prompts-v1" / "runs").glob("*.jsonl"))
    out = tmp_path / "r.jsonl"
    res = run_cli("export", "--state-dir", str(fixtures / "raft-v1"), "--format", "raft", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == (FIXTURES / "raft-v1.export.jsonl").read_bytes()
    for name in ("prompts-v1", "raft-v1"):
        res = run_cli("verify", "--state-dir", str(fixtures / name), env=env)
        assert res.returncode == 0 and "note:" not in res.stdout, res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("point", ["migrate.before_commit", "migrate.after_commit"])
def test_kill9_mid_migration_then_resume_pays_only_the_missing_calls(point: str, fixtures: Path, sim: SimProcess,
                                                                      tmp_path: Path) -> None:
    state = fixtures / "prompts-v1-killed"
    env = cli_env(sim, ASYNCRAFT_FAILPOINTS=point)
    res = run_cli("run", "--input", str(fixtures / "requests.jsonl"), "--state-dir", str(state), env=env)
    assert res.returncode == -9, res.stderr
    assert sim.stats()["requests"] == 0, "a call was made before the migration finished"
    assert migrate.needs_migration(StateDir(state)) == (point == "migrate.before_commit")
    env = cli_env(sim)
    res = run_cli("run", "--input", str(fixtures / "requests.jsonl"), "--state-dir", str(state), env=env)
    assert res.returncode == 0, res.stderr
    st = sim.stats()
    # 0.1.0 had 27 of the 38 answers on disk when it was killed: exactly the other 11 are paid for.
    assert st["paid"] == 11 and set(st["paid_by_hash"].values()) == {1}
    assert len(task_states(state).done) == 38
    out = tmp_path / "k.jsonl"
    res = run_cli("export", "--state-dir", str(state), "--input", str(fixtures / "requests.jsonl"), "--format",
                  "prompts", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == (FIXTURES / "prompts-v1.export.jsonl").read_bytes()
    assert not list(state.rglob("snap-*")) and not list((state / "runs").glob("*.jsonl"))
