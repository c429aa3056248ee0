"""Shared fixtures: the built-in simulator as a real subprocess, and the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers import SimProcess, start_simulator


@pytest.fixture
def sim_factory() -> Iterator[Any]:
    """Start simulator subprocesses on 127.0.0.1 (port 0); all are stopped at the end of the test."""
    procs: list[SimProcess] = []

    def start(*args: str) -> SimProcess:
        proc = start_simulator(*args)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        p.close()


@pytest.fixture
def sim(sim_factory: Any) -> SimProcess:
    return sim_factory()  # type: ignore[no-any-return]


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    write_prompts(path, 50)
    return path


def write_prompts(path: Path, n: int, *, start: int = 0) -> None:
    with open(path, "wb") as fh:
        for i in range(start, start + n):
            fh.write(orjson.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"messages": [{"role": "user", "content": f"Tell me fact number {i}."}],
                                            "max_tokens": 32}}) + b"\n")


def cli_env(sim: SimProcess | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCRAFT_", "OPENAI_"))}
    env.update({"ASYNCRAFT_MODEL": "sim-1", "ASYNCRAFT_API_KEY": "test-SECRETKEY-not-a-real-key-0123456789",
                "ASYNCRAFT_BACKOFF_BASE": "0.01", "ASYNCRAFT_BACKOFF_MAX": "0.2", "ASYNCRAFT_PROGRESS_INTERVAL": "0.5",
                "PYTHONUNBUFFERED": "1"})
    if sim is not None:
        env["ASYNCRAFT_BASE_URL"] = sim.base_url
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncraft", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
