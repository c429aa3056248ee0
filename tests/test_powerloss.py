"""Power loss, proven: record the file operations of real storage work, rebuild every disk state a power cut
could leave at each sync point (tests/powerloss.py), and recover each one with the real recovery code.

For every state: the resolver finds no damage (a power cut alone never produces damage), recovery succeeds,
every record acknowledged before the cut is there byte for byte (apart from its checksum field), and no
acknowledged task would be paid again. Media damage (a bit flipped after a sync) is the opposite case: it must
be found, never read as valid data.

The mutant tests break one safety measure each (a sync, a checksum, an order) and check that the harness
notices: a harness that passes whatever the code does proves nothing.
"""

from __future__ import annotations

import asyncio
import shutil
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard

from asyncraft import records, storage
from asyncraft.journal import Journal
from asyncraft.records import content_id, id_key
from asyncraft.storage import FS, StateDir, migrate, runfile, taskindex
from asyncraft.storage.fs import RecordingFS
from asyncraft.storage.resolve import resolve
from asyncraft.views import verify
from tests.helpers import journal_records
from tests.powerloss import CrashState, crash_states, snapshot_files

META = {"format": 2, "job": "prompts", "fingerprint": {"job": "prompts", "model": "m", "extra_body": {}},
        "input": "in.jsonl", "created": 0, "history": []}
BATCHES = [1, 3, 1, 2, 4, 1, 1, 3, 2, 1, 1, 4, 2, 1, 3, 1, 2, 1, 1, 2, 3, 1, 1, 2]


def make_record(i: int) -> dict[str, Any]:
    tid = content_id("task", i)
    kind = ("done", "done", "done", "fail", "attempt", "done", "ierr")[i % 7]
    if kind == "ierr":
        return {"k": "ierr", "id": content_id("ierr", f"line:{i}"), "key": f"line:{i}", "msg": f"line {i}: bad"}
    rec: dict[str, Any] = {"k": kind, "id": tid, "stage": "prompts", "line": i, "custom_id": f"req-{i}"}
    if kind in ("done", "attempt"):
        rec["message"] = {"content": f"answer number {i}: " + "words " * (i % 5)}
        rec["usage"] = {"prompt_tokens": 5 + i % 3, "completion_tokens": 9}
    else:
        rec["error"] = {"type": "BadRequest", "status": 400, "message": f"rejected {i}"}
    return rec


def strip(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in ("c",)}


@dataclass
class Recording:
    root: Path
    initial: dict[str, bytes]
    ops: list[tuple[Any, ...]]
    expected: dict[int, dict[str, Any]]  # seq -> record as committed


def record_journal_run(root: Path, *, stop_early: bool = False, snapshot_every: int = 10) -> Recording:
    """A run of the journal writer: commits of 1-4 records, segment rotation, three or more compactions and
    the final snapshot; every operation recorded."""
    fs = RecordingFS()
    sd = StateDir(root)
    expected: dict[int, dict[str, Any]] = {}

    async def go() -> None:
        rec = storage.open_for_run(sd, fs)
        sd.write_meta(fs, META)
        journal = Journal(sd, rec, fs=fs, fsync="batch", fsync_interval=0, segment_bytes=900,
                          snapshot_every=snapshot_every)
        writer = asyncio.create_task(journal.run())
        i = waited = 0
        for n in BATCHES:
            batch = [make_record(i + j) for j in range(n)]
            i += n
            await asyncio.gather(*(journal.submit(r) for r in batch))
            for r in batch:
                expected[r["seq"]] = dict(r)
            if i - waited >= 2 * snapshot_every and journal._compaction is not None:
                # Appends overlap a compaction, but on a loaded machine the compaction thread could fall so far
                # behind that the run ends before three of them: let it catch up every two snapshots' worth.
                waited = i
                await asyncio.wait([journal._compaction])
        if stop_early:
            journal.abandon()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            return
        await journal.close()
        await writer

    asyncio.run(go())
    return Recording(root, {}, fs.ops, expected)


def check_state(state: CrashState, trial: Path, expected: dict[int, dict[str, Any]], *,
                salvage: bool = False, must_keep: set[int] | None = None) -> list[str]:
    """What is wrong with recovering ``state``; empty when it recovers as promised."""
    shutil.rmtree(trial, ignore_errors=True)
    trial.mkdir()
    state.materialise(trial)
    sd = StateDir(trial)
    where = f"[{state.label} at op {state.at}, acked {state.acked}]"
    problems: list[str] = []
    if not migrate.needs_migration(sd):
        view = resolve(sd)
        if view.damage and not salvage:
            return [f"{where} a power cut alone was reported as damage: {view.damage[0]}"]
    try:
        rec = storage.open_for_run(sd, FS(), salvage=salvage)
    except Exception as exc:
        return [f"{where} recovery refused: {exc!r}"]
    got = {r["seq"]: r for r in journal_records(trial)}
    keep = must_keep if must_keep is not None else {s for s in expected if s <= state.acked}
    for seq in sorted(keep):
        if seq not in got:
            problems.append(f"{where} acknowledged record {seq} is lost")
        elif strip(got[seq]) != strip(expected[seq]):
            problems.append(f"{where} acknowledged record {seq} changed: {got[seq]} != {expected[seq]}")
        elif expected[seq].get("k") == "done" and id_key(expected[seq]["id"]) not in rec.done:
            problems.append(f"{where} acknowledged task of record {seq} is not done: it would be paid again")
        if len(problems) > 3:
            break
    return problems


def run_harness(tmp: Path, rec: Recording, *, salvage: bool = False, must_keep: set[int] | None = None,
                stop_at_first: bool = False) -> tuple[int, list[str]]:
    problems: list[str] = []
    n = 0
    for state in crash_states(rec.root, rec.initial, rec.ops):
        n += 1
        problems += check_state(state, tmp / "trial", rec.expected, salvage=salvage, must_keep=must_keep)
        if problems and stop_at_first:
            break
    return n, problems


# -- the harness on correct code ------------------------------------------------------------------------


@pytest.mark.slow
def test_every_power_cut_during_appends_rotation_and_compaction_recovers(tmp_path: Path) -> None:
    rec = record_journal_run(tmp_path / "state")
    kinds = {op[0] for op in rec.ops}
    assert {"write", "sync", "rename", "unlink", "sync_dir", "create"} <= kinds
    assert sum(1 for op in rec.ops if op[0] == "rename" and "manifest-" in str(op[2])) >= 3, "too few compactions"
    assert any(r["k"] == "seal" for r in rec.expected.values()) or any(
        "seal" in str(op) for op in rec.ops if op[0] == "write")
    n, problems = run_harness(tmp_path, rec)
    assert n > 300, f"only {n} crash states"
    assert not problems, "\n".join(problems[:10])


def test_the_model_drops_what_was_not_synced(tmp_path: Path) -> None:
    """The model is not kill -9 in disguise: some states lose unacknowledged records, some hold holes."""
    rec = record_journal_run(tmp_path / "state")
    lose = holes = 0
    for state in crash_states(rec.root, rec.initial, rec.ops):
        data = b"".join(v for k, v in state.files.items() if k.startswith("journal/"))
        holes += b"\x00" in data
        written = sum(1 for op in rec.ops[: state.at] if op[0] == "write" and "journal/" in str(op[1]))
        lose += written > 0 and "synced data" in state.label and state.acked < max(rec.expected)
    assert lose > 10 and holes > 10


@pytest.mark.slow
def test_every_power_cut_during_salvage_keeps_every_readable_record(tmp_path: Path) -> None:
    root = tmp_path / "state"
    rec = record_journal_run(root, stop_early=True)
    sd = StateDir(root)
    view = resolve(sd)
    assert view.runs and view.segments, "the run must leave both runs and a live journal"
    # Damage: a letter flipped inside an acknowledged record in the middle of the live journal, and a run deleted.
    seg = view.segments[-1]
    data = bytearray(seg.path.read_bytes())
    lines = data.split(b"\n")
    victim = len(lines) // 2
    at = sum(len(x) + 1 for x in lines[:victim]) + lines[victim].index(b'"prompts"') + 2
    data[at] ^= 0x01  # "prompts" -> "psompts": still JSON, wrong checksum
    seg.path.write_bytes(bytes(data))
    gone = view.runs[0]
    lost_seqs = set(range(gone.header.first, gone.header.last + 1))
    gone.path.unlink()
    damaged_seq = records.decode(bytes(lines[victim - 1]) + b"\n")["seq"] + 1  # type: ignore[index]
    assert resolve(sd).damage
    keep = set(rec.expected) - lost_seqs - {damaged_seq}
    initial = snapshot_files(root)
    fs = RecordingFS()
    storage.open_for_run(sd, fs, salvage=True)
    salvaged = Recording(root, initial, fs.ops, rec.expected)
    n, problems = run_harness(tmp_path, salvaged, salvage=True, must_keep=keep)
    assert n > 20
    assert not problems, "\n".join(problems[:10])
    # And the salvaged state is clean, with placeholders where records were lost: no seq is used twice.
    assert not resolve(sd).findings
    got = {r["seq"]: r for r in journal_records(root)}
    assert all(got[s]["k"] == "lost" for s in lost_seqs | {damaged_seq})
    assert not [f for f in verify(sd) if f.damage]


@pytest.mark.slow
def test_every_power_cut_during_a_migration_keeps_every_record(tmp_path: Path) -> None:
    fixture = Path(__file__).parent / "data" / "state-v1" / "prompts-v1-killed"
    root = tmp_path / "state"
    shutil.copytree(fixture, root)
    probe = tmp_path / "probe"
    shutil.copytree(fixture, probe)
    storage.open_for_run(StateDir(probe), FS())
    expected = {r["seq"]: r for r in journal_records(probe)}
    initial = snapshot_files(root)
    fs = RecordingFS()
    storage.prepare(StateDir(root), fs)
    migration = Recording(root, initial, fs.ops, expected)
    n, problems = run_harness(tmp_path, migration, must_keep=set(expected))
    assert n > 10
    assert not problems, "\n".join(problems[:10])


# -- media damage: found, never read as data --------------------------------------------------------------


def test_a_flipped_letter_in_the_journal_is_damage_not_a_torn_write(tmp_path: Path) -> None:
    root = tmp_path / "state"
    record_journal_run(root, stop_early=True, snapshot_every=1000)
    assert _journal_flip_is_found(root)


def test_a_flipped_bit_in_a_run_is_found_by_verify_and_refused_by_readers(tmp_path: Path) -> None:
    root = tmp_path / "state"
    record_journal_run(root)
    assert _run_flip_is_found(root)


def _journal_flip_is_found(root: Path) -> bool:
    """Flip a letter inside a string of an acknowledged record that a later commit follows: still JSON, so only
    its checksum tells."""
    sd = StateDir(root)
    for seg in resolve(sd).segments:
        data = bytearray(seg.path.read_bytes())
        lines = bytes(data).split(b"\n")
        batches = [(records.decode(x + b"\n") or {}).get("b") for x in lines]
        for i, line in enumerate(lines):
            later = {b for b in batches[i + 1 :] if b is not None}
            if b'"answer number' in line and later - {batches[i]}:
                at = sum(len(x) + 1 for x in lines[:i]) + line.index(b'"answer number') + 3
                data[at] ^= 0x01
                seg.path.write_bytes(bytes(data))
                return any(str(seg.path) == f.path and f.damage for f in resolve(sd).findings)
    raise AssertionError("no acknowledged record with a later commit after it in the live journal")


def _find_silent_flip(blob: bytes, raw: bytes) -> int | None:
    """A byte of a compressed frame whose flip still decompresses, to different lines that are all JSON: damage
    that only the checksums can see."""
    dctx = zstandard.ZstdDecompressor()
    for pos in range(len(blob)):
        flipped = bytearray(blob)
        flipped[pos] ^= 0x04
        try:
            out = dctx.decompress(bytes(flipped))
        except zstandard.ZstdError:
            continue
        if out == raw or len(out) != len(raw):
            continue
        try:
            if all(isinstance(orjson.loads(x), dict) for x in out.splitlines()):
                return pos
        except orjson.JSONDecodeError:
            continue
    return None


def _run_flip_is_found(root: Path) -> bool:
    sd = StateDir(root)
    ref = resolve(sd).runs[-1]
    index = runfile.read_index(runfile.index_path_for(ref.path))
    blob = ref.path.read_bytes()
    offset, clen, rlen, _crc = index.frames[0]
    frame = blob[offset : offset + clen]
    raw = zstandard.ZstdDecompressor().decompress(frame)
    pos = _find_silent_flip(frame, raw)
    assert pos is not None, "no flip decompresses to valid JSON; the test needs another corpus"
    damaged = bytearray(blob)
    damaged[offset + pos] ^= 0x04
    ref.path.write_bytes(bytes(damaged))
    found = [f for f in verify(sd) if f.damage and f.path == str(ref.path)]
    return bool(found)


# -- the harness fails when a safety measure is taken out -------------------------------------------------


def _mutant_no_fdatasync(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(FS, "fdatasync", lambda self, fd: None)


def _mutant_no_seal_fsync(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(FS, "fsync", lambda self, fd: None)


def _mutant_ack_before_write(mp: pytest.MonkeyPatch) -> None:
    original = Journal._commit

    async def commit(self: Journal, loop: Any, batch: list[Any]) -> None:
        self._fs.note("ack", self.next_seq + len(batch) - 1)
        await original(self, loop, batch)

    mp.setattr(Journal, "_commit", commit)


def _decode_without_crc(line: bytes) -> dict[str, Any] | None:
    body = line.rstrip(b"\n")
    if len(body) < records.TAIL_LEN + 2:
        return None
    try:
        rec = orjson.loads(body[: -records.TAIL_LEN] + b"}")
    except orjson.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def _mutant_no_crc_on_replay(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(records, "decode", _decode_without_crc)


def _mutant_no_crc_on_run_data(mp: pytest.MonkeyPatch) -> None:
    class NoCrc:
        decode = staticmethod(_decode_without_crc)
        encode = staticmethod(records.encode)

    no_crc = type("Z", (), {"crc32": staticmethod(lambda data, start=0: 0)})
    mp.setattr(runfile, "records", NoCrc)
    mp.setattr(runfile, "zlib", no_crc)
    mp.setattr(taskindex, "zlib", no_crc)
    mp.setattr(runfile, "check_data_crc", lambda path, header: True)
    _ = zlib  # the real module stays untouched for everything else


def _mutant_rename_before_fsync(mp: pytest.MonkeyPatch) -> None:
    import os

    def write_atomic(self: FS, path: Path, data: bytes, *, durable: bool = True, mid: str | None = None,
                     after_rename: str | None = None) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        self._log("create", tmp)
        self._log("write", tmp, 0, data)
        os.replace(tmp, path)
        self._log("rename", tmp, path)
        if durable:
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            self._log("sync", path)
            self.fsync_dir(path.parent)

    mp.setattr(FS, "write_atomic", write_atomic)


def _mutant_no_dir_fsync(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(FS, "fsync_dir", lambda self, path: None)


def _harness_fails(tmp: Path) -> Iterator[str]:
    """Every way the harness can report a broken promise, cheapest first."""
    rec = record_journal_run(tmp / "a")
    _, problems = run_harness(tmp, rec, stop_at_first=True)
    yield from problems
    if problems:
        return
    root = tmp / "b"
    record_journal_run(root, stop_early=True, snapshot_every=1000)
    if not _journal_flip_is_found(root):
        yield "a flipped letter in the journal was read as a valid record"
        return
    root = tmp / "c"
    record_journal_run(root)
    if not _run_flip_is_found(root):
        yield "a flipped bit in a run was read as valid data"
        return
    root = tmp / "d"
    rec = record_journal_run(root, stop_early=True)
    sd = StateDir(root)
    view = resolve(sd)
    seg = view.segments[-1]
    data = bytearray(seg.path.read_bytes())
    lines = data.split(b"\n")
    at = sum(len(x) + 1 for x in lines[: len(lines) // 2]) + lines[len(lines) // 2].index(b'"prompts"') + 2
    data[at] ^= 0x01
    seg.path.write_bytes(bytes(data))
    damaged = records.decode(bytes(lines[len(lines) // 2 - 1]) + b"\n")
    keep = set(rec.expected) - {(damaged or {}).get("seq", 0) + 1}
    initial = snapshot_files(root)
    fs = RecordingFS()
    try:
        storage.open_for_run(sd, fs, salvage=True)
    except Exception as exc:
        yield f"salvage failed: {exc!r}"
        return
    _, problems = run_harness(tmp, Recording(root, initial, fs.ops, rec.expected), salvage=True, must_keep=keep,
                              stop_at_first=True)
    yield from problems


MUTANTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "fdatasync removed": _mutant_no_fdatasync,
    "seal fsync removed": _mutant_no_seal_fsync,
    "durable reported before the write": _mutant_ack_before_write,
    "CRC not checked on journal replay": _mutant_no_crc_on_replay,
    "CRC not checked on run data": _mutant_no_crc_on_run_data,
    "rename before the temp file's fsync": _mutant_rename_before_fsync,
    "directory fsync removed": _mutant_no_dir_fsync,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MUTANTS))
def test_the_harness_fails_on_a_mutant(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    MUTANTS[name](monkeypatch)
    found = next(_harness_fails(tmp_path), None)
    assert found is not None, f"mutant '{name}' survived the power-loss harness"
