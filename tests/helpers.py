"""Test helpers that are not fixtures: the simulator subprocess and state inspection."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def wait_until(cond: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it is true (returning its value); fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


def journal_records(state: Path) -> Iterator[dict[str, Any]]:
    """Every record of a state dir in seq order, as the resolver sees it (read-only)."""
    from asyncraft.storage import readers
    from asyncraft.storage.layout import StateDir
    from asyncraft.storage.resolve import resolve

    view = resolve(StateDir(state))
    for rec, _loc in readers.iter_records(view):
        yield rec


@dataclass
class States:
    """Task states computed from the records themselves (not from the task cache): a test oracle."""

    done: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    attempts: Counter[int] = field(default_factory=Counter)
    input_errors: set[int] = field(default_factory=set)
    last_seq: int = 0

    @property
    def settled(self) -> set[int]:
        return self.done | self.failed


def task_states(state: Path) -> States:
    out = States()
    if not (state / "asyncraft.json").exists():
        return out
    for rec in journal_records(state):
        out.last_seq = rec["seq"]
        tid = rec.get("id")
        if not isinstance(tid, str):
            continue
        key = int(tid, 16)
        kind = rec.get("k")
        if kind == "done":
            out.done.add(key)
            out.failed.discard(key)
        elif kind == "fail" and key not in out.done:
            out.failed.add(key)
        elif kind == "attempt":
            out.attempts[key] += 1
        elif kind == "ierr":
            out.input_errors.add(key)
    return out


class SimProcess:
    """``python -m asyncraft simulate`` in a subprocess; it outlives the client processes we kill."""

    def __init__(self, proc: subprocess.Popen[str], base_url: str) -> None:
        self.proc = proc
        self.base_url = base_url
        self.root = base_url[: -len("/v1")]

    def _post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        req = urllib.request.Request(self.root + path, data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            data = resp.read()
        return json.loads(data) if data else None

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.root + "/_sim/stats", timeout=10) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def settled_stats(self, timeout: float = 30.0) -> dict[str, Any]:
        """Counters once no request is in flight: a killed client's last calls still finish (and are
        billed) on the server after the client is gone. Fails the test if they never do."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if st["in_flight"] == 0:
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"the simulator still has {st['in_flight']} request(s) in flight after "
                                     f"{timeout:g}s")
            time.sleep(0.01)

    def reconfigure(self, **fields: Any) -> None:
        self._post("/_sim/config", fields)

    def reset(self) -> None:
        self._post("/_sim/reset")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_simulator(*args: str) -> SimProcess:
    proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "simulate", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"simulator did not start: {line!r}")
    return SimProcess(proc, line.rsplit(" ", 1)[-1].strip())


def kill_after(proc: subprocess.Popen[bytes], sim: SimProcess, rng: random.Random, *, max_new_calls: int = 30) -> bool:
    """Kill ``proc`` at a random moment: mostly after a random number of new paid calls (so the
    moments spread over the whole job on a fast or a slow machine), sometimes during start-up and
    recovery. Returns False if the process ended on its own first."""
    if rng.random() < 0.2:
        try:
            proc.wait(timeout=rng.uniform(0.0, 0.4))
            return False
        except subprocess.TimeoutExpired:
            pass
    else:
        target = sim.stats()["paid"] + rng.randint(1, max_new_calls)
        while sim.stats()["paid"] < target:
            if proc.poll() is not None:
                return False
            time.sleep(0.005)
    proc.kill()
    proc.wait()
    return True
