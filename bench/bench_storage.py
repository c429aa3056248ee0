"""Storage benchmarks: resume and export against the number of finished records, compaction against history,
and the size and CPU cost of sealed runs.

Every figure is a ratio to a baseline measured in the same run on the same machine; calls go to the built-in
simulator on 127.0.0.1 (a separate process).

    python bench/bench_storage.py resume     # first request after resuming 0.1M / 1M / 10M done records
    python bench/bench_storage.py export     # time and peak RSS of exporting 0.1M / 1M / 10M results
    python bench/bench_storage.py snapshot   # compacting 100k records onto 0 / 0.1M / 1M / 10M compacted
    python bench/bench_storage.py lookup     # a task's state by id (new, or done in the oldest run) against history
    python bench/bench_storage.py size       # sealed runs against plain JSONL; CPU of the compression
    python bench/bench_storage.py all

    --sizes 100k,1m,10m   which state sizes (done records) to build and measure
    --rounds 3            rounds per measurement (the median is reported, every round is printed)
    --workdir DIR         keep the generated state dirs there and reuse them in later invocations
                          (default: a temp dir under /tmp, removed at the end)

The big state dirs are not made with calls: ``generate`` writes what runs against the simulator would have left
(format 2 runs with their indexes, a manifest, asyncraft.json, the empty continuation segment, and the input
whose first N lines those records answer, followed by 1,000 new lines), then opens it once with the real
recovery code and checks that every record is there.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_engine import PEAK_WRAPPER, Sim, asyncraft_run, input_line  # noqa: E402
from bench_raft import write_corpus  # noqa: E402

from asyncraft import app, config, records, simcontent, storage  # noqa: E402
from asyncraft.jobs.base import Task  # noqa: E402
from asyncraft.simulate import estimate_tokens  # noqa: E402
from asyncraft.storage import FS, StateDir, runfile  # noqa: E402
from asyncraft.storage.compact import compact, manifest_entry, write_manifest  # noqa: E402
from asyncraft.storage.layout import FORMAT, seg_name  # noqa: E402

NEW_LINES = 1_000  # unanswered lines at the end of the input: what an interrupted run leaves
RUN_RECORDS = 100_000  # done records per run: one compaction every ASYNCRAFT_SNAPSHOT_EVERY (default 100,000)
COMMIT = 64  # records per commit batch in the generated journal (the "b" field)
GENERATOR = 2  # bump when what ``generate`` writes changes: kept state dirs are then rebuilt
BYTES_PER_RECORD = 700  # disk a generated record needs: input line, run, index, a clone's copy, export
SNAPSHOT_RECORDS = 100_000
PROSE_MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email.message", "functools",
                 "http.client", "inspect", "itertools", "json", "logging", "os", "pathlib", "pickle", "re", "shutil",
                 "socket", "sqlite3", "ssl", "subprocess", "tarfile", "threading", "unittest", "urllib.request",
                 "zipfile")
RECOVERED = re.compile(r"recovered (\d+) done, (\d+) failed up to seq (\d+) in ([\d.]+)s")
EXPORTED = re.compile(r"wrote (\d+) rows to .* \((.*)\)")
FLOOR_SCRIPT = """
import sys
import orjson
from asyncraft.jobs.prompts import PromptsJob

# What any export in input order does without the state: read and hash every input line, write a row for it.
job = PromptsJob(sys.argv[1], model="sim-1", extra_body={})
with open(sys.argv[2], "wb") as out:
    for t in job.roots():
        out.write(orjson.dumps({"line": t.meta["line"], "custom_id": t.meta.get("custom_id"), "status": "ok"}) + b"\\n")
"""


def parse_size(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def size_name(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k" if n >= 1000 else str(n)


# -- the generator ------------------------------------------------------------------------------------------


def input_position_record(job: Any, inp: Path, offset: int, lines: int) -> dict[str, Any]:
    """The record a run writes to say how far its input is fully handled, as the run that handled the first
    ``lines`` lines would have written it: before the new lines were appended (so the resume sees a file that
    changed since, and checks the CRC of the prefix, the case of a real resume)."""
    from asyncraft.jobs.prompts import InputPosition

    crc = 0
    with open(inp, "rb") as fh:
        left = offset
        while left:
            chunk = fh.read(min(left, 8 << 20))
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
    rec: dict[str, Any] = job.position_record(InputPosition(offset, lines, crc))
    rec.update(size=offset, mtime_ns=rec["mtime_ns"] - 10**9)  # the file as it was then
    return rec


def done_record(task: Task) -> dict[str, Any]:
    """The record a run against the simulator writes for ``task``: the simulator's answer as the scheduler keeps it."""
    body = task.body
    content = simcontent.chat_reply(body)
    finish = "stop"
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > 0 and estimate_tokens(content) > max_tokens:
        content, finish = content[: max_tokens * 4], "length"
    return {"k": "done", "id": task.id, "stage": task.stage, **task.meta, "message": {"content": content},
            "finish_reason": finish, "model": body["model"],
            "usage": {"prompt_tokens": estimate_tokens(simcontent.prompt_text(body)),
                      "completion_tokens": estimate_tokens(content)}}


class Sequencer:
    """Gives records their seq and commit batch, as the journal writer does (a commit never spans segments)."""

    def __init__(self, first: int = 1) -> None:
        self.next = first
        self.origin = first

    def line(self, rec: dict[str, Any]) -> bytes:
        seq = self.next
        rec["seq"] = seq
        rec["b"] = seq - (seq - self.origin) % COMMIT
        self.next += 1
        return records.encode(rec)

    def new_segment(self) -> None:
        self.origin = self.next

    def seal(self) -> bytes:
        """The last record of a segment; the next segment starts after it."""
        line = self.line({"k": "seal", "next": self.next + 1})
        self.new_segment()
        return line


def run_settings(inp: Path, state: Path, base_url: str) -> config.Settings:
    return config.load("run", {"input": str(inp), "state_dir": str(state), "base_url": base_url, "model": "sim-1",
                               "job": "prompts", "progress_interval": "1000"}, env={"ASYNCRAFT_API_KEY": "bench"})


def write_lines(path: Path, total: int, answered: int, tag: str = "") -> int:
    """Write the input; return the byte offset after its first ``answered`` lines."""
    offset = 0
    with open(path, "wb") as fh:
        for i in range(total):
            line = input_line(i, tag)
            fh.write(line)
            if i < answered:
                offset += len(line)
    return offset


@dataclass
class Generated:
    root: Path
    state: Path
    input: Path
    n: int


def check_space(where: Path, n: int) -> None:
    free = shutil.disk_usage(where).free
    need = n * BYTES_PER_RECORD + (1 << 30)
    if free < need:
        raise SystemExit(f"{where}: {free / 2**30:.1f} GiB free, a {size_name(n)} state needs about "
                         f"{need / 2**30:.1f} GiB; pick another --workdir or smaller --sizes")


def generate(root: Path, n: int, *, journal_tail: int = 0, inpos: bool = True) -> Generated:
    """A prompts state dir holding ``n`` done records for the first ``n`` lines of its input, the last
    ``journal_tail`` of them in the live journal and the others in runs of ``RUN_RECORDS``; reused when ``root``
    already holds one made with the same parameters."""
    key = {"generator": GENERATOR, "n": n, "journal_tail": journal_tail, "inpos": inpos}
    stamp = root / "complete.json"
    inp, state = root / "in.jsonl", root / "state"
    if stamp.exists() and json.loads(stamp.read_text()) == key:
        return Generated(root, state, inp, n)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    check_space(root, n)
    print(f"  generating a state dir of {n:,} done records in {root} ...", flush=True)
    t0 = time.perf_counter()
    offset = write_lines(inp, n + NEW_LINES, n)
    sd, fs = StateDir(state), FS()
    sd.create_dirs(fs)
    settings = run_settings(inp, state, "http://127.0.0.1:9/v1")
    job = app.make_job(settings)
    sd.write_meta(fs, {"format": FORMAT, "job": job.name,
                       "fingerprint": {**job.fingerprint(), **config.fingerprint_settings(settings)},
                       "input": str(inp.resolve()), "created": time.time(), "history": []})
    tasks = (t for t in itertools.islice(job.roots(), n) if isinstance(t, Task))  # no bad lines: a task a line
    seq = Sequencer()
    position = input_position_record(job, inp, offset, n) if inpos else None
    compacted = n - journal_tail
    chain: list[dict[str, Any]] = []
    for start in range(0, compacted, RUN_RECORDS):
        first = seq.next
        lines = [seq.line(done_record(t)) for t in itertools.islice(tasks, min(RUN_RECORDS, compacted - start))]
        if position is not None and start + RUN_RECORDS >= compacted and not journal_tail:
            lines.append(seq.line(position))
        lines.append(seq.seal())
        chain.append(manifest_entry(runfile.write_run(fs, sd.runs, lines, first)))
    if chain:
        write_manifest(fs, sd, chain, chain[-1]["last"], {"done": compacted, "failed": 0, "ierr": 0})
    # The live segment after the runs: empty, or the records written since the last compaction.
    seg = sd.journal / seg_name(seq.next)
    live = [seq.line(done_record(t)) for t in tasks]
    if position is not None and journal_tail:
        live.append(seq.line(position))
    fs.write_atomic(seg, b"".join(live))
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec = open_state(sd, fs)
    first_open = time.perf_counter() - t0
    if len(rec.done) != n or rec.next_seq != seq.next:
        raise SystemExit(f"generated state at {state}: {len(rec.done)} done up to seq {rec.next_seq - 1}, expected "
                         f"{n} up to {seq.next - 1}")
    stamp.write_text(json.dumps(key))
    print(f"  generated in {seconds:.0f}s; first open {first_open:.1f}s", flush=True)
    return Generated(root, state, inp, n)


def open_state(sd: StateDir, fs: FS) -> storage.Recovery:
    """Open for a run (under the lock, as the run command does)."""
    fd = sd.lock()
    try:
        rec = storage.open_for_run(sd, fs)
        rec.tasks.close()
        return rec
    finally:
        os.close(fd)


def clone_state(src: Path, dst: Path) -> None:
    """A working copy for one round: sealed runs are immutable, so they are hard-linked; the rest is copied."""
    shutil.rmtree(dst, ignore_errors=True)

    def copy(s: str, d: str) -> None:
        if Path(s).parent.name == "runs":
            os.link(s, d)
        else:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy)


# -- measuring a child process ------------------------------------------------------------------------------


class StatsPoller:
    """Reads the simulator's request count over one kept-alive connection (cheap enough to poll every 5 ms)."""

    def __init__(self, sim: Sim) -> None:
        url = urllib.parse.urlsplit(sim.root)
        self.conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)

    def requests(self) -> int:
        self.conn.request("GET", "/_sim/stats")
        got: int = json.loads(self.conn.getresponse().read())["requests"]
        return got

    def close(self) -> None:
        self.conn.close()


@dataclass
class Child:
    code: int
    seconds: float  # start to exit
    first_request: float | None  # start to the simulator's first request, when polled
    peak_mb: float
    stderr: str


def run_child(args: list[str], env: dict[str, str], work: Path, poller: StatsPoller | None = None) -> Child:
    """``python -m <args>`` (or a .py file), with its own peak RSS (VmHWM) and, with ``poller``, the time of
    the first request the simulator sees."""
    peak_file, log_path = work / "peak", work / "stderr.log"
    peak_file.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", PEAK_WRAPPER, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=log, env={**env, "BENCH_PEAK_FILE": str(peak_file)})
        first = None
        if poller is not None:
            while proc.poll() is None:
                if poller.requests():
                    first = time.perf_counter() - t0
                    break
                time.sleep(0.005)
        code = proc.wait()
        seconds = time.perf_counter() - t0
    stderr = log_path.read_text(errors="replace")
    peak = int(peak_file.read_text()) / 1024 if peak_file.exists() else float("nan")
    return Child(code, seconds, first, peak, stderr)


def import_rss_mb(env: dict[str, str], work: Path) -> float:
    """The memory baseline: peak RSS of the interpreter starting and importing asyncraft.app (median of 3)."""
    return statistics.median(run_child(["-"], env, work).peak_mb for _ in range(3))


def child_env(base_url: str) -> dict[str, str]:
    return {**os.environ, "ASYNCRAFT_BASE_URL": base_url, "ASYNCRAFT_MODEL": "sim-1", "ASYNCRAFT_API_KEY": "bench",
            "ASYNCRAFT_PROGRESS_INTERVAL": "1000"}


def fmt_rounds(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


# -- benchmarks ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def workdir(ns: argparse.Namespace) -> Iterator[Path]:
    if ns.workdir:
        path = Path(ns.workdir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="asyncraft-bench-storage-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def state_for(ns: argparse.Namespace, base: Path, n: int, journal_tail: int = 0) -> Generated:
    name = f"n{n}-tail{journal_tail}" + ("" if ns.inpos else "-noinpos")
    return generate(base / name, n, journal_tail=journal_tail, inpos=ns.inpos)


@dataclass
class Resumed:
    first: float  # start to first request, median
    rounds: list[float]
    recovery: float  # what the run logs as its recovery time, median
    peak_mb: float  # highest of the rounds
    exit: float  # start to exit, median
    start: float  # interpreter start + import asyncraft.app, median of one before each round


def record_position_of_this_file(state: Path, inp: Path) -> None:
    """Append to the live journal the input position as a run stopped on this very file records it (the file has
    not changed since, so the resume trusts the file's identity and reads no part of the prefix)."""
    sd = StateDir(state)
    rec = storage.open_read_only(sd)
    try:
        pos = dict(rec.latest["inpos"])
    finally:
        rec.tasks.close()
    st = inp.stat()
    pos.update(ino=st.st_ino, dev=st.st_dev, size=st.st_size, mtime_ns=st.st_mtime_ns)
    for k in ("seq", "b", "c"):
        pos.pop(k, None)
    (first, seg), = sd.segments()
    if seg.stat().st_size:
        raise SystemExit(f"{seg}: the live journal of a generated state is empty")
    seg.write_bytes(Sequencer(first).line(pos))


def resume_rounds(gen: Generated, inp: Path, rounds: int, sim: Sim, poller: StatsPoller, env: dict[str, str],
                  work: Path, *, same_file: bool = False) -> Resumed:
    """Resume a fresh copy of ``gen`` with ``inp``, ``rounds`` times; check that exactly the new lines are paid.
    With ``same_file`` the recorded position was taken on ``inp`` as it is (a stopped run resumed), otherwise
    on the input before its new lines were appended (the prefix's CRC is checked)."""
    firsts, recoveries, peaks, exits, starts = [], [], [], [], []
    for _ in range(rounds):
        # The baseline right before each round: on a shared machine the load moves within minutes.
        starts.append(run_child(["-"], env, work).seconds)
        clone_state(gen.state, work / "state")
        if same_file:
            record_position_of_this_file(work / "state", inp)
        sim.reset()
        got = run_child(["asyncraft", "run", "--input", str(inp), "--state-dir", str(work / "state")], env, work,
                        poller)
        m = RECOVERED.search(got.stderr)
        stats = sim.stats()
        twice = sum(1 for v in stats["paid_by_hash"].values() if v > 1)
        if got.code != 0 or got.first_request is None or m is None or int(m.group(1)) != gen.n:
            raise SystemExit(f"resume of {gen.state} failed (exit {got.code}):\n{got.stderr[-3000:]}")
        if stats["paid"] != NEW_LINES or twice:
            raise SystemExit(f"resume paid {stats['paid']} calls ({twice} twice); {NEW_LINES} expected")
        if gen.n and inp == gen.input and f"reading from line {gen.n + 1} " not in got.stderr:
            raise SystemExit(f"resume of {gen.state} read its input from the start:\n{got.stderr[-3000:]}")
        firsts.append(got.first_request)
        recoveries.append(float(m.group(4)))
        peaks.append(got.peak_mb)
        exits.append(got.seconds)
    shutil.rmtree(work / "state", ignore_errors=True)
    return Resumed(statistics.median(firsts), firsts, statistics.median(recoveries), max(peaks),
                   statistics.median(exits), statistics.median(starts))


def new_lines_input(gen: Generated) -> Path:
    """The input cut to its unanswered lines: what a resume reads once it skips the recorded finished prefix."""
    path = gen.root / "new-lines.jsonl"
    if not path.exists():
        with open(path, "wb") as fh:
            for i in range(gen.n, gen.n + NEW_LINES):
                fh.write(input_line(i))
    return path


def bench_resume(ns: argparse.Namespace) -> None:
    sim = Sim("--latency-ms", "0")
    poller = StatsPoller(sim)
    curves: dict[str, list[tuple[int, float]]] = {"input grown": [], "input unchanged": [], "new lines only": []}
    try:
        with workdir(ns) as base:
            work = base / "work"
            work.mkdir(exist_ok=True)
            env = child_env(sim.base_url)
            base_mb = import_rss_mb(env, work)
            print(f"baseline: peak RSS of interpreter start + import asyncraft.app {base_mb:.0f} MB")

            def show(what: str, n: int, got: Resumed, target: str = "") -> None:
                print(f"resume {n:,} done, {what}: first request {got.first:.2f} s{target}, median of "
                      f"{fmtn(got.rounds)} -> {got.first / got.start:.1f}x interpreter start ({got.start:.2f} s, "
                      f"measured before each round); recovery "
                      f"{got.recovery:.2f} s; peak RSS {got.peak_mb:.0f} MB"
                      f"{' (target <= 300 MB)' if target and n == 10_000_000 else ''} -> "
                      f"{got.peak_mb / base_mb:.1f}x bare import; exit after {got.exit:.1f} s; {NEW_LINES:,} calls "
                      "paid, none twice", flush=True)

            for n in ns.sizes:
                gen = state_for(ns, base, n)
                got = resume_rounds(gen, gen.input, ns.rounds, sim, poller, env, work)
                target = {1_000_000: " (target <= 2 s)", 10_000_000: " (target <= 3 s)"}.get(n, "")
                show(f"all in runs, {NEW_LINES:,} new lines appended to the input since its position was "
                     "recorded (the prefix's CRC is checked)", n, got, target)
                curves["input grown"].append((n, got.first))
                got = resume_rounds(gen, gen.input, ns.rounds, sim, poller, env, work, same_file=True)
                show(f"all in runs, the last {NEW_LINES:,} lines of the input unhandled and the input unchanged "
                     "since its position was recorded (a stopped run resumed)", n, got, target)
                curves["input unchanged"].append((n, got.first))
                got = resume_rounds(gen, new_lines_input(gen), ns.rounds, sim, poller, env, work)
                show(f"all in runs, input cut to its {NEW_LINES:,} new lines (what a resume that skips the "
                     "recorded prefix reads)", n, got)
                curves["new lines only"].append((n, got.first))
            if 1_000_000 in ns.sizes:
                # A crash just before a compaction: one snapshot's worth of records still in the journal.
                gen = state_for(ns, base, 1_000_000, RUN_RECORDS)
                got = resume_rounds(gen, gen.input, ns.rounds, sim, poller, env, work)
                show(f"the last {RUN_RECORDS:,} in the live journal, {NEW_LINES:,} new lines at the end of the input",
                     gen.n, got)
    finally:
        poller.close()
        sim.close()
    for name, curve in curves.items():
        if len(curve) > 1:
            (n0, t0), (n1, t1) = curve[0], curve[-1]
            print(f"resume curve, {name} (first request): " + " / ".join(f"{size_name(n)} {t:.2f} s" for n, t in curve)
                  + f" -> {size_name(n1)} / {size_name(n0)} = {t1 / t0:.2f} (flat = 1)")


def fmtn(values: list[float]) -> str:
    return f"{len(values)} {fmt_rounds(values)}"


def bench_export(ns: argparse.Namespace) -> None:
    with workdir(ns) as base:
        work = base / "work"
        work.mkdir(exist_ok=True)
        env = child_env("http://127.0.0.1:9/v1")
        floor_script = work / "floor.py"
        floor_script.write_text(FLOOR_SCRIPT)
        base_mb = import_rss_mb(env, work)
        print(f"baseline: peak RSS of interpreter start + import asyncraft.app {base_mb:.0f} MB")
        for n in ns.sizes:
            gen = state_for(ns, base, n)
            out = work / "export.jsonl"
            times, peaks, floors = [], [], []
            for _ in range(ns.rounds):
                clone_state(gen.state, work / "state")
                got = run_child(["asyncraft", "export", "--state-dir", str(work / "state"), "--format", "prompts",
                                 "--out", str(out), "--partial"], env, work)
                m = EXPORTED.search(got.stderr)
                if got.code != 0 or m is None:
                    raise SystemExit(f"export of {gen.state} failed (exit {got.code}):\n{got.stderr[-3000:]}")
                if m.group(2) != f"{n} ok, {NEW_LINES} pending":
                    raise SystemExit(f"export of {gen.state}: {m.group(2)}; {n} ok and {NEW_LINES} pending expected")
                times.append(got.seconds)
                peaks.append(got.peak_mb)
                out.unlink()
                floor = run_child([str(floor_script), str(gen.input), str(out)], env, work)
                if floor.code != 0:
                    raise SystemExit(f"export floor failed:\n{floor.stderr[-3000:]}")
                floors.append(floor.seconds)
                out.unlink()
            t, f = statistics.median(times), statistics.median(floors)
            rows = n + NEW_LINES
            print(f"export {n:,} results + {NEW_LINES:,} pending (prompts, .jsonl): {t:.1f} s = "
                  f"{t / rows * 1e6:.1f} us/row, median of {fmtn(times)} -> {t / f:.1f}x reading the input and "
                  f"writing a row per line ({f:.1f} s); peak RSS {max(peaks):.0f} MB"
                  f"{' (target <= 300 MB)' if n == 10_000_000 else ''} -> {max(peaks) / base_mb:.1f}x bare "
                  "import", flush=True)
            shutil.rmtree(work / "state", ignore_errors=True)


LOOKUPS = 20_000


def bench_lookup(ns: argparse.Namespace) -> None:
    """A task's state looked up by id, as the scheduler does for every task it queues and every record it commits:
    ids that are in no run (a new task) and ids done in the oldest run (the deepest lookup), against history."""
    import random

    rng = random.Random(8)
    with workdir(ns) as base:
        results = []
        for n in ns.sizes:
            gen = state_for(ns, base, n)
            job = app.make_job(run_settings(gen.input, gen.state, "http://127.0.0.1:9/v1"))
            # Every round looks up ids it has not looked up before: TaskStates remembers the rows it read lately.
            done_ids = [records.id_key(t.id) for t in itertools.islice(job.roots(), min(n, LOOKUPS * ns.rounds))
                        if isinstance(t, Task)]
            rec = storage.open_read_only(StateDir(gen.state))
            try:
                times: dict[str, list[float]] = {"new": [], "oldest run": []}
                for r in range(ns.rounds):
                    absent = [rng.getrandbits(128) for _ in range(LOOKUPS)]
                    oldest = done_ids[r * LOOKUPS : (r + 1) * LOOKUPS]
                    for name, keys in (("new", absent), ("oldest run", oldest)):
                        t0 = time.process_time()  # CPU time: on a shared machine the wall clock counts waits
                        hits = sum(1 for k in keys if k in rec.done)
                        times[name].append((time.process_time() - t0) / LOOKUPS * 1e6)
                        if hits != (0 if name == "new" else len(keys)):
                            raise SystemExit(f"lookup in {gen.state}: {hits} of {len(keys)} {name} ids found done")
                runs = len(rec.view.runs)
            finally:
                rec.tasks.close()
            results.append((n, statistics.median(times["new"])))
            print(f"lookup in {n:,} done ({runs} runs), CPU: new id {statistics.median(times['new']):.1f} us "
                  f"{fmt_rounds(times['new'])}, id done in the oldest run {statistics.median(times['oldest run']):.1f}"
                  f" us {fmt_rounds(times['oldest run'])} (median of {ns.rounds}; {LOOKUPS:,} ids each)", flush=True)
    if len(results) > 1:
        (n0, t0), (n1, t1) = results[0], results[-1]
        print("lookup curve, new id: " + " / ".join(f"{size_name(n)} {t:.1f} us" for n, t in results)
              + f" -> {size_name(n1)} / {size_name(n0)} = {t1 / t0:.1f} (flat = 1)")


def bench_snapshot(ns: argparse.Namespace) -> None:
    """Compaction of one snapshot's worth of records (100k) onto states holding 0 .. N compacted records, as the
    journal does it: the run, its index and the manifest written and synced, the segments released, then the new
    run's task index opened and put in front of the live journal's states."""
    with workdir(ns) as base:
        work = base / "work"
        work.mkdir(exist_ok=True)
        snap_input = work / "snapshot.jsonl"
        write_lines(snap_input, SNAPSHOT_RECORDS, SNAPSHOT_RECORDS, tag="snapshot ")
        job = app.make_job(run_settings(snap_input, work / "unused", "http://127.0.0.1:9/v1"))
        fresh = [done_record(t) for t in job.roots() if isinstance(t, Task)]
        results: list[tuple[int, list[float], list[float]]] = []
        for n in [0, *ns.sizes]:
            gen = state_for(ns, base, n)
            walls, cpus = [], []
            for _ in range(ns.rounds):
                clone_state(gen.state, work / "state")
                sd, fs = StateDir(work / "state"), FS()
                (first, seg), = sd.segments()
                seq = Sequencer(first)
                data = b"".join(seq.line(dict(r)) for r in fresh) + seq.seal()
                seg.write_bytes(data)
                (sd.journal / seg_name(seq.next)).write_bytes(b"")
                fd = sd.lock()
                try:
                    rec = storage.open_for_run(sd, fs)
                    chain = [manifest_entry(ref.header) for ref in rec.view.runs]
                    t0, c0 = time.perf_counter(), time.process_time()
                    done = compact(fs, sd, rec.segments[:-1], chain, rec.tasks.counts())
                    rec.tasks.add_run(runfile.open_tasks(runfile.index_path_for(sd.runs / done.header.name)))
                    walls.append(time.perf_counter() - t0)
                    cpus.append((time.process_time() - c0) / SNAPSHOT_RECORDS * 1e6)
                    if rec.tasks.tail or len(rec.done) != n + SNAPSHOT_RECORDS:
                        raise SystemExit(f"compaction onto {gen.state}: {len(rec.done)} done, {len(rec.tasks.tail)} "
                                         "left in the live states")
                    rec.tasks.close()
                finally:
                    os.close(fd)
            results.append((n, walls, cpus))
            print(f"snapshot of {SNAPSHOT_RECORDS:,} records onto {n:,} compacted: {statistics.median(walls):.2f} s "
                  f"{fmt_rounds(walls)}, CPU {statistics.median(cpus):.1f} us a record {fmt_rounds(cpus)} (median of "
                  f"{ns.rounds})", flush=True)
        shutil.rmtree(work / "state", ignore_errors=True)
    _n0, w0, c0 = results[0]
    _n1, w1, c1 = results[-1]
    print("snapshot curve: " + " / ".join(f"{size_name(n)} {statistics.median(w):.2f} s, {statistics.median(c):.1f} us"
                                          for n, w, c in results)
          + f" -> last / first: wall {statistics.median(w1) / statistics.median(w0):.2f}, CPU "
          f"{statistics.median(c1) / statistics.median(c0):.2f} (flat = 1)")


@dataclass
class Corpus:
    name: str
    lines: list[bytes]  # the records as the journal held them (plain JSONL)
    frames: list[bytes]  # the same, cut into the frames a run compresses one by one
    data_bytes: int  # the runs' compressed data
    index_bytes: int


def read_corpus(name: str, state: Path) -> Corpus:
    sd = StateDir(state)
    lines: list[bytes] = []
    frames: list[bytes] = []
    data_bytes = index_bytes = 0
    for rn in sd.run_files():
        index = runfile.read_index(sd.index_path(rn.name))
        data_bytes += index.header.data_bytes
        index_bytes += sd.index_path(rn.name).stat().st_size
        with runfile.RunReader(sd.run_path(rn.name), index) as reader:
            for i in range(index.header.frames):
                raw = reader.frame(i)
                frames.append(raw)
                lines.extend(raw.splitlines(keepends=True))
    return Corpus(name, lines, frames, data_bytes, index_bytes)


def best_of(rounds: int, fn: Any) -> float:
    """The least CPU time of ``rounds`` calls: on a shared machine the wall clock also counts the waits for a core."""
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def prompts_corpus(work: Path, n: int) -> Path:
    """A prompts job of ``n`` requests made of the bundled documents' sentences, run against the simulator."""
    docs = sorted((ROOT / "asyncraft" / "data" / "docs").iterdir())
    sentences = [s.strip() for d in docs for s in re.split(r"(?<=[.!?])\s+", d.read_text()) if len(s.split()) >= 6]
    inp = work / "size.jsonl"
    with open(inp, "w") as fh:
        for i in range(n):
            s = sentences[i % len(sentences)]
            fh.write(json.dumps({"custom_id": f"q{i}", "body": {"messages": [
                {"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": f"Question {i}: explain this in plain words: {s}"}]}}) + "\n")
    sim = Sim("--latency-ms", "0")
    try:
        asyncraft_run(sim.base_url, inp, work / "size-state", 100)
    finally:
        sim.close()
    return work / "size-state"


def raft_corpus(work: Path) -> Path:
    """The RAFT job on the bundled documents in 6 editions (bench_raft's corpus), 64-token chunks, 3 questions
    each: question records carry their chunk, answer records a chain-of-thought answer quoting it."""
    write_corpus(work / "docs", 6)
    sim = Sim("--latency-ms", "0")
    try:
        env = {**child_env(sim.base_url), "ASYNCRAFT_PROGRESS": "off"}
        subprocess.run([sys.executable, "-m", "asyncraft", "run", "--job", "raft", "--input", str(work / "docs"),
                        "--state-dir", str(work / "raft-state"), "--questions", "3", "--chunk-size", "64",
                        "--concurrency", "200"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    finally:
        sim.close()
    return work / "raft-state"


def prose_corpus(n: int) -> Corpus:
    """Records shaped like the prompts job's whose answers are English prose (the standard library's docstrings,
    each once per cycle, cut at 2,000 characters): closer to what real model answers compress like than the
    simulator's templated answers."""
    docs: dict[str, None] = {}
    for name in PROSE_MODULES:
        mod = importlib.import_module(name)
        for attr in sorted(dir(mod)):
            doc = getattr(getattr(mod, attr, None), "__doc__", None)
            if isinstance(doc, str) and len(doc) >= 200:
                docs[doc[:2000]] = None
    texts = list(docs)
    seq = Sequencer()
    lines = []
    for i in range(n):
        content = texts[i % len(texts)]
        lines.append(seq.line({"k": "done", "id": records.content_id("prose", i), "stage": "prompts", "line": i + 1,
                               "custom_id": f"p{i}", "message": {"content": content}, "finish_reason": "stop",
                               "model": "sim-1", "usage": {"prompt_tokens": 40,
                                                           "completion_tokens": estimate_tokens(content)}}))
    data, index, _header = runfile.build_run(lines, 1)
    frames: list[bytes] = []
    frame: list[bytes] = []
    for line in lines:  # cut as build_run cuts
        if frame and sum(map(len, frame)) + len(line) > runfile.FRAME_RAW:
            frames.append(b"".join(frame))
            frame = []
        frame.append(line)
    frames.append(b"".join(frame))
    return Corpus(f"prose answers: {n:,} records cycling over {len(texts):,} docstrings "
                  f"({sum(map(len, texts)) / 1e3:,.0f} kB)", lines, frames, len(data), len(index))


def bench_size(ns: argparse.Namespace) -> None:
    with workdir(ns) as base:
        work = base / "size"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        corpora = [read_corpus("prompts: 20,000 simulator answers", prompts_corpus(work, 20_000)),
                   read_corpus("raft: bench_raft's corpus (chunks, questions, CoT answers)", raft_corpus(work)),
                   prose_corpus(2_000)]
        shutil.rmtree(work, ignore_errors=True)
    for c in corpora:
        size_of(c, ns.rounds)


def size_of(c: Corpus, rounds: int) -> None:
    n = len(c.lines)
    raw = sum(len(x) for x in c.lines)
    first = records.decode(c.lines[0])
    assert first is not None
    print(f"sealed runs, {c.name}: {n:,} records, {raw / n:.0f} bytes each as JSONL; data {c.data_bytes / raw:.3f} "
          f"of plain JSONL, with the index {(c.data_bytes + c.index_bytes) / raw:.3f} (index "
          f"{c.index_bytes / n:.0f} bytes a record)")

    def check() -> None:
        for line in c.lines:
            records.decode(line)

    t_check = best_of(rounds, check)
    t_build = best_of(rounds, lambda: runfile.build_run(c.lines, first["seq"]))
    print(f"  CPU per record: build_run {t_build / n * 1e6:.1f} us; checking the record alone (records.decode, which "
          f"any compaction does) {t_check / n * 1e6:.1f} us -> build_run = {t_build / t_check:.1f}x the check")
    for level in sorted({1, runfile.LEVEL, 9}):
        cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
        dctx = zstandard.ZstdDecompressor()
        blobs = [cctx.compress(f) for f in c.frames]
        t_z = best_of(rounds, lambda cctx=cctx: [cctx.compress(f) for f in c.frames])
        t_d = best_of(rounds, lambda dctx=dctx, blobs=blobs: [dctx.decompress(b) for b in blobs])
        size = sum(len(b) for b in blobs)
        print(f"  zstd level {level}{' (used)' if level == runfile.LEVEL else ''}: {size / raw:.3f} of plain JSONL; "
              f"compress {t_z / n * 1e6:.2f} us/record ({t_z / t_build:.0%} of build_run), decompress "
              f"{t_d / n * 1e6:.2f} us/record")


BENCHES = {"resume": bench_resume, "export": bench_export, "snapshot": bench_snapshot, "lookup": bench_lookup,
           "size": bench_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=[*BENCHES, "all"])
    parser.add_argument("--sizes", default="100k,1m,10m", help="state sizes in done records (default 100k,1m,10m)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="keep generated state dirs here (reused next time)")
    parser.add_argument("--no-inpos", dest="inpos", action="store_false",
                        help="generate state dirs without the recorded input position")
    ns = parser.parse_args()
    ns.sizes = sorted(parse_size(s) for s in ns.sizes.split(","))
    for name, fn in BENCHES.items():
        if ns.which in (name, "all"):
            fn(ns)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
