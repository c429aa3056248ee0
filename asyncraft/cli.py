"""``python -m asyncraft``: argparse subcommands -> Settings -> app."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from asyncraft import __version__, config
from asyncraft.errors import (
    AsyncraftError,
    ConfigError,
    DiskFull,
    Incomplete,
    JournalError,
    StateMismatch,
    StorageIOError,
)
from asyncraft.storage import StateDir
from asyncraft.text import safe, safe_json

EPILOG = """\
Every option also reads ASYNCRAFT_<NAME> from the environment (flag > environment > default);
the API key comes from ASYNCRAFT_API_KEY or OPENAI_API_KEY (or a file named by ASYNCRAFT_API_KEY_FILE)
and is sent to every base URL: ASYNCRAFT_BASE_URL, else OPENAI_BASE_URL, else https://api.openai.com/v1.

examples:
  python -m asyncraft demo
  python -m asyncraft simulate --port 8000 --latency-ms 500 &
  ASYNCRAFT_BASE_URL=http://127.0.0.1:8000/v1 ASYNCRAFT_MODEL=sim-1 \\
      python -m asyncraft run --job prompts --input requests.jsonl --state-dir state/
  ASYNCRAFT_BASE_URL=http://127.0.0.1:8000/v1 ASYNCRAFT_MODEL=sim-1 \\
      python -m asyncraft run --job raft --input docs/ --state-dir raft-state/ --questions 5
  python -m asyncraft export --state-dir raft-state/ --format chat --out train.jsonl --split eval=0.1
  python -m asyncraft status --state-dir state/ --json
  python -m asyncraft tail -f --state-dir state/
  python -m asyncraft export --state-dir state/ --format prompts --out results.jsonl
  ASYNCRAFT_STATE_URL=s3://bucket/jobs/x python -m asyncraft run --job raft --input docs/   # state in S3
  python -m asyncraft status --state-url s3://bucket/jobs/x

exit status: 0 finished; 75 stopped before the end (signal, fatal API error, disk full, retries
left) - run the same command again to continue; 2 bad configuration; 1 damaged state or in use by another
process; 74 a write or fsync of the state failed.
"""

RUN_USAGE = "%(prog)s --input PATH [--job prompts|raft] [--state-dir DIR] [option ...]"

RUN_EPILOG = """Every option also reads ASYNCRAFT_<NAME> from the environment (flag > environment > default).
The API key comes from ASYNCRAFT_API_KEY or OPENAI_API_KEY and is never written anywhere.

examples (sample inputs in the repository's examples/ folder):
  # no server of your own yet: the built-in simulator answers like an OpenAI-compatible API
  python -m asyncraft simulate --port 8000 &
  export ASYNCRAFT_BASE_URL=http://127.0.0.1:8000/v1 ASYNCRAFT_MODEL=sim-1 ASYNCRAFT_API_KEY=any

  # the prompts job: one completion per JSONL line (OpenAI Batch API lines or bare chat bodies)
  python -m asyncraft run --job prompts --input examples/prompts.jsonl --state-dir prompts-state/
  python -m asyncraft export --state-dir prompts-state/ --format prompts --out results.jsonl

  # the RAFT job: documents -> questions per chunk -> a chain-of-thought answer per question
  python -m asyncraft run --job raft --input examples/docs/ --state-dir raft-state/ --questions 3
  python -m asyncraft export --state-dir raft-state/ --format chat --out train.jsonl --split eval=0.1

  # inside a provider's limits, with a spending cap
  python -m asyncraft run --input big.jsonl --state-dir big/ --concurrency 200 --rpm 5000 --tpm 2000000 \\
      --price-input-per-m 0.15 --price-output-per-m 0.6 --max-cost 20

  # stopped (Ctrl-C, kill -9, exit 75)? run the same command again: it goes on where it stopped
  python -m asyncraft status --state-dir prompts-state/

exit status: 0 finished; 75 stopped before the end - run the same command again to continue;
2 bad configuration; 1 damaged state or in use by another process; 74 a write or fsync of the state failed.
"""


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return safe_json(orjson.dumps({"t": round(record.created, 3), "level": record.levelname.lower(),
                                       "logger": record.name, "msg": record.getMessage()}).decode())


class _TextFormatter(logging.Formatter):
    """One line per message: control characters from input lines or servers are escaped, never obeyed."""

    def format(self, record: logging.LogRecord) -> str:
        return "asyncraft: " + safe(record.getMessage())


def _setup_logging(fmt: str, verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger("asyncraft")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    # A log line that cannot be written (stderr on a full disk, a closed pipe) is dropped, not a traceback.
    logging.raiseExceptions = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncraft", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Generate RAFT and prompt datasets through OpenAI-compatible APIs at high concurrency; "
                    "kill it at any moment and run it again - finished calls are never paid twice.")
    parser.add_argument("--version", action="version", version=f"asyncraft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str, usage: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, usage=usage, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        config.add_arguments(p, name)
        return p

    run = add("run", "run a job (resumes the state dir if it exists)", usage=RUN_USAGE, epilog=RUN_EPILOG)
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    st = add("status", "counts of a state dir (live numbers while a run is going)")
    st.add_argument("--json", action="store_true", help="print JSON")
    tl = add("tail", "print journal records readably; -f follows new ones")
    tl.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    tl.add_argument("-n", "--lines", type=int, default=10, help="records to show first (default 10)")
    tl.add_argument("--json", action="store_true", help="raw JSON records, as written to the journal")
    tl.add_argument("--stage", default=None, metavar="STAGE", help="only records of this stage (e.g. prompts)")
    tl.add_argument("--errors", action="store_true", help="only problems: failed tasks, bad input, rejected answers")
    ex = add("export", "write results as .jsonl or .parquet")
    ex.add_argument("--format", required=True, choices=["prompts", "batch", "raft", "chat", "completion", "eval"],
                    help="output layout (batch: OpenAI Batch API output lines, prompts job)")
    ex.add_argument("--out", required=True, metavar="FILE", help="output file: .jsonl or .parquet")
    ex.add_argument("--partial", action="store_true",
                    help="export although the job is not finished (prompts: unfinished lines become \"pending\" "
                         "rows; raft: the records done so far) or the state dir is damaged (what is readable; what "
                         "is missing is listed on stderr). Without it an unfinished job exits 75 and writes nothing")
    add("verify", "check every checksum of the journal, runs and snapshots; exit 1 on damage")
    demo = add("demo", "run a job end to end against the built-in simulator")
    demo.add_argument("--dir", default=None, help="where to keep the demo's files (default: a temp dir)")
    sim = sub.add_parser("simulate", help="serve the built-in OpenAI-compatible simulator",
                         description="An OpenAI-compatible server with deterministic answers, latency, faults "
                                     "and rate limits (env ASYNCRAFT_SIM_<NAME>).")
    from asyncraft import simulate

    simulate.add_arguments(sim)
    return parser


def _flags(ns: argparse.Namespace) -> dict[str, str]:
    return {o.name: getattr(ns, o.name) for o in config.OPTIONS if hasattr(ns, o.name)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    cmd = ns.command
    try:
        if cmd == "simulate":
            from asyncraft import simulate

            return simulate.main(ns)
        settings = config.load(cmd, _flags(ns))
        _setup_logging(settings.log_format, getattr(ns, "verbose", False))
        if cmd == "run":
            from asyncraft import app

            return asyncio.run(app.main(settings))
        if cmd == "demo":
            from asyncraft import demo

            return demo.main(settings, ns.dir)
        return _offline(cmd, ns, settings)
    except (ConfigError, StateMismatch) as exc:
        print(f"asyncraft: error: {exc}", file=sys.stderr)
        return 2
    except Incomplete as exc:
        print(f"asyncraft: {exc}", file=sys.stderr)
        return 75
    except DiskFull as exc:
        print(f"asyncraft: {exc}; free some space and run the same command again (nothing acknowledged was lost)",
              file=sys.stderr)
        return 75
    except StorageIOError as exc:
        print(f"asyncraft: {exc}", file=sys.stderr)
        return 74
    except JournalError as exc:  # damaged, or in use
        print(f"asyncraft: {exc}", file=sys.stderr)
        return 1
    except AsyncraftError as exc:
        print(f"asyncraft: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


def _offline(cmd: str, ns: argparse.Namespace, settings: config.Settings) -> int:
    if settings.state_url is None:
        return _read(cmd, ns, settings, StateDir(settings.state_dir))
    # --state-url: read a copy restored into a temp dir (without the lease: the owner may be running).
    from asyncraft.remote import RemoteUnavailable
    from asyncraft.remote.product import restored_copy

    if cmd == "tail" and ns.follow:
        raise ConfigError("tail --follow reads the running job's local --state-dir; with --state-url it prints "
                          "what the store holds now (drop -f)")
    try:
        with restored_copy(settings.state_url) as (sd, owner):
            return _read(cmd, ns, settings, sd, owner)
    except RemoteUnavailable as exc:
        print(f"asyncraft: {exc}; try again when the store answers", file=sys.stderr)
        return 75


def _read(cmd: str, ns: argparse.Namespace, settings: config.Settings, sd: StateDir, owner: str | None = None) -> int:
    from asyncraft import views
    from asyncraft.cost import Budget

    if cmd == "status":
        st = views.status(sd, Budget(settings.price_input_per_m, settings.price_output_per_m))
        if settings.state_url is not None:
            st["state_dir"] = settings.state_url  # not the temp copy it was read from
            st["owner"] = owner
        print(orjson.dumps(st).decode() if ns.json else views.format_status(st))
        return 1 if st.get("damaged") else 0
    if cmd == "tail":
        try:
            return views.tail(sd, lines=ns.lines, follow=ns.follow, raw=ns.json, stage=ns.stage, errors=ns.errors)
        except KeyboardInterrupt:
            return 0
    if cmd == "verify":
        findings = views.verify(sd)
        for f in findings:
            print(str(f))
        damaged = [f for f in findings if f.damage]
        print(f"verify: {'DAMAGED' if damaged else 'ok'} ({len(damaged)} damaged position(s), "
              f"{len(findings) - len(damaged)} note(s))")
        return 1 if damaged else 0
    if cmd == "export":
        from asyncraft import export

        t0 = time.perf_counter()
        written = export.export(sd, ns.format, Path(ns.out), input_override=settings.input or None,
                                settings=settings, partial=ns.partial)
        for path, counts in written:
            detail = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            print(f"wrote {sum(counts.values())} rows to {path}" + (f" ({detail})" if detail else ""),
                  file=sys.stderr)
        print(f"export took {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        return 0
    raise ConfigError(f"unknown command {cmd}")
