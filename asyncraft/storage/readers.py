"""Reading records: all of them in seq order (export, tail, verify), or one task's deciding record by id.

Both read what the resolver found, and check every frame and record they read; a checksum that fails raises
``RunDamage`` with the file and byte offset.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asyncraft import records
from asyncraft.storage import runfile
from asyncraft.storage.recover import Recovery
from asyncraft.storage.resolve import StateView
from asyncraft.storage.runfile import RunReader
from asyncraft.storage.taskindex import DONE, FAILED, NONE, RunDamage, merge_state


@dataclass(frozen=True, slots=True)
class Location:
    """Where a record is: a run (``frame`` >= 0) or a journal segment (``frame`` == -1, ``offset`` in bytes)."""

    path: Path
    frame: int
    offset: int
    seq: int


def iter_records(view: StateView, *, after_seq: int = 0) -> Iterator[tuple[dict[str, Any], Location]]:
    """Every record with seq > ``after_seq``, in order: the runs, then the live journal up to its valid end."""
    for ref in view.runs:
        if ref.header.last <= after_seq:
            continue
        index = runfile.read_index(runfile.index_path_for(ref.path))
        with RunReader(ref.path, index, cache_frames=2) as reader:
            entries = index.entries
            for i in range(index.header.count):
                seq = index.header.first + i
                if seq <= after_seq:
                    continue
                _tid, _kind, _stage, frame, offset = runfile.ENTRY.unpack_from(entries, i * runfile.ENTRY.size)
                yield reader.record_at(frame, offset, seq), Location(ref.path, frame, offset, seq)
    for seg in view.segments:
        try:
            with open(seg.path, "rb") as fh:
                data = fh.read(seg.valid_bytes)
        except FileNotFoundError:
            continue  # compacted and released meanwhile; a new view finds its records in a run
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            rec = records.decode(data[pos : nl + 1])
            if rec is None:
                raise RunDamage(seg.path, pos, "record fails its checksum")
            if rec["seq"] > after_seq and rec["seq"] > view.covered:
                yield rec, Location(seg.path, -1, pos, rec["seq"])
            pos = nl + 1


class Reader:
    """Reads records by location, keeping a few runs open (each with a few decompressed frames)."""

    def __init__(self, *, open_runs: int = 8) -> None:
        self._runs: OrderedDict[Path, RunReader] = OrderedDict()
        self._open_runs = open_runs

    def read(self, loc: Location) -> dict[str, Any]:
        if loc.frame < 0:
            with open(loc.path, "rb") as fh:
                fh.seek(loc.offset)
                rec = records.decode(fh.readline())
            if rec is None or rec.get("seq") != loc.seq:
                raise RunDamage(loc.path, loc.offset, "record fails its checksum")
            return rec
        reader = self._runs.get(loc.path)
        if reader is None:
            reader = RunReader(loc.path, runfile.read_index(runfile.index_path_for(loc.path)), cache_frames=8)
            self._runs[loc.path] = reader
            if len(self._runs) > self._open_runs:
                self._runs.popitem(last=False)[1].close()
        else:
            self._runs.move_to_end(loc.path)
        return reader.record_at(loc.frame, loc.offset, loc.seq)

    def close(self) -> None:
        for reader in self._runs.values():
            reader.close()
        self._runs.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def deciding_location(rec: Recovery, key: int) -> tuple[int, Location | None]:
    """(state, location of the record that decides it) of a task: its done record, else its failure."""
    row, tail = rec.tasks.where(key)
    state = merge_state(row.state if row is not None else NONE, tail.state if tail is not None else NONE)
    if state not in (DONE, FAILED):
        return state, None
    if tail is not None and tail.state == state and tail.where is not None:
        path, offset = tail.where
        return state, Location(path, -1, offset, tail.seq)
    if row is not None and row.state == state and row.seq:
        ref = rec.view.runs[row.run]
        return state, Location(ref.path, row.frame, row.offset, row.seq)
    return state, None
