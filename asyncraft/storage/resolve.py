"""The resolver: the one piece of code that decides what a state dir holds.

Every command (``run``, ``export``, ``status``, ``verify``, ``tail``) starts here and gets the same answer: the
chain of sealed runs (from the newest valid manifest, plus complete runs that continue it), the journal
segments after it with how far each is valid, and every problem found, each either *damage* (acknowledged
records may be lost: refused by every command until ``--salvage`` sets it aside) or a *note* (something a
crash leaves behind and the next run tidies, such as a torn last write, a stray temp file, a compaction that
stopped half-way, or a manifest that cannot be read while the runs it names can).

The rules, in one place:

- Runs are immutable and self-describing. Each run named by the manifest must exist with its recorded size and
  a readable index header; runs continue the chain without a gap. Run data is checked lazily: the CRCs of a
  run's frames and records are checked when it is read, and all of them by ``verify``.
- The journal continues the chain: the segment that starts right after the last run must exist (it is created
  before the manifest that names the runs is written), every segment ends with a seal naming the next one
  (created before the seal is written), and records follow each other by seq.
- A write cut short by a crash or a power cut shows as a last line without its newline, or as a hole of NUL
  bytes (data the disk never got), inside the last commit batch of the last segment. That is a torn write:
  nothing in it was acknowledged, and it is truncated. Anything else that fails its checksum, or a torn write
  followed by a later commit, is damage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncraft import records
from asyncraft.errors import StateDamaged
from asyncraft.storage import runfile
from asyncraft.storage.layout import StateDir, seg_name
from asyncraft.storage.runfile import RunHeader
from asyncraft.storage.taskindex import RunDamage

Visit = Callable[[dict[str, Any]], None]


@dataclass
class Finding:
    path: str
    offset: int
    problem: str
    damage: bool = True
    lost: tuple[int, int] | None = None  # seq range whose records are lost, where known

    def __str__(self) -> str:
        return f"{'DAMAGED' if self.damage else 'note'}: {self.path} at byte {self.offset}: {self.problem}"


@dataclass
class RunRef:
    header: RunHeader
    path: Path
    listed: bool  # named by the manifest (False: a compaction that stopped before its manifest)


@dataclass
class SegRef:
    first: int
    path: Path
    valid_bytes: int  # the records before this offset are good; a torn tail follows when < size
    size: int
    last_seq: int  # first - 1 when empty
    sealed_next: int | None  # the seal record's "next", if the segment is sealed


@dataclass
class StateView:
    sd: StateDir
    meta: dict[str, Any] | None
    manifest: dict[str, Any] | None
    runs: list[RunRef] = field(default_factory=list)
    segments: list[SegRef] = field(default_factory=list)  # the live journal, after the runs
    stale_segments: list[Path] = field(default_factory=list)  # already in runs; released by the next run
    orphan_runs: list[Path] = field(default_factory=list)  # a compaction that stopped before its index
    damaged_manifests: list[Path] = field(default_factory=list)
    temp_files: list[Path] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    next_seq: int = 1

    @property
    def covered(self) -> int:
        return self.runs[-1].header.last if self.runs else 0

    @property
    def damage(self) -> list[Finding]:
        return [f for f in self.findings if f.damage]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if not f.damage]

    @property
    def has_results(self) -> bool:
        return bool(self.runs or self.manifest or any(s.last_seq >= s.first for s in self.segments))

    def refuse_if_damaged(self, *, action: str = "resume") -> None:
        damage = self.damage
        if not damage:
            return
        first = damage[0]
        more = f" (and {len(damage) - 1} more: run `asyncraft verify`)" if len(damage) > 1 else ""
        raise StateDamaged(
            f"{self.sd.root} is damaged: {first.path} at byte {first.offset}: {first.problem}{more}. Nothing was "
            f"changed. To {action} anyway, run `asyncraft run` with --salvage: it sets the damage aside under "
            "damaged/ and redoes exactly the tasks whose records are lost.", damage)


# -- manifests ------------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    rec = records.decode(data) if data.endswith(b"\n") and data.count(b"\n") == 1 else None
    if rec is None or rec.get("k") != "manifest" or rec.get("v") != 2 or not isinstance(rec.get("runs"), list):
        return None
    return rec


# -- the resolver ---------------------------------------------------------------------------------------


def resolve(sd: StateDir, *, visit: Visit | None = None) -> StateView:
    """What ``sd`` holds. Read-only. ``visit`` sees each valid record of the live journal, in seq order (the run
    command replays them in the same pass)."""
    try:
        meta = sd.read_meta()
        bad_meta = None
    except StateDamaged as exc:
        meta, bad_meta = None, str(exc)
    view = StateView(sd, meta, None)
    if bad_meta is not None:
        view.findings.append(Finding(str(sd.meta_path), 0, "asyncraft.json is damaged (empty, not JSON or not an "
                                     "asyncraft state)"))
    view.temp_files = sd.temp_files()
    for p in view.temp_files:
        view.findings.append(Finding(str(p), 0, "leftover temp file of an interrupted write", damage=False))
    _resolve_runs(sd, view)
    _resolve_journal(sd, view, visit)
    if meta is None and bad_meta is None and view.has_results:
        view.findings.insert(0, Finding(str(sd.meta_path), 0, "asyncraft.json is missing while the state holds "
                                        "results"))
    return view


def _resolve_runs(sd: StateDir, view: StateView) -> None:
    for seq, path in sd.manifests():
        m = read_manifest(path)
        if m is not None and m.get("seq") == seq:
            view.manifest = m
            break
        view.damaged_manifests.append(path)
        view.findings.append(Finding(str(path), 0, "manifest is damaged; the runs are read without it",
                                     damage=False))
    files = {rn.name: rn for rn in sd.run_files()}
    used: set[str] = set()
    covered = 0
    if view.manifest is not None:
        for item in view.manifest["runs"]:
            name, first, last = item["name"], item["first"], item["last"]
            path = sd.run_path(name)
            lost = (first, last)
            if first != covered + 1:
                view.findings.append(Finding(str(path), 0, f"the manifest's runs do not follow each other (seq "
                                             f"{covered + 1} expected, {first} found)", lost=(covered + 1, first - 1)))
            covered = last
            used.add(name)
            if name not in files:
                view.findings.append(Finding(str(path), 0, f"run is missing (records {first}..{last})", lost=lost))
                continue
            ref = _load_ref(sd, name, listed=True, view=view, expect_bytes=item.get("bytes"), lost=lost)
            if ref is not None:
                view.runs.append(ref)
        if view.manifest["seq"] != covered:
            view.findings.append(Finding(str(sd.snapshots), 0, "the manifest's seq does not match its runs"))
    # Runs that continue the chain: a compaction wrote them and stopped before (or while) writing its manifest,
    # or the manifest naming them is damaged.
    while True:
        nxt = [rn for rn in files.values() if rn.first == covered + 1 and rn.name not in used]
        if not nxt:
            break
        rn = max(nxt, key=lambda r: r.last)
        used.add(rn.name)
        index = sd.index_path(rn.name)
        try:
            header = runfile.read_header(index)
            size = sd.run_path(rn.name).stat().st_size
        except (FileNotFoundError, RunDamage):
            # Its index was never written: the compaction stopped here and the journal still has the records.
            view.orphan_runs.append(sd.run_path(rn.name))
            view.findings.append(Finding(str(sd.run_path(rn.name)), 0, "run of an interrupted compaction (its "
                                         "records are still in the journal)", damage=False))
            break
        if header.first != rn.first or header.last != rn.last or size != header.data_bytes:
            view.orphan_runs.append(sd.run_path(rn.name))
            view.findings.append(Finding(str(sd.run_path(rn.name)), 0, "incomplete run of an interrupted "
                                         "compaction", damage=False))
            break
        view.runs.append(RunRef(header, sd.run_path(rn.name), listed=False))
        covered = rn.last
    for rn in files.values():
        if rn.name not in used and rn.last > covered:
            view.orphan_runs.append(sd.run_path(rn.name))
    view.next_seq = covered + 1


def _load_ref(sd: StateDir, name: str, *, listed: bool, view: StateView, expect_bytes: int | None,
              lost: tuple[int, int]) -> RunRef | None:
    path = sd.run_path(name)
    index = sd.index_path(name)
    try:
        header = runfile.read_header(index)
    except FileNotFoundError:
        view.findings.append(Finding(str(index), 0, "run index is missing", lost=None))
        return None
    except RunDamage as exc:
        view.findings.append(Finding(str(index), exc.offset, exc.problem, lost=None))
        return None
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        view.findings.append(Finding(str(path), 0, "run is missing", lost=lost))
        return None
    if header.name != name or (header.first, header.last) != lost:
        view.findings.append(Finding(str(index), 0, "run index belongs to another run"))
        return None
    if size != header.data_bytes or (expect_bytes is not None and size != expect_bytes):
        view.findings.append(Finding(str(path), min(size, header.data_bytes),
                                     f"run is {size} bytes, {header.data_bytes} expected (cut short or changed)",
                                     lost=lost))
        return None
    return RunRef(header, path, listed)


def _resolve_journal(sd: StateDir, view: StateView, visit: Visit | None) -> None:
    covered = view.next_seq - 1
    segs = sd.segments()
    live = []
    for i, (first, path) in enumerate(segs):
        nxt = segs[i + 1][0] if i + 1 < len(segs) else None
        if nxt is not None and nxt - 1 <= covered:
            view.stale_segments.append(path)  # compacted; released by the next run
            view.findings.append(Finding(str(path), 0, "segment already compacted into a run", damage=False))
        else:
            live.append((first, path))
    expected = covered + 1
    if not live:
        # The segment after the last run is created before the manifest that names the runs, and the first one
        # with the state dir: without it, whatever was written after the runs is gone.
        if view.meta is not None or view.runs:
            view.findings.append(Finding(str(sd.journal / seg_name(expected)), 0, "journal segment is missing "
                                         f"(records from seq {expected} on may be lost)", lost=(expected, expected)))
        view.next_seq = expected
        return
    last_with_data = max((i for i, (_first, path) in enumerate(live) if _size(path) > 0), default=0)
    sealed_next: int | None = None
    for i, (first, path) in enumerate(live):
        if i > last_with_data and sealed_next is None and i > 0:
            # Empty segments after an unsealed one: a rotation that stopped after creating the next segment and
            # before sealing the previous. The writer goes on in the previous one.
            view.stale_segments.append(path)
            view.findings.append(Finding(str(path), 0, "empty segment of an interrupted rotation", damage=False))
            continue
        if sealed_next is not None and first != sealed_next:
            view.findings.append(Finding(str(sd.journal / seg_name(sealed_next)), 0, "journal segment is missing "
                                         "(the one before it is sealed and names it)", lost=(sealed_next, first - 1)))
        if first > expected:
            view.findings.append(Finding(str(path), 0, f"journal records {expected}..{first - 1} are missing (a "
                                         "segment or run file was deleted?)", lost=(expected, first - 1)))
            expected = first
        ref = _scan_segment(path, first, expected, is_last=i >= last_with_data, view=view, visit=visit)
        view.segments.append(ref)
        expected = max(expected, ref.last_seq + 1)
        sealed_next = ref.sealed_next
    if sealed_next is not None:
        view.findings.append(Finding(str(sd.journal / seg_name(sealed_next)), 0, "journal segment is missing (the "
                                     "last segment is sealed and names it; records from seq "
                                     f"{sealed_next} on may be lost)", lost=(sealed_next, sealed_next)))
        expected = max(expected, sealed_next)
    view.next_seq = expected


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _scan_segment(path: Path, first: int, expected: int, *, is_last: bool, view: StateView,
                  visit: Visit | None) -> SegRef:
    """Check every record of one segment; visit the good ones. See the module doc for the torn-write rule."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    decode = records.decode
    pos = 0
    n = len(data)
    seq = expected
    sealed_next: int | None = None
    valid = 0
    while pos < n:
        nl = data.find(b"\n", pos)
        end = n if nl < 0 else nl + 1
        rec = decode(data[pos:end]) if nl >= 0 else None
        if rec is not None and rec.get("seq") == seq and sealed_next is None:
            if rec.get("k") == "seal":
                nxt = rec.get("next")
                sealed_next = nxt if isinstance(nxt, int) else None
            if visit is not None:
                visit(rec)
            seq += 1
            pos = end
            valid = pos
            continue
        if rec is not None and isinstance(rec.get("seq"), int) and rec["seq"] < seq and sealed_next is None:
            pos = end  # already covered by a run (a segment that overlaps the chain)
            valid = pos
            continue
        # A bad line at ``pos``.
        if sealed_next is not None:
            view.findings.append(Finding(str(path), pos, "records after the segment's seal"))
            break
        if _torn(data, pos, end, seq, is_last):
            view.findings.append(Finding(str(path), pos, f"torn write at the end of the journal ({n - pos} bytes "
                                         "never acknowledged; the next run truncates them)", damage=False))
            break
        after = _next_valid(data, end)
        lost_to = (after[1]["seq"] - 1) if after is not None else None
        view.findings.append(Finding(str(path), pos, "record fails its checksum (or is out of sequence) and is "
                                     "not a torn last write" + (f"; records {seq}..{lost_to} are unreadable"
                                                                 if lost_to is not None and lost_to >= seq else ""),
                                     lost=(seq, lost_to if lost_to is not None and lost_to >= seq else seq)))
        if after is None:
            break
        # Go on after the damage so every good record is seen and every damaged position reported.
        pos = after[0]
        seq = after[1]["seq"]
    return SegRef(first, path, valid, n, seq - 1, sealed_next)


def _torn(data: bytes, pos: int, end: int, seq: int, is_last: bool) -> bool:
    """Whether the bad line at ``pos`` is what a crash or power cut leaves: in the last segment, a line cut off
    at the end of the file or holding NUL bytes, with nothing after it but the rest of the same commit."""
    if not is_last:
        return False
    line = data[pos:end]
    cut = not line.endswith(b"\n")
    if not cut and b"\x00" not in line:
        return False  # a whole line with a wrong checksum: the disk changed it after it was written
    batch: int | None = None
    at = end
    while True:
        nxt = _next_valid(data, at)
        if nxt is None:
            return True
        rec = nxt[1]
        b = rec.get("b")
        if not isinstance(b, int) or b > seq:
            return False  # a later commit follows: this one was synced, so this is not a torn write
        if batch is not None and b != batch:
            return False
        batch = b
        at = nxt[2]


def _next_valid(data: bytes, start: int) -> tuple[int, dict[str, Any], int] | None:
    """The next line at or after ``start`` that is a valid record: (offset, record, end)."""
    pos = start
    n = len(data)
    while pos < n:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return None
        rec = records.decode(data[pos : nl + 1])
        if rec is not None and isinstance(rec.get("seq"), int):
            return pos, rec, nl + 1
        pos = nl + 1
    return None
