"""Read-only views of a state dir: ``status``, ``tail``, ``verify``. Safe while a run is writing."""

from __future__ import annotations

import contextlib
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from asyncraft import records, store
from asyncraft.errors import ConfigError


def _require(sd: store.StateDir) -> dict[str, Any]:
    meta = sd.read_meta()
    if meta is None:
        raise ConfigError(f"{sd.root} is not an asyncraft state dir (no asyncraft.json); pass --state-dir")
    return meta


# -- status ----------------------------------------------------------------------------------------


def status(sd: store.StateDir) -> dict[str, Any]:
    meta = _require(sd)
    live = sd.is_locked()
    if live:
        with contextlib.suppress(FileNotFoundError, orjson.JSONDecodeError):
            snap = orjson.loads(sd.status_path.read_bytes())
            snap["running"] = True
            snap["state_dir"] = str(sd.root)
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
    if st.get("running"):
        lines.append(f"live        {st.get('in_flight', 0)} in flight, {st.get('rate_per_s', 0)}/s")
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
    if kind == "fail":
        err = rec.get("error") or {}
        return f"{head} {rec.get('stage', ''):<10} {tid}  {where}  {err.get('type')}: {err.get('message')}"
    if kind == "ierr":
        return f"{head} {rec.get('msg')}"
    if kind == "attempt":
        return f"{head} {rec.get('stage', ''):<10} {tid}  {where}  retry {rec.get('n')}: {rec.get('why')}"
    rest = {k: v for k, v in rec.items() if k not in ("k", "seq", "c")}
    return f"{head} {orjson.dumps(rest).decode()[:160]}"


def tail(sd: store.StateDir, *, lines: int, follow: bool, raw: bool, out: IO[str] | None = None,
         poll: float = 0.2, stop_after: float | None = None) -> int:
    """Print the last ``lines`` records, then (with follow) new ones as they are committed.

    Follows by sequence number, not by file: segment rotation and compaction move records
    between files, and the sequence number says exactly what was printed already."""
    _require(sd)
    out = out or sys.stdout
    last = 0
    recent: list[dict[str, Any]] = []
    for rec, _loc in store.iter_records(sd):
        recent.append(rec)
        if len(recent) > lines:
            del recent[0]
        last = max(last, rec.get("seq", 0))
    for rec in recent:
        _emit(rec, raw, out)
    out.flush()
    start = time.monotonic()
    while follow:
        if stop_after is not None and time.monotonic() - start > stop_after:
            break
        got = False
        for rec, _loc in store.iter_records(sd, after_seq=last):
            if rec.get("seq", 0) != last + 1:
                break  # not committed in order yet (or a gap being filled): wait for it
            _emit(rec, raw, out)
            last += 1
            got = True
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
