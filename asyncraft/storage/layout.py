"""Where things are in a state dir, what their names mean, and who holds the dir.

Layout (state format 2)::

    asyncraft.json                       job kind, configuration fingerprint, input path, state format
    journal/<first-seq>.jsonl            journal segments: plain JSONL (``tail -f | jq`` works)
    runs/<first>-<last>-<crc>.zst        sealed runs: zstd frames of journal records (``zstdcat | jq`` works)
    runs/<first>-<last>-<crc>.idx        a run's index: header line, frame table, one entry per record, and its
                                         tasks sorted by id with a membership filter (see taskindex)
    snapshots/manifest-<seq>.json        manifests: the runs that cover seq 1..<seq>, one checksummed line
    errors.jsonl                         input problems and failed tasks, for people (rebuilt at every start)
    status.json                          live counters of a running job
    damaged/                             bytes set aside by --salvage
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from asyncraft.errors import StateDamaged, StateInUse
from asyncraft.storage.fs import FS, mapped

FORMAT = 2
SEGMENT_RE = re.compile(r"^(\d{12})\.jsonl$")
RUN_RE = re.compile(r"^(\d{12})-(\d{12})-([0-9a-f]{8})\.zst$")
MANIFEST_RE = re.compile(r"^manifest-(\d{12})\.json$")


def seg_name(first: int) -> str:
    return f"{first:012d}.jsonl"


def run_name(first: int, last: int, crc: int) -> str:
    return f"{first:012d}-{last:012d}-{crc:08x}.zst"


def manifest_name(seq: int) -> str:
    return f"manifest-{seq:012d}.json"


@dataclass(frozen=True)
class RunName:
    first: int
    last: int
    crc: int
    name: str


def parse_run_name(name: str) -> RunName | None:
    m = RUN_RE.match(name)
    if m is None:
        return None
    return RunName(int(m.group(1)), int(m.group(2)), int(m.group(3), 16), name)


class StateDir:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.journal = self.root / "journal"
        self.runs = self.root / "runs"
        self.snapshots = self.root / "snapshots"
        self.damaged = self.root / "damaged"
        self.meta_path = self.root / "asyncraft.json"
        self.errors_path = self.root / "errors.jsonl"
        self.status_path = self.root / "status.json"
        self.lock_path = self.root / "lock"

    def exists(self) -> bool:
        return self.meta_path.exists()

    def create_dirs(self, fs: FS) -> None:
        for d in (self.root, self.journal, self.runs, self.snapshots):
            fs.mkdir(d)

    # -- one writer at a time ------------------------------------------------------------------------

    def lock(self) -> int:
        """Hold an exclusive lock for the life of the process; a second run on the same dir is refused."""
        with mapped("create", self.lock_path):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateInUse(f"{self.root} is in use by another asyncraft run") from None
        with contextlib.suppress(OSError):  # the pid is for people; a full disk must not stop the lock
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def is_locked(self) -> bool:
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    # -- asyncraft.json -------------------------------------------------------------------------------

    def read_meta(self) -> dict[str, Any] | None:
        """The metadata, None when there is no file; a file that is empty, not JSON or not an object is damage."""
        try:
            data = self.meta_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            meta = orjson.loads(data)
        except orjson.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict) or not isinstance(meta.get("job"), str):
            raise StateDamaged(f"{self.meta_path} is damaged (empty, not JSON or not an asyncraft state); "
                               "resume with --salvage to rewrite it from this run's configuration")
        return meta

    def write_meta(self, fs: FS, meta: dict[str, Any]) -> None:
        fs.write_atomic(self.meta_path, orjson.dumps(meta, option=orjson.OPT_INDENT_2) + b"\n")

    # -- listings --------------------------------------------------------------------------------------

    def segments(self) -> list[tuple[int, Path]]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for p in self.journal.iterdir():
                m = SEGMENT_RE.match(p.name)
                if m:
                    out.append((int(m.group(1)), p))
        return sorted(out)

    def run_files(self) -> list[RunName]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for p in self.runs.iterdir():
                rn = parse_run_name(p.name)
                if rn is not None:
                    out.append(rn)
        return sorted(out, key=lambda r: (r.first, r.last, r.name))

    def manifests(self) -> list[tuple[int, Path]]:
        """Newest first."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for p in self.snapshots.iterdir():
                m = MANIFEST_RE.match(p.name)
                if m:
                    out.append((int(m.group(1)), p))
        return sorted(out, reverse=True)

    def temp_files(self) -> list[Path]:
        out: list[Path] = []
        for d in (self.root, self.journal, self.runs, self.snapshots):
            with contextlib.suppress(FileNotFoundError):
                out.extend(p for p in d.iterdir() if p.name.endswith(".tmp"))
        return out

    def run_path(self, name: str) -> Path:
        return self.runs / name

    def index_path(self, name: str) -> Path:
        return self.runs / (name[: -len(".zst")] + ".idx")
