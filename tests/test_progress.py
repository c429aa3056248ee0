"""Progress output of the real CLI: structured lines off a terminal (text and JSON), a live table on one."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import cli_env, run_cli, write_prompts
from tests.helpers import ROOT

N = 150
LINE = re.compile(
    r"^asyncraft: progress (?P<done>\d+)/(?P<total>\d+|\?) done(?: \((?P<pct>[\d.]+)%\))?, (?P<failed>\d+) failed, "
    r"(?P<flight>\d+) in flight, (?P<rate>[\d.]+)/s, ETA (?P<eta>\S+) \| tokens (?P<pt>\d+)\+(?P<ct>\d+) "
    r"\(\S+/s\) \| cost \$(?P<cost>[\d.]+) \(projected (?P<proj>\$[\d.]+|\?)\) \| prompts of \d+, \+\d+ done [\d.]+/s "
    r"\d+ in flight$")


def _env(sim: Any, **extra: str) -> dict[str, str]:
    return cli_env(sim, ASYNCRAFT_CONCURRENCY="4", ASYNCRAFT_PROGRESS_INTERVAL="0.2",
                   ASYNCRAFT_PRICE_INPUT_PER_M="3", ASYNCRAFT_PRICE_OUTPUT_PER_M="15", **extra)


def test_progress_lines_off_a_terminal(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--latency-ms", "30")
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, N)
    res = run_cli("run", "--input", str(inp), "--state-dir", str(tmp_path / "state"), env=_env(sim))
    assert res.returncode == 0, res.stderr
    assert "\x1b[" not in res.stderr, "control codes in a log that is not a terminal"
    lines = [m for m in map(LINE.match, res.stderr.splitlines()) if m]
    assert len(lines) >= 3, res.stderr
    done = [int(m["done"]) for m in lines]
    assert done == sorted(done) and done[-1] > done[0]
    assert all(m["total"] == str(N) for m in lines)
    # The calls take at least N / 4 * 30 ms = 1.1 s of the simulator's latency: several lines fall inside them,
    # however slowly this machine starts the run.
    mid = next(m for m in lines if 0 < int(m["done"]) < N)
    assert float(mid["rate"]) > 0 and mid["eta"] != "?"
    cost = (int(mid["pt"]) * 3 + int(mid["ct"]) * 15) / 1e6
    assert abs(float(mid["cost"]) - cost) < 1e-4
    assert float(mid["proj"].lstrip("$")) >= float(mid["cost"])


def test_progress_lines_as_json(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--latency-ms", "30")
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, N)
    res = run_cli("run", "--input", str(inp), "--state-dir", str(tmp_path / "state"),
                  env=_env(sim, ASYNCRAFT_LOG_FORMAT="json"))
    assert res.returncode == 0, res.stderr
    events = [orjson.loads(line) for line in res.stderr.splitlines()]  # every line is JSON, logs included
    progress = [e for e in events if e.get("event") == "progress"]
    assert len(progress) >= 3, res.stderr
    for e in progress:
        assert e["total"] == N and e["job"] == "prompts" and isinstance(e["t"], float)
        assert e["in_flight"] <= 4
        assert e["cost"] == round((e["prompt_tokens"] * 3 + e["completion_tokens"] * 15) / 1e6, 6)
        assert set(e["stages"]) == {"prompts"}
    assert [e["done"] for e in progress] == sorted(e["done"] for e in progress)
    mid = next(e for e in progress if 0 < e["done"] < N)
    assert mid["rate_per_s"] > 0 and mid["eta_s"] is not None and mid["cost_projected"] >= mid["cost"]
    assert all(e["stages"]["prompts"]["done"] == e["done_this_run"] for e in progress)
    assert any(e.get("msg", "").startswith("finished") for e in events)


def test_live_table_on_a_terminal(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--latency-ms", "30")
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, N)
    master, slave = pty.openpty()
    env = _env(sim, COLUMNS="100", LINES="30")
    proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir",
                             str(tmp_path / "state")], env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        proc.wait(30)
    out = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, out
    assert "\x1b[" in out, "no live display on a terminal"
    assert "progress " not in out, "log-style progress lines on a terminal"
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)
    assert f"{N}/{N} done" in plain and "ETA" in plain and "prompts" in plain
    assert "projected $" in plain
    assert re.search(r"tok/s", plain)
    # Log lines still reach the terminal, after the table.
    assert "finished:" in plain
