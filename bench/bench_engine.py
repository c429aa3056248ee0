"""Engine benchmarks: asyncraft against a bare aiohttp loop, memory, rate limits and streaming (resume and
storage: bench_storage.py).

Every figure is a ratio to a baseline measured in the same run on the same machine, against the
built-in simulator on 127.0.0.1 (a separate process, so it has its own core). Runs are timed as a user
sees them: ``python -m asyncraft run`` from process start to exit, against the bare loop, also a
process of its own; rounds alternate, and each figure is the median of its rounds.

    python bench/bench_engine.py throughput     # the floor: 0 ms and 200 ms latency, concurrency 100
    python bench/bench_engine.py latency        # 1 s lognormal latency, concurrency 1,000
    python bench/bench_engine.py overhead       # engine CPU per task with an instant in-process provider
    python bench/bench_engine.py memory         # peak RSS of a 1,000,000-line input
    python bench/bench_engine.py ratelimit      # announced, unannounced and stray 429s
    python bench/bench_engine.py streaming      # CPU per streamed call; a server slower than the stall timeout
    python bench/bench_engine.py all
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from asyncraft import app, config  # noqa: E402
from asyncraft.jobs.prompts import PromptsJob  # noqa: E402
from asyncraft.provider import Completion, StreamAssembly  # noqa: E402


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


# Runs a module (or a script) as ``python -m`` would and writes the process's peak RSS (VmHWM, kB) to a file at
# exit. getrusage's ru_maxrss is no use here: Linux carries it over from the forking parent through exec, so a child
# of this (large) benchmark process would report the parent's peak.
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


async def bare_loop(base_url: str, bodies: list[dict[str, Any]], concurrency: int, extra_cpu: float = 0.0,
                    stream: bool = False) -> float:
    """The baseline: same requests, same concurrency, nothing kept. ``extra_cpu`` seconds of busy work
    per request turn it into a calibration: what ratio a given cost per request leads to. With ``stream``,
    the requests ask for a stream, as asyncraft's do by default, and the body is read whole, unparsed."""
    if stream:
        bodies = [{**b, "stream": True, "stream_options": {"include_usage": True}} for b in bodies]
    it = iter(bodies)
    headers = {"Authorization": "Bearer bench", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def worker() -> None:
            for body in it:
                async with s.post(base_url + "/chat/completions", data=orjson.dumps(body), headers=headers) as r:
                    await r.read()
                    assert r.status == 200, r.status
                if extra_cpu:
                    burn(extra_cpu)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(bodies) / (time.perf_counter() - t0)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a child run: no stray ASYNCRAFT_ settings of the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCRAFT_", "OPENAI_"))}
    return {**env, "ASYNCRAFT_MODEL": "sim-1", "ASYNCRAFT_API_KEY": "bench", "ASYNCRAFT_PROGRESS": "off", **extra}


def child(args: list[str], env: dict[str, str], n: int) -> tuple[float, float]:
    """Run a process to its end: (requests per second from its start to its exit, its CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(args, env=env, cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return n / elapsed, cpu


def cli_run(base_url: str, inp: Path, state: Path, concurrency: int, **env: str) -> tuple[float, float]:
    """``python -m asyncraft run``, a fresh state dir: (requests/s, client CPU seconds)."""
    shutil.rmtree(state, ignore_errors=True)
    n = sum(1 for _ in open(inp, "rb"))
    return child([sys.executable, "-m", "asyncraft", "run", "--input", str(inp), "--state-dir", str(state)],
                 clean_env(ASYNCRAFT_BASE_URL=base_url, ASYNCRAFT_CONCURRENCY=str(concurrency), **env), n)


def bare_run(base_url: str, inp: Path, concurrency: int, extra_us: float = 0.0,
             stream: bool = False) -> tuple[float, float]:
    """The bare loop in a process of its own, so that it pays the same interpreter start."""
    n = sum(1 for _ in open(inp, "rb"))
    return child([sys.executable, str(Path(__file__).resolve()), "_bare", base_url, str(inp), str(concurrency),
                  str(extra_us), "stream" if stream else "plain"], clean_env(), n)


def median_ratio(ours: list[float], base: list[float]) -> float:
    return statistics.median(ours) / statistics.median(base)


def compare(sim_args: list[str], n: int, concurrency: int, rounds: int, target: float, name: str,
            calibrate: tuple[float, ...] = ()) -> None:
    """Alternating rounds of the bare loop, asyncraft (streamed, as by default) and asyncraft with
    ``ASYNCRAFT_STREAM=off``; medians. Each is compared with the bare loop asking the same of the server: a
    streamed answer costs the simulator more CPU too, and at 0 ms latency both share the same two cores. With
    ``calibrate``, also the bare loop doing that many extra microseconds of CPU per request: the ratio such a
    cost leads to."""
    sim = Sim(*sim_args)
    tmp = Path(tempfile.mkdtemp(prefix="asyncraft-bench-"))
    try:
        inp = tmp / "in.jsonl"
        write_input(inp, n)
        bare: list[float] = []
        bare_streamed: list[float] = []
        streamed: list[float] = []
        plain: list[float] = []
        burned: dict[float, list[float]] = {us: [] for us in calibrate}
        for _ in range(rounds):
            # Each run starts from a reset simulator: the same sequence of latencies for all.
            sim.reset()
            bare.append(bare_run(sim.base_url, inp, concurrency)[0])
            sim.reset()
            bare_streamed.append(bare_run(sim.base_url, inp, concurrency, stream=True)[0])
            sim.reset()
            streamed.append(cli_run(sim.base_url, inp, tmp / "state", concurrency)[0])
            sim.reset()
            plain.append(cli_run(sim.base_url, inp, tmp / "state", concurrency, ASYNCRAFT_STREAM="off")[0])
            for us, got in burned.items():
                sim.reset()
                got.append(bare_run(sim.base_url, inp, concurrency, us)[0])
        b, bs = statistics.median(bare), statistics.median(bare_streamed)
        print(f"{name} (target >= {target}), python -m asyncraft run (fsync=batch, journal + snapshot) against "
              f"the bare aiohttp loop asking the same: streamed {statistics.median(streamed):,.0f} req/s against "
              f"{bs:,.0f} -> ratio {median_ratio(streamed, bare_streamed):.3f}; not streamed "
              f"{statistics.median(plain):,.0f} req/s against {b:,.0f} -> ratio {median_ratio(plain, bare):.3f}; "
              f"(streamed against the plain bare loop: {median_ratio(streamed, bare):.3f}); medians of {rounds} "
              f"rounds: bare={[round(x) for x in bare]} bare_streamed={[round(x) for x in bare_streamed]} "
              f"streamed={[round(x) for x in streamed]} plain={[round(x) for x in plain]}")
        for us, got in burned.items():
            print(f"  calibration: bare loop + {us:g} us of CPU per request {statistics.median(got):,.0f} req/s "
                  f"-> ratio {median_ratio(got, bare):.3f}")
    finally:
        sim.close()
        shutil.rmtree(tmp, ignore_errors=True)


def bench_throughput(ns: argparse.Namespace) -> None:
    compare(["--latency-ms", "0"], 20_000, 100, 5, 0.75, "throughput floor (0 ms, c=100, 20k)", calibrate=(20, 40))
    compare(["--latency-ms", "200"], 10_000, 100, 3, 0.95, "throughput floor (200 ms, c=100, 10k)")


def bench_latency(ns: argparse.Namespace) -> None:
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

    async def chat(self, body: dict[str, Any]) -> Completion:
        await asyncio.sleep(0)  # a real call always yields to the loop
        return Completion({"content": "An instant answer."}, "stop", {"prompt_tokens": 12, "completion_tokens": 4},
                          body.get("model"))

    embed = complete = chat

    def describe(self) -> list[dict[str, Any]]:
        return []


def bench_overhead(ns: argparse.Namespace) -> None:
    """CPU per task of whole runs (start-up, recovery, every task, final snapshot) with the instant provider."""
    n, rounds = 50_000, 5
    tmp = Path(tempfile.mkdtemp(prefix="asyncraft-bench-"))
    try:
        inp = tmp / "in.jsonl"
        write_input(inp, n)
        with mock.patch.object(app, "EndpointPool", InstantPool):
            cpu = [in_process_cpu(inp, tmp / "state", 100, n) for _ in range(rounds)]
        print(f"overhead: engine CPU per task with an instant in-process provider (c=100, {n:,} tasks, whole run): "
              f"{min(cpu):.1f} us (least of {rounds}; rounds {[round(c, 1) for c in cpu]})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def in_process_cpu(inp: Path, state: Path, concurrency: int, n: int) -> float:
    """Microseconds of this process's CPU per task for one whole run in this process (every thread counts:
    the journal's and the feeder's too)."""
    c0 = time.process_time()
    asyncraft_run("http://127.0.0.1:9/v1", inp, state, concurrency, progress="off", model_check="off")
    return (time.process_time() - c0) / n * 1e6


def peak_rss_mb(args: list[str], env: dict[str, str], tmp: Path) -> float:
    """Peak RSS of ``python -m <args>`` (``args[0]`` = "-": just import asyncraft.app)."""
    peak_file = tmp / "peak"
    subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *args], env={**env, "BENCH_PEAK_FILE": str(peak_file)},
                   cwd=ROOT, check=True)
    return int(peak_file.read_text()) / 1024


def bench_memory(ns: argparse.Namespace) -> None:
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


def limit_rounds(name: str, sim_args: list[str], n: int, concurrency: int, rounds: int, rpm: float,
                 targets: str, **env: str) -> None:
    """The share of calls answered 429 and the share of the server's limit used, medians of ``rounds``."""
    sim = Sim(*sim_args)
    tmp = Path(tempfile.mkdtemp(prefix="asyncraft-bench-"))
    try:
        inp = tmp / "in.jsonl"
        write_input(inp, n)
        shares, used = [], []
        for _ in range(rounds):
            sim.reset()
            rate, _ = cli_run(sim.base_url, inp, tmp / "state", concurrency, **env)
            st = sim.stats()
            shares.append(st["by_status"].get("429", 0) / st["requests"])
            used.append(rate * 60 / rpm)
        print(f"{name}: {100 * statistics.median(shares):.2f}% of calls answered 429, "
              f"{statistics.median(used):.3f} of the limit used ({targets}); medians of {rounds} rounds: "
              f"429 share {[round(100 * x, 2) for x in shares]}%, used {[round(x, 3) for x in used]}")
    finally:
        sim.close()
        shutil.rmtree(tmp, ignore_errors=True)


def bench_ratelimit(ns: argparse.Namespace) -> None:
    rpm, n = 3000, 2500  # 50 calls a second: about 50 s a round
    limit_rounds(f"announced limit (simulator {rpm} rpm with x-ratelimit headers, client --rpm {rpm}, c=64)",
                 ["--rpm", str(rpm), "--latency-ms", "50"], n, 64, 3, rpm, "target <= 1% and >= 0.95",
                 ASYNCRAFT_RPM=str(rpm))
    limit_rounds(f"unannounced limit (simulator {rpm} rpm, 429 + Retry-After only, client told nothing, c=64)",
                 ["--rpm", str(rpm), "--latency-ms", "50", "--limit-headers", "none"], n, 64, 3, rpm,
                 "target <= 5% and >= 0.85")
    # Stray 429s: the same job with and without them, alternating.
    sim_clean = Sim("--latency-ms", "200")
    sim_stray = Sim("--latency-ms", "200", "--p-429", "0.02", "--fault-retry-after", "1")
    tmp = Path(tempfile.mkdtemp(prefix="asyncraft-bench-"))
    try:
        inp = tmp / "in.jsonl"
        write_input(inp, 10_000)
        clean, stray = [], []
        for _ in range(3):
            sim_clean.reset()
            clean.append(cli_run(sim_clean.base_url, inp, tmp / "state", 100)[0])
            sim_stray.reset()
            stray.append(cli_run(sim_stray.base_url, inp, tmp / "state", 100)[0])
        print(f"stray 429s (2% of calls, Retry-After 1 s, 200 ms latency, c=100, 10k): {statistics.median(stray):,.0f} "
              f"req/s against {statistics.median(clean):,.0f} req/s without them -> ratio "
              f"{median_ratio(stray, clean):.3f} (target >= 0.7); rounds clean={[round(x) for x in clean]} "
              f"stray={[round(x) for x in stray]}")
    finally:
        sim_clean.close()
        sim_stray.close()
        shutil.rmtree(tmp, ignore_errors=True)


def bench_streaming(ns: argparse.Namespace) -> None:
    # CPU per call, end to end: the client process's CPU time, streamed and not, at 0 ms latency.
    sim = Sim("--latency-ms", "0")
    tmp = Path(tempfile.mkdtemp(prefix="asyncraft-bench-"))
    n = 20_000
    try:
        inp = tmp / "in.jsonl"
        write_input(inp, n)
        streamed, plain = [], []
        for _ in range(3):
            sim.reset()
            streamed.append(cli_run(sim.base_url, inp, tmp / "state", 100)[1] / n * 1e6)
            sim.reset()
            plain.append(cli_run(sim.base_url, inp, tmp / "state", 100, ASYNCRAFT_STREAM="off")[1] / n * 1e6)
        s, p = statistics.median(streamed), statistics.median(plain)
        print(f"streaming CPU (0 ms, c=100, 20k, answers of ~20 chunks): client CPU {s:.0f} us per call streamed, "
              f"{p:.0f} us not streamed -> {s - p:.0f} us per call for streaming ({s / p:.2f}x); rounds "
              f"streamed={[round(x) for x in streamed]} plain={[round(x) for x in plain]}")
    finally:
        sim.close()
        shutil.rmtree(tmp, ignore_errors=True)
    # The assembly alone, in this process: a typical streamed answer against parsing the plain body.
    chunks = [{"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "sim-1",
               "choices": [{"index": 0, "delta": {"content": f"word{i} "}, "logprobs": None, "finish_reason": None}]}
              for i in range(20)]
    stream = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    plain_body = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "sim-1",
                               "choices": [{"index": 0, "message": {"role": "assistant",
                                                                   "content": " ".join(f"word{i}" for i in range(20))},
                                            "finish_reason": "stop"}]})
    reps = 20_000
    t0 = time.perf_counter()
    for _ in range(reps):
        assembly = StreamAssembly()
        assembly.feed(stream)
        assembly.body()
    t_stream = (time.perf_counter() - t0) / reps * 1e6
    t0 = time.perf_counter()
    for _ in range(reps):
        orjson.loads(plain_body)
    t_plain = (time.perf_counter() - t0) / reps * 1e6
    print(f"  assembly alone: {t_stream:.1f} us per 20-chunk answer, against {t_plain:.1f} us to parse the plain body")

    # A server slower than the stall timeout: answers take three stall timeouts.
    for label, sim_args, env in (
            ("streamed", ["--latency-ms", "500", "--token-ms", "80"], {}),
            ("not streamed", ["--latency-ms", "3000"], {"ASYNCRAFT_STREAM": "off"})):
        sim = Sim(*sim_args)
        tmp = Path(tempfile.mkdtemp(prefix="asyncraft-bench-"))
        try:
            inp = tmp / "in.jsonl"
            write_input(inp, 200)
            rate, _ = cli_run(sim.base_url, inp, tmp / "state", 100, ASYNCRAFT_STALL_TIMEOUT="1", **env)
            st = sim.stats()
            print(f"slow server, {label} (answers take ~3 s, ASYNCRAFT_STALL_TIMEOUT=1, 200 tasks, c=100): "
                  f"{st['started']} generations started, {st['paid']} paid for 200 tasks (target: paid = tasks) "
                  f"in {200 / rate:.1f}s")
        finally:
            sim.close()
            shutil.rmtree(tmp, ignore_errors=True)


BENCHES = {"throughput": bench_throughput, "latency": bench_latency, "overhead": bench_overhead,
           "memory": bench_memory, "ratelimit": bench_ratelimit, "streaming": bench_streaming}


def main() -> None:
    if sys.argv[1:2] == ["_bare"]:  # the bare loop of bare_run(), in its own process
        url, inp, concurrency, extra_us, mode = sys.argv[2:7]
        asyncio.run(bare_loop(url, bodies_of(Path(inp)), int(concurrency), float(extra_us) / 1e6, mode == "stream"))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=[*BENCHES, "all"])
    ns = parser.parse_args()
    for name, fn in BENCHES.items():
        if ns.which in (name, "all"):
            fn(ns)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
