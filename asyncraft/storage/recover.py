"""Opening a state dir: resolve it, refuse or salvage damage, tidy what a crash left, and rebuild what the run needs.

``recover`` is the start of ``asyncraft run``; ``open_read`` the start of the read-only commands. Both resolve
the state dir with the one resolver, so they agree on what it holds. A resume reads the manifest, the run
headers and the live journal (at most one snapshot's worth); the task states of the runs come from the derived
cache, the job's payloads (RAFT's questions and chunks, the problems for errors.jsonl) only from the frames
that hold them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncraft import records
from asyncraft.errors import StateDamaged
from asyncraft.records import NAME_OF, Kind, kind_of
from asyncraft.storage import runfile
from asyncraft.storage.fs import FS
from asyncraft.storage.layout import StateDir, parse_run_name, seg_name
from asyncraft.storage.resolve import RunRef, SegRef, StateView, resolve
from asyncraft.storage.runfile import RunIndex, RunReader
from asyncraft.storage.taskindex import NONE, RunDamage, merge_state
from asyncraft.storage.tasks import TaskStates, count_from_scratch, lookup

log = logging.getLogger("asyncraft.storage")

PayloadHook = Callable[[dict[str, Any]], None]
WantsHook = Callable[[str, str], bool]


@dataclass
class Recovery:
    view: StateView
    next_seq: int
    tasks: TaskStates
    counters: Counter[str] = field(default_factory=Counter)
    latest: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Live journal segments: (first, last, path); all but the last are sealed and wait for compaction.
    segments: list[tuple[int, int, Path]] = field(default_factory=list)

    # Names the scheduler already uses.
    @property
    def done(self) -> Any:
        return self.tasks.done

    @property
    def failed(self) -> Any:
        return self.tasks.failed

    @property
    def input_errors(self) -> Any:
        return self.tasks.input_errors

    @property
    def attempts(self) -> Any:
        return self.tasks.attempts

    @property
    def last_input(self) -> dict[str, Any] | None:
        return self.latest.get("input")

    @property
    def runs(self) -> list[RunRef]:
        return self.view.runs


def _kind_stage_wanted(header: runfile.RunHeader, wants: WantsHook | None) -> bool:
    if wants is None:
        return False
    for pair in header.kind_stages:
        kind, _, stage = pair.partition(":")
        if kind in NAME_OF.values() and wants(kind, stage):
            return True
    return False


def recover(sd: StateDir, fs: FS, *, salvage: bool = False, wants: WantsHook | None = None,
            on_payload: PayloadHook | None = None) -> Recovery:
    """Resolve, refuse damage (or salvage it), tidy, and rebuild the state a run resumes from."""
    from asyncraft.storage.salvage import salvage as do_salvage
    from asyncraft.storage.salvage import unsalvaged

    view = resolve(sd)
    notes: list[str] = []
    if salvage:
        # Asked for: check everything (run data and indexes too, which a start otherwise reads lazily).
        notes = do_salvage(sd, fs, view)
        view = resolve(sd)
        if damage := unsalvaged(sd, view):
            raise StateDamaged(f"{sd.root}: --salvage could not repair everything: {damage[0]}", damage)
    else:
        view.refuse_if_damaged()
    notes += tidy(sd, fs, view)
    view = resolve(sd)  # after tidying (torn tail truncated, stale files gone)
    if not salvage:
        view.refuse_if_damaged()
    elif damage := unsalvaged(sd, view):
        raise StateDamaged(f"{sd.root}: --salvage could not repair everything: {damage[0]}", damage)
    return _rebuild(sd, view, wants=wants, on_payload=on_payload, notes=notes)


def open_read(sd: StateDir, *, wants: WantsHook | None = None, on_payload: PayloadHook | None = None) -> Recovery:
    """The same view for a read-only command; damage is reported by the caller (``view.damage``)."""
    view = resolve(sd)
    return _rebuild(sd, view, wants=wants, on_payload=on_payload, notes=[])


def tidy(sd: StateDir, fs: FS, view: StateView) -> list[str]:
    """Undo what a crash left behind (never damage: that is refused or salvaged before)."""
    notes: list[str] = []
    for p in view.temp_files:
        fs.unlink(p)
        notes.append(f"removed leftover temp file {p}")
    with_data = [ref for ref in view.segments if ref.size]
    if with_data:
        # The last segment written may hold records the disk never got (a crash between write and fdatasync, or
        # an fdatasync that failed: the kernel may then drop the pages while reads still show them). Writing its
        # valid part anew, synced, makes what this start counts as done really be on disk; a torn tail goes.
        ref = with_data[-1]
        data = ref.path.read_bytes()[: ref.valid_bytes]
        fs.write_atomic(ref.path, data)
        if ref.valid_bytes < ref.size:
            notes.append(f"truncated a torn write at {ref.path}:{ref.valid_bytes} ({ref.size - ref.valid_bytes} "
                         "bytes never acknowledged)")
    for p in view.stale_segments:
        fs.unlink(p)
    for p in view.orphan_runs:
        rn = parse_run_name(p.name)
        # The live journal is contiguous (tidying comes after the damage checks): one range covers it all.
        in_journal = rn is not None and bool(view.segments) and view.segments[0].first <= rn.first and (
            rn.last <= max(last for _seg, last in _segment_ranges(view)))
        if in_journal:
            fs.unlink(runfile.index_path_for(p))
            fs.unlink(p)
            notes.append(f"removed {p.name}, left by an interrupted compaction (its records are in the journal)")
        else:  # not ours to judge: keep it, out of the way
            fs.mkdir(sd.damaged)
            for q in (p, runfile.index_path_for(p)):
                if q.exists():
                    fs.rename(q, sd.damaged / q.name)
            notes.append(f"set {p.name} aside in damaged/: it is not part of the chain of runs")
    if view.damaged_manifests:
        fs.mkdir(sd.damaged)
        for p in view.damaged_manifests:
            fs.rename(p, sd.damaged / p.name)
            notes.append(f"set the damaged manifest {p.name} aside in damaged/ (the runs are intact)")
    if view.stale_segments or view.orphan_runs or view.damaged_manifests:
        for d in (sd.journal, sd.runs, sd.snapshots):
            fs.fsync_dir(d)
    # The journal always continues in a segment that exists (the writer appends to it).
    if not view.segments:
        fs.create_empty(sd.journal / seg_name(view.next_seq))
    # Trailing empty segments after an unsealed one (a rotation that stopped half-way): keep the first of them
    # only if the segment before is sealed. The writer appends to the last segment, so nothing else is needed.
    return notes


def _segment_ranges(view: StateView) -> list[tuple[SegRef, int]]:
    """Each live segment with the last seq it holds; the journal runs on from one segment to the next."""
    segs = view.segments
    return [(seg, segs[i + 1].first - 1 if i + 1 < len(segs) else seg.last_seq) for i, seg in enumerate(segs)]


def _rebuild(sd: StateDir, view: StateView, *, wants: WantsHook | None,
             on_payload: PayloadHook | None, notes: list[str]) -> Recovery:
    t0 = time.perf_counter()
    tasks = _task_states(sd, view)
    rec = Recovery(view, view.next_seq, tasks, notes=list(notes))
    for ref in view.runs:
        for name, value in ref.header.counters.items():
            rec.counters[name] += value
        rec.latest.update(ref.header.latest)
    if on_payload is not None:
        for latest in list(rec.latest.values()):
            on_payload(latest)
    # Payloads the job wants, from the frames that hold them.
    if wants is not None and on_payload is not None:
        for ref in view.runs:
            if not _kind_stage_wanted(ref.header, wants):
                continue
            index = _read_index(ref)
            stages = ref.header.stages
            frames = sorted({f for _tid, kind, stage, f, _off in index.iter_entries()
                             if kind != Kind.META and wants(NAME_OF[Kind(kind)], stages[stage])})
            with RunReader(ref.path, index) as reader:
                try:
                    for r in reader.records(frames):
                        k = kind_of(r)
                        if k != Kind.META and wants(NAME_OF[k], r.get("stage") or ""):
                            on_payload(r)
                except RunDamage as exc:
                    raise _damaged(sd, exc) from None
    # The live journal, replayed onto the states (and the job) in seq order.
    segments = []
    for seg in view.segments:
        data = seg.path.read_bytes()[: seg.valid_bytes]
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            got = records.decode(data[pos : nl + 1])
            if got is None:  # damage the resolver reported (a run refuses it before it gets here)
                pos = nl + 1
                continue
            if got["seq"] > view.covered:
                _replay(rec, got, (seg.path, pos), wants, on_payload)
            pos = nl + 1
        segments.append((seg.first, max(seg.last_seq, seg.first - 1), seg.path))
    rec.segments = segments
    log.debug("rebuilt state through seq %d in %.2fs", view.next_seq - 1, time.perf_counter() - t0)
    return rec


def _replay(rec: Recovery, r: dict[str, Any], where: tuple[Path, int], wants: WantsHook | None,
            on_payload: PayloadHook | None) -> None:
    kind = kind_of(r)
    if kind == Kind.META:
        name = r.get("k")
        if isinstance(name, str) and name not in runfile.UNCARRIED:
            rec.latest[name] = {k: v for k, v in r.items() if k not in ("c", "b")}
            if on_payload is not None:
                on_payload(r)
        return
    rec.tasks.apply(r, where)
    if kind != Kind.IERR:
        usage = r.get("usage")
        if isinstance(usage, dict):
            rec.counters["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
            rec.counters["completion_tokens"] += int(usage.get("completion_tokens") or 0)
            rec.counters["calls"] += 1
    if wants is not None and on_payload is not None and wants(NAME_OF[kind], r.get("stage") or ""):
        on_payload(r)


def _read_index(ref: RunRef) -> RunIndex:
    try:
        return runfile.read_index(runfile.index_path_for(ref.path))
    except FileNotFoundError:
        raise StateDamaged(f"{runfile.index_path_for(ref.path)}: run index is missing; resume with --salvage") from None
    except RunDamage as exc:
        raise StateDamaged(f"{exc}; resume with --salvage to rebuild it from the run") from None


def _damaged(sd: StateDir, exc: RunDamage) -> StateDamaged:
    return StateDamaged(f"{sd.root} is damaged: {exc.path} at byte {exc.offset}: {exc.problem}. Run `asyncraft "
                        "verify` for every damaged position, or resume with --salvage to set the damage aside and "
                        "redo the tasks whose records are lost.")


def _task_states(sd: StateDir, view: StateView) -> TaskStates:
    """Task lookups over the chain's runs, with the counts the newest manifest recorded (brought up to the chain's
    end by the runs after it, if a compaction stopped before its manifest)."""
    runs = []
    try:
        for ref in view.runs:
            runs.append(runfile.open_tasks(runfile.index_path_for(ref.path)))
    except FileNotFoundError:
        for run in runs:
            run.close()
        raise StateDamaged(f"{runfile.index_path_for(ref.path)}: run index is missing; resume with --salvage") from None
    except RunDamage as exc:
        for run in runs:
            run.close()
        raise _damaged(sd, exc) from None
    manifest = view.manifest
    listed = sum(1 for ref in view.runs if ref.listed)
    if manifest is None or not isinstance(manifest.get("counts"), dict) or listed != len(manifest["runs"]):
        return TaskStates(runs, count_from_scratch(runs) if runs else None)
    states = TaskStates(runs[:listed], dict(manifest["counts"]))
    for run in runs[listed:]:  # complete runs the manifest does not name yet
        for key, entry in run.entries():
            before = lookup(states.runs, key)
            b = before.state if before is not None else NONE
            states._transition(b, merge_state(b, entry.state))
        states.runs.append(run)
    return states
