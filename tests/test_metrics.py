"""/metrics and /healthz of the real CLI, scraped over HTTP while it runs against the simulator."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import cli_env, write_prompts
from tests.helpers import ROOT, SimProcess, journal_records

N = 120
PRICE_IN, PRICE_OUT = 2.5, 10.0


class Run:
    """``asyncraft run`` in a subprocess, stderr in a file (a pipe nobody reads could fill and block it)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = open(log, "wb")  # closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "run", *args], env=env, cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=self._fh)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics_url(self, timeout: float = 30.0) -> str:
        found = wait_for(lambda: re.search(r"metrics on (http://\S+)/metrics", self.stderr()), timeout,
                         lambda: f"no metrics URL in the log:\n{self.stderr()}")
        return str(found.group(1))

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._fh.close()
        return self.proc.returncode


@pytest.fixture
def runs() -> Iterator[Callable[..., Run]]:
    started: list[Run] = []

    def start(args: list[str], env: dict[str, str], log: Path) -> Run:
        run = Run(args, env, log)
        started.append(run)
        return run

    yield start
    for run in started:
        run.stop()


def wait_for(cond: Callable[[], Any], timeout: float, why: Callable[[], str] | str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(why() if callable(why) else f"timed out waiting for {why}")
        time.sleep(0.05)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    status, text = get(base + "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), float("nan"))


def test_metrics_after_a_run_match_the_simulator(sim_factory: Any, tmp_path: Path, runs: Any) -> None:
    sim: SimProcess = sim_factory("--latency-ms", "5", "--p-429", "0.05", "--fault-retry-after", "0.05",
                                  "--seed", "11")
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, N)
    state = tmp_path / "state"
    env = cli_env(sim, ASYNCRAFT_METRICS_PORT="0", ASYNCRAFT_CONCURRENCY="8", ASYNCRAFT_PRICE_INPUT_PER_M=str(PRICE_IN),
                  ASYNCRAFT_PRICE_OUTPUT_PER_M=str(PRICE_OUT), ASYNCRAFT_SNAPSHOT_EVERY="1000000")
    # --watch keeps the process (and its metrics) up after the input is done.
    run = runs(["--input", str(inp), "--state-dir", str(state), "--watch"], env, tmp_path / "run.log")
    base = run.metrics_url()
    # The state dir's counts move when a batch is committed, the per-stage ones when it is acknowledged (the
    # next turn of the loop): wait until both have seen the last batch.
    samples = wait_for(lambda: (s := scrape(base)) and value(s, "asyncraft_tasks", state="done") == N
                       and value(s, "asyncraft_stage_tasks_total", stage="prompts", result="done") == N and s,
                       60, lambda: f"the run did not finish:\n{run.stderr()}")
    sim_stats = sim.settled_stats()
    assert sim_stats["paid"] == N

    assert value(samples, "asyncraft_tasks", state="pending") == 0
    assert value(samples, "asyncraft_tasks", state="failed") == 0
    assert value(samples, "asyncraft_input_tasks") == N
    assert value(samples, "asyncraft_stage_tasks_total", stage="prompts", result="done") == N
    assert value(samples, "asyncraft_calls_total", status="ok") == N
    throttled = sim_stats["by_status"].get("429", 0)
    assert throttled > 0, "the simulator injected no 429; the test did not test retries"
    assert value(samples, "asyncraft_calls_total", status="429") == throttled
    assert value(samples, "asyncraft_rate_limited_total") == throttled
    assert value(samples, "asyncraft_retries_total") == throttled
    assert value(samples, "asyncraft_endpoint_calls_total", endpoint=sim.base_url.split("//")[1],
                 status="ok") == N

    prompt, completion = sim_stats["prompt_tokens"], sim_stats["completion_tokens"]
    assert value(samples, "asyncraft_tokens_total", kind="prompt") == prompt
    assert value(samples, "asyncraft_tokens_total", kind="completion") == completion
    assert value(samples, "asyncraft_stage_tokens_total", stage="prompts", kind="completion") == completion
    assert value(samples, "asyncraft_cost_total") == pytest.approx((prompt * PRICE_IN + completion * PRICE_OUT) / 1e6)

    hist = [v for (name, _labels), v in samples.items() if name == "asyncraft_call_latency_seconds_count"]
    assert sum(hist) == N
    slowest = [v for (name, labels), v in samples.items()
               if name == "asyncraft_call_latency_seconds_bucket" and ("le", "0.005") in labels]
    assert not slowest  # custom buckets for LLM latencies, not the library's defaults

    # The journal numbers agree with what is on disk.
    recs = list(journal_records(state))
    last_seq = max(rec["seq"] for rec in recs)
    assert sum(rec["k"] == "done" for rec in recs) == N
    # The results, and the records of the input (read to the end) and of the job's size.
    assert value(samples, "asyncraft_journal_seq") == last_seq == N + sum(rec["k"] != "done" for rec in recs)
    on_disk = sum(p.stat().st_size for p in (state / "journal").glob("*.jsonl"))
    assert value(samples, "asyncraft_journal_bytes_total") == on_disk
    assert value(samples, "asyncraft_journal_commits_total") >= 1
    assert 0 <= value(samples, "asyncraft_journal_fsync_seconds") < 5
    assert value(samples, "asyncraft_last_snapshot_age_seconds") >= 0
    assert value(samples, "asyncraft_journal_queue_depth") == 0
    assert value(samples, "asyncraft_journal_uncommitted") == 0
    assert value(samples, "asyncraft_in_flight") == 0
    assert value(samples, "asyncraft_queue_depth") == 0
    assert value(samples, "asyncraft_healthy") == 1

    status, body = get(base + "/healthz")
    assert status == 200 and "idle" in json.loads(body)["reason"]
    assert "test-SECRETKEY-not-a-real-key" not in get(base + "/metrics")[1]
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(30) == 75  # --watch ends only on a signal: stopped, resumable
    assert "Traceback" not in run.stderr()


@pytest.mark.slow
def test_healthz_turns_unhealthy_when_the_writer_is_wedged(sim_factory: Any, tmp_path: Path, runs: Any) -> None:
    sim = sim_factory("--latency-ms", "20")
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, 400)
    env = cli_env(sim, ASYNCRAFT_METRICS_PORT="0", ASYNCRAFT_CONCURRENCY="4", ASYNCRAFT_HEALTH_WRITER_TIMEOUT="1",
                  ASYNCRAFT_FSYNC="always", ASYNCRAFT_FAILPOINTS="journal.fsync=hang@40")
    run = runs(["--input", str(inp), "--state-dir", str(tmp_path / "state")], env, tmp_path / "run.log")
    base = run.metrics_url()
    status, body = get(base + "/healthz")
    assert status == 200, body
    assert "running" in json.loads(body)["reason"] or "starting" in json.loads(body)["reason"]

    wait_for(lambda: "failpoint journal.fsync fired" in run.stderr(), 30, run.stderr)
    status, body = wait_for(lambda: (r := get(base + "/healthz"))[0] == 503 and r, 20, "/healthz to fail")
    reason = json.loads(body)["reason"]
    assert "journal writer stuck" in reason and "nothing committed" in reason
    samples = scrape(base)
    assert value(samples, "asyncraft_healthy") == 0
    assert value(samples, "asyncraft_journal_uncommitted") > 0
    assert value(samples, "asyncraft_journal_last_commit_age_seconds") > 1
    # The calls go on being answered; only the writer is stuck, and the check says so, not "slow".
    assert run.proc.poll() is None


@pytest.mark.slow
def test_healthz_stays_ok_while_cooling_down_after_429(sim_factory: Any, tmp_path: Path, runs: Any) -> None:
    sim = sim_factory("--p-429", "1", "--fault-retry-after", "4")
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, 30)
    # Stall limit 0.5 s + backoff cap 0.2 s: any wait that is not recognised as a cool-down would fail the check.
    env = cli_env(sim, ASYNCRAFT_METRICS_PORT="0", ASYNCRAFT_CONCURRENCY="4", ASYNCRAFT_HEALTH_STALL_TIMEOUT="0.5",
                  ASYNCRAFT_HEALTH_WRITER_TIMEOUT="0.5")
    run = runs(["--input", str(inp), "--state-dir", str(tmp_path / "state")], env, tmp_path / "run.log")
    base = run.metrics_url()
    wait_for(lambda: sim.stats()["by_status"].get("429", 0) > 0, 20, "a 429")
    reasons = set()
    end = time.monotonic() + 5.0  # longer than the Retry-After: a whole cool-down and the calls after it
    while time.monotonic() < end:
        status, body = get(base + "/healthz")
        assert status == 200, body
        reasons.add(json.loads(body)["reason"].split(":")[0])
        time.sleep(0.1)
    assert "waiting" in reasons, reasons
    assert sim.stats()["by_status"].get("429", 0) >= 2, "no second round of calls after the cool-down"
    # Every call refused with "come back in 4 s": the pace learned is about one call per 4 s, so the rest of
    # the input would take minutes; stopping is enough to show the run was alive all along.
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(60) == 75, run.stderr()


def test_container_env_example_documents_every_variable() -> None:
    from asyncraft import config

    text = (ROOT / "docker" / "env.example").read_text()
    for opt in config.OPTIONS:
        assert re.search(rf"^#?{opt.env}=", text, re.MULTILINE), f"{opt.env} is missing from docker/env.example"
    for name in ("ASYNCRAFT_API_KEY", "ASYNCRAFT_API_KEY_FILE"):
        assert re.search(rf"^#?{name}=", text, re.MULTILINE)
    # The compose stop grace period must outlast the run's own grace, or SIGKILL cuts calls in flight short.
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    grace = float(re.search(r"stop_grace_period: (\d+)s", compose).group(1))  # type: ignore[union-attr]
    assert grace > config.Settings().grace
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim" in dockerfile and "FROM ${BASE}" in dockerfile
    assert "HEALTHCHECK" in dockerfile and "USER asyncraft" in dockerfile
