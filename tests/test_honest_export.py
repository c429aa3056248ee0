"""An unfinished RAFT job is not exported as if complete: pending tasks are counted per stage and refused (exit 75)
unless --partial; a finished job's export is unchanged."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.conftest import cli_env, run_cli
from tests.helpers import ROOT, SimProcess

DOCS = ROOT / "asyncraft" / "data" / "docs"
RAFT = ("run", "--job", "raft", "--questions", "3", "--chunk-size", "64", "--input", str(DOCS))


@pytest.mark.slow
def test_a_stopped_raft_job_is_exported_only_when_asked(sim_factory: object, tmp_path: Path) -> None:
    sim: SimProcess = sim_factory("--latency-ms", "5")  # type: ignore[operator]
    state, out = tmp_path / "state", tmp_path / "train.jsonl"
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="4")
    # A token cap stops the run cleanly part of the way (a budget, not a record limit the user asked for).
    res = run_cli(*RAFT, "--state-dir", str(state), env={**env, "ASYNCRAFT_MAX_TOKENS_TOTAL": "20000"})
    assert res.returncode == 75, res.stderr
    st = orjson.loads(run_cli("status", "--state-dir", str(state), "--json", env=env).stdout)
    assert st["pending"] > 0

    res = run_cli("export", "--state-dir", str(state), "--format", "chat", "--out", str(out), env=env)
    assert res.returncode == 75, res.stderr
    assert f"{st['pending']} of {st['total']} tasks are pending (" in res.stderr and "answers " in res.stderr
    assert "--partial" in res.stderr and not out.exists()

    res = run_cli("export", "--state-dir", str(state), "--format", "chat", "--out", str(out), "--partial", env=env)
    assert res.returncode == 0, res.stderr
    rows = out.read_bytes().splitlines()
    assert f"{st['pending']} of {st['total']} tasks are pending" in res.stderr
    assert f"wrote {len(rows)} rows to {out}" in res.stderr and 0 < len(rows)

    assert run_cli(*RAFT, "--state-dir", str(state), env=env).returncode == 0
    st = orjson.loads(run_cli("status", "--state-dir", str(state), "--json", env=env).stdout)
    assert st["pending"] == 0 and st["total"] == st["done"] + st["failed"]
    assert all(s["pending"] == 0 for s in st["stages"].values()), st["stages"]
    res = run_cli("export", "--state-dir", str(state), "--format", "chat", "--out", str(out), env=env)
    assert res.returncode == 0 and "pending" not in res.stderr, res.stderr
    assert len(out.read_bytes().splitlines()) > len(rows)
