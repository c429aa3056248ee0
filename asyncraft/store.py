"""The state directory on disk: journal segments, compacted runs, snapshot manifests, recovery.

Layout::

    asyncraft.json               job kind, configuration fingerprint, input path
    journal/<first-seq>.jsonl    write-ahead journal segments (records of records.py)
    runs/<first>-<last>.jsonl    compacted segments: a hard link to the sealed segment's data
    runs/<first>-<last>.idx      index of a run: header line + one fixed-size entry per record
    snapshots/snap-<seq>.json    manifest: the runs that cover seq 1..<seq>, one checksummed line
    errors.jsonl                 input problems, one per line, for people
    damaged/                     bytes set aside by --salvage

Recovery loads the newest valid manifest, adds any complete run that continues it (a compaction
that finished its run but crashed before its manifest, or a newer manifest that is damaged), then
replays journal records with a higher sequence number. The done/failed sets come from the run
indexes without parsing run data, so resuming a million-record state costs a few reads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from asyncraft import records
from asyncraft.errors import CorruptRecord, JournalError
from asyncraft.failpoints import Failpoints

KIND_CODES = {"done": 1, "fail": 2, "attempt": 3, "ierr": 4}
KIND_NAMES = {v: k for k, v in KIND_CODES.items()}
ENTRY = struct.Struct("<16sBBQ")  # task id, kind code, stage code, byte offset of the line
ZERO_ID = bytes(16)
KEEP_MANIFESTS = 2
COUNTER_FIELDS = ("calls", "prompt_tokens", "completion_tokens")


def seg_name(first: int) -> str:
    return f"{first:012d}.jsonl"


def run_stem(first: int, last: int) -> str:
    return f"{first:012d}-{last:012d}"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool = True, failpoints: Failpoints | None = None,
                 mid: str | None = None, after_rename: str | None = None) -> None:
    """temp file, fsync, rename, fsync the directory: the file is either old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        if failpoints and mid:
            fh.write(data[: len(data) // 2])
            fh.flush()
            failpoints.hit(mid)
            fh.write(data[len(data) // 2 :])
        else:
            fh.write(data)
        fh.flush()
        if durable:
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if failpoints and after_rename:
        failpoints.hit(after_rename)
    if durable:
        fsync_dir(path.parent)


def record_usage(rec: dict[str, Any]) -> tuple[int, int]:
    usage = rec.get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


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

    def create_dirs(self) -> None:
        for d in (self.root, self.journal, self.runs, self.snapshots):
            d.mkdir(parents=True, exist_ok=True)

    def lock(self) -> int:
        """Hold an exclusive lock for the life of the process; a second run on the same dir is refused."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(f"{self.root} is in use by another asyncraft run") from None
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

    def read_meta(self) -> dict[str, Any] | None:
        try:
            data = self.meta_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            meta = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise JournalError(f"{self.meta_path} is not valid JSON; restore it or start a new state dir") from None
        return meta if isinstance(meta, dict) else None

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_atomic(self.meta_path, orjson.dumps(meta, option=orjson.OPT_INDENT_2) + b"\n")

    def segments(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.journal.glob("*.jsonl"):
            with contextlib.suppress(ValueError):
                out.append((int(p.stem), p))
        return sorted(out)

    def run_files(self) -> list[tuple[int, int, Path]]:
        out = []
        for p in self.runs.glob("*.jsonl"):
            first, _, last = p.stem.partition("-")
            with contextlib.suppress(ValueError):
                out.append((int(first), int(last), p))
        return sorted(out)

    def manifests(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.snapshots.glob("snap-*.json"):
            with contextlib.suppress(ValueError):
                out.append((int(p.stem[5:]), p))
        return sorted(out, reverse=True)

    def remove_temp_files(self) -> list[str]:
        removed = []
        for d in (self.root, self.journal, self.runs, self.snapshots):
            for p in d.glob("*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(str(p))
        return removed


# ---------------------------------------------------------------------------------------------------
# run index


@dataclass
class RunIndex:
    first: int
    last: int
    count: int
    data_bytes: int
    data_crc: int
    stages: list[str]
    counters: dict[str, int]
    entries: bytes

    def iter_entries(self) -> Iterator[tuple[bytes, int, int, int]]:
        return ENTRY.iter_unpack(self.entries)


def build_index(data: bytes, first: int, last: int, path: str) -> RunIndex:
    """Index a sealed segment's bytes; every line must be a valid record (sealed data was fsynced)."""
    stages: dict[str, int] = {}
    parts = []
    counters: Counter[str] = Counter()
    pos = 0
    count = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        rec = records.decode(data[pos:end])
        if rec is None:
            raise CorruptRecord(f"{path}: damaged record at byte {pos}", path=path, offset=pos)
        kind = KIND_CODES.get(rec.get("k", ""), 0)
        stage = rec.get("stage") or ""
        code = stages.setdefault(stage, len(stages))
        tid = rec.get("id")
        parts.append(ENTRY.pack(bytes.fromhex(tid) if tid else ZERO_ID, kind, code, pos))
        if kind in (1, 2, 3) and rec.get("usage"):
            p, c = record_usage(rec)
            counters["prompt_tokens"] += p
            counters["completion_tokens"] += c
            counters["calls"] += 1
        count += 1
        pos = end
    return RunIndex(first, last, count, len(data), zlib.crc32(data), list(stages), dict(counters), b"".join(parts))


def encode_index(ix: RunIndex) -> bytes:
    header = {
        "v": 1, "first": ix.first, "last": ix.last, "count": ix.count, "data_bytes": ix.data_bytes,
        "data_crc": ix.data_crc, "stages": ix.stages, "counters": ix.counters,
        "entries_crc": zlib.crc32(ix.entries),
    }
    return records.encode(header) + ix.entries


def decode_index(blob: bytes) -> RunIndex | None:
    nl = blob.find(b"\n")
    if nl < 0:
        return None
    header = records.decode(blob[: nl + 1])
    entries = blob[nl + 1 :]
    if header is None or header.get("v") != 1 or zlib.crc32(entries) != header.get("entries_crc"):
        return None
    if len(entries) != header["count"] * ENTRY.size:
        return None
    return RunIndex(header["first"], header["last"], header["count"], header["data_bytes"], header["data_crc"],
                    header["stages"], header.get("counters", {}), entries)


def load_run(path: Path, *, check_data: bool) -> RunIndex | None:
    """The index of a run if the run is complete and (optionally) its data checksum matches."""
    try:
        ix = decode_index(path.with_suffix(".idx").read_bytes())
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if ix is None or size != ix.data_bytes:
        return None
    if check_data and zlib.crc32(path.read_bytes()) != ix.data_crc:
        return None
    return ix


# ---------------------------------------------------------------------------------------------------
# recovery


@dataclass
class Recovered:
    next_seq: int = 1
    manifest_seq: int = 0
    done: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    attempts: Counter[int] = field(default_factory=Counter)
    input_errors: set[int] = field(default_factory=set)
    counters: Counter[str] = field(default_factory=Counter)
    runs: list[str] = field(default_factory=list)
    run_ranges: list[tuple[int, int]] = field(default_factory=list)
    segments: list[tuple[int, Path]] = field(default_factory=list)  # journal segments left, all sealed
    notes: list[str] = field(default_factory=list)
    last_input: dict[str, Any] | None = None

    def apply(self, kind: int, key: int) -> None:
        if kind == 1:
            self.done.add(key)
            self.failed.discard(key)
        elif kind == 2:
            if key not in self.done:
                self.failed.add(key)
        elif kind == 3:
            self.attempts[key] += 1
        elif kind == 4:
            self.input_errors.add(key)


PayloadHook = Callable[[dict[str, Any]], None]
WantsHook = Callable[[str, str], bool]


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        rec = records.decode(path.read_bytes())
    except FileNotFoundError:
        return None
    if rec is None or rec.get("k") != "manifest":
        return None
    return rec


def recover(sd: StateDir, *, repair: bool, salvage: bool = False, wants: WantsHook | None = None,
            on_payload: PayloadHook | None = None, check_data: bool = True) -> Recovered:
    """Rebuild the state from disk. ``repair`` truncates a torn tail and removes leftovers;
    read-only callers (status, export) pass False and leave every file as it is."""
    out = Recovered()
    if repair:
        for p in sd.remove_temp_files():
            out.notes.append(f"removed leftover temp file {p}")
        _repair_indexes(sd, out)
    manifest = None
    for seq, path in sd.manifests():
        m = read_manifest(path)
        if m is not None and m.get("seq") == seq and all(
            load_run(sd.runs / (stem + ".jsonl"), check_data=False) is not None for stem in m["runs"]
        ):
            manifest = m
            break
        out.notes.append(f"snapshot {path.name} is damaged or incomplete; using an older one")
        if repair:
            path.unlink()  # useless, and it would shadow the next good snapshot of the same seq
    covered = 0
    chosen: list[tuple[str, Path]] = []
    if manifest is not None:
        covered = manifest["seq"]
        out.manifest_seq = covered
        chosen = [(stem, sd.runs / (stem + ".jsonl")) for stem in manifest["runs"]]
    # Runs that continue the chain: written by a compaction whose manifest is missing or damaged.
    for first, last, path in sd.run_files():
        if first == covered + 1 and load_run(path, check_data=check_data) is not None:
            chosen.append((path.stem, path))
            covered = last
            out.notes.append(f"using run {path.name} not yet named by a snapshot")
    for stem, path in chosen:
        if salvage and repair and load_run(path, check_data=True) is None:
            _salvage_run(sd, path, out)
        _replay_run(sd, stem, path, out, check_data=check_data, wants=wants, on_payload=on_payload)
    out.manifest_seq = covered
    if repair:
        _remove_orphan_runs(sd, {stem for stem, _ in chosen}, covered)
    out.next_seq = covered + 1
    _replay_journal(sd, out, covered, repair=repair, salvage=salvage, wants=wants, on_payload=on_payload)
    return out


def _repair_indexes(sd: StateDir, out: Recovered) -> None:
    """An index is derived data: rebuild a missing or damaged one from a run whose records are intact."""
    for first, last, path in sd.run_files():
        if load_run(path, check_data=False) is not None:
            continue
        try:
            ix = build_index(path.read_bytes(), first, last, str(path))
        except CorruptRecord:
            continue  # damaged data: recovery reports it (or --salvage handles it)
        write_atomic(path.with_suffix(".idx"), encode_index(ix))
        out.notes.append(f"rebuilt the index of run {path.name}")


def _replay_run(sd: StateDir, stem: str, path: Path, out: Recovered, *, check_data: bool,
                wants: WantsHook | None, on_payload: PayloadHook | None) -> None:
    ix = load_run(path, check_data=check_data)
    if ix is None:
        raise CorruptRecord(
            f"{path}: compacted run is damaged (checksum mismatch); run `asyncraft verify` for the position, "
            "or resume with --salvage to redo its tasks", path=str(path), offset=0)
    out.runs.append(stem)
    out.run_ranges.append((ix.first, ix.last))
    for name in COUNTER_FIELDS:
        out.counters[name] += ix.counters.get(name, 0)
    apply = out.apply
    from_bytes = int.from_bytes
    # Which (kind, stage) pairs the job needs in full: meta records always, others if the job asks.
    want = {(k, s): (k == 0 or (wants is not None and wants(KIND_NAMES.get(k, ""), stage)))
            for k in (0, *KIND_NAMES) for s, stage in enumerate(ix.stages)}
    wanted: list[int] = []
    for tid, kind, stage, offset in ix.iter_entries():
        if kind:
            apply(kind, from_bytes(tid, "big"))
        if want[kind, stage]:
            wanted.append(offset)
    if wanted:
        with open(path, "rb") as fh:
            for offset in wanted:
                fh.seek(offset)
                rec = records.decode(fh.readline())
                if rec is None:
                    raise CorruptRecord(f"{path}: damaged record at byte {offset}", path=str(path), offset=offset)
                _note_meta(out, rec)
                if on_payload is not None:
                    on_payload(rec)


def _note_meta(out: Recovered, rec: dict[str, Any]) -> None:
    if rec.get("k") == "input":
        out.last_input = rec


def _remove_orphan_runs(sd: StateDir, used: set[str], covered: int) -> None:
    in_journal = {first for first, _ in sd.segments()}
    for first, _last, path in sd.run_files():
        if path.stem not in used and first > covered and first in in_journal:
            # A compaction that crashed before its index was complete; the journal still has the data.
            for p in (path, path.with_suffix(".idx")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()


def iter_lines(data: bytes, start: int = 0) -> Iterator[tuple[int, int]]:
    pos = start
    n = len(data)
    while pos < n:
        nl = data.find(b"\n", pos)
        end = n if nl < 0 else nl + 1
        yield pos, end
        pos = end


def _next_valid(data: bytes, start: int) -> tuple[int, dict[str, Any]] | None:
    for pos, end in iter_lines(data, start):
        rec = records.decode(data[pos:end]) if data[end - 1 : end] == b"\n" else None
        if rec is not None and isinstance(rec.get("seq"), int):
            return pos, rec
    return None


def _replay_journal(sd: StateDir, out: Recovered, covered: int, *, repair: bool, salvage: bool,
                    wants: WantsHook | None, on_payload: PayloadHook | None) -> None:
    segs = sd.segments()
    expected = covered + 1
    kept: list[tuple[int, Path]] = []
    for i, (first, path) in enumerate(segs):
        is_last = i == len(segs) - 1
        next_first = segs[i + 1][0] if not is_last else None
        if next_first is not None and next_first - 1 <= covered:
            # Compacted into a run already; the crash came before the segment was released.
            if repair:
                path.unlink()
            continue
        if first > expected:
            raise CorruptRecord(
                f"{path}: journal records {expected}..{first - 1} are missing (segment files deleted?)",
                path=str(path), offset=0)
        data = path.read_bytes()
        pos = 0
        while True:
            bad_at, expected = _replay_segment(data, pos, expected, out, wants, on_payload)
            if bad_at is None:
                break
            nxt = _next_valid(data, bad_at)
            if nxt is None and is_last:
                # Torn tail: the crash interrupted the last write. Nothing after it was acknowledged.
                if repair:
                    with open(path, "r+b") as fh:
                        fh.truncate(bad_at)
                        os.fsync(fh.fileno())
                out.notes.append(f"truncated a torn record at {path}:{bad_at} ({len(data) - bad_at} bytes)")
                data = data[:bad_at]
                break
            if not salvage:
                raise CorruptRecord(
                    f"{path}: damaged record at byte offset {bad_at} followed by valid records; this is "
                    "corruption, not a torn write. Run `asyncraft verify` to see every damaged position, or "
                    "resume with --salvage to set the damaged records aside and redo their tasks",
                    path=str(path), offset=bad_at)
            data = _salvage(sd, path, data, bad_at, nxt, expected, next_first, out)
            pos = bad_at
        if data or not is_last:
            kept.append((first, path))
        elif repair:
            path.unlink()  # an empty last segment; the writer starts a fresh one at next_seq
    if repair and kept:
        # The last segment may hold records that reached the page cache but not the disk (a kill
        # between write and fsync): make them durable before anything newer is written after them.
        with open(kept[-1][1], "rb+") as fh:
            os.fsync(fh.fileno())
    out.segments = kept
    out.next_seq = expected


def _replay_segment(data: bytes, pos: int, expected: int, out: Recovered, wants: WantsHook | None,
                    on_payload: PayloadHook | None) -> tuple[int | None, int]:
    """Apply the valid records of ``data`` from ``pos`` on; returns (offset of the first bad one or
    None, next expected seq). The hot loop of a resume: a million records go through it, so the
    common case (a done record nobody needs in full) is kept to a few operations."""
    decode = records.decode
    done, failed = out.done, out.failed
    wanted: dict[tuple[int, str], bool] = {}
    prompt = completion = calls = 0
    n = len(data)
    try:
        while pos < n:
            nl = data.find(b"\n", pos)
            if nl < 0:
                return pos, expected
            rec = decode(data[pos : nl + 1])
            if rec is None:
                return pos, expected
            seq = rec.get("seq")
            if seq != expected:
                if isinstance(seq, int) and seq < expected:
                    pos = nl + 1  # already covered by a compacted run
                    continue
                return pos, expected
            kind = KIND_CODES.get(rec.get("k", ""), 0)
            if kind:
                tid = rec.get("id")
                if tid:
                    key = int(tid, 16)
                    if kind == 1:
                        done.add(key)
                        failed.discard(key)
                    else:
                        out.apply(kind, key)
                if kind != 4:
                    usage = rec.get("usage")
                    if usage:
                        prompt += int(usage.get("prompt_tokens") or 0)
                        completion += int(usage.get("completion_tokens") or 0)
                        calls += 1
            if kind == 0:
                _note_meta(out, rec)
                if on_payload is not None:
                    on_payload(rec)
            elif on_payload is not None and wants is not None:
                stage = rec.get("stage") or ""
                want = wanted.get((kind, stage))
                if want is None:
                    want = wanted[kind, stage] = wants(KIND_NAMES.get(kind, ""), stage)
                if want:
                    on_payload(rec)
            expected += 1
            pos = nl + 1
        return None, expected
    finally:
        counters = out.counters
        counters["prompt_tokens"] += prompt
        counters["completion_tokens"] += completion
        counters["calls"] += calls


def _salvage(sd: StateDir, path: Path, data: bytes, bad_at: int, nxt: tuple[int, dict[str, Any]] | None,
             expected: int, next_first: int | None, out: Recovered) -> bytes:
    """Move damaged bytes to damaged/, put placeholders for the sequence numbers they held, rewrite."""
    end = nxt[0] if nxt is not None else len(data)
    resume_seq = nxt[1]["seq"] if nxt is not None else (next_first if next_first is not None else expected)
    sd.damaged.mkdir(exist_ok=True)
    aside = sd.damaged / f"{path.name}.{bad_at}.bin"
    write_atomic(aside, data[bad_at:end])
    placeholders = b"".join(
        records.encode({"seq": s, "k": "lost", "note": f"damaged bytes set aside in damaged/{aside.name}"})
        for s in range(expected, max(expected, resume_seq))
    )
    new = data[:bad_at] + placeholders + data[end:]
    write_atomic(path, new)
    out.notes.append(f"salvaged {end - bad_at} damaged bytes at {path}:{bad_at} -> {aside}; "
                     f"{max(0, resume_seq - expected)} record(s) lost, their tasks will be redone")
    return new


def _salvage_run(sd: StateDir, path: Path, out: Recovered) -> None:
    """Keep a damaged run's valid records, set the rest aside, and re-index it."""
    first, _, last = path.stem.partition("-")
    data = path.read_bytes()
    good, lost = [], 0
    sd.damaged.mkdir(exist_ok=True)
    for pos, end in iter_lines(data):
        line = data[pos:end]
        if records.decode(line) is not None and line.endswith(b"\n"):
            good.append(line)
        else:
            lost += 1
            write_atomic(sd.damaged / f"{path.name}.{pos}.bin", line)
    new = b"".join(good)
    write_atomic(path.with_name(path.name + ".new"), new)
    os.replace(path.with_name(path.name + ".new"), path)
    write_atomic(path.with_suffix(".idx"), encode_index(build_index(new, int(first), int(last), str(path))))
    out.notes.append(f"salvaged run {path.name}: {lost} damaged record(s) set aside in {sd.damaged}; "
                     "their tasks will be redone")


# ---------------------------------------------------------------------------------------------------
# compaction


def compact(sd: StateDir, segments: list[tuple[int, int, Path]], prev_runs: list[str], failpoints: Failpoints,
            ) -> tuple[int, list[str]]:
    """Turn sealed segments into runs, write a manifest covering them, then release the segments.

    Cost is proportional to the segments compacted, not to what earlier snapshots hold: runs are
    immutable and the manifest only names them.
    """
    runs = list(prev_runs)
    last_seq = 0
    for first, last, path in segments:
        data = path.read_bytes()
        ix = build_index(data, first, last, str(path))
        stem = run_stem(first, last)
        target = sd.runs / (stem + ".jsonl")
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        try:
            os.link(path, target)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
                raise
            write_atomic(target, data)  # file systems without hard links
        blob = encode_index(ix)
        failpoints.hit("compact.mid_index")
        write_atomic(sd.runs / (stem + ".idx"), blob)
        runs.append(stem)
        last_seq = last
    manifest = records.encode({"k": "manifest", "v": 1, "seq": last_seq, "runs": runs, "t": time.time()})
    write_atomic(sd.snapshots / f"snap-{last_seq:012d}.json", manifest, failpoints=failpoints,
                 mid="snapshot.mid_write", after_rename="snapshot.after_rename")
    failpoints.hit("snapshot.before_release")
    for _first, _last, path in segments:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    for _seq, old in sd.manifests()[KEEP_MANIFESTS:]:
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    return last_seq, runs


# ---------------------------------------------------------------------------------------------------
# reading (export, tail, verify): read-only, tolerant of a live writer


@dataclass(frozen=True)
class Located:
    path: Path
    offset: int


def iter_records(sd: StateDir, *, after_seq: int = 0) -> Iterator[tuple[dict[str, Any], Located]]:
    """Every readable record in sequence order: compacted runs first, then the journal.

    A torn last line of a live journal is skipped (it is being written)."""
    covered = 0
    manifest = None
    for seq, path in sd.manifests():
        manifest = read_manifest(path)
        if manifest is not None and manifest.get("seq") == seq:
            break
        manifest = None
    stems = list(manifest["runs"]) if manifest else []
    known = set(stems)
    last_of = {}
    for first, last, path in sd.run_files():
        last_of[path.stem] = (first, last)
    tail_seq = max((last_of[s][1] for s in stems if s in last_of), default=0)
    for first, last, path in sd.run_files():
        if path.stem not in known and first == tail_seq + 1 and load_run(path, check_data=False):
            stems.append(path.stem)
            tail_seq = last
    for stem in stems:
        path = sd.runs / (stem + ".jsonl")
        first, last = last_of.get(stem, (0, 0))
        covered = max(covered, last)
        if last <= after_seq:
            continue
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        for pos, end in iter_lines(data):
            rec = records.decode(data[pos:end])
            if rec is not None and rec.get("seq", 0) > after_seq:
                yield rec, Located(path, pos)
    for _first, path in sd.segments():
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue  # compacted and released while we were reading; its run was listed above
        for pos, end in iter_lines(data):
            rec = records.decode(data[pos:end])
            if rec is None:
                continue
            seq = rec.get("seq", 0)
            if seq > covered and seq > after_seq:
                yield rec, Located(path, pos)


def read_at(loc: Located) -> dict[str, Any] | None:
    with open(loc.path, "rb") as fh:
        fh.seek(loc.offset)
        return records.decode(fh.readline())
