"""Composition root: ``async main(settings) -> exit status`` for ``asyncraft run``.

Order of start-up: lock the state dir, check its configuration, recover, start the writer, then
the scheduler. Order of shutdown: stop feeding, let calls in flight finish within the grace
period, then the writer commits what it holds, compacts a snapshot and exits last.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiofiles
import orjson

from asyncraft import __version__, preflight, storage
from asyncraft.config import Settings, fingerprint_settings
from asyncraft.cost import Budget
from asyncraft.endpoints import EndpointPool
from asyncraft.errors import (
    ConfigError,
    DiskFull,
    JournalError,
    StateDamaged,
    StateMismatch,
    StorageIOError,
)
from asyncraft.failpoints import Failpoints
from asyncraft.failures import FailureTally
from asyncraft.jobs.base import Job, Task
from asyncraft.journal import Journal
from asyncraft.limits import RateController
from asyncraft.metrics import HealthMonitor, Metrics
from asyncraft.progress import Reporter, RunView, StageTally
from asyncraft.provider import Completion
from asyncraft.scheduler import Scheduler
from asyncraft.storage import FS, Recovery, StateDir
from asyncraft.storage.fs import retry_on_full_disk

if TYPE_CHECKING:
    from asyncraft.remote import Attached, RemoteError, Replicator

log = logging.getLogger("asyncraft")
T = TypeVar("T")

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_IOERR = 74
EXIT_TEMPFAIL = 75  # stopped before the end; run the same command again to continue
EXIT_STATE = 1  # state damaged, or owned by another process (lock or state URL lease)
INPUT_POSITION_INTERVAL = 2.0  # seconds between records of how far the input is handled


def make_job(settings: Settings) -> Job:
    if settings.job == "prompts":
        from asyncraft.jobs.prompts import PromptsJob

        path = Path(settings.input)
        if not path.is_file():
            raise ConfigError(f"--input {settings.input}: no such file (the prompts job reads a JSONL file)")
        return PromptsJob(path, model=settings.model, extra_body=settings.extra_body, samples=settings.samples)
    if settings.job == "raft":
        from asyncraft import documents
        from asyncraft.jobs.raft import RaftJob, RaftParams

        path = Path(settings.input)
        if not path.exists():
            raise ConfigError(f"--input {settings.input}: no such file or folder (the raft job reads documents)")
        if path.is_file() and not path.name.lower().endswith(documents.SUFFIXES):
            raise ConfigError(f"--input {settings.input}: unsupported document type; the raft job reads "
                              f"{', '.join(documents.SUFFIXES)} files or a folder of them")
        return RaftJob(path, RaftParams.from_settings(settings))
    raise ConfigError(f"job {settings.job!r} is not available in this version")


def check_state(sd: StateDir, fs: FS, job: Job, settings: Settings, *, has_results: bool = True) -> dict[str, Any]:
    """Bind the state dir to the job's configuration; refuse a silent change of model or parameters.

    A state dir without results yet (say the first run stopped on an unknown model) takes the new
    configuration without asking: there is nothing to mix it with."""
    fingerprint = {**job.fingerprint(), **fingerprint_settings(settings)}
    meta = sd.read_meta()
    now = time.time()
    if meta is None:
        meta = {"format": storage.layout.FORMAT, "job": job.name, "fingerprint": fingerprint,
                "input": str(Path(settings.input).resolve()), "created": now, "history": []}
        sd.write_meta(fs, meta)
        return meta
    if meta.get("job") != job.name:
        raise StateMismatch(f"{sd.root} holds a {meta.get('job')!r} job; this run is {job.name!r}. "
                            "Use another --state-dir.")
    before = orjson.loads(orjson.dumps(meta))
    old = meta.get("fingerprint", {})
    if old != fingerprint:
        changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
        if not settings.allow_config_change and has_results:
            raise StateMismatch(
                f"{sd.root} was made with other generation settings ({detail}). Resuming would mix outputs of "
                "two configurations. Pass --allow-config-change (ASYNCRAFT_ALLOW_CONFIG_CHANGE=1) to go on "
                "with the new settings (identical requests are still not paid twice), or use a new --state-dir.")
        meta.setdefault("history", []).append({"changed": now, "fingerprint": old})
        meta["fingerprint"] = fingerprint
        log.warning("configuration changed (%s); continuing as asked", detail)
    new_input = str(Path(settings.input).resolve())
    if meta.get("input") != new_input:
        log.warning("input path changed from %s to %s (tasks are matched by content)", meta.get("input"), new_input)
        meta["input"] = new_input
    if meta != before:
        sd.write_meta(fs, meta)
    return meta


class Runner:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sd = StateDir(settings.state_dir)
        self.fs = FS(Failpoints(settings.failpoints))
        self.scheduler: Scheduler | None = None
        self.journal: Journal | None = None
        self._signals = 0
        self._grace_handle: asyncio.TimerHandle | None = None
        self._people_file_failed = False
        self.failures = FailureTally()
        self._problems: list[dict[str, Any]] = []  # what errors.jsonl shows: problems not resolved, failures
        self._resolved_in_run = False
        self.attached: Attached | None = None  # --state-url
        self.remote_error: RemoteError | None = None

    async def main(self) -> int:
        s = self.settings
        job = make_job(s)
        ensure_open_files(s.concurrency)
        try:
            await preflight.check(s)
        except preflight.Unanswered as exc:
            log.error("stopped before the first call: %s. Run the same command again once it answers.", exc)
            return EXIT_TEMPFAIL
        await self._disk_retry(self.sd.create_dirs, self.fs)
        lock_fd = self.sd.lock()
        try:
            if s.state_url is not None and not await self._attach_remote(s.state_url):
                return EXIT_TEMPFAIL
            with contextlib.suppress(StateDamaged):  # the resolver reports it (or --salvage repairs it)
                meta = self.sd.read_meta()
                if meta is not None and meta.get("job") != job.name:
                    raise StateMismatch(f"{self.sd.root} holds a {meta.get('job')!r} job; this run is "
                                        f"{job.name!r}. Use another --state-dir.")
            t0 = time.perf_counter()
            problems = self._problems

            def wants(kind: str, stage: str) -> bool:
                return kind in ("ierr", "fail", "resolved") or job.wants(kind, stage)

            def on_payload(rec: dict[str, Any]) -> None:
                if rec.get("k") in ("ierr", "fail"):
                    problems.append(_problem_line(rec))
                elif rec.get("k") == "resolved":
                    problems[:] = [p for p in problems if p.get("id") != rec.get("id")]
                if job.wants(rec.get("k", ""), rec.get("stage") or ""):
                    job.replay(rec)

            def open_state() -> Recovery:
                problems.clear()
                return storage.open_for_run(self.sd, self.fs, salvage=s.salvage, wants=wants, on_payload=on_payload)

            recovered = await self._disk_retry(open_state)
            await self._disk_retry(check_state, self.sd, self.fs, job, s,
                                   has_results=bool(len(recovered.done) or len(recovered.failed)))
            # errors.jsonl is a view for people, rebuilt from the journal at every start.
            self._write_errors_file()
            for note in recovered.notes:
                log.warning("recovery: %s", note)
            log.info("recovered %d done, %d failed up to seq %d in %.2fs", len(recovered.done),
                     len(recovered.failed), recovered.next_seq - 1, time.perf_counter() - t0)
            resume = getattr(job, "resume_from", None)
            if resume is not None:
                states = recovered.tasks

                def settled(key: int, problem: bool) -> bool:
                    if problem:
                        return key in states.input_errors
                    return key in states.done or (not s.retry_failed and key in states.failed)

                # With --retry-failed the failed tasks before the recorded position must be read again too.
                resume(recovered.latest.get("inpos"), settled, trust_position=not s.retry_failed)
            return await self._run(job, recovered)
        finally:
            if self.attached is not None and self.remote_error is None and not self._replicated:
                await self._replicate(self.attached.replicator, stopped=True)  # releases the lease
            os.close(lock_fd)

    async def _disk_retry(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Start-up writes on a full disk are retried for ASYNCRAFT_DISK_FULL_WAIT, then the run stops (75)."""
        return await retry_on_full_disk(lambda: asyncio.to_thread(fn, *args, **kwargs), self.settings.disk_full_wait)

    def _write_errors_file(self) -> None:
        self._write_people_file(self.sd.errors_path, b"".join(orjson.dumps(p) + b"\n" for p in self._problems))

    def _write_people_file(self, path: Path, data: bytes) -> None:
        """errors.jsonl and status.json are views for people, rebuilt from the journal: a full disk or an I/O
        error there is logged once and never stops the run (the journal's own writes decide that)."""
        try:
            self.fs.write_atomic(path, data, durable=False)
        except (DiskFull, StorageIOError) as exc:
            self._people_file_error(path, exc)

    def _people_file_error(self, path: Path, exc: Exception) -> None:
        if not self._people_file_failed:
            self._people_file_failed = True
            log.warning("cannot write %s (%s); it is rebuilt at the next start", path.name, exc)

    async def _run(self, job: Job, recovered: Recovery) -> int:
        s = self.settings
        limits = RateController(s.rpm, s.tpm, concurrency=s.concurrency)
        tally = StageTally()
        job_commit: Callable[[list[dict[str, Any]]], None] | None = getattr(job, "on_commit", None)

        def on_commit(batch: list[dict[str, Any]]) -> None:
            tally.on_commit(batch)
            if job_commit is not None:
                job_commit(batch)  # the job's own counts (RAFT's totals per stage)

        rep = self.attached.replicator if self.attached is not None else None
        journal = Journal(self.sd, recovered, fs=self.fs, fsync=s.fsync, fsync_interval=s.fsync_interval,
                          segment_bytes=int(s.segment_mb * (1 << 20)), snapshot_every=s.snapshot_every,
                          disk_full_wait=s.disk_full_wait, on_error=self._journal_failed, on_commit=on_commit,
                          replica=rep)
        self.journal = journal
        replicating = None
        if rep is not None:
            from asyncraft.remote.product import announce

            announce(rep, self.sd, recovered.segments)
            replicating = asyncio.create_task(self._replicate(rep), name="replicator")
        metrics = Metrics() if s.metrics_port is not None else None
        pool = EndpointPool(s.base_url, api_key=s.api_key, api_type=s.resolved_api_type(),
                            api_version=s.api_version, concurrency=s.concurrency,
                            request_timeout=s.request_timeout, connect_timeout=s.connect_timeout,
                            stall_timeout=s.stall_timeout, stream=s.stream != "off",
                            on_rate_info=limits.observe, on_status=limits.answered,
                            backoff_base=s.backoff_base, backoff_max=s.backoff_max,
                            on_call=metrics.observe_call if metrics is not None else None)

        calls = {"chat": pool.chat, "embed": pool.embed, "complete": pool.complete}

        def call(task: Task) -> Awaitable[Completion]:
            return calls[task.endpoint](task.body)

        sched = Scheduler(job, journal, call, limits, recovered, concurrency=s.concurrency,
                          rate_limit_wait=s.rate_limit_wait, max_retries=s.max_retries, backoff_base=s.backoff_base,
                          backoff_max=s.backoff_max, output_estimate=s.output_tokens_estimate,
                          retry_failed=s.retry_failed, api_key=s.api_key, on_problem=self._append_error,
                          budget=Budget(s.price_input_per_m, s.price_output_per_m, s.max_cost, s.max_tokens_total),
                          watch=s.watch, watch_interval=s.watch_interval, tally=tally)
        self.scheduler = sched
        view = RunView(s, sched, journal, tally, pool)
        health = HealthMonitor(sched, journal, writer_timeout=s.health_writer_timeout,
                               stall_timeout=s.health_stall_timeout)
        if rep is not None:
            view.replication = health.replication = rep.status
        if metrics is not None and s.metrics_port is not None:
            # Before the scheduler, so that a health check sees the whole run; stopped after the writer.
            metrics.watch(view, health)
            view.metrics_url = await metrics.start(s.metrics_host, s.metrics_port)
            log.info("metrics on %s/metrics, health on %s/healthz", view.metrics_url, view.metrics_url)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        _tune_gc()
        writer = asyncio.create_task(journal.run(), name="journal-writer")
        reporter = Reporter(view, mode=s.progress, interval=s.progress_interval, log_format=s.log_format,
                            on_snapshot=self._write_status)
        reporting = asyncio.create_task(reporter.run(), name="progress")
        started = time.time()
        tracking = asyncio.create_task(self._track_input(job, journal), name="input-position")
        try:
            async with pool:
                await sched.run()
            tracking.cancel()
            await self._record_input_position(job, journal)
            await sched.record_totals()  # what is left, for `status` of the stopped state dir
        except* JournalError:
            # The writer failed (or a record could not be handed to it): the workers and the feeder saw the same
            # error. The journal's error decides the exit status below (or the replicator's, if it failed).
            if journal.error is None and (rep is None or rep.status().state not in ("failed", "fenced")):
                raise
        finally:
            tracking.cancel()
            reporting.cancel()
            await asyncio.wait([reporting, tracking])
            if not reporting.cancelled() and reporting.exception() is not None:
                log.error("progress display failed: %r", reporting.exception())
            reporter.close()
            if self._grace_handle is not None:
                self._grace_handle.cancel()
            if journal.error is None:
                await journal.close()
            try:
                await writer
            except JournalError:
                pass
            if rep is not None and replicating is not None:
                rep.stop()  # ships what the writer's final flush left, then releases the lease
                await replicating
            if metrics is not None:
                await metrics.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        self._write_status(view.snapshot(final=True), final=True)
        if self._resolved_in_run:
            self._write_errors_file()
        return self._verdict(sched, journal, time.time() - started)

    def _verdict(self, sched: Scheduler, journal: Journal, elapsed: float) -> int:
        st = sched.stats
        for line in self.failures.lines():
            log.warning("%s", line)
        summary = (f"{len(sched.done)} done, {len(sched.failed)} failed, {st.input_problems} input problems; "
                   f"this run: {st.done} done in {elapsed:.1f}s, {st.calls.total()} calls, "
                   f"{st.prompt_tokens}+{st.completion_tokens} tokens")
        if self.remote_error is not None:
            log.error("stopped: %s. The state URL's replication failed: %s", summary, self.remote_error)
            return EXIT_USAGE if isinstance(self.remote_error, ConfigError) else EXIT_STATE
        if journal.error is not None:
            err = journal.error
            log.error("%s", err)
            log.error("stopped: %s", summary)
            if isinstance(err, DiskFull):
                log.error("free some space and run the same command again; nothing acknowledged was lost")
                return EXIT_TEMPFAIL
            log.error("the next start decides from what is on disk; nothing acknowledged is lost")
            return EXIT_IOERR
        if sched.fatal is not None:
            log.error("stopped: %s", sched.fatal)
            log.error("%s. Nothing is lost: fix the cause and run the same command again.", summary)
            return EXIT_TEMPFAIL
        if sched.stopping is not None:
            log.warning("stopped (%s): %s. Run the same command again to continue.", sched.stopping, summary)
            return EXIT_TEMPFAIL
        if not sched.done and (sched.failed or st.input_problems):
            log.error("no task succeeded: %d failed, %d bad input line(s) (see %s). %s. Fix the cause and run "
                      "again (--retry-failed asks the failed tasks again).", len(sched.failed), st.input_problems,
                      self.sd.errors_path, summary)
            return EXIT_TEMPFAIL
        if st.gave_up:
            log.warning("%d task(s) still failing after %d retries or %gs of 429s (last error: %s); they are not "
                        "marked failed. %s. Run again to retry them.", st.gave_up, self.settings.max_retries,
                        self.settings.rate_limit_wait, st.last_error, summary)
            return EXIT_TEMPFAIL
        log.info("finished: %s", summary)
        log.info("export with: python -m asyncraft export --state-dir %s --format %s --out results.jsonl",
                 self.settings.state_dir, self.settings.job)
        return EXIT_OK

    # -- state beyond the machine (--state-url; asyncraft.remote) -----------------------------------------

    _replicated = False

    async def _attach_remote(self, url: str) -> bool:
        """Take the state URL's lease and bring the local dir up to the store before recovery reads it.
        False when the store cannot be reached (exit 75: nothing was started)."""
        from asyncraft.remote import RemoteUnavailable
        from asyncraft.remote.product import attach_dir

        s = self.settings
        try:
            self.attached = await attach_dir(url, self.sd.root, durability="sync" if s.remote_durability == "sync"
                                             else "async", interval=s.remote_interval, ttl=s.remote_lease,
                                             failpoints=self.fs.fp, backoff_base=s.backoff_base,
                                             backoff_max=s.backoff_max)
        except RemoteUnavailable as exc:
            log.error("%s; run the same command again when the store answers", exc)
            return False
        a = self.attached
        where = f"; what was in the way is in {a.set_aside}" if a.set_aside is not None else ""
        log.info("state URL %s: %s as generation %d (%s durability)%s", url,
                 {"fresh": "new state", "continued": "continuing", "restored": "restored"}[a.action], a.generation,
                 s.remote_durability, where)
        return True

    async def _replicate(self, rep: Replicator, *, stopped: bool = False) -> None:
        """Run the replicator; if it fails (lease lost, bucket damaged or refused) the run stops at once."""
        from asyncraft.remote import RemoteError

        self._replicated = True
        if stopped:
            rep.stop()
        try:
            await rep.run()
        except RemoteError as exc:
            self.remote_error = exc
            log.error("replication to the state URL failed: %s", exc)
            if self.scheduler is not None:
                self.scheduler.fatal_error(exc)

    async def _track_input(self, job: Job, journal: Journal) -> None:
        """Record every few seconds how far the input is fully handled, so a resume can start reading there,
        and the job's size when it changed."""
        while True:
            await asyncio.sleep(INPUT_POSITION_INTERVAL)
            await self._record_input_position(job, journal)
            if self.scheduler is not None:
                await self.scheduler.record_totals()  # after a kill, `status` knows what was left

    async def _record_input_position(self, job: Job, journal: Journal) -> None:
        tracker = getattr(job, "tracker", None)
        if tracker is None or journal.error is not None or journal.closed:
            return
        before = tracker.position
        pos = tracker.advance()
        if pos != before:
            await journal.append(job.position_record(pos))  # type: ignore[attr-defined]

    async def _append_error(self, rec: dict[str, Any]) -> None:
        self.failures.add(rec)
        if rec.get("k") == "resolved":
            # Rewritten without the problem at the end of the run (appending is all that happens meanwhile).
            self._problems[:] = [p for p in self._problems if p.get("id") != rec.get("id")]
            self._resolved_in_run = True
            return
        self._problems.append(_problem_line(rec))
        try:
            async with aiofiles.open(self.sd.errors_path, "ab") as fh:
                await fh.write(orjson.dumps(_problem_line(rec)) + b"\n")
        except OSError as exc:
            self._people_file_error(self.sd.errors_path, exc)

    def _journal_failed(self, exc: BaseException) -> None:
        if self.scheduler is not None:
            self.scheduler.fatal_error(exc)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals > 1:
            # The journal is append-only and checksummed: stopping mid-write leaves at worst a torn
            # last record, which recovery truncates. Nothing acknowledged can be lost.
            sys.stderr.write(f"asyncraft: second {name}: exiting now\n")
            sys.stderr.flush()
            os._exit(EXIT_TEMPFAIL)
        sched = self.scheduler
        if sched is None:
            return
        grace = self.settings.grace
        log.warning("%s: finishing %d call(s) in flight (up to %gs; a second signal exits at once)", name,
                    len(sched.inflight), grace)
        sched.request_stop(f"{name} received")
        self._grace_handle = asyncio.get_running_loop().call_later(grace, sched.interrupt_inflight)

    def _write_status(self, snap: dict[str, Any], *, final: bool = False) -> dict[str, Any]:
        """status.json: the live numbers for ``asyncraft status`` (read while this run holds the lock)."""
        started = self.scheduler.stats.started if self.scheduler is not None else None
        status = {"pid": os.getpid(), "version": __version__, "updated": time.time(), "started": started,
                  "running": not final, **snap}
        summary = getattr(self.scheduler.job, "input_summary", None) if self.scheduler is not None else None
        if summary is not None:
            status.update(summary())  # repeated lines and custom_ids (the prompts job)
        self._write_people_file(self.sd.status_path, orjson.dumps(status, option=orjson.OPT_INDENT_2))
        return status


def ensure_open_files(concurrency: int) -> None:
    """Each call holds a socket and the run a few dozen files: raise the soft RLIMIT_NOFILE to what the
    concurrency needs, or refuse before any call (running out mid-run would fail calls at random)."""
    need = concurrency + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ConfigError(f"ASYNCRAFT_CONCURRENCY={concurrency} needs about {need} open files, but this process may "
                          f"open at most {hard} (`ulimit -n`); raise the limit (e.g. `ulimit -n {need}`, or "
                          "`ulimits: nofile:` in compose) or lower the concurrency")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the hot path.

    Per-call garbage (request and answer dicts, records) is acyclic and freed by reference counting,
    but it survives long enough (until its commit) to be promoted, so the default thresholds run
    full collections over every imported module and the recovered state again and again: in the
    throughput benchmark that was a third of the client's CPU. Freezing what exists at start-up
    and collecting the young generation less often keeps collection cost independent of history.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _problem_line(rec: dict[str, Any]) -> dict[str, Any]:
    """errors.jsonl line for an input problem or a failed task."""
    keep = ("k", "key", "line", "custom_id", "path", "id", "stage", "msg", "error", "message", "text", "seq")
    return {k: rec[k] for k in keep if k in rec}


async def main(settings: Settings) -> int:
    return await Runner(settings).main()
