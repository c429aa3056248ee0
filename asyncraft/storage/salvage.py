"""``--salvage``: set every kind of damage aside, keep every readable record, and leave a clean state dir.

Damaged bytes and files are moved under ``damaged/`` (never deleted). Records that cannot be read are replaced
by ``lost`` placeholders with their seq numbers, so the sequence stays whole and no number is used twice; their
tasks are no longer done, so the run redoes exactly them. A run that is missing, cut short or damaged (data,
index or both) is rebuilt from what can be read, as a new immutable run, and a new manifest names the repaired
chain. Input progress is reset, because the lost tasks may lie in the part of the input a resume would skip.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard

from asyncraft import records
from asyncraft.storage import runfile
from asyncraft.storage.compact import manifest_entry, write_manifest
from asyncraft.storage.fs import FS
from asyncraft.storage.layout import StateDir, seg_name
from asyncraft.storage.resolve import Finding, StateView, resolve
from asyncraft.storage.taskindex import RunDamage
from asyncraft.storage.tasks import count_from_scratch

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def lost(seq: int, note: str) -> bytes:
    return records.encode({"k": "lost", "note": note, "seq": seq, "b": seq})


def unsalvaged(sd: StateDir, view: StateView) -> list[Finding]:
    """The damage ``salvage`` leaves: none, but asyncraft.json is then missing until the run writes it again from
    its configuration (it alone knows the job and its settings), right after opening the state dir."""
    return [f for f in view.damage if f.path != str(sd.meta_path)]


def salvage(sd: StateDir, fs: FS, view: StateView) -> list[str]:
    """Repair ``view``'s damage in place; returns notes for the log."""
    notes: list[str] = []
    fs.mkdir(sd.damaged)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    if any(f.path == str(sd.meta_path) for f in view.damage) and sd.meta_path.exists():
        fs.rename(sd.meta_path, sd.damaged / f"asyncraft.json.{stamp}")
        notes.append("set the damaged asyncraft.json aside; it is written again from this run's configuration")
    chain = _salvage_runs(sd, fs, view, notes, stamp)
    if chain:
        runs = [runfile.open_tasks(sd.index_path(item["name"])) for item in chain]
        try:
            write_manifest(fs, sd, chain, chain[-1]["last"], count_from_scratch(runs))
        finally:
            for run in runs:
                run.close()
    view = resolve(sd)
    _salvage_journal(sd, fs, view, notes, stamp)
    if notes:
        _reset_input_progress(sd, fs)
    for d in (sd.journal, sd.runs, sd.snapshots, sd.damaged):
        fs.fsync_dir(d)
    return notes


# -- runs -------------------------------------------------------------------------------------------------


def _run_is_damaged(path: Path, index: Path, first: int, last: int) -> bool:
    """The deep check --salvage makes of every run: index header and body, data size and checksum."""
    try:
        ix = runfile.read_index(index)
    except (RunDamage, FileNotFoundError):
        return True
    return (ix.header.first, ix.header.last) != (first, last) or not path.exists() or not runfile.check_data_crc(
        path, ix.header)


def _salvage_runs(sd: StateDir, fs: FS, view: StateView, notes: list[str], stamp: str) -> list[dict[str, Any]] | None:
    """Rebuild every damaged or missing run of the manifest's chain; the repaired chain, or None if unchanged."""
    if view.manifest is None:
        return None
    changed = False
    chain: list[dict[str, Any]] = []
    for item in view.manifest["runs"]:
        name, first, last = item["name"], item["first"], item["last"]
        path, index = sd.run_path(name), sd.index_path(name)
        if not _run_is_damaged(path, index, first, last):
            chain.append(item)
            continue
        good, missing = _readable(path, index, first, last)
        # Keep the damaged bytes first: the rebuilt run may have the same name (when only its index was hurt).
        for p in (path, index):
            if p.exists():
                fs.write_atomic(sd.damaged / f"{p.name}.{stamp}", p.read_bytes())
        lines = _with_placeholders(good, first, last, f"damaged or missing run {name}, set aside in damaged/")
        header = runfile.write_run(fs, sd.runs, lines, first)
        chain.append(manifest_entry(header))
        if header.name != name:
            fs.unlink(path)
            fs.unlink(index)
        notes.append(f"salvaged run {name}: {last - first + 1 - missing} record(s) kept, {missing} lost (their "
                     f"tasks will be redone) -> {header.name}")
        changed = True
    return chain if changed else None


def _readable(path: Path, index: Path, first: int, last: int) -> tuple[dict[int, bytes], int]:
    """seq -> line of every record of a run that can still be read (by its index, else by scanning frames)."""
    good: dict[int, bytes] = {}
    try:
        ix = runfile.read_index(index)
        if (ix.header.first, ix.header.last) != (first, last):
            raise RunDamage(index, 0, "index of another run")
        with runfile.RunReader(path, ix) as reader:
            for f in range(ix.header.frames):
                try:
                    raw = reader.frame(f)
                except (RunDamage, OSError):
                    continue
                _take_lines(raw, first, last, good)
    except (RunDamage, FileNotFoundError):
        if path.exists():
            for raw in _scan_frames(path.read_bytes()):
                _take_lines(raw, first, last, good)
    return good, (last - first + 1) - len(good)


def _take_lines(raw: bytes, first: int, last: int, good: dict[int, bytes]) -> None:
    pos = 0
    while pos < len(raw):
        nl = raw.find(b"\n", pos)
        if nl < 0:
            break
        line = raw[pos : nl + 1]
        rec = records.decode(line)
        if rec is not None and isinstance(rec.get("seq"), int) and first <= rec["seq"] <= last:
            good[rec["seq"]] = line
        pos = nl + 1


def _scan_frames(data: bytes) -> Iterator[bytes]:
    """Decompress every zstd frame that still decompresses, resynchronising on the frame magic after damage."""
    pos = 0
    while pos < len(data):
        at = data.find(ZSTD_MAGIC, pos)
        if at < 0:
            return
        obj = zstandard.ZstdDecompressor().decompressobj()
        try:
            raw = obj.decompress(data[at:])
        except zstandard.ZstdError:
            pos = at + 1
            continue
        rest = obj.unused_data
        yield raw
        nxt = len(data) - len(rest)
        pos = nxt if nxt > at else at + 1


def _with_placeholders(good: dict[int, bytes], first: int, last: int, note: str) -> Iterator[bytes]:
    for seq in range(first, last + 1):
        yield good.get(seq) or lost(seq, note)


# -- the journal ------------------------------------------------------------------------------------------


def _salvage_journal(sd: StateDir, fs: FS, view: StateView, notes: list[str], stamp: str) -> None:
    for f in view.damage:
        path = Path(f.path)
        if path.parent != sd.journal:
            continue
        if not path.exists():
            _fill_gap(sd, fs, f, notes)
        elif f.lost is not None or "seal" in f.problem:
            _rewrite_segment(sd, fs, path, notes, stamp)
    # Gaps found while reading other files ("records a..b are missing" at an existing segment).
    view = resolve(sd)
    for f in view.damage:
        if Path(f.path).parent == sd.journal and f.lost is not None and Path(f.path).exists():
            _fill_gap(sd, fs, f, notes, before=Path(f.path))


def _fill_gap(sd: StateDir, fs: FS, f: Finding, notes: list[str], before: Path | None = None) -> None:
    """A missing segment: a placeholder segment holding ``lost`` records for its seq numbers."""
    if f.lost is None:
        return
    a, b = f.lost
    if before is not None:
        b = int(before.name.split(".")[0]) - 1
    path = sd.journal / seg_name(a)
    if path.exists() or b < a:
        return
    note = "journal segment missing; its records are lost"
    lines = [lost(s, note) for s in range(a, b)]
    if before is not None:
        lines.append(records.encode({"k": "seal", "next": b + 1, "seq": b, "b": b}))
    else:
        lines.append(lost(b, note))
    fs.write_atomic(path, b"".join(lines))
    notes.append(f"journal records {a}..{b} were missing: placeholders written, their tasks will be redone")


def _rewrite_segment(sd: StateDir, fs: FS, path: Path, notes: list[str], stamp: str) -> None:
    """Keep the valid records of a segment, put placeholders where records are damaged, drop what follows a
    seal; the original bytes go to damaged/."""
    data = path.read_bytes()
    seq = int(path.name.split(".")[0]) - 1  # the last seq accounted for
    note = f"damaged bytes of {path.name} set aside in damaged/"
    out: list[bytes] = []
    trailing = 0  # damaged complete lines not yet accounted for
    lost_n = 0
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        rec = records.decode(data[pos:end]) if nl >= 0 else None
        if rec is not None and isinstance(rec.get("seq"), int) and rec["seq"] > seq:
            for s in range(seq + 1, rec["seq"]):
                out.append(lost(s, note))
                lost_n += 1
            out.append(data[pos:end])
            seq, trailing = rec["seq"], 0
            if rec.get("k") == "seal":
                break
        elif nl >= 0:
            trailing += 1
        pos = end
    for _ in range(trailing):  # damaged records at the end keep their numbers too
        seq += 1
        out.append(lost(seq, note))
        lost_n += 1
    fs.write_atomic(sd.damaged / f"{path.name}.{stamp}.bin", data)
    fs.write_atomic(path, b"".join(out))
    notes.append(f"salvaged {path.name}: {lost_n} damaged record(s) set aside in damaged/, their tasks will be "
                 "redone")


def _reset_input_progress(sd: StateDir, fs: FS) -> None:
    """Lost tasks may lie in the part of the input that a resume skips: record that the input must be read from
    its start again (appended to the live journal, so it is durable before anything else runs)."""
    view = resolve(sd)
    if unsalvaged(sd, view):
        return
    seq = view.next_seq
    if view.segments:
        path = view.segments[-1].path
        if view.segments[-1].valid_bytes < view.segments[-1].size:
            fs.truncate(path, view.segments[-1].valid_bytes)
    else:
        path = sd.journal / seg_name(seq)
        fs.create_empty(path)
    line = records.encode({"k": "inpos", "reset": "salvage", "offset": 0, "line": 0, "seq": seq, "b": seq})
    fd = fs.open_append(path)
    try:
        fs.append(fd, line, size_before=path.stat().st_size)
        fs.fdatasync(fd)
    finally:
        fs.close(fd)
