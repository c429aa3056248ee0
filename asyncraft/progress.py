"""Progress of a run: one snapshot of the numbers, shown three ways.

``RunView.snapshot()`` turns the live scheduler, journal and per-stage tallies into a plain dict (rates over a
sliding window, ETA, tokens, cost so far and projected). The same dict goes to ``status.json``, to the JSON
progress lines, to the one-line text form and to the live table, so the views cannot disagree. On a terminal
the live table (rich) is redrawn in place; off a terminal (a container's log, a file) one line is written every
``ASYNCRAFT_PROGRESS_INTERVAL`` seconds, since a redrawn display would fill a log with control codes.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from asyncraft.text import safe

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

    from asyncraft.config import Settings
    from asyncraft.endpoints import EndpointPool
    from asyncraft.journal import Journal
    from asyncraft.remote import ReplicationStatus
    from asyncraft.scheduler import Scheduler

RATE_WINDOW = 30.0  # seconds of history behind a rate: steady enough to read, quick to follow a change
LIVE_TICK = 0.5  # redraw period of the live table


@dataclass(slots=True)
class StageCounts:
    """One stage, this process only (earlier runs of the state dir are not broken down by stage)."""

    done: int = 0
    failed: int = 0
    retried: int = 0  # paid answers the job rejected and asked again
    in_flight: int = 0
    calls: int = 0  # answers received
    prompt_tokens: int = 0
    completion_tokens: int = 0


class StageTally:
    """Per-stage counts: calls and tokens as answers arrive (the scheduler counts them), results once they
    are committed (``on_commit``)."""

    __slots__ = ("stages",)

    def __init__(self) -> None:
        self.stages: dict[str, StageCounts] = {}

    def stage(self, name: str) -> StageCounts:
        counts = self.stages.get(name)
        if counts is None:
            counts = self.stages[name] = StageCounts()
        return counts

    def on_commit(self, batch: list[dict[str, Any]]) -> None:
        """The journal's commit hook: counting here shows a result as done only once it is on disk."""
        for record in batch:
            stage = record.get("stage")
            if not isinstance(stage, str):
                continue
            kind = record.get("k")
            if kind == "done":
                self.stage(stage).done += 1
            elif kind == "fail":
                self.stage(stage).failed += 1
            elif kind == "attempt":
                self.stage(stage).retried += 1


class RunView:
    """Computes snapshots of a running job. Call from the event loop thread only (it reads live state)."""

    def __init__(self, settings: Settings, sched: Scheduler, journal: Journal, tally: StageTally,
                 pool: EndpointPool | None = None, *, clock: Callable[[], float] = time.monotonic,
                 window: float = RATE_WINDOW) -> None:
        self.settings = settings
        self.sched = sched
        self.journal = journal
        self.tally = tally
        self.pool = pool
        self.metrics_url: str | None = None
        self.replication: Callable[[], ReplicationStatus] | None = None  # --state-url
        self._clock = clock
        self._window = window
        self.started = clock()
        # (time, finished this run, tokens this run, {stage: (finished, tokens)})
        self._samples: deque[tuple[float, int, int, dict[str, tuple[int, int]]]] = deque()
        self._samples.append((self.started, 0, 0, {}))

    def snapshot(self, *, final: bool = False) -> dict[str, Any]:
        sched, journal, st = self.sched, self.journal, self.sched.stats
        now = self._clock()
        finished_run = st.done + st.failed
        tokens_run = st.prompt_tokens + st.completion_tokens
        marks = {name: (c.done + c.failed, c.prompt_tokens + c.completion_tokens)
                 for name, c in self.tally.stages.items()}
        samples = self._samples
        samples.append((now, finished_run, tokens_run, marks))
        while len(samples) > 2 and now - samples[1][0] >= self._window:
            samples.popleft()
        t0, finished0, tokens0, marks0 = samples[0]
        dt = max(now - t0, 1e-9)
        rate = (finished_run - finished0) / dt
        tokens_rate = (tokens_run - tokens0) / dt

        done, failed = len(sched.done), len(sched.failed)
        total, expected = sched.expected()
        pending = total - done - failed if total is not None else None
        eta = None
        if pending is not None:
            eta = 0.0 if pending == 0 else (pending / rate if rate > 0 else None)

        budget = sched.budget
        prompt_tokens, completion_tokens = sched.tokens_used()
        priced = bool(budget.price_input_per_m or budget.price_output_per_m)
        cost = budget.cost(prompt_tokens, completion_tokens) if priced else None
        projected = None
        if cost is not None and pending is not None:
            if finished_run:
                per_task: float | None = budget.cost(st.prompt_tokens, st.completion_tokens) / finished_run
            else:
                per_task = cost / (done + failed) if done + failed else None
            if per_task is not None:
                projected = cost + pending * per_task

        stages: dict[str, dict[str, Any]] = {}
        for name in [*expected, *(n for n in self.tally.stages if n not in expected)]:
            c = self.tally.stage(name)
            f0, k0 = marks0.get(name, (0, 0))
            f1, k1 = marks.get(name, (0, 0))
            stages[name] = {
                **{f"{k}_all": v for k, v in expected.get(name, {}).items() if k != "total"},
                "total": expected.get(name, {}).get("total"),
                "done": c.done, "failed": c.failed, "retried": c.retried, "in_flight": c.in_flight,
                "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "rate_per_s": round((f1 - f0) / dt, 2), "tokens_per_s": round((k1 - k0) / dt, 1),
                "cost": (round(budget.cost(c.prompt_tokens, c.completion_tokens), 6) if priced else None),
            }
        snap: dict[str, Any] = {
            "job": self.settings.job, "elapsed_s": round(now - self.started, 1),
            "total": total, "done": done, "failed": failed, "pending": pending,
            "in_flight": len(sched.inflight), "queued": sched.queued(), "input_problems": st.input_problems,
            "done_this_run": st.done, "failed_this_run": st.failed,
            "rate_per_s": round(rate, 2), "eta_s": round(eta, 1) if eta is not None else None,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "prompt_tokens_this_run": st.prompt_tokens, "completion_tokens_this_run": st.completion_tokens,
            "tokens_per_s": round(tokens_rate, 1),
            "cost": round(cost, 6) if cost is not None else None,
            "cost_projected": round(projected, 6) if projected is not None else None,
            "calls": dict(st.calls), "retries": st.retries, "gave_up": st.gave_up,
            "cooling_down": False if final else sched.limits.cooling_down(),
            "waiting_for": None if final else sched.waiting_for(),
            "last_error": st.last_error or None,
            "stopping": sched.stopping, "journal_seq": journal.next_seq - 1, "stages": stages,
        }
        if self.pool is not None and len(self.pool.endpoints) > 1:
            snap["endpoints"] = self.pool.describe()
        if self.metrics_url:
            snap["metrics_url"] = self.metrics_url
        if self.replication is not None:
            snap["replication"] = replication_snapshot(self.replication())
        return snap


def replication_snapshot(rs: ReplicationStatus) -> dict[str, Any]:
    """The state URL's replication, for status.json, the progress line and /metrics."""
    return {"state": rs.state, "durability": rs.durability, "generation": rs.generation,
            "lag_records": rs.lag_records, "lag_s": round(rs.lag_seconds, 3),
            "unreachable_since": rs.unreachable_since, "healthy": rs.healthy, "line": rs.describe()}


# -- rendering --------------------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def fmt_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.1f}"


def fmt_money(value: float | None) -> str:
    if value is None:
        return "?"
    return f"${value:.4f}" if value < 1 else f"${value:,.2f}"


def _state_note(snap: dict[str, Any]) -> str:
    notes = []
    errors = {k: v for k, v in (snap.get("calls") or {}).items() if k != "ok"}
    if errors:
        last = snap.get("last_error") or ""
        last = last if len(last) <= 160 else last[:157] + "..."
        notes.append("errors " + " ".join(f"{k}x{v}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1]))
                     + (f" (last: {last})" if last else ""))
    if snap.get("waiting_for"):
        notes.append(f"waiting: {snap['waiting_for']}")
    if snap.get("stopping"):
        notes.append(f"stopping: {snap['stopping']}")
    return ", ".join(notes)


def format_line(snap: dict[str, Any]) -> str:
    """The one-line form for logs: overall numbers, then each stage's numbers for this run."""
    total = snap["total"]
    finished = snap["done"] + snap["failed"]
    head = f"{snap['done']}/{total if total is not None else '?'} done"
    if total:
        head += f" ({100.0 * finished / total:.1f}%)"
    parts = [f"progress {head}, {snap['failed']} failed, {snap['in_flight']} in flight, "
             f"{snap['rate_per_s']:.1f}/s, ETA {fmt_duration(snap['eta_s'])}",
             f"tokens {snap['prompt_tokens']}+{snap['completion_tokens']} ({fmt_count(snap['tokens_per_s'])}/s)"]
    if snap["cost"] is not None:
        parts.append(f"cost {fmt_money(snap['cost'])} (projected {fmt_money(snap['cost_projected'])})")
    stages = snap.get("stages") or {}
    if stages:
        parts.append("; ".join(f"{name} {_stage_total(s)}+{s['done']} done {s['rate_per_s']:.1f}/s "
                               f"{s['in_flight']} in flight" for name, s in stages.items()))
    note = _state_note(snap)
    if note:
        parts.append(note)
    if "replication" in snap:
        parts.append(snap["replication"]["line"])
    # The last error and the stop reason are a server's words: shown, never obeyed by the terminal.
    return "asyncraft: " + safe(" | ".join(parts))


def _stage_of(s: dict[str, Any]) -> str | None:
    """A stage's tasks settled in all runs of those expected ("12/40"), or just those expected ("40"), where the
    job knows them."""
    if s.get("total") is None:
        return None
    if "done_all" in s:
        return f"{s['done_all'] + s.get('failed_all', 0)}/{s['total']}"
    return str(s["total"])


def _stage_total(s: dict[str, Any]) -> str:
    of = _stage_of(s)
    return "" if of is None else (f"{of}, " if "/" in of else f"of {of}, ")


def format_json(snap: dict[str, Any]) -> str:
    return orjson.dumps({"t": round(time.time(), 3), "event": "progress", **snap}).decode()


def render_table(snap: dict[str, Any]) -> RenderableType:
    """The live display: an overall bar with ETA and cost, then one row per stage."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    total = snap["total"]
    finished = snap["done"] + snap["failed"]
    priced = snap["cost"] is not None
    top = Table.grid(padding=(0, 1))
    top.add_row(
        Text(f"asyncraft {snap['job']}", style="bold"),
        ProgressBar(total=float(total) if total else None, completed=float(finished), width=24),
        Text(f"{snap['done']}/{total if total is not None else '?'} done"),
        Text(f"ETA {fmt_duration(snap['eta_s'])}", style="bold cyan"),
    )
    status = Text(f"{snap['failed']} failed, {snap['in_flight']} in flight, {snap['queued']} queued, "
                  f"{snap['rate_per_s']:.1f}/s, elapsed {fmt_duration(snap['elapsed_s'])}", style="dim")
    table = Table(box=None, padding=(0, 1), show_edge=False, header_style="bold")
    columns = ["stage", "total", "done", "failed", "retried", "flying", "/s", "tok/s", "in+out"]
    for col in columns + (["cost"] if priced else []):
        table.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    for name, s in (snap.get("stages") or {}).items():
        row = [name, _stage_of(s) or "?", str(s["done"]), str(s["failed"]), str(s["retried"]), str(s["in_flight"]),
               f"{s['rate_per_s']:.1f}", fmt_count(s["tokens_per_s"]),
               f"{fmt_count(s['prompt_tokens'])}+{fmt_count(s['completion_tokens'])}"]
        table.add_row(*row, *([fmt_money(s["cost"])] if priced else []))
    if len(snap.get("stages") or {}) > 1:
        table.add_row(Text("all", style="bold"), "", str(snap["done_this_run"]), str(snap["failed_this_run"]), "",
                      str(snap["in_flight"]), f"{snap['rate_per_s']:.1f}", fmt_count(snap["tokens_per_s"]),
                      f"{fmt_count(snap['prompt_tokens_this_run'])}+"
                      f"{fmt_count(snap['completion_tokens_this_run'])}", *([""] if priced else []))
    foot = f"state dir: {fmt_count(snap['prompt_tokens'])}+{fmt_count(snap['completion_tokens'])} tokens"
    if priced:
        foot = (f"cost {fmt_money(snap['cost'])} so far, projected {fmt_money(snap['cost_projected'])}; " + foot)
    else:
        foot += " (no cost estimate: ASYNCRAFT_PRICE_INPUT_PER_M / _OUTPUT_PER_M not set)"
    parts: list[RenderableType] = [top, status, table, Text(foot, style="dim")]
    endpoints = snap.get("endpoints")
    if endpoints:
        parts.append(Text("endpoints: " + ", ".join(
            f"{e['endpoint']} {'up' if e['up'] else 'backed off'} ({e['in_flight']} in flight)" for e in endpoints),
            style="dim"))
    note = _state_note(snap)
    if note:
        parts.append(Text(safe(note), style="yellow"))
    rep = snap.get("replication")
    if rep is not None:
        parts.append(Text(rep["line"], style="dim" if rep["healthy"] else "yellow"))
    return Group(*parts)


# -- the reporter task ------------------------------------------------------------------------------


class _ConsoleStream(io.TextIOBase):
    """A stream for log handlers while the live table is shown: lines are printed above the table."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self._console = console
        self._buf = ""

    def write(self, text: str) -> int:
        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self._console.print(line, markup=False, highlight=False, soft_wrap=True)
        return len(text)


class Reporter:
    """Writes status.json every interval and shows progress: live table, lines, or nothing."""

    def __init__(self, view: RunView, *, mode: str = "auto", interval: float = 5.0, log_format: str = "text",
                 on_snapshot: Callable[[dict[str, Any]], object] | None = None, stream: TextIO | None = None) -> None:
        self.view = view
        self.stream = stream or sys.stderr
        tty = _isatty(self.stream)
        if mode == "auto":
            mode = "live" if tty and log_format == "text" else "lines"
        elif mode == "live" and not tty:
            mode = "lines"  # a redrawn table needs a terminal
        self.mode = mode
        self.interval = interval
        self.log_format = log_format
        self.on_snapshot = on_snapshot
        self._live: Live | None = None
        self._swapped: list[tuple[logging.StreamHandler[Any], Any]] = []

    async def run(self) -> None:
        if self.mode == "live":
            await self._run_live()
            return
        while True:
            await asyncio.sleep(self.interval)
            snap = self.view.snapshot()
            if self.on_snapshot is not None:
                self.on_snapshot(snap)
            if self.mode == "lines":
                self.stream.write((format_json(snap) if self.log_format == "json" else format_line(snap)) + "\n")
                self.stream.flush()

    async def _run_live(self) -> None:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.stream)
        self._live = Live(render_table(self.view.snapshot()), console=console, auto_refresh=False,
                          redirect_stdout=False, redirect_stderr=False)
        self._live.start(refresh=True)
        # A second Ctrl-C ends the process with os._exit, past any cleanup: never leave the cursor hidden.
        console.show_cursor(True)
        self._swap_log_streams(console)
        tick = min(LIVE_TICK, self.interval)
        since_status = 0.0
        while True:
            await asyncio.sleep(tick)
            snap = self.view.snapshot()
            self._live.update(render_table(snap), refresh=True)
            since_status += tick
            if since_status >= self.interval and self.on_snapshot is not None:
                since_status = 0.0
                self.on_snapshot(snap)

    def close(self) -> None:
        """Leave the last table on screen and give the log handlers their stream back."""
        if self._live is not None:
            self._live.update(render_table(self.view.snapshot(final=True)), refresh=True)
            self._live.stop()
            self._live = None
        for handler, stream in self._swapped:
            handler.setStream(stream)
        self._swapped = []

    def _swap_log_streams(self, console: Console) -> None:
        proxy = _ConsoleStream(console)
        for handler in logging.getLogger("asyncraft").handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self.stream:
                self._swapped.append((handler, handler.setStream(proxy)))


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
