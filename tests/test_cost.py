"""Token and cost accounting against what the simulator billed, and caps that stop without burning calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import cli_env, run_cli, write_prompts

PRICE_IN, PRICE_OUT = 0.15, 0.60
N = 200
CONCURRENCY = 8


def cost_of(prompt: int, completion: int, price_in: float = PRICE_IN, price_out: float = PRICE_OUT) -> float:
    return (prompt * price_in + completion * price_out) / 1e6


def priced_env(sim: Any, **extra: str) -> dict[str, str]:
    return cli_env(sim, ASYNCRAFT_PRICE_INPUT_PER_M=str(PRICE_IN), ASYNCRAFT_PRICE_OUTPUT_PER_M=str(PRICE_OUT),
                   ASYNCRAFT_CONCURRENCY=str(CONCURRENCY), **extra)


@pytest.mark.slow
def test_tokens_and_cost_match_the_simulator_usage(sim_factory: Any, tmp_path: Path) -> None:
    # 429s and 500s are not billed: they must not be counted either.
    sim = sim_factory("--latency-ms", "5", "--p-429", "0.05", "--p-500", "0.05", "--fault-retry-after", "0.02",
                      "--seed", "4")
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, N)
    state = tmp_path / "state"
    env = priced_env(sim)
    res = run_cli("run", "--input", str(inp), "--state-dir", str(state), env=env)
    assert res.returncode == 0, res.stderr
    billed = sim.settled_stats()
    assert billed["faults"].get("429") and billed["faults"].get("500"), "no unbilled faults; the test tests less"
    prompt, completion = billed["prompt_tokens"], billed["completion_tokens"]
    expected = cost_of(prompt, completion)

    final = orjson.loads((state / "status.json").read_bytes())  # the run's own last word
    assert (final["prompt_tokens"], final["completion_tokens"]) == (prompt, completion)
    assert final["cost"] == pytest.approx(expected, abs=1e-6)
    assert final["cost_projected"] == pytest.approx(expected, abs=1e-6)  # nothing is pending any more
    stage = final["stages"]["prompts"]
    assert (stage["prompt_tokens"], stage["completion_tokens"]) == (prompt, completion)

    # status reads the state dir afresh (no run holds it) and prices it with the environment's prices.
    st = orjson.loads(run_cli("status", "--state-dir", str(state), "--json", env=env).stdout)
    assert (st["prompt_tokens"], st["completion_tokens"]) == (prompt, completion)
    assert st["cost"] == pytest.approx(expected, abs=1e-6)
    text = run_cli("status", "--state-dir", str(state), "--price-input-per-m", "1", "--price-output-per-m", "2",
                   env=cli_env()).stdout
    assert f"cost        ${cost_of(prompt, completion, 1, 2):.4f} estimated" in text
    unpriced = run_cli("status", "--state-dir", str(state), env=cli_env()).stdout
    assert "no estimate" in unpriced


def test_cost_cap_stops_cleanly_and_a_restart_burns_no_calls(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--latency-ms", "5")
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, N)
    state = tmp_path / "state"
    args = ("run", "--input", str(inp), "--state-dir", str(state))
    cap = cost_of(3000, 3000)  # about a third of the job
    res = run_cli(*args, env=priced_env(sim, ASYNCRAFT_MAX_COST=f"{cap:.9f}"))
    assert res.returncode == 75, res.stderr
    assert "cost budget reached" in res.stderr
    first = sim.settled_stats()
    assert 0 < first["paid"] < N
    spent = cost_of(first["prompt_tokens"], first["completion_tokens"])
    # It stops at the cap, give or take the calls that were already in flight.
    assert cap <= spent <= cap + cost_of(CONCURRENCY * 40, CONCURRENCY * 40)

    # What a restarting container does with the same settings: stop again at once, without a single call.
    for _ in range(2):
        res = run_cli(*args, env=priced_env(sim, ASYNCRAFT_MAX_COST=f"{cap:.9f}"))
        assert res.returncode == 75 and "cost budget reached" in res.stderr
    assert sim.settled_stats()["requests"] == first["requests"]

    # The cap raised: the job finishes, and nothing was paid twice.
    res = run_cli(*args, env=priced_env(sim, ASYNCRAFT_MAX_COST="1"))
    assert res.returncode == 0, res.stderr
    done = sim.settled_stats()
    assert done["paid"] == N and set(done["paid_by_hash"].values()) == {1}


@pytest.mark.slow
def test_insufficient_quota_stops_and_resumes_once_raised(sim_factory: Any, tmp_path: Path) -> None:
    sim = sim_factory("--latency-ms", "5", "--quota-calls", "50")
    inp = tmp_path / "requests.jsonl"
    write_prompts(inp, N)
    state = tmp_path / "state"
    args = ("run", "--input", str(inp), "--state-dir", str(state))
    res = run_cli(*args, env=priced_env(sim))
    assert res.returncode == 75, res.stderr
    assert "insufficient_quota" in res.stderr
    first = sim.settled_stats()
    assert 50 <= first["paid"] <= 50 + CONCURRENCY  # calls admitted before the quota ran out still finish

    # Restarted while the quota is still exhausted: one refused wave of calls, none paid, and it stops again.
    res = run_cli(*args, env=priced_env(sim))
    assert res.returncode == 75 and "insufficient_quota" in res.stderr
    again = sim.settled_stats()
    assert again["paid"] == first["paid"] and again["requests"] - first["requests"] <= CONCURRENCY

    sim.reconfigure(quota_calls=0)  # the account is topped up
    res = run_cli(*args, env=priced_env(sim))
    assert res.returncode == 0, res.stderr
    done = sim.settled_stats()
    assert done["paid"] == N and set(done["paid_by_hash"].values()) == {1}
    st = orjson.loads(run_cli("status", "--state-dir", str(state), "--json", env=priced_env(sim)).stdout)
    assert st["cost"] == pytest.approx(cost_of(done["prompt_tokens"], done["completion_tokens"]), abs=1e-6)
