"""Several base URLs: calls spread by free capacity, a failing endpoint is backed off and the others take its work."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from asyncraft.endpoints import endpoint_label
from tests.conftest import cli_env, run_cli, write_prompts
from tests.helpers import ROOT, SimProcess


def export_rows(state: Path, env: dict[str, str], tmp: Path) -> list[dict[str, Any]]:
    out = tmp / "results.jsonl"
    res = run_cli("export", "--state-dir", str(state), "--format", "prompts", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    return [orjson.loads(line) for line in out.read_bytes().splitlines()]


def status_of(state: Path) -> dict[str, Any]:
    return orjson.loads((state / "status.json").read_bytes())  # type: ignore[no-any-return]


def two_urls(a: SimProcess, b: SimProcess) -> str:
    return f"{a.base_url},{b.base_url}"


@pytest.mark.slow
def test_failing_endpoint_is_backed_off_and_the_other_takes_its_work(sim_factory: Any, tmp_path: Path) -> None:
    good = sim_factory("--latency-ms", "10")
    bad = sim_factory("--latency-ms", "10", "--p-500", "1")
    n = 200
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, n)
    state = tmp_path / "state"
    env = cli_env(good, ASYNCRAFT_BASE_URL=two_urls(good, bad), ASYNCRAFT_CONCURRENCY="8")
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), env=env)
    assert res.returncode == 0, res.stderr
    rows = export_rows(state, env, tmp_path)
    assert [r["custom_id"] for r in rows] == [f"req-{i}" for i in range(n)] and all(r["status"] == "ok" for r in rows)

    good_stats, bad_stats = good.settled_stats(), bad.settled_stats()
    assert good_stats["paid"] == n and bad_stats["paid"] == 0
    assert bad_stats["requests"] >= 1, "the failing endpoint was never tried"
    # Backed off (probed now and then), not sent an equal share of the calls.
    assert bad_stats["requests"] <= 30, bad_stats["requests"]
    st = status_of(state)
    # The calls moved to the good endpoint at once: the scheduler saw no error and spent no retry.
    assert st["calls"] == {"ok": n} and st["retries"] == 0
    by_label = {e["endpoint"]: e for e in st["endpoints"]}
    assert by_label[endpoint_label(bad.base_url)]["calls"] == {"500": bad_stats["requests"]}
    assert not by_label[endpoint_label(bad.base_url)]["up"]
    assert "endpoint 127.0.0.1" in res.stderr and "other endpoints take its calls" in res.stderr


def test_calls_are_spread_by_free_capacity(sim_factory: Any, tmp_path: Path) -> None:
    fast = sim_factory("--latency-ms", "5")
    slow = sim_factory("--latency-ms", "80")
    n = 300
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, n)
    env = cli_env(fast, ASYNCRAFT_BASE_URL=two_urls(slow, fast), ASYNCRAFT_CONCURRENCY="8")
    res = run_cli("run", "--input", str(inp), "--state-dir", str(tmp_path / "state"), env=env)
    assert res.returncode == 0, res.stderr
    fast_paid, slow_paid = fast.settled_stats()["paid"], slow.settled_stats()["paid"]
    assert fast_paid + slow_paid == n
    assert slow_paid > 0, "the slower endpoint got nothing: not spread"
    # The fast server frees its slots sooner, so it takes more of the calls.
    assert fast_paid > 2 * slow_paid, (fast_paid, slow_paid)


@pytest.mark.slow
def test_endpoint_that_goes_away_mid_run(sim_factory: Any, tmp_path: Path) -> None:
    a = sim_factory("--latency-ms", "20")
    b = sim_factory("--latency-ms", "20")
    n = 300
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, n)
    state = tmp_path / "state"
    env = cli_env(a, ASYNCRAFT_BASE_URL=two_urls(a, b), ASYNCRAFT_CONCURRENCY="8")
    proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir",
                             str(state)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while b.stats()["paid"] < 40:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the endpoint died"
        time.sleep(0.01)
    b.proc.kill()  # as a crashed replica: connections reset, new ones refused
    b.proc.wait()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    rows = export_rows(state, env, tmp_path)
    assert len(rows) == n and all(r["status"] == "ok" for r in rows)
    st = status_of(state)
    assert st["calls"].get("ok") == n and st["retries"] == 0, st["calls"]
    assert a.settled_stats()["paid"] >= n - 40 - 8  # the rest of the work, besides what b answered before dying


def test_endpoint_that_refuses_the_key_is_taken_out(sim_factory: Any, tmp_path: Path) -> None:
    good = sim_factory()
    locked = sim_factory("--api-key", "another-key")
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, 60)
    state = tmp_path / "state"
    env = cli_env(good, ASYNCRAFT_BASE_URL=two_urls(locked, good), ASYNCRAFT_CONCURRENCY="4")
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), env=env)
    assert res.returncode == 0, res.stderr
    assert good.settled_stats()["paid"] == 60
    assert locked.settled_stats()["requests"] <= 4  # at most one wave of calls before it is taken out
    assert "refuses calls" in res.stderr and "test-SECRETKEY-not-a-real-key" not in res.stderr


def test_labels_never_carry_credentials() -> None:
    assert endpoint_label("https://user:pw-secret@api.example.com:8443/v1/?key=k-secret") == "api.example.com:8443/v1"
    assert endpoint_label("http://10.0.0.7:8000/v1") == "10.0.0.7:8000/v1"
