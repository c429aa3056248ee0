"""Which tasks are done, failed, retried or bad input, without holding the history in memory.

The runs answer for what they hold (each run's index finds a task by id: see ``taskindex``); the live journal's
records (at most one snapshot's worth) are kept in a dict. ``TaskStates`` is what the scheduler sees: set-like
views ``done``, ``failed`` and ``input_errors`` and an ``attempts`` mapping over both. A task's state across runs:
the newest run that decides it, unless an older one has it done (done always wins); attempts add up.

The counts (how many tasks are done, failed, bad input) are kept as records are applied, and written into each
manifest, so a start does not count the runs again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asyncraft.records import Kind, kind_of
from asyncraft.storage.taskindex import (
    BLOOM_BLOCK,
    DONE,
    FAILED,
    FILTER_LINE,
    IERR,
    NONE,
    RunTasks,
    hashes,
    merge_state,
)

MEMO_ROWS = 65_536
STATE_NAMES = {DONE: "done", FAILED: "failed", IERR: "ierr"}


@dataclass(slots=True)
class Row:
    """A task's state in the runs: the deciding entry's run (position in the chain) and place, and attempts."""

    state: int
    attempts: int
    run: int
    frame: int
    offset: int
    seq: int


def lookup(runs: Sequence[RunTasks], key: bytes) -> Row | None:
    """The state of ``key`` across ``runs`` (oldest first). The filter test is inlined: a lookup touches every
    run's filter, and a resume or an export makes one lookup per input line."""
    state, attempts, found = NONE, 0, None
    h1, mask = hashes(key)
    for i in range(len(runs) - 1, -1, -1):
        run = runs[i]
        if not run.n:
            continue
        lines, bloom, ok = run.filter_params()
        pos = (h1 % lines) * FILTER_LINE
        if not ok[pos // BLOOM_BLOCK]:
            run.check_bloom_block(pos // BLOOM_BLOCK)
        if int.from_bytes(bloom[pos : pos + FILTER_LINE], "little") & mask != mask:
            continue
        e = run.find(key)
        if e is None:
            continue
        attempts += e.attempts
        if e.state and found is None:
            found, state = (i, e), e.state
        elif e.state == DONE:
            found, state = (i, e), DONE
        if state == DONE:
            break  # a done task has no older attempts that matter
    if found is None:
        return Row(NONE, attempts, -1, 0, 0, 0) if attempts else None
    i, e = found
    return Row(state, attempts, i, e.frame, e.offset, e.seq)


@dataclass(slots=True)
class TailEntry:
    state: int = NONE
    seq: int = 0  # of the deciding record (0: none)
    where: tuple[Path, int] | None = None  # segment and byte offset of the deciding record
    attempt_seqs: list[int] = field(default_factory=list)


class TaskStates:
    """Task states of a state dir: the runs' task indexes plus the live journal.

    Records are applied as they are committed (``apply``). When a compaction has made a run of records up to
    ``seq``, ``add_run`` puts its index in and drops the live entries it now answers for, so memory stays at one
    snapshot's worth."""

    def __init__(self, runs: list[RunTasks], counts: dict[str, int] | None = None) -> None:
        self.runs = runs
        self.tail: dict[int, TailEntry] = {}
        counts = counts or {}
        self.n_done = int(counts.get("done", 0))
        self.n_failed = int(counts.get("failed", 0))
        self.n_ierr = int(counts.get("ierr", 0))
        # Rows read from the runs lately: a task is looked up when it is queued and again when its record is
        # committed. Cleared when a run is added, so it is never stale.
        self._memo: dict[int, Row | None] = {}
        self.done = _StateView(self, DONE)
        self.failed = _StateView(self, FAILED)
        self.input_errors = _StateView(self, IERR)
        self.attempts = _Attempts(self)

    def close(self) -> None:
        for run in self.runs:
            run.close()

    # -- reading ------------------------------------------------------------------------------------

    def base(self, key: int) -> Row | None:
        """The state of a task in the runs (not the live journal)."""
        if not self.runs:
            return None
        memo = self._memo
        if key in memo:
            return memo[key]
        row = lookup(self.runs, key.to_bytes(16, "big"))
        if len(memo) >= MEMO_ROWS:
            memo.clear()
        memo[key] = row
        return row

    def state(self, key: int) -> tuple[int, int]:
        """(state, attempts) of a task, from the runs and the live journal."""
        row = self.base(key)
        t = self.tail.get(key)
        base_state, base_attempts = (row.state, row.attempts) if row is not None else (NONE, 0)
        if t is None:
            return base_state, base_attempts
        return merge_state(base_state, t.state), base_attempts + len(t.attempt_seqs)

    def where(self, key: int) -> tuple[Row | None, TailEntry | None]:
        return self.base(key), self.tail.get(key)

    # -- writing (records committed, or replayed from the live journal) -------------------------------

    def apply(self, rec: dict[str, Any], where: tuple[Path, int] | None = None) -> None:
        kind = kind_of(rec)
        if kind == Kind.META:
            return
        tid = rec.get("id")
        if not isinstance(tid, str) or len(tid) != 32:
            return
        key = int(tid, 16)
        seq = int(rec.get("seq") or 0)
        t = self.tail.get(key)
        if t is None:
            t = self.tail[key] = TailEntry()
        if kind == Kind.ATTEMPT:
            t.attempt_seqs.append(seq)
            return
        row = self.base(key)
        base = row.state if row is not None else NONE
        before = merge_state(base, t.state)
        new = merge_state(t.state, int(kind))
        if new == kind:  # this record decides the task's state: remember where it is
            t.state, t.seq, t.where = new, seq, where
        self._transition(before, merge_state(base, t.state))

    def _transition(self, before: int, after: int) -> None:
        if before == after:
            return
        for state, delta in ((before, -1), (after, +1)):
            if state == DONE:
                self.n_done += delta
            elif state == FAILED:
                self.n_failed += delta
            elif state == IERR:
                self.n_ierr += delta

    def mark(self, key: int, state: int) -> None:
        """Set a state without a record (the scheduler's own bookkeeping); a no-op once the record is applied."""
        t = self.tail.get(key)
        if t is not None and merge_state(t.state, state) == t.state:
            return
        row = self.base(key)
        base = row.state if row is not None else NONE
        if t is None:
            if merge_state(base, state) == base:
                return
            t = self.tail[key] = TailEntry()
        before = merge_state(base, t.state)
        t.state = merge_state(t.state, state)
        self._transition(before, merge_state(base, t.state))

    def unmark(self, key: int, state: int) -> None:
        t = self.tail.get(key)
        if t is not None and t.state == state and t.seq == 0:
            row = self.base(key)
            base = row.state if row is not None else NONE
            before = merge_state(base, t.state)
            t.state = NONE
            self._transition(before, merge_state(base, t.state))

    def add_run(self, run: RunTasks) -> None:
        """A compaction made a run of every record up to ``run``'s last seq: look there from now on."""
        self.runs.append(run)
        self._memo.clear()
        through = run.last
        for key, t in list(self.tail.items()):
            t.attempt_seqs = [s for s in t.attempt_seqs if s > through]
            if t.seq and t.seq <= through:
                t.state, t.seq, t.where = NONE, 0, None
            if not t.seq and t.state == NONE and not t.attempt_seqs:
                del self.tail[key]

    def counts(self) -> dict[str, int]:
        return {"done": self.n_done, "failed": self.n_failed, "ierr": self.n_ierr}


def count_from_scratch(runs: Sequence[RunTasks]) -> dict[str, int]:
    """Exact counts of the task states in ``runs``, merging their sorted tasks (for a state dir whose manifest
    does not carry counts: after a salvage, a migration, or when every manifest is damaged)."""
    import heapq

    counts = {"done": 0, "failed": 0, "ierr": 0}
    streams = [((k, i, e) for k, e in run.entries()) for i, run in enumerate(runs)]
    current: bytes | None = None
    state = NONE

    def close() -> None:
        name = STATE_NAMES.get(state)
        if name is not None:
            counts[name] += 1

    for key, _i, e in heapq.merge(*streams, key=lambda x: (x[0], x[1])):
        if key != current:
            if current is not None:
                close()
            current, state = key, NONE
        state = merge_state(state, e.state)
    if current is not None:
        close()
    return counts


class _StateView:
    """A set-like view: ``key in view``, ``view.add(key)``, ``view.discard(key)``, ``len(view)``."""

    __slots__ = ("_states", "_state")

    def __init__(self, states: TaskStates, state: int) -> None:
        self._states = states
        self._state = state

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int) and self._states.state(key)[0] == self._state

    def add(self, key: int) -> None:
        self._states.mark(key, self._state)

    def discard(self, key: int) -> None:
        self._states.unmark(key, self._state)

    def __len__(self) -> int:
        s = self._states
        return {DONE: s.n_done, FAILED: s.n_failed, IERR: s.n_ierr}[self._state]

    def __iter__(self) -> Iterator[int]:
        raise TypeError("task states are kept on disk; look keys up instead of iterating")


class _Attempts:
    __slots__ = ("_states",)

    def __init__(self, states: TaskStates) -> None:
        self._states = states

    def get(self, key: int, default: int = 0) -> int:
        n = self._states.state(key)[1]
        return n if n else default

    def __getitem__(self, key: int) -> int:
        return self._states.state(key)[1]
