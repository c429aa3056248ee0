"""Reading and migrating state dirs written by asyncraft 0.1.0 (state format 1).

Format 1 kept runs as plain JSONL (``runs/<first>-<last>.jsonl`` with a binary ``.idx``), manifests as
``snapshots/snap-<seq>.json``, and journal segments without seals or commit marks. Migration reads every record
with format 1's rules (newest valid manifest, runs that continue it, the journal after them, a torn last
record dropped), writes them as format 2 runs with a manifest and an empty segment to continue in, and then
switches ``asyncraft.json`` to format 2 in one atomic rename: that is the commit point. Killed before it, the
next start finds format 1 and migrates again (throwing away the half-written format 2 files); killed after it,
the next start finds format 2 and only removes the format 1 files that are left.
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from asyncraft import records
from asyncraft.errors import StateDamaged
from asyncraft.storage import runfile
from asyncraft.storage.compact import manifest_entry, write_manifest
from asyncraft.storage.fs import FS
from asyncraft.storage.layout import FORMAT, MANIFEST_RE, RUN_RE, StateDir, seg_name
from asyncraft.storage.tasks import count_from_scratch

log = logging.getLogger("asyncraft.storage")

V1_ENTRY = struct.Struct("<16sBBQ")
RUN_RECORDS = 100_000  # records per format 2 run written by the migration


def needs_migration(sd: StateDir) -> bool:
    meta = _raw_meta(sd)
    return meta is not None and meta.get("format", 1) == 1


def has_leftovers(sd: StateDir) -> bool:
    return bool(_v1_files(sd))


def _raw_meta(sd: StateDir) -> dict[str, Any] | None:
    try:
        meta = orjson.loads(sd.meta_path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _v1_files(sd: StateDir) -> list[Path]:
    out: list[Path] = []
    if sd.runs.is_dir():
        for p in sd.runs.iterdir():
            if p.suffix == ".jsonl" or (p.suffix == ".idx" and not RUN_RE.match(p.with_suffix(".zst").name)):
                out.append(p)
    if sd.snapshots.is_dir():
        out.extend(p for p in sd.snapshots.iterdir() if p.name.startswith("snap-"))
    return sorted(out)


def migrate(sd: StateDir, fs: FS, *, salvage: bool = False) -> list[str]:
    """Migrate a format 1 state dir in place (the caller holds the lock). Returns notes for the log."""
    meta = _raw_meta(sd)
    assert meta is not None
    notes: list[str] = []
    # Throw away what an interrupted migration wrote.
    for p in list(sd.runs.iterdir()) if sd.runs.is_dir() else []:
        if RUN_RE.match(p.name) or RUN_RE.match(p.with_suffix(".zst").name) or p.name.endswith(".tmp"):
            fs.unlink(p)
    for p in list(sd.snapshots.iterdir()) if sd.snapshots.is_dir() else []:
        if MANIFEST_RE.match(p.name) or p.name.endswith(".tmp"):
            fs.unlink(p)
    lines, last, lost = _v1_records(sd, salvage=salvage)
    if lost:
        notes.append(f"format 1 state had {lost} unreadable record(s); placeholders written, their tasks will be "
                     "redone")
    chain: list[dict[str, Any]] = []
    batch: list[bytes] = []
    first = 1
    for line in lines:
        batch.append(line)
        if len(batch) >= RUN_RECORDS:
            chain.append(manifest_entry(runfile.write_run(fs, sd.runs, batch, first)))
            first += len(batch)
            batch = []
    if batch:
        chain.append(manifest_entry(runfile.write_run(fs, sd.runs, batch, first)))
    fs.fp.hit("migrate.before_commit")
    # The segment the journal continues in, then the manifest naming the runs, then the commit point.
    stale_segments = sd.segments()
    cont = sd.journal / seg_name(last + 1)
    if cont.exists() and cont.stat().st_size:
        fs.rename(cont, cont.with_name(cont.name + ".format1"))
    fs.create_empty(cont)
    if chain:
        runs = [runfile.open_tasks(sd.index_path(item["name"])) for item in chain]
        try:
            write_manifest(fs, sd, chain, last, count_from_scratch(runs))
        finally:
            for run in runs:
                run.close()
    meta["format"] = FORMAT
    sd.write_meta(fs, meta)
    notes.append(f"migrated the state dir from format 1 to {FORMAT} ({last} records)")
    fs.fp.hit("migrate.after_commit")
    for _first, path in stale_segments:
        if path != cont:
            fs.unlink(path)
    finish(sd, fs)
    return notes


def finish(sd: StateDir, fs: FS) -> None:
    """Remove the format 1 files a migration leaves once it has committed."""
    for p in _v1_files(sd):
        fs.unlink(p)
    for p in sd.journal.glob("*.format1"):
        fs.unlink(p)
    for d in (sd.journal, sd.runs, sd.snapshots):
        if d.is_dir():
            fs.fsync_dir(d)


def _v1_records(sd: StateDir, *, salvage: bool) -> tuple[Iterator[bytes], int, int]:
    """Every record of a format 1 state dir in seq order, each re-encoded as it was; (lines, last seq, lost)."""
    out: list[bytes] = []
    lost = 0
    chain = _v1_chain(sd)
    seq = 0

    def add(line: bytes, rec: dict[str, Any]) -> None:
        nonlocal seq
        out.append(line)
        seq = rec["seq"]

    def placeholder(s: int, where: str) -> None:
        nonlocal lost
        lost += 1
        out.append(records.encode({"k": "lost", "note": f"unreadable in format 1 {where}", "seq": s, "b": s}))

    for first, last, path in chain:
        data = path.read_bytes()
        expected = first
        for line in data.splitlines(keepends=True):
            rec = records.decode(line) if line.endswith(b"\n") else None
            if rec is None or rec.get("seq") != expected:
                if not salvage:
                    raise StateDamaged(f"{path}: damaged record (format 1 run, seq {expected}); run with --salvage "
                                       "to set it aside while migrating")
                continue
            add(line, rec)
            expected += 1
        for s in range(expected, last + 1):
            placeholder(s, path.name)
        seq = last
    covered = seq
    segs = [(f, p) for f, p in sorted(_v1_segments(sd)) if p.stat().st_size]
    for i, (_first, path) in enumerate(segs):
        data = path.read_bytes()
        lines = data.splitlines(keepends=True)
        for j, line in enumerate(lines):
            rec = records.decode(line) if line.endswith(b"\n") else None
            if rec is not None and isinstance(rec.get("seq"), int) and rec["seq"] <= covered:
                continue
            if rec is not None and rec.get("seq") == seq + 1:
                add(line, rec)
                continue
            rest_valid = any(records.decode(x) is not None for x in lines[j + 1 :] if x.endswith(b"\n"))
            if i == len(segs) - 1 and not rest_valid:
                break  # a torn last record: never acknowledged
            if not salvage:
                raise StateDamaged(f"{path}: damaged record at seq {seq + 1} (format 1 journal); run with --salvage "
                                   "to set it aside while migrating")
            nxt = next((records.decode(x) for x in lines[j + 1 :] if records.decode(x) is not None), None)
            upto = nxt["seq"] - 1 if nxt is not None else seq + 1
            for s in range(seq + 1, upto + 1):
                placeholder(s, path.name)
            seq = upto
    return iter(out), seq, lost


def _v1_segments(sd: StateDir) -> list[tuple[int, Path]]:
    return [(f, p) for f, p in sd.segments()]


def _v1_chain(sd: StateDir) -> list[tuple[int, int, Path]]:
    """The runs of a format 1 state dir, as format 1 recovery chose them."""
    runs: dict[str, tuple[int, int, Path]] = {}
    for p in sd.runs.glob("*.jsonl") if sd.runs.is_dir() else []:
        lo, _, hi = p.stem.partition("-")
        try:
            runs[p.stem] = (int(lo), int(hi), p)
        except ValueError:
            continue
    manifest: dict[str, Any] | None = None
    for p in sorted(sd.snapshots.glob("snap-*.json"), reverse=True) if sd.snapshots.is_dir() else []:
        rec = records.decode(p.read_bytes())
        if rec is not None and rec.get("k") == "manifest" and all(
                s in runs and _v1_run_ok(runs[s][2]) for s in rec.get("runs", [])):
            manifest = rec
            break
    chain = [runs[s] for s in manifest["runs"]] if manifest else []
    covered = chain[-1][1] if chain else 0
    for stem in sorted(runs):
        first, last, path = runs[stem]
        if first == covered + 1 and _v1_run_ok(path):
            chain.append((first, last, path))
            covered = last
    return chain


def _v1_run_ok(path: Path) -> bool:
    try:
        blob = path.with_suffix(".idx").read_bytes()
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    nl = blob.find(b"\n")
    header = records.decode(blob[: nl + 1]) if nl >= 0 else None
    if header is None or header.get("v") != 1 or zlib.crc32(blob[nl + 1 :]) != header.get("entries_crc"):
        return False
    return bool(size == header.get("data_bytes"))
