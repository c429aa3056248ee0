"""Calls end to end: the real CLI against the simulator subprocess on 127.0.0.1.

A slow answer is paid once; stray 429s delay only their calls; limits nobody announces are learned;
a run that cannot succeed stops early, says why once, and records no task as failed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import cli_env, run_cli, write_prompts
from tests.helpers import ROOT

KEY = "test-SECRETKEY-not-a-real-key-0123456789"
DOCS = ROOT / "asyncraft" / "data" / "docs"


def run_job(inp: Path, state: Path, env: dict[str, str], *extra: str, timeout: float = 120,
            ) -> subprocess.CompletedProcess[str]:
    return run_cli("run", "--input", str(inp), "--state-dir", str(state), *extra, env=env, timeout=timeout)


def timed(inp: Path, state: Path, env: dict[str, str], *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    res = run_job(inp, state, env, *extra)
    return res, time.monotonic() - t0


def status_of(state: Path) -> dict[str, Any]:
    return orjson.loads((state / "status.json").read_bytes())  # type: ignore[no-any-return]


def errors_of(state: Path) -> list[dict[str, Any]]:
    path = state / "errors.jsonl"
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def write_lines(path: Path, contents: list[str]) -> None:
    path.write_bytes(b"".join(orjson.dumps({"custom_id": f"c{i}", "messages": [{"role": "user", "content": c}],
                                            "max_tokens": 16}) + b"\n" for i, c in enumerate(contents)))


# -- a slow server is paid once ----------------------------------------------------------------------------


@pytest.mark.parametrize(("sim_args", "env_extra"), [
    (("--latency-ms", "500", "--token-ms", "60"), {}),
    pytest.param(("--latency-ms", "2400",), {"ASYNCRAFT_STREAM": "off"}, marks=pytest.mark.slow),
    pytest.param(("--latency-ms", "2400", "--stream-mode", "json"), {}, marks=pytest.mark.slow),
], ids=["streamed", "not-streamed", "server-cannot-stream"])
def test_a_server_slower_than_the_stall_timeout_starts_each_generation_once(
        sim_factory: Any, tmp_path: Path, sim_args: tuple[str, ...], env_extra: dict[str, str]) -> None:
    """Every answer takes about three stall timeouts. Streamed, bytes keep coming; not streamed, nothing comes
    until the end, and the stall timer must not cancel (and pay again) a call already sent."""
    sim = sim_factory(*sim_args)
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 8)
    env = cli_env(sim, ASYNCRAFT_STALL_TIMEOUT="0.8", ASYNCRAFT_CONCURRENCY="8", **env_extra)
    res, elapsed = timed(inp, tmp_path / "state", env)
    assert res.returncode == 0, res.stderr
    st = sim.settled_stats()
    assert st["started"] == 8 and set(st["started_by_hash"].values()) == {1}, st  # billable starts
    assert st["paid"] == 8 and st["requests"] == 8
    assert elapsed > 2.4  # the answers really took three stall timeouts
    assert status_of(tmp_path / "state")["calls"] == {"ok": 8}
    assert st["streamed"] == (8 if not env_extra and "--stream-mode" not in sim_args else 0)


# -- rate limits ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stray_429s_delay_only_their_own_calls(sim_factory: Any, tmp_path: Path) -> None:
    """2% of calls answered 429 with Retry-After: 1 and no sign of a used-up limit: each waits its second,
    nobody else slows down."""
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 600)
    clean = sim_factory("--latency-ms", "50")
    res, clean_time = timed(inp, tmp_path / "clean", cli_env(clean, ASYNCRAFT_CONCURRENCY="16"))
    assert res.returncode == 0, res.stderr
    stray = sim_factory("--latency-ms", "50", "--p-429", "0.02", "--fault-retry-after", "1", "--seed", "3")
    res, stray_time = timed(inp, tmp_path / "stray", cli_env(stray, ASYNCRAFT_CONCURRENCY="16"))
    assert res.returncode == 0, res.stderr
    st = stray.settled_stats()
    assert st["faults"]["429"] >= 5 and st["paid"] == 600 and set(st["paid_by_hash"].values()) == {1}
    assert "429s show a limit" not in res.stderr  # no pattern: nobody was slowed down
    assert stray_time < 2 * clean_time + 3.0, (clean_time, stray_time)


@pytest.mark.slow
def test_a_limit_the_server_does_not_announce_is_learned(sim_factory: Any, tmp_path: Path) -> None:
    """600 requests/min enforced with 429s and a whole-second Retry-After, no x-ratelimit headers."""
    sim = sim_factory("--rpm", "600", "--limit-headers", "none", "--latency-ms", "20")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 200)
    res, elapsed = timed(inp, tmp_path / "state", cli_env(sim, ASYNCRAFT_CONCURRENCY="32",
                                                          ASYNCRAFT_PROGRESS_INTERVAL="1"))
    assert res.returncode == 0, res.stderr
    st = sim.settled_stats()
    assert st["paid"] == 200 and set(st["paid_by_hash"].values()) == {1}
    assert "429s show a limit the server does not announce" in res.stderr
    assert "learned from 429s" in res.stderr  # the progress line says what the run waits for
    assert st["by_status"].get("429", 0) <= 0.2 * st["requests"], st["by_status"]
    assert elapsed >= 18.0  # the limit holds: 200 calls at 10 a second, less the first second's worth
    assert elapsed <= 200 / 10 / 0.7 + 10


@pytest.mark.slow
def test_a_five_requests_a_minute_key(sim_factory: Any, tmp_path: Path) -> None:
    """A whole minute's worth at once, then one call per 12 s, 429s with Retry-After only: the calls
    refused wait their turn one by one instead of firing together after each pause."""
    sim = sim_factory("--rpm", "5", "--limit-window", "60", "--limit-headers", "none")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 8)
    res, elapsed = timed(inp, tmp_path / "state", cli_env(sim, ASYNCRAFT_PROGRESS_INTERVAL="2"))
    assert res.returncode == 0, res.stderr
    st = sim.settled_stats()
    assert st["paid"] == 8 and st["by_status"].get("429", 0) <= 4, st["by_status"]
    assert elapsed >= 24  # three calls after the first five, 12 s apart at best


# -- a run that cannot succeed stops early -------------------------------------------------------------------


def test_a_model_the_server_does_not_list_is_refused_before_any_call(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--models", "gpt-4o-mini,gpt-4o,text-embedding-3-small")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 20)
    t0 = time.monotonic()
    res = run_job(inp, tmp_path / "state", cli_env(sim, ASYNCRAFT_MODEL="gpt-4o-mni"))
    assert res.returncode == 2 and time.monotonic() - t0 < 10
    assert "model 'gpt-4o-mni' is not served by" in res.stderr and "close matches: gpt-4o-mini" in res.stderr
    assert res.stderr.strip().count("\n") == 0, res.stderr  # one line
    assert sim.stats()["requests"] == 0 and not (tmp_path / "state").exists()


@pytest.mark.slow
def test_a_missing_embedding_model_is_refused_before_any_call(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--models", "sim-1")
    res = run_job(DOCS, tmp_path / "state", cli_env(sim), "--job", "raft", "--chunker", "semantic")
    assert res.returncode == 2, res.stderr
    assert "model 'text-embedding-3-small' is not served" in res.stderr and sim.stats()["requests"] == 0


def test_a_missing_key_is_refused_before_any_call(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--api-key", "the-right-key", "--models", "sim-1")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 20)
    env = {k: v for k, v in cli_env(sim).items() if k != "ASYNCRAFT_API_KEY"}
    res = run_job(inp, tmp_path / "state", env)
    assert res.returncode == 2 and "no API key" in res.stderr and "ASYNCRAFT_API_KEY" in res.stderr
    assert sim.stats()["requests"] == 0
    # A hosted API that always needs one is refused without asking it anything.
    res = run_job(inp, tmp_path / "state2", {**env, "ASYNCRAFT_BASE_URL": "https://api.openai.com/v1"})
    assert res.returncode == 2 and "https://api.openai.com/v1 needs one" in res.stderr


@pytest.mark.slow
def test_an_unknown_model_answered_400_stops_within_two_waves_and_the_fix_goes_on(sim_factory: Any,
                                                                                   tmp_path: Path) -> None:
    """LiteLLM's proxy answers an unknown model with 400: every first answer is the same refusal."""
    sim = sim_factory("--models", "sim-1", "--unknown-model-status", "400")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 300)
    state = tmp_path / "state"
    env = cli_env(sim, ASYNCRAFT_MODEL="sim-9", ASYNCRAFT_MODEL_CHECK="off", ASYNCRAFT_CONCURRENCY="16")
    res = run_job(inp, state, env)
    assert res.returncode == 75, res.stderr
    assert sim.stats()["requests"] <= 2 * 16
    assert res.stderr.count("Invalid model name passed in model=sim-9") == 1, res.stderr
    assert "no task was recorded as failed" in res.stderr and errors_of(state) == []
    assert status_of(state)["failed"] == 0
    res = run_job(inp, state, cli_env(sim, ASYNCRAFT_MODEL="sim-1"))  # the fix, without --allow-config-change
    assert res.returncode == 0, res.stderr
    assert status_of(state)["done"] == 300


@pytest.mark.slow
def test_a_bad_request_shared_by_every_line_stops_the_run(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory()
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [f"[[sim:bad-request]] question {i}" for i in range(100)])
    res = run_job(inp, tmp_path / "state", cli_env(sim, ASYNCRAFT_CONCURRENCY="4"))
    assert res.returncode == 75, res.stderr
    assert sim.stats()["requests"] <= 8 and errors_of(tmp_path / "state") == []


@pytest.mark.slow
def test_a_run_in_which_every_task_failed_exits_non_zero(sim_factory: Any, tmp_path: Path) -> None:
    """Each line refused for its own reason: those are the requests' failures, recorded, and the run says
    that nothing succeeded."""
    sim = sim_factory()
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [f"[[sim:bad-request:reason number {'abcdefghij'[i]}]]" for i in range(10)])
    res = run_job(inp, tmp_path / "state", cli_env(sim, ASYNCRAFT_CONCURRENCY="2"))
    assert res.returncode == 75, res.stderr
    assert "no task succeeded: 10 failed" in res.stderr
    assert len(errors_of(tmp_path / "state")) == 10


@pytest.mark.slow
def test_persistent_server_errors_show_in_the_progress_line(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--p-500", "1", "--latency-ms", "50")
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 5)
    env = cli_env(sim, ASYNCRAFT_MAX_RETRIES="3", ASYNCRAFT_BACKOFF_BASE="0.2", ASYNCRAFT_BACKOFF_MAX="0.5",
                  ASYNCRAFT_PROGRESS_INTERVAL="0.2")
    res = run_job(inp, tmp_path / "state", env)
    assert res.returncode == 75, res.stderr
    assert sim.stats()["requests"] == 5 * 4
    progress = [line for line in res.stderr.splitlines() if "progress" in line]
    assert any("errors 500x" in line and "The server had an error" in line for line in progress), progress
    assert "still failing after 3 retries" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("where", ["nothing-listening", "unknown-host"])
def test_a_server_that_is_not_there_is_named_at_once_and_the_run_stops(tmp_path: Path, where: str) -> None:
    if where == "nothing-listening":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # closed when the block ends
    else:
        url = "http://no-such-host.invalid/v1"  # .invalid never resolves (RFC 6761)
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 50)
    env = {**cli_env(), "ASYNCRAFT_BASE_URL": url}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir",
                             str(tmp_path / "state")], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    first = proc.stderr.readline()
    said_at = time.monotonic() - t0
    _, rest = proc.communicate(timeout=60)
    code = proc.returncode
    stopped_at = time.monotonic() - t0
    assert url in first and ("Connection refused" in first or "no-such-host" in first), first
    assert said_at < 5.0, said_at
    assert code == 75 and stopped_at < 30.0, (code, stopped_at, rest)
    assert "Traceback" not in first + rest


# -- configuration -----------------------------------------------------------------------------------------------


def test_openai_base_url_is_honoured_and_the_asyncraft_name_wins(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory()
    other = sim_factory()
    inp = tmp_path / "in.jsonl"
    write_prompts(inp, 5)
    env = {k: v for k, v in cli_env().items() if k != "ASYNCRAFT_BASE_URL"}
    res = run_job(inp, tmp_path / "a", {**env, "OPENAI_BASE_URL": sim.base_url})
    assert res.returncode == 0, res.stderr
    assert sim.stats()["paid"] == 5
    res = run_job(inp, tmp_path / "b", {**env, "OPENAI_BASE_URL": sim.base_url, "ASYNCRAFT_BASE_URL": other.base_url})
    assert res.returncode == 0, res.stderr
    assert sim.stats()["paid"] == 5 and other.stats()["paid"] == 5


@pytest.mark.parametrize(("extra", "fragment"), [
    ({"ASYNCRAFT_API_KEY": "abc\r\ndef"}, "ASYNCRAFT_API_KEY contains a line break"),
    ({"ASYNCRAFT_API_KEY": "", "OPENAI_API_KEY": "abc\x07def"}, "OPENAI_API_KEY contains a control character"),
    ({"ASYNCRAFT_BASE_URL": "https://user:pass-secret@llm.example.com/v1"}, "ASYNCRAFT_BASE_URL carries credentials"),
    ({"ASYNCRAFT_BASE_URL": "https://llm.example.com/v1#frag"}, "ASYNCRAFT_BASE_URL 'https://llm.example.com/v1'"),
    ({"ASYNCRAFT_CONCURENCY": "500"}, "ASYNCRAFT_CONCURENCY is not a setting; did you mean ASYNCRAFT_CONCURRENCY?"),
], ids=["key-crlf", "key-control", "url-credentials-and-key", "url-fragment", "misspelt-variable"])
def test_configuration_that_cannot_work_is_refused_in_one_line(tmp_path: Path, extra: dict[str, str],
                                                                fragment: str) -> None:
    env = {**cli_env(), **extra}
    env = {k: v for k, v in env.items() if v != "" or k not in ("ASYNCRAFT_API_KEY",)}
    res = run_cli("run", "--input", str(tmp_path / "in.jsonl"), "--state-dir", str(tmp_path / "s"), env=env)
    assert res.returncode == 2, res.stderr
    assert fragment in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
    assert "pass-secret" not in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "s").exists()


def test_help_names_where_the_key_goes() -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    res = run_cli("--help", env=env)
    assert res.returncode == 0 and "is sent to every base URL" in res.stdout and "OPENAI_BASE_URL" in res.stdout
    res = run_cli("run", "--help", env=env)
    assert res.returncode == 0 and "gets every call and the API key" in " ".join(res.stdout.split())
