"""Read-only views of a state dir: ``status``, ``tail``, ``verify``. Safe while a run is writing.

All three see the state dir through the one resolver (``storage.resolve``), so they agree with ``run`` and
``export`` on what it holds and on what is damaged."""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from asyncraft import records
from asyncraft.cost import Budget
from asyncraft.errors import ConfigError, StateDamaged
from asyncraft.responses import answer_text
from asyncraft.storage import ensure_current, open_read_only, readers, runfile
from asyncraft.storage.layout import StateDir
from asyncraft.storage.recover import Recovery
from asyncraft.storage.resolve import Finding, resolve
from asyncraft.storage.taskindex import RunDamage
from asyncraft.text import safe, safe_json


def _require(sd: StateDir) -> None:
    if not sd.meta_path.exists() and not sd.journal.is_dir():
        raise ConfigError(f"{sd.root} is not an asyncraft state dir (no asyncraft.json); pass --state-dir")
    ensure_current(sd)


# -- status ----------------------------------------------------------------------------------------


def status(sd: StateDir, budget: Budget | None = None) -> dict[str, Any]:
    """Counts of a state dir; a running job's own live numbers when it is running. ``budget`` gives the prices
    for the cost estimate (a running job reports the cost at its own prices)."""
    _require(sd)
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
    try:
        rec = open_read_only(sd)
    except StateDamaged as exc:
        view = resolve(sd)
        return {"state_dir": str(sd.root), "job": (view.meta or {}).get("job"), "running": live,
                "damaged": [str(f) for f in view.damage] or [str(exc)]}
    meta = rec.view.meta or {}
    total, pending, stages = work_left(rec)
    done, failed = rec.tasks.n_done, rec.tasks.n_failed
    counters = rec.counters
    return {
        "state_dir": str(sd.root), "job": meta.get("job"), "running": live,
        "total": total, "done": done, "failed": failed, "pending": pending,
        "input_problems": rec.tasks.n_ierr, "calls": counters.get("calls", 0),
        "prompt_tokens": counters.get("prompt_tokens", 0),
        "completion_tokens": counters.get("completion_tokens", 0),
        "journal_seq": rec.next_seq - 1, "input_read": rec.last_input is not None, "stages": stages,
        **{k: v for k, v in (rec.last_input or {}).items() if k in ("shared_lines", "repeated_custom_ids")},
        "cost": (round(budget.cost(counters.get("prompt_tokens", 0), counters.get("completion_tokens", 0)),
                       6) if budget is not None and priced else None),
        "damaged": [str(f) for f in rec.view.damage],
    }


def work_left(rec: Recovery) -> tuple[int | None, int | None, dict[str, dict[str, int]]]:
    """(total, pending, per stage) of a state dir: the job's size as its run last journaled it (at the count at
    start, every few seconds, at the end), else as of the last time its input was read to the end (a state dir
    of an older version); None where it is not known. ``status`` and ``export`` both judge by this."""
    sized = rec.latest.get("totals") or rec.last_input or {}
    total = sized.get("total")
    done, failed = rec.tasks.n_done, rec.tasks.n_failed
    if total is None:
        return None, None, {}
    total = max(int(total), done + failed)
    stages = {name: {**v, "pending": max(v["total"] - v.get("done", 0) - v.get("failed", 0), 0)}
              for name, v in (sized.get("stages") or {}).items() if "done" in v}
    return total, total - done - failed, stages


def format_status(st: dict[str, Any]) -> str:
    if st.get("damaged") and st.get("done") is None:
        return "\n".join([f"state dir   {st.get('state_dir')}  (DAMAGED)", f"job         {st.get('job')}",
                          *(f"damage      {d}" for d in st["damaged"]),
                          "            run `asyncraft verify` for every position; `asyncraft run --salvage` "
                          "sets the damage aside and redoes the lost tasks"])
    total = st.get("total")
    lines = [
        f"state dir   {st.get('state_dir')}" + ("" if st.get("owner") else  # a state URL: the owner line says it
                                                f"  ({'running' if st.get('running') else 'not running'})"),
        *([f"owner       {st['owner']}"] if st.get("owner") else []),
        f"job         {st.get('job')}",
        f"tasks       {st.get('done')} done, {st.get('failed')} failed, "
        + (f"{st.get('pending')} pending of {total}" if total is not None else "total not known yet "
           "(the run stopped before its input was counted)"),
        f"input       {st.get('input_problems', 0)} problem line(s) (see errors.jsonl)"
        + (f"; {st['shared_lines']} line(s) share the answer of an earlier identical line"
           if st.get("shared_lines") else "")
        + (f"; {st['repeated_custom_ids']} line(s) repeat an earlier custom_id" if st.get("repeated_custom_ids")
           else ""),
        f"tokens      {st.get('prompt_tokens', 0)} prompt + {st.get('completion_tokens', 0)} completion",
    ]
    if st.get("damaged"):
        lines[0] += "  DAMAGED (the counts are of the records that can be read)"
        lines += [f"damage      {d}" for d in st["damaged"]]
        lines.append("            `asyncraft run --salvage` sets the damage aside and redoes exactly the lost tasks")
    cost = st.get("cost")
    if cost is not None:
        projected = st.get("cost_projected")
        lines.append(f"cost        ${cost:.4f} estimated" + (f", ${projected:.4f} projected for the whole input"
                                                          if projected is not None else ""))
    else:
        lines.append("cost        no estimate: set ASYNCRAFT_PRICE_INPUT_PER_M and ASYNCRAFT_PRICE_OUTPUT_PER_M")
    if not st.get("running"):
        for name, stage in (st.get("stages") or {}).items():
            lines.append(f"  {name:<10}{stage.get('done', 0)} done, {stage.get('failed', 0)} failed, "
                         f"{stage.get('pending', 0)} pending of {stage.get('total')}")
    if st.get("running"):
        eta = st.get("eta_s")
        lines.append(f"live        {st.get('in_flight', 0)} in flight, {st.get('rate_per_s', 0)}/s"
                     + (f", ETA {eta:.0f}s" if eta is not None else "")
                     + (", cooling down after 429" if st.get("cooling_down") else "")
                     + (f", stopping: {st['stopping']}" if st.get("stopping") else ""))
        for name, stage in (st.get("stages") or {}).items():
            of = (f"{stage['done_all'] + stage.get('failed_all', 0)} of {stage['total']} settled; "
                  if stage.get("total") is not None and "done_all" in stage else "")
            lines.append(f"  {name:<10}{of}{stage.get('done', 0)} done, {stage.get('failed', 0)} failed, "
                         f"{stage.get('in_flight', 0)} in flight this run; tokens {stage.get('prompt_tokens', 0)}+"
                         f"{stage.get('completion_tokens', 0)}")
        if st.get("metrics_url"):
            lines.append(f"metrics     {st['metrics_url']}/metrics")
    return "\n".join(safe(line) for line in lines)  # a stop reason may quote a server


# -- tail ------------------------------------------------------------------------------------------


def describe(rec: dict[str, Any]) -> str:
    """One readable line for a record; text from input lines and servers is escaped (``text.safe``)."""
    return safe(_describe(rec))


def _describe(rec: dict[str, Any]) -> str:
    kind = rec.get("k", "?")
    head = f"#{rec.get('seq', '?'):<8} {kind:<7}"
    where = " ".join(f"{k}={rec[k]}" for k in ("line", "custom_id", "path") if k in rec)
    tid = (rec.get("id") or "")[:12]
    if kind == "done":
        usage = rec.get("usage") or {}
        text = answer_text(rec)
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
    if kind == "resolved":
        return f"{head} {where or rec.get('key')}: read again and handled; the problem recorded before is resolved"
    if kind == "attempt":
        return f"{head} {rec.get('stage', ''):<10} {tid}  {where}  retry {rec.get('n')}: {rec.get('why')}{said}"
    rest = {k: v for k, v in rec.items() if k not in ("k", "seq", "c")}
    return f"{head} {orjson.dumps(rest).decode()[:160]}"


ERROR_KINDS = frozenset({"fail", "ierr", "attempt", "lost", "resolved"})


def record_filter(stage: str | None = None, errors: bool = False) -> Callable[[dict[str, Any]], bool]:
    """Which records ``tail`` shows: one stage's, and/or only problems (failed tasks, bad input, answers the job
    rejected and asked again, records set aside by --salvage, and problems resolved since)."""

    def keep(rec: dict[str, Any]) -> bool:
        if stage is not None and rec.get("stage") != stage:
            return False
        return not errors or rec.get("k") in ERROR_KINDS

    return keep


class Follower:
    """Reads a state dir's records in sequence order, each exactly once, while a run appends, rotates and compacts.

    It remembers the last sequence number it handed out and where that record was. New records are read from
    there; when that file ends for good (a sealed segment, a run) or is gone (released after a compaction), it
    asks the resolver where the next sequence number now is. A record is handed out only if its sequence number
    is the next one, so nothing is skipped and nothing is repeated, whatever moves under it."""

    def __init__(self, sd: StateDir) -> None:
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
        return list(self._scan_iter())

    def _take(self, rec: dict[str, Any]) -> bool:
        seq = rec.get("seq", 0)
        if seq != self.last + 1:
            return False
        self.last = seq
        return True

    def _scan_iter(self) -> Iterator[dict[str, Any]]:
        view = resolve(self.sd)
        try:
            for rec, loc in readers.iter_records(view, after_seq=self.last):
                if not self._take(rec):
                    break  # a gap: the record is being moved by a compaction; look again at the next poll
                self._path, self._offset = (loc.path, loc.offset) if loc.frame < 0 else (None, 0)
                yield rec
        except FileNotFoundError:
            self._path = None  # a file went away under us (compaction): the next poll looks again

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
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # being written
            rec = records.decode(data[pos : nl + 1])
            if rec is None:
                self._path = None  # rewritten under us (salvage) or damaged: find the next record afresh
                break
            if rec.get("seq", 0) <= self.last:
                self._offset = base + nl + 1
                pos = nl + 1
                continue
            if not self._take(rec):
                self._path = None  # not the next record: look for it elsewhere
                break
            self._offset = base + nl + 1
            out.append(rec)
            pos = nl + 1
        return out

    def _needs_scan(self) -> bool:
        if self._path is None or not self._path.exists():
            return True
        segments = self.sd.segments()
        # At the end of the active segment there is nothing more to find; anywhere else the next record is in
        # another file.
        return not segments or segments[-1][1] != self._path


def tail(sd: StateDir, *, lines: int, follow: bool, raw: bool, stage: str | None = None,
         errors: bool = False, out: IO[str] | None = None, poll: float = 0.2,
         stop_after: float | None = None) -> int:
    """Print the last ``lines`` records (of those the filters keep), then with ``follow`` new ones as they are
    committed, across segment rotation and snapshot compaction (see ``Follower``). Following a state dir that does
    not exist yet waits for it (a run about to start)."""
    if follow and not sd.meta_path.exists():
        sys.stderr.write(f"asyncraft: waiting for {sd.root} to appear (a run starting there)\n")
        sys.stderr.flush()
        start = time.monotonic()
        while not sd.meta_path.exists():
            if stop_after is not None and time.monotonic() - start > stop_after:
                return 0
            time.sleep(poll)
    _require(sd)
    out = out or sys.stdout
    keep = record_filter(stage, errors)
    follower = Follower(sd)
    recent: deque[dict[str, Any]] = deque(maxlen=max(lines, 0))
    for rec in follower.read_all():
        if errors and rec.get("k") == "resolved":
            # The history of problems shows those that still hold; following, a resolution is shown as it comes.
            gone = rec.get("id")
            recent = deque((r for r in recent if r.get("k") != "ierr" or r.get("id") != gone), maxlen=recent.maxlen)
            continue
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
    out.write((safe_json(orjson.dumps(rec).decode()) if raw else describe(rec)) + "\n")


# -- verify ----------------------------------------------------------------------------------------


def verify(sd: StateDir) -> list[Finding]:
    """Everything the resolver checks, then every byte of every run: index bodies, frame and record checksums,
    and the data checksum of each run file."""
    _require(sd)
    view = resolve(sd)
    found = list(view.findings)
    for ref in view.runs:
        index_path = runfile.index_path_for(ref.path)
        try:
            index = runfile.read_index(index_path)
        except RunDamage as exc:
            found.append(Finding(str(exc.path), exc.offset, exc.problem))
            continue
        try:
            with runfile.RunReader(ref.path, index, cache_frames=1) as reader:
                for _ in reader.records():
                    pass
        except RunDamage as exc:
            found.append(Finding(str(exc.path), exc.offset, exc.problem))
            continue
        if not runfile.check_data_crc(ref.path, ref.header):
            found.append(Finding(str(ref.path), 0, "run data checksum mismatch"))
    return found
