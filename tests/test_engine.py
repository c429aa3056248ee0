"""The engine's behaviour under the failures of the real world, shown with the real CLI against the
built-in simulator: hung connections, 429 storms, fatal API errors, malformed answers and input,
a full disk, failing fsync, signals, duplicates, configuration changes, and the API key.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import cli_env, run_cli, write_prompts
from tests.helpers import ROOT, task_states

KEY = "test-SECRETKEY-not-a-real-key-0123456789"  # the key cli_env() gives every run


def run_job(inp: Path, state: Path, env: dict[str, str], *extra: str, timeout: float = 120,
            ) -> subprocess.CompletedProcess[str]:
    return run_cli("run", "--input", str(inp), "--state-dir", str(state), *extra, env=env, timeout=timeout)


def export_rows(state: Path, env: dict[str, str], out: Path) -> list[dict[str, Any]]:
    res = run_cli("export", "--state-dir", str(state), "--format", "prompts", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    return [orjson.loads(line) for line in out.read_bytes().splitlines()]


def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def durable_ids(state: Path) -> set[int]:
    return task_states(state).settled


# -- provider failures -------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "stall", "total", "message"), [
    ("--p-stall", "0.3", "10", "call stalled: no byte"),
    ("--p-hang", "600", "0.5", "ASYNCRAFT_REQUEST_TIMEOUT"),
], ids=["stream-stops", "no-answer"])
@pytest.mark.slow
def test_hung_calls_are_cancelled_and_retried(sim_factory: Any, tmp_path: Path, fault: str, stall: str, total: str,
                                              message: str) -> None:
    """A stream that stops sending is ended after ASYNCRAFT_STALL_TIMEOUT without a byte; a call that
    never answers at all is ended by ASYNCRAFT_REQUEST_TIMEOUT (the other limit set out of reach)."""
    sim = sim_factory(fault, "0.25", "--seed", "5")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 40)
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="8", ASYNCRAFT_STALL_TIMEOUT=stall, ASYNCRAFT_REQUEST_TIMEOUT=total,
                  ASYNCRAFT_MAX_RETRIES="20")
    res = run_job(inp, tmp_path / "state", env, timeout=90)
    assert res.returncode == 0, res.stderr
    st = sim.stats()
    hung = st["faults"].get("stall", 0) + st["faults"].get("hang", 0)
    assert hung >= 3, st  # the server really held connections open
    rows = export_rows(tmp_path / "state", env, tmp_path / "out.jsonl")
    assert [r["status"] for r in rows] == ["ok"] * 40
    status = orjson.loads((tmp_path / "state" / "status.json").read_bytes())
    assert status["calls"].get("ProviderTimeout", 0) >= hung - 1
    assert message in status["last_error"] or message in res.stderr or status["calls"].get("ProviderTimeout")


@pytest.mark.slow
def test_429_storm_with_retry_after_finishes_and_pays_each_call_once(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--p-429", "0.5", "--fault-retry-after", "0.05", "--seed", "9")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 60)
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="16", ASYNCRAFT_MAX_RETRIES="50")
    res = run_job(inp, tmp_path / "state", env)
    assert res.returncode == 0, res.stderr
    st = sim.stats()
    assert st["by_status"]["429"] >= 20, st
    assert st["paid"] == 60 and set(st["paid_by_hash"].values()) == {1}
    assert [r["status"] for r in export_rows(tmp_path / "state", env, tmp_path / "o.jsonl")] == ["ok"] * 60


@pytest.mark.parametrize("style", ["openai", "litellm"])
@pytest.mark.slow
def test_server_rate_limit_headers_are_followed(sim_factory: Any, tmp_path: Path, style: str) -> None:
    """No client limit configured: the client paces to the limit of the server's headers (OpenAI's
    x-ratelimit-* or LiteLLM's x-ratelimit-api_key-*), from the first answers on."""
    sim = sim_factory("--rpm", "1200", "--limit-headers", style)  # 20 requests/s, enforced per second
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 60)
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="30")
    res = run_job(inp, tmp_path / "state", env)
    assert res.returncode == 0, res.stderr
    assert "server allows 1200 requests/min" in res.stderr
    st = sim.stats()
    assert st["by_status"].get("429", 0) <= 1, st
    assert st["paid"] == 60 and st["started"] == 60


@pytest.mark.parametrize(("sim_args", "env_extra", "expect"), [
    (("--api-key", "the-right-key"), {}, "HTTP 401"),
    (("--models", "sim-1"), {"ASYNCRAFT_MODEL": "no-such-model", "ASYNCRAFT_MODEL_CHECK": "off"}, "model_not_found"),
], ids=["wrong-key", "unknown-model-404"])
@pytest.mark.slow
def test_fatal_errors_stop_at_once_with_exit_75_and_resume(sim_factory: Any, tmp_path: Path,
                                                           sim_args: tuple[str, ...], env_extra: dict[str, str],
                                                           expect: str) -> None:
    sim = sim_factory(*sim_args)
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 100)
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="4", **env_extra)
    res = run_job(inp, tmp_path / "state", env)
    assert res.returncode == 75, res.stderr
    assert expect in res.stderr and "run the same command again" in res.stderr
    assert res.stderr.count(expect) == 1, res.stderr  # the server's message, once
    assert sim.stats()["requests"] <= 4, "retries were burnt on a fatal error"
    assert KEY not in res.stderr
    # Fix the cause, run the same command: it finishes, without --allow-config-change.
    sim.reconfigure(api_key="", models="")
    res = run_job(inp, tmp_path / "state", cli_env(sim, ASYNCRAFT_CONCURRENCY="4"))
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_insufficient_quota_stops_cleanly_and_nothing_done_is_paid_again(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--quota-calls", "30")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 80)
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="4")
    res = run_job(inp, tmp_path / "state", env)
    assert res.returncode == 75, res.stderr
    assert "insufficient_quota" in res.stderr
    assert len(durable_ids(tmp_path / "state")) == 30  # every paid answer was kept
    sim.reconfigure(quota_calls=0)
    res = run_job(inp, tmp_path / "state", env)
    assert res.returncode == 0, res.stderr
    st = sim.stats()
    assert st["paid"] == 80 and set(st["paid_by_hash"].values()) == {1}


@pytest.mark.slow
def test_a_400_fails_only_its_own_task(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory()
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 10)
    lines = inp.read_bytes().splitlines(keepends=True)
    bad = orjson.loads(lines[3])
    bad["body"]["messages"][0]["content"] += " [[sim:bad-request]]"
    lines[3] = orjson.dumps(bad) + b"\n"
    inp.write_bytes(b"".join(lines))
    env = cli_env(sim)
    res = run_job(inp, tmp_path / "state", env)
    assert res.returncode == 0, res.stderr
    rows = export_rows(tmp_path / "state", env, tmp_path / "o.jsonl")
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["failed"] + ["ok"] * 6
    assert rows[3]["error"]["status"] == 400
    errors = [orjson.loads(x) for x in (tmp_path / "state" / "errors.jsonl").read_bytes().splitlines()]
    assert [e["custom_id"] for e in errors] == ["req-3"]
    # A failed task is not retried by a plain rerun (it would fail again and cost money) ...
    assert run_job(inp, tmp_path / "state", env).returncode == 0
    assert sim.stats()["by_status"]["400"] == 1
    # ... but is with --retry-failed.
    assert run_job(inp, tmp_path / "state", env, "--retry-failed").returncode == 0
    assert sim.stats()["by_status"]["400"] == 2


@pytest.mark.slow
def test_malformed_answers_and_connection_resets_are_retried(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--p-malformed", "0.2", "--p-reset", "0.2", "--p-500", "0.1", "--p-503", "0.1",
                      "--fault-retry-after", "0.01", "--seed", "4")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 50)
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="8", ASYNCRAFT_MAX_RETRIES="30")
    res = run_job(inp, tmp_path / "state", env)
    assert res.returncode == 0, res.stderr
    faults = sim.stats()["faults"]
    assert faults.get("malformed", 0) > 0 and faults.get("reset", 0) > 0 and faults.get("500", 0) > 0
    assert [r["status"] for r in export_rows(tmp_path / "state", env, tmp_path / "o.jsonl")] == ["ok"] * 50


@pytest.mark.slow
def test_calls_still_failing_after_max_retries_are_left_for_the_next_run(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--p-500", "1.0")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 5)
    env = cli_env(sim, ASYNCRAFT_MAX_RETRIES="2")
    res = run_job(inp, tmp_path / "state", env)
    assert res.returncode == 75, res.stderr
    assert "still failing after 2 retries" in res.stderr
    assert sim.stats()["requests"] == 15  # 5 tasks x (1 + 2 retries), then it stopped trying
    sim.reconfigure(p_500=0.0)
    assert run_job(inp, tmp_path / "state", env).returncode == 0
    assert [r["status"] for r in export_rows(tmp_path / "state", env, tmp_path / "o.jsonl")] == ["ok"] * 5


def test_concurrency_cap_holds(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--latency-ms", "30")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 120)
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="7")
    assert run_job(inp, tmp_path / "state", env).returncode == 0
    assert sim.stats()["max_in_flight"] == 7


# -- input --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_malformed_input_lines_are_recorded_with_line_numbers(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory()
    inp = tmp_path / "in.jsonl"
    good = {"messages": [{"role": "user", "content": "hello"}]}
    inp.write_bytes(b"\n".join([
        orjson.dumps({"custom_id": "a", **good}),
        b"{not json",
        b"[1, 2]",
        orjson.dumps({"custom_id": "c", "messages": []}),
        orjson.dumps({"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": good}),
        b"",
        orjson.dumps({"custom_id": "e", "messages": [{"role": "user", "content": "bye"}], "temperature": 0}),
    ]) + b"\n")
    env = cli_env(sim)
    res = run_job(inp, tmp_path / "state", env)
    assert res.returncode == 0, res.stderr
    errors = [orjson.loads(x) for x in (tmp_path / "state" / "errors.jsonl").read_bytes().splitlines()]
    assert [e["line"] for e in errors] == [2, 3, 4, 5]
    # Line 5 is an embeddings request with a chat body: no "input".
    assert "not valid JSON" in errors[0]["msg"] and '"input"' in errors[3]["msg"]
    rows = export_rows(tmp_path / "state", env, tmp_path / "o.jsonl")
    assert [(r["line"], r["status"]) for r in rows] == [(1, "ok"), (2, "invalid"), (3, "invalid"), (4, "invalid"),
                                                        (5, "invalid"), (6, "blank"), (7, "ok")]
    status = run_cli("status", "--state-dir", str(tmp_path / "state"), "--json", env=env)
    st = orjson.loads(status.stdout)
    assert (st["total"], st["done"], st["failed"], st["pending"], st["input_problems"]) == (2, 2, 0, 0, 4)


@pytest.mark.slow
def test_identical_requests_are_paid_once_and_a_rerun_pays_nothing(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory()
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 20)
    lines = inp.read_bytes().splitlines(keepends=True)
    # The same bodies again under other custom_ids: an identical request must not be paid twice.
    dup = [orjson.dumps({**orjson.loads(x), "custom_id": f"dup-{i}"}) + b"\n" for i, x in enumerate(lines[:10])]
    inp.write_bytes(b"".join(lines + dup))
    env = cli_env(sim)
    assert run_job(inp, tmp_path / "state", env).returncode == 0
    assert sim.stats()["paid"] == 20
    rows = export_rows(tmp_path / "state", env, tmp_path / "o.jsonl")
    assert len(rows) == 30 and all(r["status"] == "ok" for r in rows)
    assert [r["content"] for r in rows[20:]] == [r["content"] for r in rows[:10]]
    assert run_job(inp, tmp_path / "state", env).returncode == 0
    assert sim.stats()["requests"] == 20
    # An edited line costs exactly one call.
    lines[5] = lines[5].replace(b"fact number 5", b"fact number five")
    inp.write_bytes(b"".join(lines))
    assert run_job(inp, tmp_path / "state", env).returncode == 0
    assert sim.stats()["requests"] == 21


@pytest.mark.slow
def test_another_model_is_refused_unless_asked_for(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--models", "sim-1,sim-2")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 5)
    state = tmp_path / "state"
    assert run_job(inp, state, cli_env(sim)).returncode == 0
    res = run_job(inp, state, cli_env(sim, ASYNCRAFT_MODEL="sim-2"))
    assert res.returncode == 2
    assert "model: 'sim-1' -> 'sim-2'" in res.stderr and "--allow-config-change" in res.stderr
    assert sim.stats()["requests"] == 5
    res = run_job(inp, state, cli_env(sim, ASYNCRAFT_MODEL="sim-2"), "--allow-config-change")
    assert res.returncode == 0, res.stderr
    assert sim.stats()["requests"] == 10  # new model, new requests


def test_a_second_run_on_the_same_state_dir_is_refused(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--latency-ms", "200")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 50)
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="2")
    first = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir",
                              str(tmp_path / "state")], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sim.stats()["requests"] > 0, what="the first run to start calling")
        res = run_job(inp, tmp_path / "state", env)
        assert res.returncode == 1 and "in use by another asyncraft run" in res.stderr
    finally:
        first.kill()
        first.wait()


# -- the journal's disk ----------------------------------------------------------------------------------


def test_disk_full_stops_cleanly_then_resumes(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory()
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 60)
    state = tmp_path / "state"
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="4", ASYNCRAFT_DISK_FULL_WAIT="0.3", ASYNCRAFT_FSYNC_INTERVAL="0")
    res = run_job(inp, state, {**env, "ASYNCRAFT_FAILPOINTS": "journal.write=enospc@10+"})
    assert res.returncode == 75, res.stderr
    assert "disk full" in res.stderr and "free some space" in res.stderr
    assert run_cli("verify", "--state-dir", str(state), env=env).returncode == 0  # nothing half-written
    kept = durable_ids(state)
    assert 0 < len(kept) < 60
    res = run_job(inp, state, env)
    assert res.returncode == 0, res.stderr
    assert [r["status"] for r in export_rows(state, env, tmp_path / "o.jsonl")] == ["ok"] * 60


@pytest.mark.slow
def test_a_short_disk_full_is_ridden_out(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory()
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 30)
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="4", ASYNCRAFT_FAILPOINTS="journal.write=enospc@5")
    res = run_job(inp, tmp_path / "state", env)
    assert res.returncode == 0, res.stderr
    assert "disk full" in res.stderr and "retrying" in res.stderr
    assert sim.stats()["paid"] == 30


@pytest.mark.parametrize("failpoint", ["journal.fsync=eio@10", "journal.write=eio@10"])
@pytest.mark.slow
def test_io_errors_are_fatal_and_recovery_decides(sim_factory: Any, tmp_path: Path, failpoint: str) -> None:
    sim = sim_factory()
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 40)
    state = tmp_path / "state"
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="4", ASYNCRAFT_FSYNC_INTERVAL="0")
    res = run_job(inp, state, {**env, "ASYNCRAFT_FAILPOINTS": failpoint})
    assert res.returncode == 74, res.stderr
    assert "Input/output error" in res.stderr
    res = run_job(inp, state, env)
    assert res.returncode == 0, res.stderr
    assert [r["status"] for r in export_rows(state, env, tmp_path / "o.jsonl")] == ["ok"] * 40
    assert run_cli("verify", "--state-dir", str(state), env=env).returncode == 0


# -- signals ---------------------------------------------------------------------------------------------


def test_sigterm_lets_calls_in_flight_finish_so_none_is_wasted(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--latency-ms", "300")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 60)
    state = tmp_path / "state"
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="10")
    proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir", str(state)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: sim.stats()["paid"] >= 15 and sim.stats()["in_flight"] > 0, what="calls in flight")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert "SIGTERM" in err
    st = sim.stats()
    assert st["in_flight"] == 0
    assert len(durable_ids(state)) == st["paid"], "a call answered during the grace period was not kept"
    assert list((state / "snapshots").glob("manifest-*.json")), "no snapshot at shutdown"
    res = run_job(inp, state, env)
    assert res.returncode == 0, res.stderr
    st = sim.stats()
    assert st["paid"] == 60 and set(st["paid_by_hash"].values()) == {1}


@pytest.mark.slow
def test_calls_still_in_flight_when_the_grace_period_ends_are_cancelled(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--latency-ms", "30000")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 20)
    state = tmp_path / "state"
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="5", ASYNCRAFT_GRACE="0.5")
    proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir", str(state)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: sim.stats()["in_flight"] == 5, what="calls in flight")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 75, err
    assert time.monotonic() - t0 < 10, "calls in flight outlived the grace period"
    assert "Traceback" not in err
    wait_for(lambda: sim.stats()["in_flight"] == 0, what="the server to see the connections close")
    assert durable_ids(state) == set(), "nothing was answered, so nothing may be recorded as done"
    assert run_cli("verify", "--state-dir", str(state), env=env).returncode == 0
    sim.reconfigure(latency_ms=0.0)
    res = run_job(inp, state, env)
    assert res.returncode == 0, res.stderr
    assert [r["status"] for r in export_rows(state, env, tmp_path / "o.jsonl")] == ["ok"] * 20


@pytest.mark.slow
def test_a_second_signal_exits_at_once_without_damage(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--latency-ms", "30000")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 20)
    state = tmp_path / "state"
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="5")
    proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir", str(state)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: sim.stats()["in_flight"] == 5, what="calls in flight")
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    wait_for(lambda: "finishing 5 call(s) in flight" in proc.stderr.readline(), what="the first signal's message")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 75, err
    assert time.monotonic() - t0 < 10, "the second signal did not exit at once"
    assert run_cli("verify", "--state-dir", str(state), env=env).returncode == 0
    sim.reconfigure(latency_ms=0.0)
    assert run_job(inp, state, env).returncode == 0


# -- secrets -----------------------------------------------------------------------------------------------


def test_the_api_key_is_written_nowhere(sim_factory: Any, tmp_path: Path) -> None:
    """Runs that fail on the key (the server echoes it), fail on faults, and succeed: the key appears
    in no file of the state dir, the export, or any output."""
    sim = sim_factory("--api-key", "another-key", "--p-500", "0.2", "--seed", "1")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 20)
    state = tmp_path / "state"
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="4")
    outputs = []
    res = run_job(inp, state, env)
    assert res.returncode == 75 and "Incorrect API key provided: ***" in res.stderr
    outputs += [res.stdout, res.stderr]
    sim.reconfigure(api_key=KEY)
    res = run_job(inp, state, env, "-v")
    assert res.returncode == 0, res.stderr
    outputs += [res.stdout, res.stderr]
    for cmd in (("status", "--json"), ("tail", "-n", "100"), ("verify",)):
        r = run_cli(*cmd, "--state-dir", str(state), env=env)
        outputs += [r.stdout, r.stderr]
    export_rows(state, env, tmp_path / "export.jsonl")
    files = [p for p in state.rglob("*") if p.is_file()] + [tmp_path / "export.jsonl"]
    assert len(files) > 5
    for p in files:
        assert KEY.encode() not in p.read_bytes(), p
    for text in outputs:
        assert KEY not in text


def test_openai_sdk_works_against_the_simulator(sim_factory: Any) -> None:
    openai = pytest.importorskip("openai")
    sim = sim_factory("--models", "sim-1,sim-embed")
    client = openai.OpenAI(base_url=sim.base_url, api_key="k", max_retries=0)
    try:
        r = client.chat.completions.create(model="sim-1", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        assert r.choices[0].message.content and r.usage is not None and r.usage.completion_tokens <= 8
        streamed = client.chat.completions.create(model="sim-1", messages=[{"role": "user", "content": "hi"}],
                                                  stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        full = client.chat.completions.create(model="sim-1", messages=[{"role": "user", "content": "hi"}])
        assert text == full.choices[0].message.content
        emb = client.embeddings.create(model="sim-embed", input=["a b", "c"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 64
        assert "sim-1" in [m.id for m in client.models.list()]
    finally:
        client.close()


def test_status_tail_and_verify_on_a_finished_run(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory()
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 30)
    state = tmp_path / "state"
    env = cli_env(sim, ASYNCRAFT_SNAPSHOT_EVERY="7")
    assert run_job(inp, state, env).returncode == 0
    st = orjson.loads(run_cli("status", "--state-dir", str(state), "--json", env=env).stdout)
    assert (st["total"], st["done"], st["failed"], st["pending"]) == (30, 30, 0, 0)
    assert st["prompt_tokens"] > 0 and st["completion_tokens"] > 0
    tail = run_cli("tail", "--state-dir", str(state), "-n", "5", env=env)
    assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 5
    raw = run_cli("tail", "--state-dir", str(state), "-n", "1000", "--json", env=env)
    seqs = [orjson.loads(x)["seq"] for x in raw.stdout.splitlines()]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 31
    assert run_cli("verify", "--state-dir", str(state), env=env).returncode == 0
    missing = run_cli("status", "--state-dir", str(tmp_path / "nope"), env=env)
    assert missing.returncode == 2 and "not an asyncraft state dir" in missing.stderr
    assert not os.path.exists(tmp_path / "nope")


# -- caps and watch mode ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_token_budget_stops_cleanly_and_raising_it_continues(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory()
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 60)
    state = tmp_path / "state"
    env = cli_env(sim, ASYNCRAFT_CONCURRENCY="1")
    res = run_job(inp, state, env, "--max-tokens-total", "300")
    assert res.returncode == 75, res.stderr
    assert "token budget reached" in res.stderr
    st = sim.stats()
    used = st["prompt_tokens"] + st["completion_tokens"]
    assert 300 <= used < 300 + 40, used  # stopped at the first call past the cap (one in flight)
    again = run_job(inp, state, env, "--max-tokens-total", "300")
    assert again.returncode == 75 and sim.stats()["requests"] == st["requests"]  # nothing more was spent
    res = run_job(inp, state, env, "--max-tokens-total", "100000")
    assert res.returncode == 0, res.stderr
    assert sim.stats()["paid"] == 60


def test_watch_mode_picks_up_new_input_lines(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory()
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 5)
    state = tmp_path / "state"
    env = cli_env(sim)
    proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir", str(state),
                             "--watch", "--watch-interval", "0.1"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: sim.stats()["paid"] == 5, what="the first five")
        with open(inp, "ab") as fh:
            fh.write(orjson.dumps({"custom_id": "late", "messages": [{"role": "user", "content": "late"}]}) + b"\n")
        wait_for(lambda: sim.stats()["paid"] == 6, what="the appended line")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, err
    assert sim.stats()["requests"] == 6
    rows = export_rows(state, env, tmp_path / "o.jsonl")
    assert [r["custom_id"] for r in rows if r["status"] == "ok"] == [f"req-{i}" for i in range(5)] + ["late"]


@pytest.mark.slow
def test_prompts_export_to_parquet_matches_the_jsonl_export(sim_factory: Any, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    sim = sim_factory()
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 12)
    with open(inp, "ab") as fh:
        fh.write(b"{broken\n")
    env = cli_env(sim)
    assert run_job(inp, tmp_path / "state", env).returncode == 0
    rows = export_rows(tmp_path / "state", env, tmp_path / "o.jsonl")
    res = run_cli("export", "--state-dir", str(tmp_path / "state"), "--format", "prompts", "--out",
                  str(tmp_path / "o.parquet"), env=env)
    assert res.returncode == 0, res.stderr
    table = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [(r["line"], r["custom_id"], r["status"], r["content"]) for r in table] == \
        [(r["line"], r["custom_id"], r["status"], r.get("content")) for r in rows]
    assert table[0]["usage"] == rows[0]["usage"] and table[-1]["status"] == "invalid"
    bad = run_cli("export", "--state-dir", str(tmp_path / "state"), "--format", "prompts", "--out",
                  str(tmp_path / "o.csv"), env=env)
    assert bad.returncode != 0 and ".jsonl or .parquet" in bad.stderr
