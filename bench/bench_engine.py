"""Engine benchmarks: asyncraft against a bare aiohttp loop, memory and rate limits (resume and
storage: bench_storage.py).

Every figure is a ratio to a baseline measured in the same run on the same machine, against the
built-in simulator on 127.0.0.1 (a separate process, so it has its own core).

    python bench/bench_engine.py throughput     # 0 ms latency, concurrency 100, 20,000 requests
    python bench/bench_engine.py latency        # 1 s lognormal latency, concurrency 1,000
    python bench/bench_engine.py overhead       # engine CPU per task with an instant in-process provider
    python bench/bench_engine.py memory         # peak RSS of a 1,000,000-line input
    python bench/bench_engine.py ratelimit      # 429 share and use of the server's limit
    python bench/bench_engine.py all
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asyncraft import app, config  # noqa: E402
from asyncraft.jobs.prompts import PromptsJob  # noqa: E402
from asyncraft.provider import Completion  # noqa: E402


class Sim:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "asyncraft", "simulate", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.base_url = line.rsplit(" ", 1)[-1].strip()
        self.root = self.base_url[: -len("/v1")]

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.root + "/_sim/stats", timeout=30) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def reset(self) -> None:
        req = urllib.request.Request(self.root + "/_sim/reset", data=b"{}", method="POST")
        urllib.request.urlopen(req, timeout=30).close()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def input_line(i: int, tag: str = "") -> bytes:
    return orjson.dumps({"custom_id": f"r{i}", "body": {
        "messages": [{"role": "user", "content": f"Benchmark request {tag}{i}: say something."}],
        "max_tokens": 16}}) + b"\n"


def write_input(path: Path, n: int, tag: str = "") -> None:
    with open(path, "wb") as fh:
        for i in range(n):
            fh.write(input_line(i, tag))


def bodies_of(path: Path) -> list[dict[str, Any]]:
    job = PromptsJob(path, model="sim-1", extra_body={})
    return [t.body for t in job.roots() if hasattr(t, "body")]


def burn(seconds: float) -> None:
    """Spend this much CPU time on nothing (the calibration of the throughput ratio)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def bare_loop(base_url: str, bodies: list[dict[str, Any]], concurrency: int, extra_cpu: float = 0.0) -> float:
    """The baseline: same requests, same concurrency, nothing kept. ``extra_cpu`` seconds of busy work
    per request turn it into a calibration: what ratio a given cost per request leads to."""
    it = iter(bodies)
    headers = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
    resent = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def worker() -> None:
            nonlocal resent
            for body in it:
                for _ in range(3):
                    # On a busy machine the simulator now and then drops a kept-alive connection; asyncraft
                    # sends such a request again, and so does the baseline (instead of ending the benchmark).
                    try:
                        async with s.post(base_url + "/chat/completions", data=orjson.dumps(body),
                                          headers=headers) as r:
                            await r.read()
                            assert r.status == 200, r.status
                        break
                    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                        resent += 1
                if extra_cpu:
                    burn(extra_cpu)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    if resent:
        print(f"  (bare loop: {resent} request(s) sent again after a dropped connection)", file=sys.stderr)
    return len(bodies) / elapsed


def asyncraft_run(base_url: str, inp: Path, state: Path, concurrency: int, **flags: str) -> float:
    shutil.rmtree(state, ignore_errors=True)
    n = sum(1 for _ in open(inp, "rb"))
    settings = config.load("run", {"input": str(inp), "state_dir": str(state), "base_url": base_url,
                                   "model": "sim-1", "concurrency": str(concurrency), "job": "prompts",
                                   "progress_interval": "1000", **flags}, env={"ASYNCRAFT_API_KEY": "bench"})
    t0 = time.perf_counter()
    code = asyncio.run(app.main(settings))
    elapsed = time.perf_counter() - t0
    assert code == 0, code
    return n / elapsed


def with_cpu(fn: Callable[[], float], n: int) -> tuple[float, float]:
    """(what ``fn`` returns, microseconds of this process's CPU per request spent in it). Process time counts
    every thread (the journal's and the feeder's too) and, unlike req/s, barely moves when other work shares
    the machine: at 0 ms latency the client is CPU-bound, so the CPU ratio is the throughput ratio it allows."""
    c0 = time.process_time()
    got = fn()
    return got, (time.process_time() - c0) / n * 1e6


def compare(sim_args: list[str], n: int, concurrency: int, rounds: int, target: float, name: str,
            calibrate: tuple[float, ...] = ()) -> None:
    """Best of ``rounds`` for the bare loop and for asyncraft, interleaved. With ``calibrate``, also the
    bare loop doing that many extra microseconds of CPU per request: the ratio such a cost leads to."""
    sim = Sim(*sim_args)
    tmp = Path(tempfile.mkdtemp(prefix="asyncraft-bench-"))
    try:
        inp = tmp / "in.jsonl"
        write_input(inp, n)
        bodies = bodies_of(inp)
        bare: list[tuple[float, float]] = []
        ours: list[tuple[float, float]] = []
        burned: dict[float, list[tuple[float, float]]] = {us: [] for us in calibrate}
        for _ in range(rounds):
            # Each run starts from a reset simulator: the same sequence of latencies for both.
            sim.reset()
            bare.append(with_cpu(lambda: asyncio.run(bare_loop(sim.base_url, bodies, concurrency)), n))
            sim.reset()
            ours.append(with_cpu(lambda: asyncraft_run(sim.base_url, inp, tmp / "state", concurrency), n))
            for us, got in burned.items():
                sim.reset()
                burn_loop = functools.partial(bare_loop, sim.base_url, bodies, concurrency, extra_cpu=us / 1e6)
                got.append(with_cpu(lambda: asyncio.run(burn_loop()), n))  # noqa: B023 - called at once
        b, o = max(r for r, _ in bare), max(r for r, _ in ours)
        bc, oc = min(c for _, c in bare), min(c for _, c in ours)
        print(f"{name}: bare aiohttp {b:,.0f} req/s, asyncraft {o:,.0f} req/s (fsync=batch, journal + snapshot) "
              f"-> ratio {o / b:.3f} (target >= {target}); rounds bare={[round(r) for r, _ in bare]} "
              f"asyncraft={[round(r) for r, _ in ours]}")
        print(f"  client CPU per request (least of {rounds}): bare aiohttp {bc:.1f} us, asyncraft {oc:.1f} us -> "
              f"ratio {bc / oc:.3f}; rounds bare={[round(c, 1) for _, c in bare]} "
              f"asyncraft={[round(c, 1) for _, c in ours]}")
        for us, got in burned.items():
            print(f"  calibration: bare aiohttp + {us:g} us of CPU per request {max(r for r, _ in got):,.0f} req/s "
                  f"-> ratio {max(r for r, _ in got) / b:.3f}; CPU {min(c for _, c in got):.1f} us/request")
    finally:
        sim.close()
        shutil.rmtree(tmp, ignore_errors=True)


def bench_throughput(_: argparse.Namespace) -> None:
    compare(["--latency-ms", "0"], 20_000, 100, 5, 0.85, "throughput (0 ms, c=100, 20k)", calibrate=(10, 20, 30))


def bench_latency(_: argparse.Namespace) -> None:
    compare(["--latency-ms", "1000", "--latency-dist", "lognormal"], 20_000, 1000, 2, 0.95,
            "latency (1 s lognormal, c=1000, 20k)")


class InstantPool:
    """Stands in for the endpoint pool: every call is answered at once, in this process. What is left of a run is
    the engine's own cost per task: reading the input, scheduling, the journal, the task states, compaction."""

    endpoints = ("instant",)

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    async def __aenter__(self) -> InstantPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def chat(self, body: dict[str, Any], beat: Callable[[], None] | None = None) -> Completion:
        await asyncio.sleep(0)  # a real call always yields to the loop
        return Completion({"content": "An instant answer."}, "stop", {"prompt_tokens": 12, "completion_tokens": 4},
                          body.get("model"))

    embed = chat

    def describe(self) -> list[dict[str, Any]]:
        return []


def bench_overhead(_: argparse.Namespace) -> None:
    """CPU per task of whole runs (start-up, recovery, every task, final snapshot) with the instant provider."""
    n, rounds = 50_000, 5
    tmp = Path(tempfile.mkdtemp(prefix="asyncraft-bench-"))
    try:
        inp = tmp / "in.jsonl"
        write_input(inp, n)
        with mock.patch.object(app, "EndpointPool", InstantPool):
            cpu = [with_cpu(lambda: asyncraft_run("http://127.0.0.1:9/v1", inp, tmp / "state", 100), n)[1]
                   for _ in range(rounds)]
        print(f"overhead: engine CPU per task with an instant in-process provider (c=100, {n:,} tasks, whole run): "
              f"{min(cpu):.1f} us (least of {rounds}; rounds {[round(c, 1) for c in cpu]})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Runs a module as ``python -m`` would and writes the process's peak RSS (VmHWM, kB) to a file at exit.
# getrusage's ru_maxrss is no use here: Linux carries it over from the forking parent through exec, so
# a child of this (large) benchmark process would report the parent's peak.
PEAK_WRAPPER = """
import atexit, os, runpy, sys
def _report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            with open(os.environ["BENCH_PEAK_FILE"], "w") as fh:
                fh.write(line.split()[1])
atexit.register(_report)
module = sys.argv[1]
sys.argv = sys.argv[1:]
if module == "-":
    import asyncraft.app
elif module.endswith(".py"):
    runpy.run_path(module, run_name="__main__")
else:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def peak_rss_mb(args: list[str], env: dict[str, str], tmp: Path) -> float:
    """Peak RSS of ``python -m <args>`` (``args[0]`` = "-": just import asyncraft.app; a .py path: run that file)."""
    peak_file = tmp / "peak"
    subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *args], env={**env, "BENCH_PEAK_FILE": str(peak_file)},
                   cwd=ROOT, check=True)
    return int(peak_file.read_text()) / 1024


def bench_memory(_: argparse.Namespace) -> None:
    n = 1_000_000
    sim = Sim("--latency-ms", "0")
    tmp = Path(tempfile.mkdtemp(prefix="asyncraft-bench-"))
    try:
        inp = tmp / "in.jsonl"
        write_input(inp, n)
        env = {**os.environ, "ASYNCRAFT_BASE_URL": sim.base_url, "ASYNCRAFT_MODEL": "sim-1",
               "ASYNCRAFT_API_KEY": "bench", "ASYNCRAFT_CONCURRENCY": "100", "ASYNCRAFT_PROGRESS_INTERVAL": "30"}
        t0 = time.perf_counter()
        peak = peak_rss_mb(["asyncraft", "run", "--input", str(inp), "--state-dir", str(tmp / "state")], env, tmp)
        elapsed = time.perf_counter() - t0
        base_mb = peak_rss_mb(["-"], env, tmp)
        print(f"memory ({n:,}-line input, c=100): peak RSS {peak:.0f} MB (target <= 300 MB) in {elapsed:.0f}s; "
              f"interpreter + imports alone {base_mb:.0f} MB -> ratio {peak / base_mb:.1f}x")
    finally:
        sim.close()
        shutil.rmtree(tmp, ignore_errors=True)


def bench_ratelimit(_: argparse.Namespace) -> None:
    rpm = 3000
    n = 2500  # ~50 s at 50 requests/s
    sim = Sim("--latency-ms", "50", "--rpm", str(rpm))
    tmp = Path(tempfile.mkdtemp(prefix="asyncraft-bench-"))
    try:
        inp = tmp / "in.jsonl"
        write_input(inp, n)
        rate = asyncraft_run(sim.base_url, inp, tmp / "state", 200, rpm=str(rpm))
        st = sim.stats()
        r429 = st["by_status"].get("429", 0)
        total = st["requests"]
        print(f"rate limit (server {rpm} rpm, client --rpm {rpm}, c=200): {r429} of {total} calls answered 429 "
              f"({100 * r429 / total:.2f}%, target <= 1%); {rate * 60:,.0f} requests/min done "
              f"-> {rate * 60 / rpm:.3f} of the limit used (target >= 0.90)")
    finally:
        sim.close()
        shutil.rmtree(tmp, ignore_errors=True)


BENCHES = {"throughput": bench_throughput, "latency": bench_latency, "overhead": bench_overhead,
           "memory": bench_memory, "ratelimit": bench_ratelimit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=[*BENCHES, "all"])
    ns = parser.parse_args()
    for name, fn in BENCHES.items():
        if ns.which in (name, "all"):
            fn(ns)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
