"""Faults from the world outside the process, on the real CLI against the built-in simulator.

- A full disk: a small tmpfs mounted by the test (root only), filled so that the disk runs out at start-up, in
  the middle of the journal, during a compaction and during the final snapshot, with bad input lines mixed in.
- I/O errors on fsync and fdatasync: libfiu's ``fiu-run`` where failing every call of one kind reaches the
  write in question first, and a Python-level interposer (``os.fsync`` replaced in the child before asyncraft
  starts) where one file must be picked out (a seal, a run, an index, a manifest): libfiu fails every fsync
  alike, and the first fsync of a compaction is always the directory fsync of its rotation.
- Too few file descriptors for the concurrency, and an ``asyncraft.json`` lost while results exist.

Every run must end with its documented exit status and no traceback; the next start (faults gone) finishes,
``verify`` is clean, the export equals that of a clean run, and no result already on disk is paid for again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from asyncraft.jobs.base import Task
from asyncraft.jobs.prompts import PromptsJob
from asyncraft.records import id_key
from asyncraft.simulate import body_hash
from tests.conftest import cli_env, run_cli
from tests.helpers import ROOT, SimProcess, journal_records, start_simulator

pytestmark = pytest.mark.slow

LINES = 120
# Malformed lines (problem records) throughout, two of them first: the first commit holds the feeder's records.
BAD_LINES = frozenset({1, 2, *range(17, LINES, 20)})
DISK_FULL_WAIT = "0.2"
NO_SNAPSHOT = "1000000"  # only the final snapshot
EXIT_IOERR = 74
EXIT_TEMPFAIL = 75
ASYNCRAFT = (sys.executable, "-m", "asyncraft")


def write_input(path: Path) -> None:
    with open(path, "wb") as fh:
        for i in range(1, LINES + 1):
            if i in BAD_LINES:
                fh.write(b'{"custom_id": "bad-%d", "body": {"messages": [\n' % i)
                continue
            fh.write(orjson.dumps({"custom_id": f"req-{i}", "body": {
                "messages": [{"role": "user", "content": f"Tell me fact number {i}."}], "max_tokens": 32}}) + b"\n")


def no_traceback(res: subprocess.CompletedProcess[str]) -> None:
    for word in ("Traceback", "ExceptionGroup"):
        assert word not in res.stderr, f"exit {res.returncode} with a traceback:\n{res.stderr[-4000:]}"


def tail(res: subprocess.CompletedProcess[str]) -> str:
    return f"exit {res.returncode}:\n{res.stderr[-3000:]}"


# -- the job, its clean result, and who paid for what ---------------------------------------------------------


@dataclass
class Job:
    input: Path
    hashes: dict[int, str]  # task key -> the simulator's hash of the request sent for it
    expected: bytes  # the export of a clean run on a normal disk


@pytest.fixture(scope="module")
def fsim() -> Iterator[SimProcess]:
    sim = start_simulator()
    yield sim
    sim.close()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, fsim: SimProcess) -> Job:
    tmp = tmp_path_factory.mktemp("faults-job")
    inp = tmp / "requests.jsonl"
    write_input(inp)
    pj = PromptsJob(inp, model="sim-1", extra_body={})
    hashes = {id_key(t.id): body_hash(t.body) for t in pj.roots() if isinstance(t, Task)}
    assert len(hashes) == LINES - len(BAD_LINES)
    env = cli_env(fsim)
    res = run_cli("run", "--input", str(inp), "--state-dir", str(tmp / "state"), env=env)
    assert res.returncode == 0, res.stderr
    return Job(inp, hashes, export(tmp / "state", env, tmp / "reference.jsonl"))


def export(state: Path, env: dict[str, str], out: Path) -> bytes:
    res = run_cli("export", "--state-dir", str(state), "--format", "prompts", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    return out.read_bytes()


class Ledger:
    """Runs the CLI on one state dir and checks each run against the simulator's paid calls: nothing on disk
    before a run is paid for again by it, and nothing is paid twice within one run. No run shows a traceback."""

    def __init__(self, sim: SimProcess, job: Job, state: Path, env: dict[str, str]) -> None:
        self.sim = sim
        self.job = job
        self.state = state
        self.env = env
        sim.settled_stats()
        sim.reset()
        self.paid: Counter[str] = Counter()

    def durable(self) -> set[str]:
        """Hashes of the tasks done on disk, read from the records (asyncraft.json may be lost)."""
        if not self.state.exists():
            return set()
        return {self.job.hashes[int(r["id"], 16)] for r in journal_records(self.state) if r["k"] == "done"}

    def run(self, *extra: str, launcher: tuple[str, ...] = ASYNCRAFT, env: dict[str, str] | None = None,
            input_path: Path | None = None, preexec_fn: Callable[[], None] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        before = self.durable()
        cmd = [*launcher, "run", "--input", str(input_path or self.job.input), "--state-dir", str(self.state),
               *extra]
        res = subprocess.run(cmd, env=env or self.env, capture_output=True, text=True, timeout=120, cwd=ROOT,
                             preexec_fn=preexec_fn)
        now = Counter(self.sim.settled_stats()["paid_by_hash"])
        delta = now - self.paid
        again = [h for h in delta if h in before]
        assert not again, f"{len(again)} results already on disk were paid for again"
        assert all(n == 1 for n in delta.values()), "a call was paid twice within one run"
        self.paid = now
        no_traceback(res)
        return res

    def finish(self, out_dir: Path, input_path: Path | None = None) -> None:
        """Without faults: the job finishes, verify is clean, the export is a clean run's, each task paid for."""
        res = self.run(input_path=input_path)
        assert res.returncode == 0, tail(res)
        ver = run_cli("verify", "--state-dir", str(self.state), env=self.env)
        assert ver.returncode == 0, ver.stdout + ver.stderr
        assert export(self.state, self.env, out_dir / "export.jsonl") == self.job.expected
        assert set(self.paid) == set(self.job.hashes.values())


def killed_part_way(ledger: Ledger) -> None:
    """A state dir with some results and the rest to do: a run killed after its sixth commit (a commit holds at
    most one record per call in flight, so eight calls at a time cannot finish the job)."""
    # The first commits may hold only problem records (the bad lines come first): kill later until some
    # results are on disk.
    for hit in (6, 12, 24, 48):
        res = ledger.run(env={**ledger.env, "ASYNCRAFT_FAILPOINTS": f"journal.after_fsync@{hit}",
                              "ASYNCRAFT_CONCURRENCY": "8"})
        assert res.returncode == -9, tail(res)
        if ledger.durable():
            break
    assert 0 < len(ledger.durable()) < len(ledger.job.hashes)


# -- 1. a full disk --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(where: Path, size: int = 4 << 20) -> Iterator[Path]:
    """A small file system of its own, so that the test can fill it."""
    if os.geteuid() != 0:
        pytest.skip("the disk-full tests mount a small tmpfs, which needs root: run the suite as root to include them")
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip()}); the disk-full tests need one")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def used_bytes(mount: Path) -> int:
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class Filler:
    def __init__(self, mount: Path) -> None:
        self.path = mount / "filler"

    def leave(self, free: int) -> None:
        """Fill the file system, then give back ``free`` bytes (whole pages)."""
        chunk = bytes(1 << 16)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        finally:
            os.close(fd)
        page = os.statvfs(self.path.parent).f_frsize
        os.truncate(self.path, max(0, self.path.stat().st_size - -(-free // page) * page))

    def remove(self) -> None:
        self.path.unlink()


@dataclass(frozen=True)
class Phase:
    settings: dict[str, str]
    names: str  # what the first run's disk-full message names
    cut_compaction: bool  # the first run leaves a run without its index: the disk filled in a compaction
    # Bytes left free: the mean of what runs killed at these failpoints take on the empty disk (none: nothing).
    # Measured on this very disk, not assumed, so that the fill levels follow the formats.
    free_as_at: tuple[str, ...] = ()
    latency_ms: float = 0.0  # the simulator's, until the disk is full
    killed_at: str = ""  # the state dir is that of a run killed at this failpoint, then the disk is filled


# A compaction races the journal for the last pages. In that phase the calls come one at a time and slowly, so
# that the compaction fails first (its run fits, not its index); the journal fails a call later, and that is the
# failure the writer reports.
DISK_FULL = {
    "start-up": Phase({}, r"/asyncraft\.json", False),
    # A resume whose first journal write is the feeder's: a problem record (the input starts with bad lines).
    "first journal write": Phase({}, r"/journal/\d+\.jsonl", False, killed_at="journal.before_write"),
    # Half way between start-up done and every record in the journal.
    "mid-journal": Phase({}, r"/journal/\d+\.jsonl", False, ("journal.before_write", "compact.mid_index")),
    # Room for everything up to the run of the first snapshot, not for its index.
    "compaction": Phase({"ASYNCRAFT_SNAPSHOT_EVERY": "15", "ASYNCRAFT_CONCURRENCY": "1"}, r"/journal/\d+\.jsonl",
                        True, ("compact.mid_index",), latency_ms=100),
    "final snapshot": Phase({}, r"/runs/\d+-\d+-[0-9a-f]+\.idx", True, ("compact.mid_index",)),
}


def cut_runs(state: Path) -> list[Path]:
    return [p for p in (state / "runs").glob("*.zst") if not p.with_suffix(".idx").exists()]


def used_at(mnt: Path, env: dict[str, str], job: Job, point: str) -> int:
    """Bytes a run of the job has taken on the (empty) tmpfs ``mnt`` when it is killed at failpoint ``point``."""
    state = mnt / "calibration"
    empty = used_bytes(mnt)
    res = run_cli("run", "--input", str(job.input), "--state-dir", str(state), env={
        **env, "ASYNCRAFT_FAILPOINTS": point})
    assert res.returncode == -9, tail(res)
    used = used_bytes(mnt) - empty
    shutil.rmtree(state)
    return used


@pytest.mark.parametrize("phase", list(DISK_FULL))
def test_disk_full(phase: str, tmp_path: Path, fsim: SimProcess, job: Job) -> None:
    """The disk fills: the run waits ASYNCRAFT_DISK_FULL_WAIT and stops with 75, so does a resume on the still
    full disk, and once space is freed the job finishes as if nothing had happened."""
    how = DISK_FULL[phase]
    with tmpfs(tmp_path / "disk") as mnt:
        # status.json written only at the end: its periodic rewrite would take a page at a moment of its own.
        env = cli_env(fsim, **{"ASYNCRAFT_DISK_FULL_WAIT": DISK_FULL_WAIT, "ASYNCRAFT_SNAPSHOT_EVERY": NO_SNAPSHOT,
                               "ASYNCRAFT_PROGRESS_INTERVAL": "3600", **how.settings})
        fsim.reconfigure(latency_ms=how.latency_ms)
        try:
            free = sum(used_at(mnt, env, job, point) for point in how.free_as_at) // max(1, len(how.free_as_at))
            ledger = Ledger(fsim, job, mnt / "state", env)
            if how.killed_at:
                killed = ledger.run(env={**env, "ASYNCRAFT_FAILPOINTS": how.killed_at})
                assert killed.returncode == -9, tail(killed)
            filler = Filler(mnt)
            filler.leave(free)
            first = ledger.run()
        finally:
            fsim.reconfigure(latency_ms=0.0)
        assert first.returncode == EXIT_TEMPFAIL, tail(first)
        full = [line for line in first.stderr.splitlines() if "disk full" in line]
        assert any(re.search(how.names, line) for line in full), \
            f"the disk did not fill at the {phase} ({free} bytes free): {full}"
        assert bool(cut_runs(mnt / "state")) == how.cut_compaction, f"{phase}: {list((mnt / 'state/runs').iterdir())}"
        again = ledger.run()
        assert again.returncode == EXIT_TEMPFAIL, tail(again)
        filler.remove()
        ledger.finish(tmp_path)


# -- 2. I/O errors ----------------------------------------------------------------------------------------------

FIU_RUN = shutil.which("fiu-run")


def fiu(*commands: str) -> tuple[str, ...]:
    """``fiu-run`` failing libc calls of the child with EIO (remote control off)."""
    if FIU_RUN is None:
        pytest.skip("fiu-run is not installed (Debian/Ubuntu: apt-get install fiu-utils); it injects the EIO faults")
    return (FIU_RUN, "-x", "-f", "", *(a for c in commands for a in ("-c", f"{c},failinfo={errno.EIO}")), *ASYNCRAFT)


# Run asyncraft with EIO on the fsync, or the writes, of the files whose path matches a pattern. libfiu fails
# every call of a kind alike, and Python's writes to stderr go through the same write(2) as its file writes.
INTERPOSER = """
import builtins, errno, fnmatch, io, os, runpy
call, pattern = os.environ.pop("FAULTS_EIO").split(" ", 1)
def eio():
    return OSError(errno.EIO, os.strerror(errno.EIO))
if call == "fsync":
    real_fsync = os.fsync
    def fsync(fd):
        if fnmatch.fnmatch(os.readlink(f"/proc/self/fd/{fd}"), pattern):
            raise eio()
        return real_fsync(fd)
    os.fsync = fsync
else:
    class FailingFile(io.FileIO):
        def write(self, data):
            raise eio()
    real_open = builtins.open
    def failing_open(file, mode="r", *args, **kwargs):
        if (isinstance(file, (str, os.PathLike)) and set(mode) & set("wax")
                and fnmatch.fnmatch(os.path.abspath(file), pattern)):
            raw = io.BufferedWriter(FailingFile(file, mode.replace("b", "").replace("t", "")))
            return raw if "b" in mode else io.TextIOWrapper(raw)
        return real_open(file, mode, *args, **kwargs)
    builtins.open = failing_open
runpy.run_module("asyncraft", run_name="__main__", alter_sys=True)
"""
INTERPOSED = (sys.executable, "-c", INTERPOSER)


@dataclass(frozen=True)
class IOFault:
    how: str  # a libfiu command, or "fsync PATTERN" / "write PATTERN" for the interposer
    names: str  # what the error message names
    exit: int = EXIT_IOERR
    settings: dict[str, str] = field(default_factory=dict)
    resume: bool = False  # the faulty run resumes a state dir killed part-way (instead of starting one)
    moved_input: bool = False  # ... from a copy of the input elsewhere, so that asyncraft.json is rewritten

    def launch(self, env: dict[str, str]) -> tuple[tuple[str, ...], dict[str, str]]:
        if self.how.startswith(("fsync ", "write ")):
            return INTERPOSED, {**env, "FAULTS_EIO": self.how}
        return fiu(self.how), env


SNAPSHOTS = {"ASYNCRAFT_SNAPSHOT_EVERY": "15"}
IO_FAULTS = {
    # Only the journal uses fdatasync. The feeder's problem records are the first to go (the input starts with
    # bad lines): they once ended in an ExceptionGroup traceback.
    "fdatasync of the journal": IOFault("enable name=posix/io/sync/fdatasync", r"fsync of \S+/journal/"),
    "fdatasync on resume": IOFault("enable name=posix/io/sync/fdatasync", r"fsync of \S+/journal/", resume=True),
    # The first fsync of a new state dir is that of the directory holding it.
    "fsync of a directory at start-up": IOFault("enable name=posix/io/sync/fsync", r"fsync of directory "),
    # A resume that rewrites asyncraft.json (the input moved) before its first journal write.
    "fsync of asyncraft.json": IOFault("fsync */asyncraft.json.tmp", r"fsync of \S+/asyncraft\.json",
                                       resume=True, moved_input=True),
    # A resume after a crash first writes the last journal segment anew, synced.
    "fsync of the rewritten last segment": IOFault("enable name=posix/io/sync/fsync",
                                                   r"fsync of \S+/journal/\d+\.jsonl\.tmp", resume=True),
    # The files of a rotation and of a compaction, each picked out by path.
    "fsync of the seal": IOFault("fsync */journal/*.jsonl", r"fsync of \S+/journal/\d+\.jsonl", settings=SNAPSHOTS),
    "fsync of a run": IOFault("fsync */runs/*.zst.tmp", r"fsync of \S+/runs/\S+\.zst\.tmp", settings=SNAPSHOTS),
    "fsync of an index": IOFault("fsync */runs/*.idx.tmp", r"fsync of \S+/runs/\S+\.idx\.tmp", settings=SNAPSHOTS),
    "fsync of a manifest": IOFault("fsync */snapshots/*.tmp", r"fsync of \S+/manifest-\d+\.json\.tmp",
                                   settings=SNAPSHOTS),
    "fsync of the runs directory": IOFault("fsync */runs", r"fsync of directory \S+/runs", settings=SNAPSHOTS),
    "fsync of the final snapshot's manifest": IOFault("fsync */snapshots/*.tmp",
                                                      r"fsync of \S+/manifest-\d+\.json\.tmp"),
    "write of asyncraft.json": IOFault("write */asyncraft.json.tmp", r"cannot write \S+/asyncraft\.json: "),
    "write of a run": IOFault("write */runs/*.zst.tmp", r"cannot write \S+/runs/\S+\.zst: ", settings=SNAPSHOTS),
    "write of a manifest": IOFault("write */snapshots/*.tmp", r"cannot write \S+/manifest-\d+\.json: ",
                                   settings=SNAPSHOTS),
    # Views for people: logged once, and the run goes on.
    "write of errors.jsonl": IOFault("write */errors.jsonl*", r"cannot write errors\.jsonl .*; it is rebuilt",
                                     exit=0),
    "write of status.json": IOFault("write */status.json.tmp", r"cannot write status\.json .*; it is rebuilt",
                                    exit=0),
}


@pytest.mark.parametrize("case", list(IO_FAULTS))
def test_io_error(case: str, tmp_path: Path, fsim: SimProcess, job: Job) -> None:
    """EIO on a write or an fsync of the state stops the run with 74 and no traceback (on a view for people it
    is logged and the run goes on); the next start finishes."""
    fault = IO_FAULTS[case]
    env = cli_env(fsim, **fault.settings)
    ledger = Ledger(fsim, job, tmp_path / "state", env)
    if fault.resume:
        killed_part_way(ledger)
    input_path = job.input
    if fault.moved_input:
        input_path = tmp_path / "moved" / job.input.name
        input_path.parent.mkdir()
        shutil.copy(job.input, input_path)
    launcher, faulty_env = fault.launch(env)
    res = ledger.run(launcher=launcher, env=faulty_env, input_path=input_path)
    assert res.returncode == fault.exit, tail(res)
    assert re.search(fault.names, res.stderr), tail(res)
    assert "Input/output error" in res.stderr
    ledger.finish(tmp_path, input_path=input_path)


def test_random_fsync_errors(tmp_path: Path, fsim: SimProcess, job: Job) -> None:
    """A third of all fsync and fdatasync calls fail : every run finishes or
    stops with 74, wherever it was, and a start without faults finishes."""
    ledger = Ledger(fsim, job, tmp_path / "state", cli_env(fsim, ASYNCRAFT_SNAPSHOT_EVERY="10"))
    exits = []
    for _ in range(6):
        res = ledger.run(launcher=fiu("enable_random name=posix/io/sync/*,probability=0.3"))
        exits.append(res.returncode)
        assert res.returncode in (0, EXIT_IOERR), tail(res)
        if res.returncode == 0:
            break
    assert EXIT_IOERR in exits
    ledger.finish(tmp_path)


def test_short_writes(tmp_path: Path, fsim: SimProcess, job: Job) -> None:
    """Every write(2) writes only part of what it is given (libfiu's write/reduce): nothing is cut short."""
    ledger = Ledger(fsim, job, tmp_path / "state", cli_env(fsim, ASYNCRAFT_SNAPSHOT_EVERY="10"))
    res = ledger.run(launcher=fiu("enable name=posix/io/rw/write/reduce"))
    assert res.returncode == 0, tail(res)
    ledger.finish(tmp_path)


# -- 3. file descriptors ---------------------------------------------------------------------------------------


def open_files(soft: int, hard: int) -> Callable[[], None]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


def test_too_few_file_descriptors_refused(tmp_path: Path, fsim: SimProcess, job: Job) -> None:
    """A hard limit below what the concurrency needs: refused before anything is written or called."""
    ledger = Ledger(fsim, job, tmp_path / "state", cli_env(fsim, ASYNCRAFT_CONCURRENCY="1000"))
    res = ledger.run(preexec_fn=open_files(256, 256))
    assert res.returncode == 2, tail(res)
    assert "`ulimit -n`" in res.stderr
    assert fsim.stats()["requests"] == 0
    assert not ledger.state.exists()


def test_low_soft_file_limit_raised(tmp_path: Path, fsim: SimProcess, job: Job) -> None:
    """A soft limit below what the concurrency needs (the hard limit allows it) is raised: more calls are in
    flight at once than the soft limit leaves descriptors for, and the job finishes."""
    soft = 64
    ledger = Ledger(fsim, job, tmp_path / "state", cli_env(fsim, ASYNCRAFT_CONCURRENCY="200"))
    fsim.reconfigure(latency_ms=300)  # every call of the job in flight at once
    try:
        res = ledger.run(preexec_fn=open_files(soft, 4096))
    finally:
        fsim.reconfigure(latency_ms=0.0)
    assert res.returncode == 0, tail(res)
    assert fsim.stats()["max_in_flight"] > soft
    ledger.finish(tmp_path)


# -- 4. asyncraft.json lost --------------------------------------------------------------------------------------

LOST_META: dict[str, Callable[[Path], None]] = {
    "missing": lambda p: p.unlink(),
    "empty": lambda p: p.write_bytes(b""),
    "not an object": lambda p: p.write_bytes(b'["prompts"]\n'),
}


@pytest.mark.parametrize("loss", list(LOST_META))
def test_lost_meta_refused_then_salvaged(loss: str, tmp_path: Path, fsim: SimProcess, job: Job) -> None:
    """Results exist but asyncraft.json is gone or unreadable: ``run`` refuses without a call (never rewrites it
    silently with whatever configuration it is given), and ``--salvage`` rewrites it and finishes the job."""
    ledger = Ledger(fsim, job, tmp_path / "state", cli_env(fsim))
    killed_part_way(ledger)
    meta = ledger.state / "asyncraft.json"
    LOST_META[loss](meta)
    requests = fsim.stats()["requests"]
    res = ledger.run()
    assert res.returncode == 1, tail(res)
    assert "asyncraft.json" in res.stderr and "--salvage" in res.stderr, tail(res)
    assert fsim.stats()["requests"] == requests
    salvaged = ledger.run("--salvage")
    assert salvaged.returncode == 0, tail(salvaged)
    assert orjson.loads(meta.read_bytes())["job"] == "prompts"
    ledger.finish(tmp_path)
