"""Sealed runs: immutable, zstd-compressed files of journal records, and their indexes.

A run holds the records of seq ``first..last`` (every one of them: meta records too), as JSONL cut into
frames of about ``FRAME_RAW`` bytes, each compressed as its own zstd frame. Concatenated frames are a valid
zstd stream, so ``zstdcat RUN | jq`` reads a run, and a reader can decompress one frame to get one record.

The index (``.idx``) is a checksummed JSON header line followed by a binary body: the frame table
(offset, compressed length, raw length, CRC-32 of the compressed bytes) and one entry per record in seq order
(task id, kind, stage, frame, offset in the frame). Nothing here is trusted without its checksum: the
header's own CRC when it is read, the body's CRC when the body is loaded, a frame's CRC when the frame is read,
and each record's CRC when it is decoded. Starting a run reads only headers; data is checked when it is read
(and all of it by ``verify``).
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from asyncraft import records
from asyncraft.records import Kind, kind_of
from asyncraft.storage import taskindex
from asyncraft.storage.fs import FS
from asyncraft.storage.layout import run_name
from asyncraft.storage.taskindex import RunDamage

FRAME_RAW = 128 << 10
LEVEL = 3
FRAME = struct.Struct("<QIII")  # offset, compressed length, raw length, crc32 of the compressed bytes
ENTRY = struct.Struct("<16sBBII")  # task id (zeros if none), kind, stage code, frame, offset in the frame
ZERO_ID = bytes(16)
# Meta records that are not carried forward as "latest": structure of the journal itself.
UNCARRIED = frozenset({"seal", "lost", "manifest"})


def record_usage(rec: dict[str, Any]) -> tuple[int, int]:
    usage = rec.get("usage")
    if not isinstance(usage, dict):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


@dataclass
class RunHeader:
    name: str
    first: int
    last: int
    count: int
    data_bytes: int
    data_crc: int
    frames: int
    stages: list[str]
    counters: dict[str, int]
    kinds: dict[str, int]
    body_crc: int
    body_bytes: int
    kind_stages: list[str]  # "done:prompts", ...: which payloads a run holds, so a resume can skip the others
    latest: dict[str, dict[str, Any]]  # the newest meta record of each kind (input progress, job notes)
    tasks: int  # tasks the run settles or touches (entries of the task index)
    bloom_m: int  # bits of the task filter
    sections: dict[str, list[int]]  # name -> [offset in the body, length, crc32]

    def as_dict(self) -> dict[str, Any]:
        return {"k": "runindex", "v": 2, "name": self.name, "first": self.first, "last": self.last,
                "count": self.count, "data_bytes": self.data_bytes, "data_crc": self.data_crc,
                "frames": self.frames, "stages": self.stages, "counters": self.counters, "kinds": self.kinds,
                "body_crc": self.body_crc, "body_bytes": self.body_bytes, "kind_stages": self.kind_stages,
                "latest": self.latest, "tasks": self.tasks, "bloom_m": self.bloom_m, "sections": self.sections}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunHeader:
        return cls(d["name"], d["first"], d["last"], d["count"], d["data_bytes"], d["data_crc"], d["frames"],
                   list(d["stages"]), dict(d["counters"]), dict(d["kinds"]), d["body_crc"], d["body_bytes"],
                   list(d["kind_stages"]), dict(d["latest"]), int(d["tasks"]), int(d["bloom_m"]),
                   {k: list(v) for k, v in d["sections"].items()})


@dataclass
class RunIndex:
    header: RunHeader
    frames: list[tuple[int, int, int, int]]
    entries: bytes

    def iter_entries(self) -> Iterator[tuple[bytes, int, int, int, int]]:
        return ENTRY.iter_unpack(self.entries)


# -- writing ---------------------------------------------------------------------------------------------


def build_run(lines: Iterable[bytes], first: int) -> tuple[bytes, bytes, RunHeader]:
    """Compress the records of seq ``first``, ``first + 1``, ... into run data and its index.

    Every line must be a valid record with the expected seq (sealed journal data was fsynced and checked
    on the way in); a line that is not is a bug or damage, and raises ``ValueError``."""
    cctx = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True, write_checksum=False)
    stages: dict[str, int] = {}
    kinds: Counter[str] = Counter()
    counters: Counter[str] = Counter()
    entries: list[bytes] = []
    frames: list[tuple[int, int, int, int]] = []
    blobs: list[bytes] = []
    raw: list[bytes] = []
    raw_len = 0
    offset = 0
    seq = first
    latest: dict[str, dict[str, Any]] = {}
    kind_stages: set[str] = set()
    tasks: dict[bytes, list[int]] = {}  # id -> [state, attempts, frame, offset, seq - first]

    def flush() -> None:
        nonlocal raw_len, offset
        if not raw:
            return
        blob = cctx.compress(b"".join(raw))
        frames.append((offset, len(blob), raw_len, zlib.crc32(blob)))
        blobs.append(blob)
        offset += len(blob)
        raw.clear()
        raw_len = 0

    for line in lines:
        rec = records.decode(line)
        if rec is None or rec.get("seq") != seq or not line.endswith(b"\n"):
            raise ValueError(f"record {seq}: not a valid record with that seq")
        if raw_len and raw_len + len(line) > FRAME_RAW:
            flush()
        kind = kind_of(rec)
        stage = rec.get("stage") or ""
        code = stages.setdefault(stage if isinstance(stage, str) else "", len(stages))
        tid = rec.get("id")
        key = bytes.fromhex(tid) if isinstance(tid, str) and len(tid) == 32 else ZERO_ID
        entries.append(ENTRY.pack(key, int(kind), code, len(frames), raw_len))
        if key != ZERO_ID and kind != Kind.META:
            t = tasks.get(key)
            if t is None:
                t = tasks[key] = [taskindex.NONE, 0, 0, 0, 0]
            if kind == Kind.ATTEMPT:
                t[1] += 1
            else:
                state = taskindex.merge_state(t[0], int(kind))
                if state == kind:  # this record decides the task's state in the run: remember where it is
                    t[0], t[2], t[3], t[4] = state, len(frames), raw_len, seq - first
        kinds[rec.get("k", "")] += 1
        if kind in (Kind.DONE, Kind.FAIL, Kind.ATTEMPT) and rec.get("usage"):
            p, c = record_usage(rec)
            counters["prompt_tokens"] += p
            counters["completion_tokens"] += c
            counters["calls"] += 1
        if kind == Kind.META:
            name = rec.get("k")
            if isinstance(name, str) and name not in UNCARRIED:
                latest[name] = {k: v for k, v in rec.items() if k not in ("c", "b")}
        else:
            kind_stages.add(f"{rec.get('k')}:{stage}")
        raw.append(line)
        raw_len += len(line)
        seq += 1
    flush()
    if seq == first:
        raise ValueError("a run needs at least one record")
    data = b"".join(blobs)
    crc = zlib.crc32(data)
    parts, info = taskindex.build_sections(tasks)
    parts = {"frames": b"".join(FRAME.pack(*f) for f in frames), "entries": b"".join(entries), **parts}
    sections: dict[str, list[int]] = {}
    offset = 0
    for name, blob in parts.items():
        sections[name] = [offset, len(blob), zlib.crc32(blob)]
        offset += len(blob)
    body = b"".join(parts.values())
    header = RunHeader(run_name(first, seq - 1, crc), first, seq - 1, seq - first, len(data), crc, len(frames),
                       list(stages), dict(counters), dict(kinds), zlib.crc32(body), len(body), sorted(kind_stages),
                       latest, info["tasks"], info["bloom_m"], sections)
    return data, records.encode(header.as_dict()) + body, header


def write_run(fs: FS, runs_dir: Path, lines: Iterable[bytes], first: int) -> RunHeader:
    """Write a run and then its index, each atomically and durably (the index names a complete run)."""
    data, index, header = build_run(lines, first)
    fs.write_atomic(runs_dir / header.name, data)
    fs.fp.hit("compact.mid_index")
    fs.write_atomic(index_path_for(runs_dir / header.name), index)
    return header


def index_path_for(run_path: Path) -> Path:
    return run_path.with_suffix(".idx")


# -- reading ---------------------------------------------------------------------------------------------


def read_header(path: Path) -> RunHeader:
    """The header of a run's index (first line only); raises ``RunDamage`` (or FileNotFoundError)."""
    with open(path, "rb") as fh:
        line = fh.readline(1 << 20)
    rec = records.decode(line) if line.endswith(b"\n") else None
    if rec is None or rec.get("k") != "runindex" or rec.get("v") != 2:
        raise RunDamage(path, 0, "index header is damaged")
    try:
        return RunHeader.from_dict(rec)
    except (KeyError, TypeError):
        raise RunDamage(path, 0, "index header is incomplete") from None


def read_index(path: Path) -> RunIndex:
    """The frames and record entries of an index, the whole body checked against the header's CRC."""
    blob = path.read_bytes()
    nl = blob.find(b"\n")
    header = read_header(path)
    body = blob[nl + 1 :]
    if len(body) != header.body_bytes or zlib.crc32(body) != header.body_crc:
        raise RunDamage(path, nl + 1, "index body is damaged (checksum mismatch)")
    fo, fl, _ = header.sections["frames"]
    eo, el, _ = header.sections["entries"]
    if fl != header.frames * FRAME.size or el != header.count * ENTRY.size:
        raise RunDamage(path, nl + 1, "index body has the wrong size")
    return RunIndex(header, list(FRAME.iter_unpack(body[fo : fo + fl])), body[eo : eo + el])


def open_tasks(path: Path) -> taskindex.RunTasks:
    """The task lookups of a run's index (``path`` is the .idx file)."""
    header = read_header(path)
    with open(path, "rb") as fh:
        body_start = len(fh.readline(1 << 20))
    return taskindex.RunTasks(path, body_start, header.as_dict())


class RunReader:
    """Reads records of one run, checking every frame and record; keeps a few decompressed frames."""

    def __init__(self, path: Path, index: RunIndex, *, cache_frames: int = 16) -> None:
        self.path = path
        self.index = index
        self._dctx = zstandard.ZstdDecompressor()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_frames = cache_frames
        self._fh: Any = None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def frame(self, i: int) -> bytes:
        got = self._cache.get(i)
        if got is not None:
            self._cache.move_to_end(i)
            return got
        offset, clen, rlen, crc = self.index.frames[i]
        if self._fh is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._fh.seek(offset)
        blob = self._fh.read(clen)
        if len(blob) != clen or zlib.crc32(blob) != crc:
            raise RunDamage(self.path, offset, f"frame {i} is damaged (checksum mismatch or cut short)")
        try:
            raw = self._dctx.decompress(blob)
        except zstandard.ZstdError:
            raise RunDamage(self.path, offset, f"frame {i} does not decompress") from None
        if len(raw) != rlen:
            raise RunDamage(self.path, offset, f"frame {i} decompresses to the wrong size")
        self._cache[i] = raw
        if len(self._cache) > self._cache_frames:
            self._cache.popitem(last=False)
        return raw

    def record_at(self, frame: int, offset: int, seq: int | None = None) -> dict[str, Any]:
        raw = self.frame(frame)
        end = raw.find(b"\n", offset)
        rec = records.decode(raw[offset : end + 1]) if end >= 0 else None
        if rec is None or (seq is not None and rec.get("seq") != seq):
            where = self.index.frames[frame][0]
            raise RunDamage(self.path, where, f"record {seq if seq is not None else '?'} in frame {frame} is damaged")
        return rec

    def records(self, frames: Iterable[int] | None = None) -> Iterator[dict[str, Any]]:
        """Every record in seq order (or only those of the given frames), each checked."""
        first = self.index.header.first
        seq = first
        wanted = None if frames is None else set(frames)
        entries = self.index.entries
        n = self.index.header.count
        i = 0
        for f in range(self.index.header.frames):
            # records of frame f are the entries whose frame field is f, consecutive in seq order
            start = i
            while i < n and ENTRY.unpack_from(entries, i * ENTRY.size)[3] == f:
                i += 1
            if wanted is not None and f not in wanted:
                seq = first + i
                continue
            raw = self.frame(f)
            pos = 0
            for _ in range(start, i):
                end = raw.find(b"\n", pos)
                rec = records.decode(raw[pos : end + 1]) if end >= 0 else None
                if rec is None or rec.get("seq") != seq:
                    raise RunDamage(self.path, self.index.frames[f][0], f"record {seq} in frame {f} is damaged")
                yield rec
                pos = end + 1
                seq += 1
            if pos != len(raw):
                raise RunDamage(self.path, self.index.frames[f][0], f"frame {f} holds more than its records")


def check_data_crc(path: Path, header: RunHeader) -> bool:
    crc = 0
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size == header.data_bytes and crc == header.data_crc
