"""Which tasks are done, failed, retried or bad input: kept on disk, so a restart does not grow with history.

The truth is the journal and the runs. ``TaskCache`` is a derived index of the runs in a SQLite file
(``cache/tasks.sqlite``): one row per task with its state, the number of rejected attempts and where its
deciding record is. SQLite because it answers a lookup in a B-tree whatever the number of runs, it is in the
standard library, and in WAL mode a crash or power cut leaves it consistent (at worst behind). It is brought up
to date from the runs' indexes at every start and after every compaction; when it is missing, behind, or names
other runs (after ``--salvage``), it is caught up or rebuilt, never trusted over the runs.

``TaskStates`` is what the scheduler sees: the cache plus the records of the live journal (at most one
snapshot's worth, in memory), with set-like views ``done``, ``failed`` and ``input_errors`` and an ``attempts``
mapping.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from asyncraft.records import Kind, kind_of
from asyncraft.storage.runfile import ZERO_ID, RunIndex

NONE, DONE, FAILED, IERR = 0, int(Kind.DONE), int(Kind.FAIL), int(Kind.IERR)
_LOOKUP_CHUNK = 500
MEMO_ROWS = 65_536
SCHEMA_VERSION = 1


def merge_state(old: int, new: int) -> int:
    """Done beats everything; a failure beats an input problem and nothing; an input problem only fills nothing."""
    if old == DONE or new == DONE:
        return DONE
    if old == FAILED or new == FAILED:
        return FAILED
    return old or new


@dataclass(slots=True)
class Row:
    state: int
    attempts: int
    last_attempt: int  # seq of the newest attempt counted
    run: int  # position of the run in the chain (-1: a journal segment)
    frame: int
    offset: int
    seq: int  # seq of the deciding record (0: none)


class TaskCache:
    """The SQLite index of the runs. One instance per thread (a connection is not shared across threads)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._create()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, *, readonly: bool = False) -> TaskCache | None:
        """Open (or, writable, create) the cache; None when it cannot be used (then it is rebuilt or skipped)."""
        try:
            cache = cls(path, readonly=readonly)
            cache.chain()
            return cache
        except sqlite3.Error:
            if readonly:
                return None
        # Not a usable SQLite file (damaged, or written by something else): it is derived, so start afresh.
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(str(path) + suffix).unlink()
        try:
            return cls(path)
        except sqlite3.Error:
            return None

    def _create(self) -> None:
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS tasks (
                id BLOB PRIMARY KEY, state INTEGER NOT NULL, attempts INTEGER NOT NULL,
                last_attempt INTEGER NOT NULL, run INTEGER NOT NULL, frame INTEGER NOT NULL,
                off INTEGER NOT NULL, seq INTEGER NOT NULL
            ) WITHOUT ROWID;
        """)
        got = self._db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
        if got is None or int(got[0]) != SCHEMA_VERSION:
            self._db.execute("DELETE FROM tasks")
            self._db.execute("DELETE FROM meta")
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    # -- what it covers -----------------------------------------------------------------------------

    def _meta(self, key: str, default: Any) -> Any:
        got = self._db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return orjson.loads(got[0]) if got is not None else default

    def chain(self) -> list[str]:
        """Names of the runs the cache holds, in order."""
        value: list[str] = self._meta("chain", [])
        return value

    def counts(self) -> dict[str, int]:
        value: dict[str, int] = self._meta("counts", {"done": 0, "failed": 0, "ierr": 0})
        return value

    def reset(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("DELETE FROM tasks")
        self._db.execute("DELETE FROM meta WHERE k != 'schema'")
        self._db.execute("COMMIT")

    # -- lookups ------------------------------------------------------------------------------------

    def get(self, key: bytes) -> Row | None:
        with self._lock:
            got = self._db.execute("SELECT state, attempts, last_attempt, run, frame, off, seq FROM tasks "
                                   "WHERE id = ?", (key,)).fetchone()
        return Row(*got) if got is not None else None

    def get_many(self, keys: Iterable[bytes]) -> dict[bytes, Row]:
        out: dict[bytes, Row] = {}
        batch = list(keys)
        with self._lock:
            for i in range(0, len(batch), _LOOKUP_CHUNK):
                part = batch[i : i + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(part))
                for row in self._db.execute("SELECT id, state, attempts, last_attempt, run, frame, off, seq FROM "
                                            f"tasks WHERE id IN ({marks})", part):
                    out[row[0]] = Row(*row[1:])
        return out

    # -- applying a run -----------------------------------------------------------------------------

    def apply_run(self, position: int, index: RunIndex) -> None:
        """Add one run (the next in the chain) in one transaction."""
        first = index.header.first
        effects: dict[bytes, Row] = {}
        for i, (tid, kind, _stage, frame, offset) in enumerate(index.iter_entries()):
            if tid == ZERO_ID or kind == Kind.META:
                continue
            seq = first + i
            e = effects.get(tid)
            if e is None:
                e = effects[tid] = Row(NONE, 0, 0, position, 0, 0, 0)
            if kind == Kind.ATTEMPT:
                e.attempts += 1
                e.last_attempt = seq
                continue
            new = merge_state(e.state, kind)
            if new == kind:  # this record decides the task's state: remember where it is
                e.state, e.frame, e.offset, e.seq = new, frame, offset, seq
        counts = self.counts()
        rows = []
        old_rows = self.get_many(effects)
        for key, e in effects.items():
            old = old_rows.get(key)
            if old is None:
                merged = e
            else:
                state = merge_state(old.state, e.state)
                takes_new = e.seq and (state == e.state)
                merged = Row(state, old.attempts + e.attempts, max(old.last_attempt, e.last_attempt),
                             e.run if takes_new else old.run, e.frame if takes_new else old.frame,
                             e.offset if takes_new else old.offset, e.seq if takes_new else old.seq)
                _count(counts, old.state, -1)
            _count(counts, merged.state, +1)
            rows.append((key, merged.state, merged.attempts, merged.last_attempt, merged.run, merged.frame,
                         merged.offset, merged.seq))
        chain = self.chain()
        if len(chain) != position:
            raise ValueError(f"the cache holds {len(chain)} runs; run {position} cannot be added")
        chain.append(index.header.name)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('chain', ?)", (orjson.dumps(chain).decode(),))
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('counts', ?)", (orjson.dumps(counts).decode(),))
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('covered', ?)", (str(index.header.last),))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise


def _count(counts: dict[str, int], state: int, delta: int) -> None:
    name = {DONE: "done", FAILED: "failed", IERR: "ierr"}.get(state)
    if name is not None:
        counts[name] = counts.get(name, 0) + delta


# -- the scheduler's view ---------------------------------------------------------------------------------


@dataclass(slots=True)
class TailEntry:
    state: int
    attempts: int
    last_attempt: int
    seq: int  # of the deciding record (0: none)
    where: tuple[Path, int] | None  # segment and byte offset of the deciding record


class TaskStates:
    """Task states of a state dir: the cache for the runs, a dict for the live journal (bounded by compaction).

    Records are applied as they are committed (``apply``); after a compaction has reached the cache,
    ``forget_through(seq)`` drops what the cache now holds, so memory stays at one snapshot's worth."""

    def __init__(self, cache: TaskCache | None, overlay: dict[bytes, Row] | None = None,
                 base_counts: dict[str, int] | None = None) -> None:
        self.cache = cache
        self._overlay = overlay or {}  # runs the cache could not hold (read-only use while a run is writing)
        self.tail: dict[int, TailEntry] = {}
        # Rows read from the cache lately: a task is looked up when it is queued and again when its record is
        # committed. Cleared when the cache changes (after a compaction), so it is never stale.
        self._memo: dict[int, Row | None] = {}
        self._cache_rows = cache is not None and bool(cache.chain())
        counts = dict(base_counts if base_counts is not None else (cache.counts() if cache else {}))
        self.n_done = counts.get("done", 0)
        self.n_failed = counts.get("failed", 0)
        self.n_ierr = counts.get("ierr", 0)
        self.done = _StateView(self, DONE)
        self.failed = _StateView(self, FAILED)
        self.input_errors = _StateView(self, IERR)
        self.attempts = _Attempts(self)

    # -- reading ------------------------------------------------------------------------------------

    def base(self, key: int) -> Row | None:
        """The state of a task in the runs (not the live journal)."""
        if not self._cache_rows and not self._overlay:
            return None
        memo = self._memo
        if key in memo:
            return memo[key]
        b = key.to_bytes(16, "big")
        row = self._overlay.get(b)
        if row is None and self.cache is not None and self._cache_rows:
            row = self.cache.get(b)
        if len(memo) >= MEMO_ROWS:
            memo.clear()
        memo[key] = row
        return row

    def state(self, key: int) -> tuple[int, int]:
        """(state, attempts) of a task, from the runs and the live journal."""
        row = self.base(key)
        t = self.tail.get(key)
        if t is None:
            return (row.state, row.attempts) if row is not None else (NONE, 0)
        if row is None:
            return t.state, t.attempts
        extra = t.attempts if t.last_attempt > row.last_attempt else 0
        return merge_state(row.state, t.state), row.attempts + extra

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
            t = self.tail[key] = TailEntry(NONE, 0, 0, 0, None)
        if kind == Kind.ATTEMPT:
            t.attempts += 1
            t.last_attempt = seq
            return
        row = self.base(key)
        base = row.state if row is not None else NONE
        before = merge_state(base, t.state)
        new = merge_state(t.state, int(kind))
        if new == kind:  # this record decides the task's state: remember where it is
            t.state, t.seq, t.where = new, seq, where
        self._transition(before, merge_state(base, t.state))

    def _merged_state(self, key: int, t: TailEntry) -> int:
        row = self.base(key)
        return merge_state(row.state if row is not None else NONE, t.state)

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
        if t is None:
            t = self.tail[key] = TailEntry(NONE, 0, 0, 0, None)
        before = self._merged_state(key, t)
        t.state = merge_state(t.state, state)
        self._transition(before, self._merged_state(key, t))

    def unmark(self, key: int, state: int) -> None:
        t = self.tail.get(key)
        if t is not None and t.state == state and t.seq == 0:
            before = self._merged_state(key, t)
            t.state = NONE
            self._transition(before, self._merged_state(key, t))

    def forget_through(self, seq: int) -> None:
        """The cache now holds every record up to ``seq``: drop live entries it covers."""
        self._memo.clear()
        self._cache_rows = True
        stale = [k for k, t in self.tail.items() if t.seq and t.seq <= seq and t.last_attempt <= seq]
        for k in stale:
            del self.tail[k]
        for k, t in list(self.tail.items()):
            if not t.seq and t.state == NONE and t.last_attempt and t.last_attempt <= seq:
                del self.tail[k]

    def counts(self) -> dict[str, int]:
        return {"done": self.n_done, "failed": self.n_failed, "ierr": self.n_ierr}


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
