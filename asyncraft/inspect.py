"""Read-only views of a state dir: ``status``, ``tail``, ``verify``. Safe while a run is writing."""

from __future__ import annotations

import contextlib
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from asyncraft import records, store
from asyncraft.cost import Budget
from asyncraft.errors import ConfigError


def _require(sd: store.StateDir) -> dict[str, Any]:
    meta = sd.read_meta()
    if meta is None:
        raise ConfigError(f"{sd.root} is not an asyncraft state dir (no asyncraft.json); pass --state-dir")
    return meta


# -- status ----------------------------------------------------------------------------------------


def status(sd: store.StateDir, budget: Budget | None = None) -> dict[str, Any]:
    """Counts of a state dir; a running job's own live numbers when it is running. ``budget`` gives the prices
    for the cost estimate (a running job reports the cost at its own prices)."""
    meta = _require(sd)
    live = sd.is_locked()
    priced = budget is not None and bool(budget.price_input_per_m or budget.price_output_per_m)
    if live:
        with contextlib.suppress(FileNotFoundError, orjson.JSONDecodeError):
            snap: dict[str, Any] = orjson.loads(sd.status_path.read_bytes())
            snap["running"] = True
            snap["state_dir"] = str(sd.root)
            if snap.get("cost") is None and budget is not None and priced:
                snap["cost"] = round(budget.cost(snap.get("prompt_tokens", 0), snap.get("completion_tokens", 0)), 6)
            return snap
    rec = store.recover(sd, repair=False, check_data=False)
    total = rec.last_input.get("total") if rec.last_input else None
    done, failed = len(rec.done), len(rec.failed)
    if total is not None:
        total = max(total, done + failed)
    return {
        "state_dir": str(sd.root), "job": meta.get("job"), "running": live,
        "total": total, "done": done, "failed": failed,
        "pending": (total - done - failed) if total is not None else None,
        "input_problems": len(rec.input_errors), "calls": rec.counters.get("calls", 0),
        "prompt_tokens": rec.counters.get("prompt_tokens", 0),
        "completion_tokens": rec.counters.get("completion_tokens", 0),
        "journal_seq": rec.next_seq - 1, "input_read": rec.last_input is not None,
        "cost": (round(budget.cost(rec.counters.get("prompt_tokens", 0), rec.counters.get("completion_tokens", 0)),
                       6) if budget is not None and priced else None),
    }


def format_status(st: dict[str, Any]) -> str:
    total = st.get("total")
    lines = [
        f"state dir   {st.get('state_dir')}  ({'running' if st.get('running') else 'not running'})",
        f"job         {st.get('job')}",
        f"tasks       {st.get('done')} done, {st.get('failed')} failed, "
        + (f"{st.get('pending')} pending of {total}" if total is not None else "total not known yet "
           "(the input has not been read to the end)"),
        f"input       {st.get('input_problems', 0)} problem line(s) (see errors.jsonl)",
        f"tokens      {st.get('prompt_tokens', 0)} prompt + {st.get('completion_tokens', 0)} completion",
    ]
    cost = st.get("cost")
    if cost is not None:
        projected = st.get("cost_projected")
        lines.append(f"cost        ${cost:.4f} estimated" + (f", ${projected:.4f} projected for the whole input"
                                                          if projected is not None else ""))
    else:
        lines.append("cost        no estimate: set ASYNCRAFT_PRICE_INPUT_PER_M and ASYNCRAFT_PRICE_OUTPUT_PER_M")
    if st.get("running"):
        eta = st.get("eta_s")
        lines.append(f"live        {st.get('in_flight', 0)} in flight, {st.get('rate_per_s', 0)}/s"
                     + (f", ETA {eta:.0f}s" if eta is not None else "")
                     + (", cooling down after 429" if st.get("cooling_down") else "")
                     + (f", stopping: {st['stopping']}" if st.get("stopping") else ""))
        for name, stage in (st.get("stages") or {}).items():
            lines.append(f"  {name:<10}{stage.get('done', 0)} done, {stage.get('failed', 0)} failed, "
                         f"{stage.get('in_flight', 0)} in flight this run; tokens {stage.get('prompt_tokens', 0)}+"
                         f"{stage.get('completion_tokens', 0)}")
        if st.get("metrics_url"):
            lines.append(f"metrics     {st['metrics_url']}/metrics")
    return "\n".join(lines)


# -- tail ------------------------------------------------------------------------------------------


def describe(rec: dict[str, Any]) -> str:
    """One readable line for a record."""
    kind = rec.get("k", "?")
    head = f"#{rec.get('seq', '?'):<8} {kind:<7}"
    where = " ".join(f"{k}={rec[k]}" for k in ("line", "custom_id", "path") if k in rec)
    tid = (rec.get("id") or "")[:12]
    if kind == "done":
        usage = rec.get("usage") or {}
        text = ((rec.get("message") or {}).get("content") or "") if isinstance(rec.get("message"), dict) else ""
        text = " ".join(str(text).split())
        return (f"{head} {rec.get('stage', ''):<10} {tid}  {where}  {usage.get('prompt_tokens', 0)}+"
                f"{usage.get('completion_tokens', 0)} tok  {text[:80]!r}")
    # A rejected or failed reply's raw text is what tells why: shown after the reason.
    reply = rec.get("message")
    raw = reply.get("content") if isinstance(reply, dict) else None
    said = f"  {' '.join(raw.split())[:200]!r}" if isinstance(raw, str) else ""
    if kind == "fail":
        err = rec.get("error") or {}
        return f"{head} {rec.get('stage', ''):<10} {tid}  {where}  {err.get('type')}: {err.get('message')}{said}"
    if kind == "ierr":
        return f"{head} {rec.get('msg')}"
    if kind == "attempt":
        return f"{head} {rec.get('stage', ''):<10} {tid}  {where}  retry {rec.get('n')}: {rec.get('why')}{said}"
    rest = {k: v for k, v in rec.items() if k not in ("k", "seq", "c")}
    return f"{head} {orjson.dumps(rest).decode()[:160]}"


ERROR_KINDS = frozenset({"fail", "ierr", "attempt", "lost"})


def record_filter(stage: str | None = None, errors: bool = False) -> Callable[[dict[str, Any]], bool]:
    """Which records ``tail`` shows: one stage's, and/or only problems (failed tasks, bad input, answers the job
    rejected and asked again, records set aside by --salvage)."""

    def keep(rec: dict[str, Any]) -> bool:
        if stage is not None and rec.get("stage") != stage:
            return False
        return not errors or rec.get("k") in ERROR_KINDS

    return keep


class Follower:
    """Reads a state dir's records in sequence order, each exactly once, while a run appends, rotates and compacts.

    It remembers the last sequence number it handed out and where that record was. New records are read from
    there; when that file ends for good (a sealed segment, a run) or is gone (released after a compaction), it
    looks the next sequence number up wherever it now is. A record is handed out only if its sequence number is
    the next one, so nothing is skipped and nothing is repeated, whatever moves under it."""

    def __init__(self, sd: store.StateDir) -> None:
        self.sd = sd
        self.last = 0
        self._path: Path | None = None
        self._offset = 0  # a line boundary at or before the first record not yet handed out

    def read_all(self) -> Iterator[dict[str, Any]]:
        """Every record there is now, in order (lazily: a large state dir is not held in memory)."""
        return self._scan_iter()

    def poll(self) -> list[dict[str, Any]]:
        """The records committed since the last call (possibly none)."""
        got = self._read_current()
        if got or not self._needs_scan():
            return got
        return self._scan()

    def _take(self, rec: dict[str, Any], path: Path, offset: int) -> bool:
        seq = rec.get("seq", 0)
        if seq != self.last + 1:
            return False
        self.last = seq
        self._path, self._offset = path, offset
        return True

    def _scan(self) -> list[dict[str, Any]]:
        return list(self._scan_iter())

    def _scan_iter(self) -> Iterator[dict[str, Any]]:
        for rec, loc in store.iter_records(self.sd, after_seq=self.last):
            if rec.get("seq", 0) <= self.last:
                continue
            if not self._take(rec, loc.path, loc.offset):
                break  # a gap: the record is being moved by a compaction; look again at the next poll
            yield rec

    def _read_current(self) -> list[dict[str, Any]]:
        path = self._path
        if path is None:
            return []
        try:
            with open(path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            self._path = None
            return []
        out = []
        base = self._offset
        for pos, end in store.iter_lines(data):
            if data[end - 1 : end] != b"\n":
                break  # being written
            rec = records.decode(data[pos:end])
            if rec is None:
                self._path = None  # rewritten under us (salvage) or damaged: find the next record afresh
                break
            seq = rec.get("seq", 0)
            if seq <= self.last:
                self._offset = base + end
                continue
            if not self._take(rec, path, base + pos):
                self._path = None  # not the next record: look for it elsewhere
                break
            self._offset = base + end
            out.append(rec)
        return out

    def _needs_scan(self) -> bool:
        if self._path is None or not self._path.exists():
            return True
        segments = self.sd.segments()
        # At the end of the active segment there is nothing more to find; anywhere else the next record is in
        # another file.
        return not segments or segments[-1][1] != self._path


def tail(sd: store.StateDir, *, lines: int, follow: bool, raw: bool, stage: str | None = None,
         errors: bool = False, out: IO[str] | None = None, poll: float = 0.2,
         stop_after: float | None = None) -> int:
    """Print the last ``lines`` records (of those the filters keep), then with ``follow`` new ones as they are
    committed, across segment rotation and snapshot compaction (see ``Follower``)."""
    _require(sd)
    out = out or sys.stdout
    keep = record_filter(stage, errors)
    follower = Follower(sd)
    recent: deque[dict[str, Any]] = deque(maxlen=max(lines, 0))
    for rec in follower.read_all():
        if keep(rec):
            recent.append(rec)
    for rec in recent:
        _emit(rec, raw, out)
    out.flush()
    start = time.monotonic()
    while follow:
        if stop_after is not None and time.monotonic() - start > stop_after:
            break
        got = follower.poll()
        for rec in got:
            if keep(rec):
                _emit(rec, raw, out)
        out.flush()
        if not got:
            time.sleep(poll)
    return 0


def _emit(rec: dict[str, Any], raw: bool, out: IO[str]) -> None:
    out.write((orjson.dumps(rec).decode() if raw else describe(rec)) + "\n")


# -- verify ----------------------------------------------------------------------------------------


@dataclass
class Finding:
    path: str
    offset: int
    problem: str
    damage: bool = True

    def __str__(self) -> str:
        return f"{'DAMAGED' if self.damage else 'note'}: {self.path} at byte {self.offset}: {self.problem}"


def verify(sd: store.StateDir) -> list[Finding]:
    """Check every record checksum, sequence continuity, run indexes and snapshots."""
    _require(sd)
    found: list[Finding] = []
    newest_ok = None
    for seq, path in sd.manifests():
        m = store.read_manifest(path)
        if m is None or m.get("seq") != seq:
            found.append(Finding(str(path), 0, "snapshot manifest is damaged (recovery uses an older one and "
                                 "the runs after it)"))
        elif newest_ok is None:
            newest_ok = m
    expected = 1
    run_stems = set(newest_ok["runs"]) if newest_ok else set()
    for first, last, path in sd.run_files():
        listed = path.stem in run_stems
        ix = store.load_run(path, check_data=False)
        if ix is None:
            if listed:
                found.append(Finding(str(path), 0, "run index missing or damaged"))
            continue
        data = path.read_bytes()
        if zlib.crc32(data) != ix.data_crc:
            found.append(Finding(str(path), 0, "run data checksum mismatch"))
        for f in _check_lines(path, data, None, final=False):
            found.append(f)
        if first != expected and listed:
            found.append(Finding(str(path), 0, f"runs do not continue: expected seq {expected}, run starts at {first}"))
        expected = last + 1
    segs = sd.segments()
    for i, (first, path) in enumerate(segs):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        if first > expected:
            found.append(Finding(str(path), 0, f"records {expected}..{first - 1} are missing"))
        expected = max(expected, first)
        findings = _check_lines(path, data, expected, final=i == len(segs) - 1)
        found.extend(findings)
        for rec in _valid_records(data):
            if rec.get("seq", 0) >= expected:
                expected = rec["seq"] + 1
    return found


def _valid_records(data: bytes) -> Iterator[dict[str, Any]]:
    for pos, end in store.iter_lines(data):
        rec = records.decode(data[pos:end])
        if rec is not None:
            yield rec


def _check_lines(path: Path, data: bytes, expected: int | None, *, final: bool) -> list[Finding]:
    out: list[Finding] = []
    bad: list[int] = []
    prev = None
    for pos, end in store.iter_lines(data):
        rec = records.decode(data[pos:end]) if data[end - 1 : end] == b"\n" else None
        if rec is None:
            bad.append(pos)
            continue
        seq = rec.get("seq")
        if prev is not None and isinstance(seq, int) and seq != prev + 1:
            out.append(Finding(str(path), pos, f"sequence jumps from {prev} to {seq}"))
        if prev is None and expected is not None and isinstance(seq, int) and seq > expected:
            out.append(Finding(str(path), pos, f"records {expected}..{seq - 1} are missing"))
        prev = seq if isinstance(seq, int) else prev
        if bad:
            for b in bad:
                out.append(Finding(str(path), b, "record checksum mismatch (followed by valid records)"))
            bad = []
    if bad:
        if final and len(bad) >= 1:
            out.append(Finding(str(path), bad[0], "torn last record (an interrupted write; resume truncates it)",
                               damage=False))
        else:
            for b in bad:
                out.append(Finding(str(path), b, "record checksum mismatch"))
    return out
